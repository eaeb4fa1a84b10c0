"""The rootless path on this cgroup v1 host: what holds as an ordinary user, and what cannot (and why)."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from textwrap import dedent
from typing import Any

import httpx
import pytest
from support.live import WarmpodServer, run_json, wait_until

from warmpod.sandbox.pool import LABEL_PID

from .asuser import (
    CPU_TIME,
    MAX_OUTPUT_BYTES,
    MAX_TIMEOUT,
    MEMORY_MB,
    PIDS,
    SETTINGS,
    Tree,
    User,
    start_server,
)

pytestmark = pytest.mark.rootless

NEEDS_CGROUPS = (
    "cgroup v1: rootless Podman can neither apply cgroup limits nor pause here; a cgroup v2 host with "
    "delegation can (tests/cgv2/run.sh runs the suites rootless on cgroup v2)"
)
# What /health must say on a rootless cgroup v1 host: the fallback layer of each limit, or none.
LAYERS_WITHOUT_CGROUPS = {
    "wall_time": "server",
    "cpu_time": "rlimit",
    "memory": "rlimit",
    "pids": "rlimit",
    "cpu_share": None,
    "disk": "tmpfs",
    "open_files": "rlimit",
    "output": "agent",
    "core_dumps": "rlimit",
}


def skip_on_cgroup_v1(health: dict[str, Any]) -> None:
    """Skip a test of a cgroup-only layer where the host cannot offer it rootless."""
    if health["cgroup_version"] == 1:
        pytest.skip(NEEDS_CGROUPS)


def status_uid(pid: int) -> int:
    """The real uid of a host process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def host_pids_with(marker: str) -> list[int]:
    """Host processes whose arguments include ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in argv:
                found.append(int(entry.name))
    return found


def test_refuses_to_start_without_allow_unenforced(
    user: User, tree: Tree, image: str, tmp_path: Path
) -> None:
    """Without WARMPOD_LIMITS__ALLOW_UNENFORCED the service refuses to start and says what is missing."""
    live = start_server(user, tree, tmp_path, {**SETTINGS, "WARMPOD_LIMITS__ALLOW_UNENFORCED": "false"})
    try:
        status = live.proc.wait(timeout=60)
    finally:
        live.close()
    log = live.log_tail(20000)
    assert status != 0, log
    assert "no layer on this host enforces cpu_share" in log, log
    assert "WARMPOD_LIMITS__ALLOW_UNENFORCED=true" in log, log
    assert not user.containers(f"{LABEL_PID}={live.pid}")


def test_doctor_says_rootless_cgroup_v1_and_what_is_unenforced(user: User, tree: Tree, image: str) -> None:
    """`warmpod doctor` as the user reports rootless, cgroup v1, the fallbacks and the refusal."""
    argv = (tree.python, "-m", "warmpod", "doctor")
    env = tree.environ()
    refused = user.run(*argv, env={**env, "WARMPOD_LIMITS__ALLOW_UNENFORCED": "false"}, check=False)
    out = refused.stdout
    assert refused.returncode == 1, f"{out}\n{refused.stderr}"
    assert re.search(r"^Podman \S+, rootless$", out, re.M), out
    assert re.search(r"^cgroups: v1\b", out, re.M), out
    assert "  memory: rlimit, RLIMIT_AS" in out, out
    assert "  pids: rlimit, RLIMIT_NPROC" in out, out
    assert "  cpu_share: NOT ENFORCED," in out, out
    assert "Pause idle containers: no" in out, out
    assert "OOM score: warmpod cannot shield the agents (no CAP_SYS_RESOURCE)" in out, out
    assert "User namespace: rootless Podman's" in out, out
    assert "warmpod serve would refuse to start: no layer on this host enforces cpu_share" in out, out
    allowed = user.run(*argv, env={**env, "WARMPOD_LIMITS__ALLOW_UNENFORCED": "true"}, check=False)
    assert allowed.returncode == 0, f"{allowed.stdout}\n{allowed.stderr}"
    assert "  cpu_share: NOT ENFORCED," in allowed.stdout, allowed.stdout


def test_health_tells_the_truth_about_rootless_cgroup_v1(health: dict[str, Any]) -> None:
    """/health says rootless, cgroup v1, no pause, and the fallback layer (or none) of every limit."""
    assert health["rootless"] is True, health
    assert health["cgroup_version"] == 1, health
    assert health["paused_idle"] is False, health
    assert {row["limit"]: row["layer"] for row in health["limits"]} == LAYERS_WITHOUT_CGROUPS, health


def test_server_and_its_podman_run_as_the_user(user: User, server: WarmpodServer) -> None:
    """The server and its private Podman service run as the ordinary user, not root."""
    service_pid, _ = server.podman_service()
    assert status_uid(server.pid) == user.uid
    assert status_uid(service_pid) == user.uid


def test_trivial_run_succeeds(client: httpx.Client) -> None:
    """print(1) succeeds with its output and no limit hit."""
    result = run_json(client, "print(1)", timeout=5)
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "1\n", result
    assert result["limits_hit"] == [], result


def test_container_root_is_the_user_not_host_root(
    user: User, server: WarmpodServer, client: httpx.Client
) -> None:
    """The program is uid 65534, mapped into the user's subordinate range; container root is the user."""
    code = (
        "import os, json\nprint(json.dumps([os.getuid(), os.geteuid(), open('/proc/self/uid_map').read()]))\n"
    )
    result = run_json(client, code)
    assert result["status"] == "succeeded", result
    uid, euid, uid_map = json.loads(result["stdout"])
    assert (uid, euid) == (65534, 65534), result
    mapping = [tuple(int(n) for n in line.split()) for line in uid_map.splitlines()]
    # Container root is the user itself; every other id comes from the user's subordinate range.
    assert mapping[0] == (0, user.uid, 1), uid_map
    assert all(host >= user.subuid_start for inside, host, _ in mapping[1:]), uid_map
    program_host_uid = next(
        host + 65534 - inside for inside, host, n in mapping if inside <= 65534 < inside + n
    )
    assert program_host_uid not in (0, 65534, user.uid), uid_map
    # On the host: each idle pool container's PID 1, the agent, runs as the user, not as root.
    # The pool of two may be refilling after the runs before (both containers still starting):
    # look again until one is running.
    checked = 0

    def check_agents() -> int:
        nonlocal checked
        for container in user.containers(f"{LABEL_PID}={server.pid}"):
            if container["State"] == "running" and container.get("Pid"):
                try:
                    uid = status_uid(int(container["Pid"]))
                except FileNotFoundError:
                    continue  # listed while it went: the container that served the run above
                assert uid == user.uid, container["Names"]
                checked += 1
        return checked

    wait_until(check_agents, timeout=60, interval=0.5)
    assert checked, "no pool container's agent was running to look at"


def test_no_network_only_loopback(client: httpx.Client) -> None:
    """The program sees only the lo interface and no route."""
    code = dedent(
        """
        import os
        print(sorted(os.listdir("/sys/class/net")), open("/proc/net/route").read().count("\\n"))
        """
    )
    result = run_json(client, code)
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "['lo'] 1\n", result  # the route table's header line only


def test_root_filesystem_is_read_only(client: httpx.Client) -> None:
    """/ is mounted read-only and a write to /usr fails."""
    code = dedent(
        """
        import errno, os
        try:
            open("/usr/warmpod-was-here", "w")
            wrote = "wrote"
        except OSError as exc:
            wrote = errno.errorcode[exc.errno]
        print(bool(os.statvfs("/").f_flag & os.ST_RDONLY), wrote)
        """
    )
    result = run_json(client, code)
    assert result["status"] == "succeeded", result
    assert result["stdout"] in ("True EROFS\n", "True EACCES\n"), result


def test_cpu_time_limit_kills_a_spin(client: httpx.Client) -> None:
    """RLIMIT_CPU stops a busy loop with SIGXCPU at the CPU-time limit, before the wall-time limit."""
    result = run_json(client, "while True:\n    pass\n", timeout=MAX_TIMEOUT)
    assert result["status"] == "failed", result
    assert result["exit_code"] == -24, result  # SIGXCPU: RLIMIT_CPU, not the agent's kill
    assert result["limits_hit"] == ["cpu_time"], result
    # CPU seconds, not wall seconds: with no CPU quota and busy neighbours the spin may get less
    # than a core, so only a lower bound on the wall time is certain.
    assert result["duration_ms"] >= CPU_TIME * 1000, result


def test_memory_bomb_is_stopped_by_rlimit_as(client: httpx.Client) -> None:
    """Without a memory cgroup, RLIMIT_AS (the memory limit on top of what the preloaded
    interpreter maps) stops a bomb below the limit."""
    code = dedent(
        """
        import resource
        print("limit", resource.getrlimit(resource.RLIMIT_AS)[0] >> 20, flush=True)
        held = []
        while True:
            held.append(bytearray(1 << 20))
            if len(held) % 16 == 0:
                print("held", len(held), flush=True)
        """
    )
    result = run_json(client, code, timeout=15)
    assert result["status"] == "failed", result
    assert result["exit_code"] == 1, result
    assert "MemoryError" in result["stderr"], result
    lines = result["stdout"].splitlines()
    limit = int(lines[0].removeprefix("limit "))
    # numpy, pandas and pyarrow map some 350 MB before the program starts.
    assert MEMORY_MB < limit < MEMORY_MB + 1024, result
    held = [int(line.split()[1]) for line in lines[1:]]
    assert held, "the bomb never got going, so this test proves nothing"
    assert max(held) < MEMORY_MB, result
    # The interpreter survives its MemoryError; no OOM kill happens, so limits_hit has no `memory`
    # (nothing says which allocation failed), and the run is a plain failure.


def test_output_is_capped(client: httpx.Client) -> None:
    """Output past the cap is cut at exactly the cap and reported as the output limit."""
    result = run_json(client, f"print('x' * {MAX_OUTPUT_BYTES * 4})")
    assert result["stdout"] == "x" * MAX_OUTPUT_BYTES, len(result["stdout"])
    assert result["stdout_truncated"] is True, result["limits_hit"]
    assert "output" in result["limits_hit"], result["limits_hit"]


def test_sleep_is_stopped_at_the_timeout(client: httpx.Client) -> None:
    """A program sleeping forever is stopped at its 1 s timeout and answered within a second more."""
    started = time.monotonic()
    result = run_json(client, "import time\ntime.sleep(10**6)\n", timeout=1)
    seconds = time.monotonic() - started
    assert result["status"] == "timeout", result
    assert result["limits_hit"] == ["wall_time"], result
    assert seconds < 2.0, f"the reply took {seconds:.1f} s"


def test_process_left_behind_is_gone(user: User, server: WarmpodServer) -> None:
    """A setsid daemon left behind runs on the host as a subordinate uid, and dies with its run."""
    marker = f"warmpod-daemon-{uuid.uuid4().hex}"
    code = dedent(
        f"""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/usr/bin/python3", ["python3", "-c", "import time; time.sleep(600)", "{marker}"])
            os._exit(0)
        os.wait()
        time.sleep(3)
        print("spawned")
        """
    )
    server.wait_pool_full()
    results: list[dict[str, Any]] = []

    def spawn() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            results.append(run_json(http, code, timeout=10))

    thread = threading.Thread(target=spawn)
    thread.start()
    try:
        # Seen on the host while the run lasts: the check below can fail.
        assert wait_until(lambda: host_pids_with(marker), timeout=10), "the daemon never ran"
        (daemon,) = host_pids_with(marker)
        assert status_uid(daemon) >= user.subuid_start, "the daemon runs outside the subordinate range"
    finally:
        thread.join()
    assert len(results) == 1, "the run did not answer"
    assert results[0]["status"] == "succeeded", results
    assert results[0]["stdout"] == "spawned\n", results
    assert wait_until(lambda: not host_pids_with(marker), timeout=10), "the daemon outlived its run"


def test_processes_are_limited_by_rlimit_nproc(client: httpx.Client) -> None:
    """Without a pids cgroup, RLIMIT_NPROC stops a program forking without end below the pids limit."""
    code = dedent(
        """
        import errno, os, signal, time
        children = []
        failure = "none"
        for _ in range(1000):
            try:
                pid = os.fork()
            except OSError as exc:
                failure = errno.errorcode[exc.errno]
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        print(failure, len(children))
        """
    )
    result = run_json(client, code, timeout=15)
    assert result["status"] == "succeeded", result
    failure, started = result["stdout"].split()
    assert failure == "EAGAIN", result
    # Counted per uid across the user's containers: the idle ones' interpreters count too.
    assert 0 < int(started) < PIDS, result


def test_idle_containers_stay_running(user: User, server: WarmpodServer, health: dict[str, Any]) -> None:
    """As /health says (paused_idle false), idle pool containers are running, not paused."""
    assert health["paused_idle"] is False
    server.wait_pool_full()
    states = {c["Names"][0]: c["State"] for c in user.containers(f"{LABEL_PID}={server.pid}")}
    assert states, "no pool containers"
    assert set(states.values()) <= {"running", "created"}, states
    assert "running" in states.values(), states


def test_pids_cgroup_limit(health: dict[str, Any], client: httpx.Client) -> None:
    """With a pids cgroup, a fork bomb is reported as hitting the pids limit."""
    skip_on_cgroup_v1(health)
    code = "import os\nwhile True:\n    os.fork()\n"
    result = run_json(client, code, timeout=3)
    assert "pids" in result["limits_hit"], result


def test_cpu_quota(health: dict[str, Any]) -> None:
    """With a cpu cgroup, the CPU share is enforced by the cgroup quota."""
    skip_on_cgroup_v1(health)
    layers = {row["limit"]: row["layer"] for row in health["limits"]}
    assert layers["cpu_share"] == "cgroup", health


def test_idle_containers_pause(user: User, server: WarmpodServer, health: dict[str, Any]) -> None:
    """With a freezer, idle pool containers are paused."""
    skip_on_cgroup_v1(health)
    server.wait_pool_full()
    states = {c["State"] for c in user.containers(f"{LABEL_PID}={server.pid}")}
    assert "paused" in states, states
