"""Which layer enforces each resource limit on this host, said truthfully."""

from __future__ import annotations

from warmpod.errors import SettingsError
from warmpod.models import LimitEnforcement


def enforcement(*, cgroups: bool) -> list[LimitEnforcement]:
    """Every limit warmpod applies, given whether the engine applies cgroup limits."""

    def row(limit: str, layer: str | None, mechanism: str) -> LimitEnforcement:
        return LimitEnforcement(limit=limit, layer=layer, mechanism=mechanism)

    return [
        row("wall_time", "server", "the agent kills the program at the timeout, the server the container"),
        row("cpu_time", "rlimit", "RLIMIT_CPU: SIGXCPU, then SIGKILL a second later"),
        row(
            "memory",
            "cgroup" if cgroups else "rlimit",
            "cgroup memory limit, swap capped at the same value"
            if cgroups
            else "RLIMIT_AS on the program past its preloaded interpreter (coarse: address space)",
        ),
        row(
            "pids",
            "cgroup" if cgroups else "rlimit",
            "cgroup pids limit" if cgroups else "RLIMIT_NPROC (counted per uid across containers)",
        ),
        row(
            "cpu_share",
            "cgroup" if cgroups else None,
            "cgroup cpu quota" if cgroups else "not enforced: no cgroup cpu controller for this engine",
        ),
        row("disk", "tmpfs", "size-limited tmpfs on /work and /tmp, RLIMIT_FSIZE"),
        row("open_files", "rlimit", "RLIMIT_NOFILE"),
        row("output", "agent", "the agent stops reading at the cap and stops the program"),
        row("core_dumps", "rlimit", "RLIMIT_CORE = 0"),
    ]


def check(rows: list[LimitEnforcement], *, allow_unenforced: bool) -> list[str]:
    """Names of limits nothing enforces; raises unless the operator allowed a weaker mode.

    Raises:
        SettingsError: a configured limit cannot be enforced and weaker mode is not allowed.
    """
    missing = [row.limit for row in rows if row.layer is None]
    if missing and not allow_unenforced:
        raise SettingsError(
            f"no layer on this host enforces {', '.join(missing)} (rootless Podman on cgroup v1 "
            "applies no cgroup limits): use a cgroup v2 host with delegation, run rootful, or "
            "start anyway with WARMPOD_LIMITS__ALLOW_UNENFORCED=true"
        )
    return missing
