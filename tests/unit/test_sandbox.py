"""Unit tests of the locked-down container spec."""

from __future__ import annotations

from pathlib import Path

from warmpod.sandbox.sandbox import AGENT_CAPS, container_spec
from warmpod.settings import LimitSettings

LIMITS = LimitSettings(memory_mb=256, pids=64, cpus=0.5, tmpfs_mb=32, cpu_time=5)


def spec(*, cgroups: bool, userns: bool = False) -> dict[str, object]:
    return container_spec(
        image="img",
        seccomp_profile=Path("/p/seccomp.json"),
        name="warmpod-x-1",
        labels={"a": "b"},
        agent_dir=Path("/s/warmpod-x-1"),
        limits=LIMITS,
        cgroup_limits=cgroups,
        userns=userns,
    )


def test_spec_closes_every_door() -> None:
    """No network, read-only root, all capabilities dropped but the agent's, no new privileges, seccomp."""
    s = spec(cgroups=True)
    assert s["netns"] == {"nsmode": "none"}
    assert s["read_only_filesystem"] is True
    assert s["cap_drop"] == ["ALL"]
    assert s["cap_add"] == AGENT_CAPS
    assert s["no_new_privileges"] is True
    assert s["seccomp_profile_path"] == "/p/seccomp.json"
    assert s["env_host"] is False
    assert s["ipcns"] == {"nsmode": "private"}


def test_every_namespace_is_pinned() -> None:
    """pid, uts, ipc, net and cgroup namespaces are named in the spec, so no engine default loosens them."""
    s = spec(cgroups=True)
    assert {key: s[key] for key in ("pidns", "utsns", "ipcns", "netns", "cgroupns")} == {
        "pidns": {"nsmode": "private"},
        "utsns": {"nsmode": "private"},
        "ipcns": {"nsmode": "private"},
        "netns": {"nsmode": "none"},
        "cgroupns": {"nsmode": "private"},
    }


def test_writable_mounts_are_small_noexec_tmpfs() -> None:
    """/work and /tmp are size-limited noexec tmpfs; the agent directory is the only bind mount."""
    mounts = {m["destination"]: m for m in spec(cgroups=True)["mounts"]}  # type: ignore[attr-defined]
    for path in ("/work", "/tmp"):
        assert mounts[path]["type"] == "tmpfs"
        assert {"noexec", "nosuid", "nodev", "size=32m"} <= set(mounts[path]["options"])
    assert mounts["/run/warmpod"]["source"] == "/s/warmpod-x-1"


def test_cgroup_limits_with_swap_capped() -> None:
    """With cgroups, memory and swap are the same value, and pids and CPU quota are set."""
    limits = spec(cgroups=True)["resource_limits"]
    assert limits == {
        "memory": {"limit": 256 * 2**20, "swap": 256 * 2**20},
        "pids": {"limit": 64},
        "cpu": {"quota": 50_000, "period": 100_000},
    }


def test_rlimit_fallbacks_without_cgroups() -> None:
    """Without cgroups, memory falls back to RLIMIT_AS and processes to RLIMIT_NPROC."""
    s = spec(cgroups=False)
    assert "resource_limits" not in s
    assert s["env"]["WARMPOD_AS_BYTES"] == str(256 * 2**20)  # type: ignore[index]
    # The agent must not read the host-wide counters of a cgroup that is not the container's.
    assert s["env"]["WARMPOD_CGROUP_COUNTERS"] == "0"  # type: ignore[index]
    assert "WARMPOD_CGROUP_COUNTERS" not in spec(cgroups=True)["env"]  # type: ignore[operator]
    nproc = [r for r in s["r_limits"] if r["type"] == "nproc"]  # type: ignore[attr-defined]
    assert nproc == [{"type": "nproc", "soft": 64, "hard": 64}]


def test_a_user_namespace_of_its_own_maps_the_program_and_owns_the_agent_directory() -> None:
    """userns=auto with room for uid 65534, and the agent directory chowned to the container's root."""
    s = spec(cgroups=True, userns=True)
    assert s["userns"] == {"nsmode": "auto", "value": "size=65536"}
    assert s["idmappings"] == {"AutoUserNs": True, "AutoUserNsOpts": {"Size": 65536}}
    mounts = {m["destination"]: m for m in s["mounts"]}  # type: ignore[attr-defined]
    assert "U" in mounts["/run/warmpod"]["options"]
    plain = spec(cgroups=True)
    assert "userns" not in plain
    assert "idmappings" not in plain
    assert "U" not in {m["destination"]: m for m in plain["mounts"]}["/run/warmpod"]["options"]  # type: ignore[attr-defined]
