"""`warmpod doctor` on hosts this machine is not: what it says, from a faked `podman info`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from warmpod.errors import EngineError
from warmpod.host import doctor as doctor_command
from warmpod.host import facts as host
from warmpod.host.podman_api import EngineInfo
from warmpod.settings import Settings, from_env


def podman_info(*, rootless: bool, cgroup: str, controllers: list[str]) -> dict[str, Any]:
    """A `podman info --format json` document (Podman's ``GET /info``) with only what doctor reads."""
    return {
        "host": {
            "security": {"rootless": rootless},
            "cgroupVersion": cgroup,
            "cgroupManager": "systemd",
            "cgroupControllers": controllers,
            "ociRuntime": {"name": "crun", "version": "crun version 1.21"},
        },
        "version": {"Version": "5.4.2"},
    }


def doctor(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], info: dict[str, Any]
) -> tuple[int, str]:
    """Run doctor against an engine that answers ``info`` and return its exit status and output."""

    async def engine_info(settings: Settings) -> EngineInfo:
        return EngineInfo.from_podman(info)

    monkeypatch.setattr(doctor_command, "engine_info", engine_info)
    status = doctor_command.main(from_env())
    return status, capsys.readouterr().out


def test_rootless_cgroup_v2_without_delegation_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rootless on cgroup v2 without memory and pids delegated: doctor names them, the fix, and fails."""
    status, out = doctor(
        monkeypatch, capsys, podman_info(rootless=True, cgroup="v2", controllers=["cpu", "io"])
    )
    assert status == 1, out
    assert "Delegated cgroup controllers: cpu, io; missing memory, pids: set Delegate=" in out, out
    assert "loginctl enable-linger" in out, out
    assert "warmpod serve would fail" in out, out


def test_rootless_cgroup_v2_with_delegation_enforces_by_cgroup(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rootless on cgroup v2 with cpu, memory and pids delegated: every cgroup limit by cgroup, pause on."""
    info = podman_info(rootless=True, cgroup="v2", controllers=["cpu", "io", "memory", "pids"])
    status, out = doctor(monkeypatch, capsys, info)
    assert status == 0, out
    assert "Delegated cgroup controllers" not in out, out
    assert "Podman 5.4.2, rootless\ncgroups: v2" in out, out
    assert "OCI runtime: crun (crun version 1.21)" in out, out
    assert "  memory: cgroup, cgroup memory limit, swap capped at the same value" in out, out
    assert "  cpu_share: cgroup, cgroup cpu quota" in out, out
    assert "Pause idle containers: yes" in out, out
    assert "User namespace: rootless Podman's" in out, out


def test_rootful_says_which_user_namespace_each_container_gets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Rootful: one user namespace per container where /etc/subuid and /etc/subgid have a
    `containers` range; without one, doctor names both files and the fix, and fails."""
    info = podman_info(rootless=False, cgroup="v2", controllers=["cpu", "memory", "pids"])
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    monkeypatch.setattr(host, "SUBID_FILES", (subuid, subgid))
    subuid.write_text("warmpod-ci:100000:65536\n")
    subgid.write_text("warmpod-ci:100000:65536\n")
    status, out = doctor(monkeypatch, capsys, info)
    assert status == 1, out
    assert f"{subuid} and {subgid} have no `containers` range" in out, out
    assert "run deploy/setup.sh, or set WARMPOD_ENGINE__USERNS=host" in out, out
    assert "container root is host root" in out, out
    for path in (subuid, subgid):
        path.write_text("warmpod-ci:100000:65536\ncontainers:2147483647:2147483648\n")
    status, out = doctor(monkeypatch, capsys, info)
    assert status == 0, out
    assert "User namespace: one per container (userns=auto" in out, out


def test_without_cap_sys_resource_doctor_says_the_agents_are_not_shielded(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server lowers each agent's OOM score from the host: without CAP_SYS_RESOURCE, doctor says so."""
    info = podman_info(rootless=True, cgroup="v2", controllers=["cpu", "io", "memory", "pids"])
    monkeypatch.setattr(doctor_command, "_has_cap_sys_resource", lambda: False)
    status, out = doctor(monkeypatch, capsys, info)
    assert status == 0, out
    assert "OOM score: warmpod cannot shield the agents (no CAP_SYS_RESOURCE)" in out, out
    monkeypatch.setattr(doctor_command, "_has_cap_sys_resource", lambda: True)
    status, out = doctor(monkeypatch, capsys, info)
    assert "OOM score" not in out, out


def test_a_podman_that_cannot_be_asked_is_said_to_be_unusable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """When no Podman service answers (none installed, or its service did not start), doctor says how
    to install it and fails."""

    async def engine_info(settings: Settings) -> EngineInfo:
        raise EngineError("'podman' not found: install Podman (apt-get install podman)")

    monkeypatch.setattr(doctor_command, "engine_info", engine_info)
    assert doctor_command.main(from_env()) == 1
    assert "Podman: not usable ('podman' not found" in capsys.readouterr().out
