"""CPU and wall time: spinning, sleeping and busy neighbours are stopped by their limits, promptly."""

from __future__ import annotations

import threading
import time
from textwrap import dedent

import httpx
import pytest
from support.hostile import (
    CPU_REPLY_SECONDS,
    CPU_TIME,
    PIDS,
    REFILL_WAIT_SECONDS,
    SPIN_TIMEOUT,
    Run,
    assert_still_serves,
    run,
)
from support.live import SLOWNESS, WarmpodServer

pytestmark = pytest.mark.security


def test_cpu_spin_is_stopped_by_cpu_time(server: WarmpodServer, client: httpx.Client) -> None:
    """A busy loop is killed by SIGXCPU at the CPU-time limit, long before its timeout."""
    server.wait_pool_full()
    spin = run(client, "while True:\n    pass\n", timeout=SPIN_TIMEOUT)
    assert spin.status == "failed", spin.result
    assert spin.exit_code == -24, spin.result  # SIGXCPU
    assert spin.limits_hit == ["cpu_time"], spin.result
    assert spin.seconds < CPU_REPLY_SECONDS, f"the reply took {spin.seconds:.1f} s"
    assert_still_serves(client)


def test_cpu_spin_ignoring_sigxcpu_is_killed(server: WarmpodServer, client: httpx.Client) -> None:
    """A busy loop that ignores SIGXCPU and cannot raise its hard limit is SIGKILLed a second later."""
    code = dedent(
        """
        import resource, signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        try:
            resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except ValueError as exc:
            print("raise refused:", exc, flush=True)
        while True:
            pass
        """
    )
    server.wait_pool_full()
    spin = run(client, code, timeout=SPIN_TIMEOUT)
    assert spin.status == "failed", spin.result
    assert spin.exit_code == -9, spin.result
    assert spin.limits_hit == ["cpu_time"], spin.result
    assert spin.stdout == "raise refused: not allowed to raise maximum limit\n", spin.result
    assert spin.seconds < CPU_REPLY_SECONDS, f"the reply took {spin.seconds:.1f} s"
    assert_still_serves(client)


def test_cpu_time_is_not_multiplied_by_forking(server: WarmpodServer, client: httpx.Client) -> None:
    """Four spinning processes share one CPU-time budget: the run is stopped by cpu_time, not the timeout."""
    code = dedent(
        """
        import os
        for _ in range(4):
            if os.fork() == 0:
                while True:
                    pass
        while True:
            try:
                os.wait()
            except ChildProcessError:
                break
        """
    )
    server.wait_pool_full()
    spin = run(client, code, timeout=SPIN_TIMEOUT)
    # RLIMIT_CPU is per process: each child starts with a fresh budget, so only a limit on the
    # container's total CPU use (the cgroup's cpuacct) keeps the program near CPU_TIME seconds
    # (the agent kills it a second past them, where RLIMIT_CPU's hard limit would).
    assert spin.seconds < CPU_REPLY_SECONDS, f"the reply took {spin.seconds:.1f} s: {spin.result}"
    assert spin.status == "failed", spin.result
    assert "cpu_time" in spin.limits_hit, spin.result
    assert_still_serves(client)


def test_sleep_forever_is_stopped_at_the_timeout(server: WarmpodServer, client: httpx.Client) -> None:
    """A program sleeping forever is stopped at its 2 s timeout and answered within 3 s."""
    server.wait_pool_full()
    sleeper = run(client, "import time\ntime.sleep(10**6)\n", timeout=2)
    assert sleeper.status == "timeout", sleeper.result
    assert sleeper.limits_hit == ["wall_time"], sleeper.result
    assert sleeper.exit_code == -9, sleeper.result
    assert sleeper.seconds < 3.0, f"the reply took {sleeper.seconds:.1f} s"
    assert_still_serves(client)


def test_spinning_processes_do_not_starve_the_agent(server: WarmpodServer, client: httpx.Client) -> None:
    """Dozens of spinning processes sharing the agent's CPU quota still get an agent result at the timeout."""
    # Below the pids limit with room for the agent's threads: this is about CPU, not pids (the fork
    # bomb tests those), and a fork failing at pids.max panics the UML kernel of tests/cgv2.
    code = dedent(
        f"""
        import os
        print("start", flush=True)
        for _ in range({PIDS - 16}):
            try:
                if os.fork() == 0:
                    while True:
                        pass
            except OSError:
                break
        while True:
            pass
        """
    )
    server.wait_pool_full()
    # Under the CPU-time limit (3 s by default), which the container-wide CPU check would otherwise hit
    # first; where forking is slow, long enough that the kill finds the spinners, not a fork.
    timeout = min(2 * SLOWNESS, CPU_TIME - 1)
    spin = run(client, code, timeout=timeout)
    # An agent too starved to answer would leave the server's backstop: exit_code null, output lost.
    assert spin.status == "timeout", spin.result
    assert spin.exit_code == -9, spin.result
    assert spin.limits_hit == ["wall_time"], spin.result
    assert spin.stdout == "start\n", spin.result
    assert spin.seconds < timeout + 1.0, f"the reply took {spin.seconds:.1f} s"
    assert_still_serves(client)


def test_trivial_run_is_prompt_beside_hostile_neighbours(server: WarmpodServer, client: httpx.Client) -> None:
    """A trivial run started while a CPU spin and a memory bomb run completes promptly (2 s here)."""
    memory_bomb = (
        "import time\nheld = []\nwhile True:\n    held.append(bytearray(10**6))\n    time.sleep(0.002)\n"
    )
    hostile: dict[str, Run] = {}
    finished: dict[str, float] = {}

    def neighbour(name: str, code: str) -> None:
        with httpx.Client(base_url=server.url, timeout=SPIN_TIMEOUT + 60) as http:
            hostile[name] = run(http, code, timeout=SPIN_TIMEOUT)
        finished[name] = time.monotonic()

    server.wait_pool_full()
    threads = [
        threading.Thread(target=neighbour, args=("spin", "while True:\n    pass\n")),
        threading.Thread(target=neighbour, args=("memory", memory_bomb)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # both neighbours hold their containers and run
    trivial = run(client, "print(1)", timeout=5)
    finished["trivial"] = time.monotonic()
    for thread in threads:
        thread.join()
    assert trivial.status == "succeeded", trivial.result
    assert trivial.stdout == "1\n"
    assert trivial.seconds < REFILL_WAIT_SECONDS, f"the trivial run took {trivial.seconds:.1f} s"
    assert finished["trivial"] < finished["spin"], "the spin ended before the trivial run: no overlap"
    assert hostile["spin"].limits_hit == ["cpu_time"], hostile["spin"].result
    assert hostile["memory"].limits_hit == ["memory"], hostile["memory"].result
    assert_still_serves(client)
