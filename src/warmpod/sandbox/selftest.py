"""The start-up self-test: a probe run in a real sandbox must find every layer on before serving.

The same probe reads the image's record of what it installed, which ``GET /environment`` serves.
"""

from __future__ import annotations

import json
import math
import socket
from typing import Any

from warmpod.environments import EnvironmentSpec
from warmpod.errors import WarmpodError
from warmpod.host.image import guest_dir
from warmpod.models import Environment
from warmpod.sandbox.pool import Pool
from warmpod.sandbox.runner import Runner
from warmpod.sandbox.sandbox import AGENT_COMMAND
from warmpod.settings import LimitSettings, Settings

PROBE_FILE = guest_dir() / "probe.py"
"""The probe program (pool/probe.py): it prints what the program sees of its sandbox, as JSON."""
PROBE = PROBE_FILE.read_text()


class SelfTestFailed(WarmpodError):
    """Raised when the start-up probe finds a layer missing; warmpod then refuses to serve."""


def failures(
    report: dict[str, Any], limits: LimitSettings, *, cgroups: bool, userns: bool = False
) -> list[str]:
    """What the probe's report shows to be missing, in words; empty when every layer is on."""
    expected: list[tuple[str, object, str]] = [
        ("interfaces", ["lo"], "the sandbox has a network interface besides lo"),
        ("root_writable", False, "the root filesystem is writable"),
        ("seccomp", "2", "no seccomp filter is active"),
        ("no_new_privs", "1", "no_new_privileges is off"),
        ("cap_eff", "0000000000000000", "the program holds capabilities"),
    ]
    # The program's budget counts from its start: the soft limit is the budget above the whole
    # seconds the interpreter had used by then (preloading).
    rlimit_cpu, used = report.get("rlimit_cpu"), report.get("cpu_used") or 0
    if not (
        isinstance(rlimit_cpu, int) and limits.cpu_time <= rlimit_cpu <= limits.cpu_time + math.ceil(used)
    ):
        found_cpu = [f"RLIMIT_CPU is not applied (found {rlimit_cpu!r} after {used!r} s of start-up)"]
    else:
        found_cpu = []
    if cgroups:
        expected += [
            ("memory_max", str(limits.memory_mb * 1024 * 1024), "the memory cgroup limit is not applied"),
            ("pids_max", str(limits.pids), "the pids cgroup limit is not applied"),
        ]
    found = [
        f"{message} (found {report.get(key)!r})" for key, want, message in expected if report.get(key) != want
    ]
    if report.get("uid") in (0, None):
        found.append("the program runs as root")
    # Container root is not host root: any map but the identity one ("0 0 4294967295").
    uid_map = report.get("uid_map")
    if userns and (not isinstance(uid_map, str) or uid_map.split()[:2] in ([], ["0", "0"])):
        found.append(f"the sandbox has no user namespace of its own (uid_map {uid_map!r})")
    # Its own PID namespace (the agent's kill(-1) must reach only the sandbox) and UTS namespace.
    if report.get("pid1") != AGENT_COMMAND:
        found.append(f"PID 1 is not the agent: no PID namespace of its own (found {report.get('pid1')!r})")
    hostname = report.get("hostname")
    if (
        not (isinstance(hostname, str) and hostname.startswith("warmpod-"))
        or hostname == socket.gethostname()
    ):
        found.append(f"the hostname is not the container's: no UTS namespace of its own (found {hostname!r})")
    return found + found_cpu


async def self_test(
    pool: Pool,
    runner: Runner,
    settings: Settings,
    environment: EnvironmentSpec,
    *,
    cgroups: bool,
    userns: bool,
) -> Environment | None:
    """Wait for the pool's first sandbox of every environment, then run the probe in a sandbox of
    ``environment``.

    Returns:
        What the image recorded as installed (``ENVIRONMENT_FILE``), or None if it holds no record.

    Raises:
        PoolUnavailable: no sandbox was made within the start-up timeout.
        SelfTestFailed: the probe did not run, or found a layer missing (the message names the
            environment).
    """
    limits = environment.limits
    # The first sandbox may take far longer than a run's acquire timeout (a slow host, preloads).
    await pool.wait_serving(settings.server.startup_timeout)
    result = await runner.run(
        PROBE.encode(), b"", timeout=min(30.0, limits.max_timeout), environment=environment.name
    )
    where = f"environment {environment.name!r}"
    if result.status != "succeeded":
        raise SelfTestFailed(
            f"the start-up probe did not run in the {where}: {result.status} {result.error or result.stderr}"
        )
    try:
        report = json.loads(result.stdout)
    except ValueError as exc:
        raise SelfTestFailed(
            f"the start-up probe printed no report in the {where}: {result.stdout[:200]!r}"
        ) from exc
    missing = failures(report, limits, cgroups=cgroups, userns=userns)
    if missing:
        raise SelfTestFailed(f"refusing to serve: in the {where}, " + "; ".join(missing))
    return Environment.from_report(report.get("environment"))
