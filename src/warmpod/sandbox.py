"""The locked-down container spec every pool container is created from (a libpod SpecGenerator)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from warmpod.settings import LimitSettings

AGENT_COMMAND = ["python3", "-I", "/opt/warmpod/agent.py"]
AGENT_DIR = "/run/warmpod"
SOCKET_NAME = "agent.sock"
CPU_PERIOD = 100_000
SHM_MB = 16
NPROC_WITH_CGROUPS = 4096
# A user namespace of its own maps container uids 0..USERNS_SIZE-1: the program's 65534 included.
USERNS_SIZE = 65536
# The agent needs exactly these to start the program as an unprivileged user and to kill it.
# CAP_SYS_RESOURCE makes the program's OOM score of 1000 a floor (only without a user namespace:
# the kernel checks it on the host), CAP_SETPCAP empties the program's bounding set (the program
# loses every capability when it changes uid).
AGENT_CAPS = ["CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_SYS_RESOURCE", "CAP_SETPCAP"]
# Podman 4.3 refuses tmpfs nr_inodes: inode exhaustion is bounded by the memory cgroup instead.
# notmpcopyup: otherwise Podman copies the image directory's (root-owned 0755) mode onto the tmpfs.
_TMPFS_OPTS = ["rw", "nosuid", "nodev", "noexec", "notmpcopyup", "mode=1777"]


def container_spec(
    *,
    image: str,
    seccomp_profile: Path,
    name: str,
    labels: dict[str, str],
    agent_dir: Path,
    limits: LimitSettings,
    cgroup_limits: bool,
    userns: bool = False,
    preload: Sequence[str] = (),
) -> dict[str, Any]:
    """The spec of one pool container.

    Args:
        image: runner image reference.
        name: container name, also its hostname.
        labels: labels that tie the container to its server instance.
        seccomp_profile: absolute host path of the seccomp profile (``pool/seccomp.json``).
        agent_dir: host directory bind-mounted at /run/warmpod for the agent's socket.
        limits: the server's limits.
        cgroup_limits: whether the engine can apply cgroup limits (it cannot rootless on v1).
        userns: a user namespace with a uid range of its own (Podman's ``auto``; rootful only).
        preload: modules the program's interpreter imports before the container is paused.
    """
    tmpfs_size = f"size={limits.tmpfs_mb}m"
    spec: dict[str, Any] = {
        "image": image,
        "name": name,
        "hostname": name,
        "labels": labels,
        "command": AGENT_COMMAND,
        "user": "0:0",
        # The agent reads these and applies them to the program only; the program's own
        # environment is a fixed minimal list built by the agent.
        "env": {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "WARMPOD_CPU_SECONDS": str(limits.cpu_time),
            "WARMPOD_FSIZE_BYTES": str(limits.tmpfs_mb * 1024 * 1024),
            "WARMPOD_PRELOAD": ",".join(preload),
        },
        "env_host": False,
        "httpproxy": False,
        # The image's own minimal /etc/hosts and empty resolv.conf: Podman's would copy the
        # host's entries in.
        "use_image_hosts": True,
        "use_image_resolve_conf": True,
        # Every namespace the sandbox relies on, pinned: an engine default (containers.conf's
        # pidns = "host", say) must not loosen it. The agent's kill(-1) needs its own PID namespace.
        "netns": {"nsmode": "none"},
        "ipcns": {"nsmode": "private"},
        "pidns": {"nsmode": "private"},
        "utsns": {"nsmode": "private"},
        "cgroupns": {"nsmode": "private"},
        "read_only_filesystem": True,
        "read_write_tmpfs": False,
        "cap_drop": ["ALL"],
        "cap_add": AGENT_CAPS,
        "no_new_privileges": True,
        "seccomp_profile_path": str(seccomp_profile),
        "stop_timeout": 0,
        "mounts": [
            {
                "destination": AGENT_DIR,
                "source": str(agent_dir),
                "type": "bind",
                # U: Podman chowns it to the container's root, which under a user namespace is
                # not host root and could not create its socket in a root-owned 0700 directory.
                "options": ["rw", "nosuid", "nodev", "noexec", *(["U"] if userns else [])],
            },
            {
                "destination": "/work",
                "source": "tmpfs",
                "type": "tmpfs",
                "options": [*_TMPFS_OPTS, tmpfs_size],
            },
            {
                # Explicit: Podman 5 mounts /dev/shm read-only in a read-only container, which
                # breaks multiprocessing's semaphores; Podman 4 mounted it writable.
                "destination": "/dev/shm",  # noqa: S108  (inside the container)
                "source": "shm",
                "type": "tmpfs",
                "options": [*_TMPFS_OPTS, f"size={SHM_MB}m"],
            },
            {
                "destination": "/tmp",  # noqa: S108  (inside the container)
                "source": "tmpfs",
                "type": "tmpfs",
                "options": [*_TMPFS_OPTS, tmpfs_size],
            },
        ],
        "r_limits": [
            {"type": "nofile", "soft": limits.open_files, "hard": limits.open_files},
            {"type": "core", "soft": 0, "hard": 0},
            # Whatever the host allows: the program must not climb back above the agent's priority.
            {"type": "nice", "soft": 0, "hard": 0},
        ],
    }
    # RLIMIT_NPROC counts per uid across every container sharing a user namespace, so it is
    # only the tight fallback where the pids cgroup is missing; it must be set either way, since
    # Podman's default copies a host limit the runtime may not be allowed to apply.
    nproc = limits.pids if not cgroup_limits else NPROC_WITH_CGROUPS
    spec["r_limits"].append({"type": "nproc", "soft": nproc, "hard": nproc})
    memory = limits.memory_mb * 1024 * 1024
    if not cgroup_limits:
        spec["env"]["WARMPOD_AS_BYTES"] = str(memory)
        # No cgroup of its own: the counters the agent would read (CPU use, OOM kills, pids.max
        # hits) are a parent's, shared with the whole host, and would stop or blame runs falsely.
        spec["env"]["WARMPOD_CGROUP_COUNTERS"] = "0"
    else:
        spec["resource_limits"] = {
            "memory": {"limit": memory, "swap": memory},
            "pids": {"limit": limits.pids},
            "cpu": {"quota": int(limits.cpus * CPU_PERIOD), "period": CPU_PERIOD},
        }
    if userns:
        # Both halves are needed over the REST API: the CLI fills idmappings from --userns=auto.
        spec["userns"] = {"nsmode": "auto", "value": f"size={USERNS_SIZE}"}
        spec["idmappings"] = {"AutoUserNs": True, "AutoUserNsOpts": {"Size": USERNS_SIZE}}
    return spec
