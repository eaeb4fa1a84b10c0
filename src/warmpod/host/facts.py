"""This host as Podman sees it: its cgroup layout, its uid ranges, and how to call the podman CLI."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from warmpod.errors import EngineError
from warmpod.settings import EngineSettings, Settings

SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))

# A user namespace of its own maps container uids 0..USERNS_SIZE-1: the program's 65534 included.
USERNS_SIZE = 65536


@dataclass(frozen=True)
class HostFacts:
    """What this host offers containers, read from the kernel and the environment."""

    cgroup_version: int
    hybrid: bool
    rootless: bool
    unified_controllers: tuple[str, ...] = ()
    """On a hybrid host, the controllers of its cgroup v2 hierarchy (those bound to no v1 one)."""

    @classmethod
    def read(cls) -> HostFacts:
        """Read the facts of the host this process runs on."""
        unified = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        hybrid = not unified and Path("/sys/fs/cgroup/unified").is_dir()
        controllers: tuple[str, ...] = ()
        if hybrid:
            try:
                controllers = tuple(Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().split())
            except OSError:
                controllers = ("?",)
        return cls(
            cgroup_version=2 if unified else 1,
            hybrid=hybrid,
            rootless=os.geteuid() != 0,
            unified_controllers=controllers,
        )


def containers_conf() -> Path:
    """The containers.conf warmpod owns (bundled in the wheel, or ``deploy/`` in a checkout)."""
    package = Path(__file__).resolve().parents[1]
    bundled = package / "containers.conf"
    if bundled.exists():
        return bundled
    return package.parents[1] / "deploy" / "containers.conf"


def pick_runtime(settings: EngineSettings, facts: HostFacts) -> str:
    """The OCI runtime to ask for, or '' for Podman's default.

    crun where it can run: it costs a container far less CPU than runc (runc's Go ``init`` alone
    took 20-30 ms of each container's start here). On cgroup v1 crun refuses a hybrid host whose
    unified hierarchy still holds a controller ("cgroups in hybrid mode not supported"), where
    runc works; ``deploy/setup.sh`` binds such controllers to v1 hierarchies of their own.
    """
    if settings.runtime:
        return settings.runtime
    if facts.cgroup_version == 1:
        if shutil.which("crun") and facts.hybrid and not facts.unified_controllers:
            return "crun"
        if shutil.which("runc"):
            return "runc"
    return ""


def podman_command(
    settings: EngineSettings, *args: str, conf: Path | None = None
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment to run the podman CLI with warmpod's configuration (or ``conf``)."""
    env = dict(os.environ)
    if conf is not None:
        env["CONTAINERS_CONF"] = str(conf)
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


def own_user_namespaces(settings: Settings, *, rootless: bool) -> bool:
    """Whether warmpod asks rootful Podman for a user namespace per container (``engine.userns``).

    Raises:
        EngineError: it should, but this host has no ``containers`` range to draw them from.
    """
    if rootless or settings.engine.userns != "auto":
        return False
    # Only a local engine's ranges can be read here; a remote one reports its own error on create.
    if settings.engine.url and not settings.engine.url.startswith("unix:"):
        return True
    missing = missing_subid_ranges(USERNS_SIZE * settings.pool.bounds[1])
    if missing:
        raise EngineError(
            f"{' and '.join(missing)} have no `containers` range of {USERNS_SIZE} ids per pool container: "
            "run deploy/setup.sh, or set WARMPOD_ENGINE__USERNS=host to share the host's uids"
        )
    return True


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
