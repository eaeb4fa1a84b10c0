"""This host as Podman sees it: its cgroup layout, its uid ranges, and how to call the podman CLI."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from warmpod.settings import EngineSettings

SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))


@dataclass(frozen=True)
class HostFacts:
    """What this host offers containers, read from the kernel and the environment."""

    cgroup_version: int
    hybrid: bool
    rootless: bool

    @classmethod
    def read(cls) -> HostFacts:
        """Read the facts of the host this process runs on."""
        unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        hybrid = not unified and Path("/sys/fs/cgroup/unified").is_dir()
        return cls(cgroup_version=2 if unified else 1, hybrid=hybrid, rootless=os.geteuid() != 0)


def containers_conf() -> Path:
    """The containers.conf warmpod owns (bundled in the wheel, or ``deploy/`` in a checkout)."""
    bundled = Path(__file__).with_name("containers.conf")
    if bundled.exists():
        return bundled
    return Path(__file__).resolve().parents[2] / "deploy" / "containers.conf"


def pick_runtime(settings: EngineSettings, facts: HostFacts) -> str:
    """The OCI runtime to ask for, or '' for Podman's default.

    crun refuses cgroup v1 hybrid hosts ("cgroups in hybrid mode not supported") while runc works.
    """
    if settings.runtime:
        return settings.runtime
    if facts.cgroup_version == 1 and shutil.which("runc"):
        return "runc"
    return ""


def podman_command(settings: EngineSettings, *args: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment to run the podman CLI with warmpod's configuration."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(containers_conf()))
    argv = [settings.podman]
    runtime = pick_runtime(settings, HostFacts.read())
    if runtime:
        argv += ["--runtime", runtime]
    return [*argv, *args], env


def missing_subid_ranges(size: int) -> list[str]:
    """Those of /etc/subuid and /etc/subgid with no ``containers`` range of at least ``size`` ids:
    rootful Podman's ``userns=auto`` draws every container's uid and gid range from them."""
    missing = []
    for path in SUBID_FILES:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            lines = []
        counts = [
            line.split(":")[2] for line in lines if line.startswith("containers:") and line.count(":") == 2
        ]
        if not any(count.strip().isdigit() and int(count) >= size for count in counts):
            missing.append(str(path))
    return missing


def process_alive(pid: str | int) -> bool:
    """Whether a process of this pid (a decimal string from a label or a row) is alive on this host."""
    if not str(pid).isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
