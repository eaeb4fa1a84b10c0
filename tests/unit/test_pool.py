"""Unit tests of the warm pool against a fake engine whose containers are in-process fake agents."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import TaskGroup
from prometheus_client import REGISTRY
from support.fakes import FakeEngine, probe_report

from warmpod.environments import DEFAULT, Environments
from warmpod.errors import EngineError, InvalidRun, PoolUnavailable
from warmpod.sandbox import protocol
from warmpod.sandbox.owners import OwnerLock
from warmpod.sandbox.pool import LABEL_HOST, LABEL_INSTANCE, LABEL_PID, RUN_FIRST, Pool, imports_libraries
from warmpod.sandbox.protocol import Job, Output, Result
from warmpod.sandbox.runner import Runner
from warmpod.sandbox.sandbox import AGENT_EXIT_WAIT, Sandbox
from warmpod.sandbox.selftest import self_test
from warmpod.settings import Settings, from_env

INSTANCE = "feedface0000"
WAIT = 3.0


# Fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="wp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def settings(**pool: Any) -> Settings:
    """Settings with small timeouts so the pool reacts within a test's time."""
    values: dict[str, Any] = {
        "size": 2,
        "acquire_timeout": 1.0,
        "start_timeout": 1.0,
        "refill_concurrency": 2,
        "backoff_max": 0.1,
    }
    values.update(pool)
    return from_env({}, pool=values)


def make_pool(engine: FakeEngine, state_dir: Path, *, can_pause: bool = False, **pool: Any) -> Pool:
    """A pool over ``engine`` with ``pool`` settings."""
    return Pool(
        settings(**pool),
        engine,
        environments=[(Environments.load(settings(**pool)).default, "localhost/warmpod-runner:test")],
        state_dir=state_dir,
        instance=INSTANCE,
        can_pause=can_pause,
        can_limit=True,
    )


async def eventually(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until ``predicate()`` holds, failing the test after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


def waiting(pool: Pool, leases: int) -> Callable[[], bool]:
    """Whether ``leases`` leases wait in ``pool``'s queue."""
    return lambda: len(pool._kinds[DEFAULT].queue) == leases


@pytest.fixture
async def agents() -> AsyncIterator[TaskGroup]:
    """The task group the fake agents run in; cancelled after the test."""
    async with anyio.create_task_group() as tg:
        yield tg
        tg.cancel_scope.cancel()


async def with_pool(pool: Pool, body: Callable[[], Awaitable[None]]) -> None:
    """Run the pool while ``body`` runs, then cancel it as the app's lifespan does."""
    async with anyio.create_task_group() as tg:
        await tg.start(pool.serve)
        await body()
        tg.cancel_scope.cancel()


async def use(sandbox: Sandbox) -> None:
    """Act on a leased sandbox as a run does first, handing its agent a job: the pool destroys it
    after the lease, never gives it back."""
    await sandbox.send(Job(code=b"pass", stdin=b"", timeout=1.0, max_output_bytes=100))


async def dead_pid() -> str:
    """The pid of a process that has exited."""
    devnull = subprocess.DEVNULL
    async with await anyio.open_process(
        [sys.executable, "-c", "pass"], stdin=devnull, stdout=devnull, stderr=devnull
    ) as process:
        await process.wait()
    return str(process.pid)


# Filling --------------------------------------------------------------------------------------


async def test_pool_fills_to_target_and_no_further(agents: TaskGroup, state_dir: Path) -> None:
    """The pool creates exactly ``size`` containers, each greeted, and reports them ready."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=3)
    assert not pool.serving

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 3)
        await anyio.sleep(0.05)  # the sleep is the test: a pool that overfills would start a fourth now
        stats = pool.stats()
        assert (stats.ready, stats.busy, stats.starting, stats.target) == (3, 0, 0, 3)
        assert stats.created == 3
        assert stats.failures == 0
        assert stats.last_error is None
        assert len(engine.created) == 3
        assert pool.serving

    await with_pool(pool, body)


async def test_containers_carry_the_instance_labels(agents: TaskGroup, state_dir: Path) -> None:
    """Every container is labelled with this instance, this host and this process."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        (labels,) = engine.containers.values()
        assert labels == {
            LABEL_INSTANCE: INSTANCE,
            LABEL_HOST: socket.gethostname(),
            LABEL_PID: str(os.getpid()),
        }

    await with_pool(pool, body)


# Leasing --------------------------------------------------------------------------------------


async def test_a_container_that_dies_while_idle_is_replaced_and_never_leased(
    agents: TaskGroup, state_dir: Path
) -> None:
    """An idle container whose agent hangs up leaves the pool at once and is removed, a new one
    takes its place, and the next lease gets that one."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        (dead,) = engine.created
        await engine.crash(dead)
        await eventually(lambda: dead in engine.destroyed)
        await eventually(lambda: pool.stats().ready == 1)
        async with pool.lease() as sandbox:
            assert sandbox.container_id != dead
        assert (pool.stats().last_error or "").endswith(" died while idle")

    await with_pool(pool, body)


async def test_lease_hands_out_each_container_once_and_destroys_it(
    agents: TaskGroup, state_dir: Path
) -> None:
    """Each lease gets a container no other lease got, and that container is destroyed after the block."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=2)
    leased: list[str] = []

    async def body() -> None:
        for _ in range(5):
            async with pool.lease() as sandbox:
                await use(sandbox)
                assert sandbox.container_id not in engine.destroyed
                assert pool.stats().busy == 1
                leased.append(sandbox.container_id)
            await eventually(lambda: sandbox.container_id in engine.destroyed)
            await eventually(lambda: not sandbox.directory.exists())
            assert pool.stats().busy == 0

    await with_pool(pool, body)
    assert len(set(leased)) == 5
    assert all(engine.count("destroy", cid) >= 1 for cid in leased)


async def test_a_sandbox_leased_but_given_no_job_goes_back_to_the_front(
    agents: TaskGroup, state_dir: Path
) -> None:
    """A lease whose block ends without using its sandbox (another node claimed the run) gives it back:
    not destroyed, first in line for the next lease, and watched again while it waits."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=2, can_pause=True)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 2)
        async with pool.lease() as sandbox:
            unused = sandbox.container_id
        assert pool.stats().busy == 0
        assert pool._kinds[DEFAULT].ready[0] is sandbox
        assert not sandbox.paused  # still thawed, as the head of the queue is anyway
        await anyio.sleep(0.05)  # the sleep is the test: a destroy in the background would run now
        assert unused not in engine.destroyed
        assert sandbox.directory.exists()
        async with pool.lease() as again:
            assert again is sandbox
            await use(again)
        await eventually(lambda: unused in engine.destroyed)
        # The next one given back is watched while it waits: if it dies, it is replaced.
        await eventually(lambda: pool.stats().ready == 2)
        async with pool.lease() as sandbox:
            pass
        await engine.crash(sandbox.container_id)
        await eventually(lambda: sandbox.container_id in engine.destroyed)
        await eventually(lambda: pool.stats().ready == 2 and sandbox not in pool._kinds[DEFAULT].ready)
        assert (pool.stats().last_error or "").endswith(" died while idle")

    await with_pool(pool, body)


async def test_a_lease_that_raised_or_outlived_the_pool_destroys_its_unused_sandbox(
    agents: TaskGroup, state_dir: Path
) -> None:
    """A sandbox is never given back when its lease ended by an exception, or once the pool has stopped:
    both are destroyed, though nothing was done to them."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=2)
    holding, release, done = anyio.Event(), anyio.Event(), anyio.Event()
    held: list[str] = []
    failed: list[str] = []

    async def fail() -> None:
        async with pool.lease() as sandbox:
            failed.append(sandbox.container_id)
            raise RuntimeError("the run's caller failed")

    async def hold() -> None:
        async with pool.lease() as sandbox:
            held.append(sandbox.container_id)
            holding.set()
            await release.wait()
        done.set()

    async with anyio.create_task_group() as outside:
        async with anyio.create_task_group() as tg:
            await tg.start(pool.serve)
            await eventually(lambda: pool.stats().ready == 2)
            with pytest.raises(RuntimeError):
                await fail()
            (raised,) = failed
            await eventually(lambda: raised in engine.destroyed)
            assert all(s.container_id != raised for s in pool._kinds[DEFAULT].ready)
            outside.start_soon(hold)  # a lease the pool's cancellation does not reach
            await holding.wait()
            tg.cancel_scope.cancel()
        release.set()
        await done.wait()
    assert pool.stats().ready == 0
    assert held[0] in engine.destroyed
    assert engine.containers == {}
    assert list(state_dir.iterdir()) == []


async def test_concurrent_leases_never_share_a_container(agents: TaskGroup, state_dir: Path) -> None:
    """Leases taken at the same time each hold a different container."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=3)
    held: list[str] = []
    all_in = anyio.Event()

    async def take() -> None:
        async with pool.lease() as sandbox:
            held.append(sandbox.container_id)
            if len(held) == 6:
                all_in.set()
            await all_in.wait()

    async def body() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(take)

    await with_pool(pool, body)
    assert len(held) == 6
    assert len(set(held)) == 6


async def test_leased_container_runs_a_job(agents: TaskGroup, state_dir: Path) -> None:
    """The leased sandbox carries a Job to its agent, and its Output and Result back."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        async with pool.lease() as sandbox:
            await sandbox.send(Job(code=b"print(1)", stdin=b"in", timeout=1.0, max_output_bytes=100))
            assert sandbox.used
            with anyio.fail_after(WAIT):
                messages = [await sandbox.receive() for _ in range(3)]
            assert sandbox.answered
        assert messages == [
            Output(stream="stdout", data=b"print(1)"),
            Output(stream="stderr", data=b"in"),
            Result(
                exit_code=0, stdout_truncated=False, stderr_truncated=False, limits_hit=[], duration_ms=1.0
            ),
        ]

    await with_pool(pool, body)


async def test_runner_runs_a_program_through_the_pool(agents: TaskGroup, state_dir: Path) -> None:
    """Runner.run over a real pool and a fake agent returns the agent's answer as a succeeded run."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=1)
    run_results = []

    async def body() -> None:
        run_results.append(await Runner(pool, Environments.load(settings())).run(b"print(2)", b"", 1.0))
        # Used by its run: destroyed, never given back for another.
        await eventually(lambda: engine.created[0] in engine.destroyed)

    await with_pool(pool, body)
    (run,) = run_results
    assert (run.status, run.exit_code, run.stdout) == ("succeeded", 0, "print(2)")
    assert len(engine.destroyed) == len(engine.created)


async def test_a_container_is_removed_once_its_agent_has_answered_and_exited(
    agents: TaskGroup, state_dir: Path
) -> None:
    """The pool waits for the agent that answered to exit before the removal, which then needs no
    kill; an agent that never exits is removed anyway once AGENT_EXIT_WAIT is over."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        run = await Runner(pool, Environments.load(settings())).run(b"print(2)", b"", 1.0)
        assert run.status == "succeeded"
        await eventually(lambda: engine.created[0] in engine.destroyed)
        assert engine.removed_stopped == [engine.created[0]]
        # A sandbox whose agent answered and stays: removed after the wait, not never.
        engine.linger = True
        async with pool.lease() as sandbox:
            await use(sandbox)
            with anyio.fail_after(WAIT):
                while not isinstance(await sandbox.receive(), Result):
                    pass
            assert sandbox.answered
            started = anyio.current_time()
        await eventually(lambda: sandbox.container_id in engine.destroyed)
        assert anyio.current_time() - started >= AGENT_EXIT_WAIT * 0.9
        assert sandbox.container_id not in engine.removed_stopped

    await with_pool(pool, body)


async def test_replacement_is_made_while_the_lease_is_held(agents: TaskGroup, state_dir: Path) -> None:
    """Taking a container starts a new one at once, so the pool is back at its target before the run ends."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        async with pool.lease() as sandbox:
            await eventually(lambda: pool.stats().ready == 1)
            assert len(engine.created) == 2
            assert pool._kinds[DEFAULT].ready[0].container_id != sandbox.container_id

    await with_pool(pool, body)


async def test_a_lone_run_from_an_idle_pool_goes_before_the_pools_own_work(
    agents: TaskGroup, state_dir: Path
) -> None:
    """A run leased from a full, idle pool that still has one ready: its replacement is made and
    the next container thawed only RUN_FIRST later, not alongside the run; a run that takes the
    last ready one ends the wait at once (the fill tests above)."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=2, can_pause=True)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 2)
        async with pool.lease():
            leased = anyio.current_time()
            head = pool._kinds[DEFAULT].ready[0].container_id
            await anyio.sleep(RUN_FIRST / 2)
            assert len(engine.created) == 2
            assert engine.count("unpause", head) == 0
            await eventually(lambda: len(engine.created) == 3 and engine.count("unpause", head) == 1)
            assert anyio.current_time() - leased >= RUN_FIRST

    await with_pool(pool, body)


async def test_a_second_run_ends_the_lone_runs_head_start(agents: TaskGroup, state_dir: Path) -> None:
    """Under load runs and refills share the CPUs: once a second run is leased, replacements for
    both are made at once, though ready containers remain."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=3)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 3)
        async with pool.lease(), pool.lease():
            await eventually(lambda: len(engine.created) == 5, timeout=RUN_FIRST / 2)

    await with_pool(pool, body)


async def test_lease_waits_for_a_container_when_none_is_ready(agents: TaskGroup, state_dir: Path) -> None:
    """A lease on an empty pool waits and gets the next container that becomes ready."""
    engine = FakeEngine(agents)
    # At most two alive: with one leased, exactly one replacement may be starting.
    pool = make_pool(engine, state_dir, size=1, max_size=2)
    got: list[str] = []

    async def second() -> None:
        async with pool.lease() as sandbox:
            got.append(sandbox.container_id)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        engine.gate = anyio.Event()  # the replacement cannot start yet
        async with pool.lease() as first, anyio.create_task_group() as tg:
            tg.start_soon(second)
            await eventually(waiting(pool, 1))
            assert got == []
            assert pool.stats().starting == 1
            engine.gate.set()
            await eventually(lambda: len(got) == 1)
            assert got[0] != first.container_id

    await with_pool(pool, body)


async def test_lease_raises_pool_unavailable_after_acquire_timeout(
    agents: TaskGroup, state_dir: Path
) -> None:
    """With no container ready within acquire_timeout, the lease raises PoolUnavailable, and not sooner."""
    engine = FakeEngine(agents)
    engine.gate = anyio.Event()  # nothing ever starts
    pool = make_pool(engine, state_dir, size=1, acquire_timeout=0.2)

    async def body() -> None:
        started = anyio.current_time()
        with anyio.fail_after(WAIT), pytest.raises(PoolUnavailable):
            async with pool.lease():
                raise AssertionError("leased a container that never started")
        assert anyio.current_time() - started >= 0.19

    await with_pool(pool, body)


async def test_self_test_waits_past_the_acquire_timeout_for_a_slow_first_sandbox(
    agents: TaskGroup, state_dir: Path
) -> None:
    """Start-up waits for the first sandbox as long as making it takes, not a run's acquire timeout."""
    engine = FakeEngine(agents)
    engine.gate = anyio.Event()  # the first container is slow to start
    engine.stdout = json.dumps(probe_report(from_env({}).limits)).encode()
    pool = make_pool(engine, state_dir, size=1, acquire_timeout=0.2)
    test_settings = msgspec.structs.replace(
        settings(acquire_timeout=0.2),
        server=msgspec.structs.replace(settings().server, startup_timeout=WAIT),
    )

    async def open_the_gate() -> None:
        await anyio.sleep(0.6)  # three acquire timeouts
        engine.gate.set()

    async def body() -> None:
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            tg.start_soon(open_the_gate)
            await self_test(
                pool,
                Runner(pool, Environments.load(test_settings)),
                test_settings,
                Environments.load(test_settings).default,
                cgroups=False,
                userns=False,
            )
        assert anyio.current_time() - started >= 0.6

    await with_pool(pool, body)


async def test_start_up_gives_up_after_its_own_timeout(agents: TaskGroup, state_dir: Path) -> None:
    """A first sandbox that never comes fails start-up after the start-up timeout, naming the setting."""
    engine = FakeEngine(agents)
    engine.failing_creates = -1
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        with anyio.fail_after(WAIT), pytest.raises(PoolUnavailable, match=r"STARTUP_TIMEOUT.*no space left"):
            await pool.wait_serving(0.3, progress_every=0.1)

    await with_pool(pool, body)


async def test_lease_on_a_pool_that_is_not_running_times_out(state_dir: Path) -> None:
    """A pool that was never run has nothing to lease and says so after acquire_timeout."""
    async with anyio.create_task_group() as tg:
        pool = make_pool(FakeEngine(tg), state_dir, acquire_timeout=0.05)
        with anyio.fail_after(WAIT), pytest.raises(PoolUnavailable, match="no sandbox"):
            async with pool.lease():
                pass


# Failures -------------------------------------------------------------------------------------


async def test_failed_creates_back_off_instead_of_looping(agents: TaskGroup, state_dir: Path) -> None:
    """A create that always fails is retried at a bounded rate, and the failure is reported in stats."""
    engine = FakeEngine(agents)
    engine.failing_creates = -1
    pool = make_pool(engine, state_dir, size=2, refill_concurrency=2, backoff_max=0.1)

    async def body() -> None:
        await anyio.sleep(0.5)

    await with_pool(pool, body)
    # Two slots, each retrying at most every 0.1 s for 0.5 s: about 12 creates; a hot loop makes thousands.
    attempts = len(engine.create_times)
    assert 4 <= attempts <= 16
    stats = pool.stats()
    assert stats.failures == attempts
    assert stats.last_error == "podman create failed: no space left on device"
    assert stats.ready == 0
    assert not pool.serving


async def test_backoff_grows_between_consecutive_failures(agents: TaskGroup, state_dir: Path) -> None:
    """Consecutive failures wait longer each time: a retry after about 0.5 s, the next not within 1 s."""
    engine = FakeEngine(agents)
    engine.failing_creates = -1
    pool = make_pool(engine, state_dir, size=1, refill_concurrency=1, backoff_max=30)

    async def body() -> None:
        await anyio.sleep(0.9)

    await with_pool(pool, body)
    assert len(engine.create_times) == 2
    assert engine.create_times[1] - engine.create_times[0] >= 0.45


async def test_pool_recovers_after_failed_creates(agents: TaskGroup, state_dir: Path) -> None:
    """After a few failed creates the pool still fills, and the last error stays visible."""
    engine = FakeEngine(agents)
    engine.failing_creates = 3
    pool = make_pool(engine, state_dir, size=2, backoff_max=0.05)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 2)
        stats = pool.stats()
        assert stats.failures == 3
        assert stats.last_error == "podman create failed: no space left on device"

    await with_pool(pool, body)


async def test_metrics_time_each_container_made_count_failed_ones_and_paused_ready_ones(
    agents: TaskGroup, state_dir: Path
) -> None:
    """Each container made is timed once and each failed attempt counted; of the ready ones, those
    still paused (not the head, thawed ahead of demand) are counted apart."""
    engine = FakeEngine(agents)
    engine.failing_creates = 2
    pool = make_pool(engine, state_dir, size=2, backoff_max=0.05, can_pause=True)
    starts = REGISTRY.get_sample_value("warmpod_container_start_seconds_count") or 0.0
    failures = REGISTRY.get_sample_value("warmpod_refill_failures_total") or 0.0

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 2 and pool.stats().paused == 1)
        assert REGISTRY.get_sample_value("warmpod_container_start_seconds_count") == starts + 2
        assert REGISTRY.get_sample_value("warmpod_refill_failures_total") == failures + 2

    await with_pool(pool, body)


@pytest.mark.parametrize(
    "hello",
    [
        pytest.param(
            {"type": "hello", "version": protocol.PROTOCOL_VERSION + 1, "pid": 1}, id="wrong-version"
        ),
        pytest.param({"type": "error", "message": "no interpreter"}, id="error"),
        pytest.param({"type": "hello"}, id="invalid"),
        pytest.param(b'{"type":"hello","version":2,"pid":1,"preload_failed":["\xff"]}', id="not-utf8"),
    ],
)
async def test_container_with_a_bad_greeting_is_destroyed(
    agents: TaskGroup, state_dir: Path, hello: dict[str, Any] | bytes
) -> None:
    """A container whose agent greets wrongly counts as a failure, is destroyed and never leased."""
    engine = FakeEngine(agents)
    if isinstance(hello, bytes):
        engine.hello_body = hello
    else:
        engine.hello = hello
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        await eventually(lambda: pool.stats().failures >= 1)
        await eventually(lambda: engine.created[0] in engine.destroyed)
        assert pool.stats().ready == 0
        assert pool.stats().last_error

    await with_pool(pool, body)


async def test_silent_agent_times_out_and_is_destroyed(agents: TaskGroup, state_dir: Path) -> None:
    """An agent that accepts but never says hello fails the start after start_timeout and is destroyed."""
    engine = FakeEngine(agents)
    engine.silent = True
    pool = make_pool(engine, state_dir, size=1, start_timeout=0.1)

    async def body() -> None:
        await eventually(lambda: pool.stats().failures >= 1)
        await eventually(lambda: engine.created[0] in engine.destroyed)
        last_error = pool.stats().last_error
        assert last_error is not None
        assert re.fullmatch(rf"agent of warmpod-{INSTANCE[:8]}-\d+ did not answer in time", last_error)

    await with_pool(pool, body)


async def test_socket_that_exists_before_it_listens_is_not_fatal(agents: TaskGroup, state_dir: Path) -> None:
    """An agent socket file that appears before listen() (the agent binds, chmods, then listens) is retried,
    not allowed to crash the pool with ConnectionRefusedError."""
    engine = FakeEngine(agents)
    engine.listen_delay = 0.05
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)

    await with_pool(pool, body)


async def test_vanished_state_directory_is_a_failure_not_a_crash(agents: TaskGroup, state_dir: Path) -> None:
    """A missing state directory (say, a tmp cleaner ran) makes fills fail and retry; the pool runs on."""
    engine = FakeEngine(agents)
    gone = state_dir / "gone"
    pool = make_pool(engine, gone, size=1, backoff_max=0.05)

    async def body() -> None:
        await eventually(lambda: pool.stats().failures >= 1)
        gone.mkdir()
        await eventually(lambda: pool.stats().ready == 1)

    await with_pool(pool, body)


# Pausing --------------------------------------------------------------------------------------


async def test_idle_containers_are_paused_and_unpaused_on_lease(agents: TaskGroup, state_dir: Path) -> None:
    """Where the engine can pause, each container is paused once ready and unpaused before its run."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=2, can_pause=True)
    assert pool.can_pause

    leased: list[str] = []

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 2)
        for container_id in engine.created:
            assert engine.count("pause", container_id) == 1
        async with pool.lease() as sandbox:
            assert not sandbox.paused
            cid = sandbox.container_id
            assert engine.count("unpause", cid) == 1
            assert engine.calls.index(("pause", cid)) < engine.calls.index(("unpause", cid))
            leased.append(cid)

    await with_pool(pool, body)
    (cid,) = leased
    assert engine.calls.index(("unpause", cid)) < engine.calls.index(("destroy", cid))


async def test_container_that_cannot_be_unpaused_is_destroyed_not_leased(
    agents: TaskGroup, state_dir: Path
) -> None:
    """A lease whose container fails to unpause raises EngineError, and that container is destroyed."""
    engine = FakeEngine(agents)
    engine.failing_unpause = True  # the early thaw after the fill fails too
    pool = make_pool(engine, state_dir, size=1, can_pause=True)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        with pytest.raises(EngineError):
            async with pool.lease():
                raise AssertionError("leased a container that is still paused")
        await eventually(lambda: engine.created[0] in engine.destroyed)
        assert pool.stats().busy == 0

    await with_pool(pool, body)


async def test_a_container_that_cannot_be_paused_serves_running(agents: TaskGroup, state_dir: Path) -> None:
    """A failed pause (runc's freezer giving up on a busy host) keeps the container ready, running,
    and is no pool error: before, it was destroyed and /health named the failure."""
    engine = FakeEngine(agents)
    engine.failing_pause = True
    pool = make_pool(engine, state_dir, size=2, can_pause=True)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 2)
        assert engine.destroyed == []
        assert pool.stats().last_error is None
        async with pool.lease() as sandbox:
            assert not sandbox.paused
            assert sandbox.container_id in engine.created[:2]

    await with_pool(pool, body)


@pytest.mark.parametrize(("can_pause", "pause_setting"), [(False, True), (True, False)])
async def test_no_pausing_when_the_engine_cannot_or_settings_forbid(
    agents: TaskGroup, state_dir: Path, can_pause: bool, pause_setting: bool
) -> None:
    """Without engine support, or with pool.pause off, no container is ever paused or unpaused."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=2, can_pause=can_pause, pause=pause_setting)
    assert not pool.can_pause

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 2)
        async with pool.lease() as sandbox:
            assert not sandbox.paused

    await with_pool(pool, body)
    assert engine.count("pause") == 0
    assert engine.count("unpause") == 0


# Leftovers and shutdown -------------------------------------------------------------------------


async def test_remove_leftovers_only_removes_dead_servers_on_this_host(
    agents: TaskGroup, state_dir: Path
) -> None:
    """Containers of a dead warmpod on this host are removed; live, other-host and own ones are kept."""
    engine = FakeEngine(agents)
    host = socket.gethostname()
    dead = await dead_pid()
    engine.containers = {
        "dead-here": {LABEL_INSTANCE: "old", LABEL_HOST: host, LABEL_PID: dead},
        "dead-here-2": {LABEL_INSTANCE: "older", LABEL_HOST: host, LABEL_PID: dead},
        "live-here": {LABEL_INSTANCE: "other", LABEL_HOST: host, LABEL_PID: str(os.getpid())},
        "parent-here": {LABEL_INSTANCE: "parent", LABEL_HOST: host, LABEL_PID: str(os.getppid())},
        "dead-elsewhere": {LABEL_INSTANCE: "remote", LABEL_HOST: host + "-other", LABEL_PID: dead},
        "no-host": {LABEL_INSTANCE: "remote2", LABEL_PID: dead},
        "mine": {LABEL_INSTANCE: INSTANCE, LABEL_HOST: host, LABEL_PID: dead},
    }
    pool = make_pool(engine, state_dir)
    assert await pool.remove_leftovers() == 2
    assert sorted(engine.destroyed) == ["dead-here", "dead-here-2"]
    assert sorted(engine.containers) == ["dead-elsewhere", "live-here", "mine", "no-host", "parent-here"]


async def test_run_removes_leftovers_before_filling(agents: TaskGroup, state_dir: Path) -> None:
    """Starting the pool removes a dead server's containers before its own first create."""
    engine = FakeEngine(agents)
    dead = await dead_pid()
    engine.containers = {"stale": {LABEL_INSTANCE: "old", LABEL_HOST: socket.gethostname(), LABEL_PID: dead}}
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)

    await with_pool(pool, body)
    assert engine.calls.index(("destroy", "stale")) < engine.calls.index(("create", "c001"))


def leave_owner_lock(state_dir: Path, token: str) -> None:
    """The lock file a server killed with SIGKILL leaves: there, and held by nobody."""
    (state_dir / "owners").mkdir(exist_ok=True)
    (state_dir / "owners" / f"{token}.lock").touch()


async def test_a_restarted_servers_leftovers_are_removed_whatever_its_pid_says(
    agents: TaskGroup, state_dir: Path
) -> None:
    """Containers whose owner lock in this state directory is free are removed even though their
    pid label names a live process (a server restarted in its container is PID 2 again) or
    another host (Quadlet gives the restarted container a new hostname), and their lock files go."""
    engine = FakeEngine(agents)
    host = socket.gethostname()
    leave_owner_lock(state_dir, "crashed")
    leave_owner_lock(state_dir, "renamed")
    leave_owner_lock(state_dir, "nocontainers")
    (state_dir / "warmpod-crashed-1").mkdir()
    (state_dir / "warmpod-crashed-1" / "agent.sock").touch()
    (state_dir / "warmpod-renamed-7").mkdir()
    (state_dir / f"warmpod-{INSTANCE[:8]}-1").mkdir()
    engine.containers = {
        "same-pid": {LABEL_INSTANCE: "crashed", LABEL_HOST: host, LABEL_PID: str(os.getpid())},
        "new-host": {LABEL_INSTANCE: "renamed", LABEL_HOST: host + "-old", LABEL_PID: "2"},
    }
    pool = make_pool(engine, state_dir)
    assert await pool.remove_leftovers() == 2
    assert sorted(engine.destroyed) == ["new-host", "same-pid"]
    assert sorted(path.name for path in (state_dir / "owners").iterdir()) == []
    # Their agents' directories go with them; this server's own stay.
    assert sorted(path.name for path in state_dir.iterdir()) == ["owners", f"warmpod-{INSTANCE[:8]}-1"]


async def test_a_live_owner_lock_keeps_its_containers_whatever_its_pid_says(
    agents: TaskGroup, state_dir: Path
) -> None:
    """A container whose owner lock is held is kept, even with a dead pid on this host, and so is
    a container whose token has no lock file here and whose host is another (a server sharing
    the Podman storage with a state directory of its own); a held lock's agents' directories stay."""
    engine = FakeEngine(agents)
    host = socket.gethostname()
    dead = await dead_pid()
    # flock belongs to an open file: this process's own holder looks like another server's.
    holder = OwnerLock(state_dir, "running")
    holder.acquire()
    (state_dir / "warmpod-running-1").mkdir()
    try:
        engine.containers = {
            "held": {LABEL_INSTANCE: "running", LABEL_HOST: host, LABEL_PID: dead},
            "elsewhere": {LABEL_INSTANCE: "stranger", LABEL_HOST: host + "-other", LABEL_PID: dead},
            "bad-token": {LABEL_INSTANCE: "../owners/running", LABEL_HOST: host + "-other", LABEL_PID: dead},
        }
        pool = make_pool(engine, state_dir)
        assert await pool.remove_leftovers() == 0
        assert engine.destroyed == []
        assert (state_dir / "owners" / "running.lock").exists()
        assert (state_dir / "warmpod-running-1").exists()
    finally:
        holder.release()


async def test_a_leftover_that_cannot_be_removed_keeps_its_lock_file(
    agents: TaskGroup, state_dir: Path
) -> None:
    """If a gone owner's container cannot be destroyed, its lock file stays so the next start
    still knows the container is a leftover."""
    engine = FakeEngine(agents)
    leave_owner_lock(state_dir, "crashed")
    engine.containers = {"stuck": {LABEL_INSTANCE: "crashed", LABEL_HOST: "elsewhere", LABEL_PID: "2"}}
    engine.failing_destroys.add("stuck")
    pool = make_pool(engine, state_dir)
    assert await pool.remove_leftovers() == 0
    assert (state_dir / "owners" / "crashed.lock").exists()


async def test_the_pool_holds_its_owner_lock_while_it_runs(agents: TaskGroup, state_dir: Path) -> None:
    """While the pool runs its owner lock is held (another start sees it alive), and a stop removes it."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=1)
    other = Pool(
        settings(),
        engine,
        environments=[(Environments.load(settings()).default, "localhost/warmpod-runner:test")],
        state_dir=state_dir,
        instance="another0start",
        can_pause=False,
        can_limit=True,
    )

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        assert await other.remove_leftovers() == 0
        assert engine.destroyed == []

    await with_pool(pool, body)
    assert not (state_dir / "owners" / f"{INSTANCE}.lock").exists()


async def test_cancelling_the_pool_destroys_every_container(agents: TaskGroup, state_dir: Path) -> None:
    """On cancellation ready, leased and still-starting containers are all destroyed, directories too."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=3)
    leased = anyio.Event()

    async def hold() -> None:
        async with pool.lease():
            leased.set()
            await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        await tg.start(pool.serve)
        await eventually(lambda: pool.stats().ready == 3)
        engine.gate = anyio.Event()  # the replacement for the leased one hangs in start
        tg.start_soon(hold)
        await leased.wait()
        await eventually(lambda: engine.count("start") == 4)
        stats = pool.stats()
        assert (stats.ready, stats.busy, stats.starting) == (2, 1, 1)
        tg.cancel_scope.cancel()

    assert len(engine.created) == 4
    assert sorted(engine.destroyed) == sorted(engine.created)
    assert engine.containers == {}
    assert list(state_dir.iterdir()) == []
    assert pool.stats().ready == 0


# Adapting to demand ------------------------------------------------------------------------------


def preload_of(engine: FakeEngine, container_id: str) -> str:
    """The preload list a container was created with."""
    env = engine.specs[container_id]["env"]
    assert isinstance(env, dict)
    return str(env["WARMPOD_PRELOAD"])


async def test_target_grows_under_demand_but_never_past_max_size(agents: TaskGroup, state_dir: Path) -> None:
    """Runs that find the pool empty double its target; ready, starting and busy stay within max_size."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=None, min_size=1, max_size=3, refill_concurrency=4)
    release = anyio.Event()
    peak: list[int] = []

    async def hold() -> None:
        async with pool.lease() as sandbox:
            await use(sandbox)
            await release.wait()

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        assert pool.target == 1
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(hold)

            def grown() -> bool:
                stats = pool.stats()
                peak.append(stats.ready + stats.starting + stats.busy)
                return pool.target == 3 and stats.busy == 3

            await eventually(grown)
            release.set()

    await with_pool(pool, body)
    assert max(peak) == 3
    assert len(engine.created) >= 5


async def test_a_container_being_removed_counts_toward_max_size(agents: TaskGroup, state_dir: Path) -> None:
    """A used container lives until its removal ends (its agent may still be exiting, or be killed):
    the pool makes its replacement only then, so the containers alive never exceed max_size."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=None, min_size=2, max_size=2)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 2)
        engine.destroy_gate = anyio.Event()
        async with pool.lease() as sandbox:
            await use(sandbox)
        await eventually(lambda: pool.stats().closing == 1)
        await anyio.sleep(0.2)
        assert len(engine.created) == 2
        assert len(engine.containers) == 2
        stats = pool.stats()
        assert (stats.ready, stats.starting, stats.busy, stats.closing) == (1, 0, 0, 1)
        engine.destroy_gate.set()
        await eventually(lambda: pool.stats().ready == 2)
        assert pool.stats().closing == 0
        assert len(engine.created) == 3
        assert len(engine.containers) == 2

    await with_pool(pool, body)


async def test_target_shrinks_back_to_min_size_when_idle(agents: TaskGroup, state_dir: Path) -> None:
    """After shrink_after seconds without a shortage the target halves to min_size and surplus goes."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=None, min_size=1, max_size=4, shrink_after=0.3)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        async with pool.lease() as sandbox:
            await use(sandbox)
        async with pool.lease() as sandbox:  # finds the pool empty: the target doubles
            await use(sandbox)
            assert pool.target == 2
        await eventually(lambda: pool.stats().ready == 2)
        await eventually(lambda: pool.target == 1)
        await eventually(lambda: pool.stats().ready == 1)
        await eventually(lambda: len(engine.destroyed) == 3)

    await with_pool(pool, body)


async def test_waiting_runs_get_containers_in_arrival_order(agents: TaskGroup, state_dir: Path) -> None:
    """Runs waiting on an empty pool are served first come, first served."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=None, min_size=1, max_size=8, refill_concurrency=1)
    order: list[int] = []

    async def take(index: int) -> None:
        async with pool.lease() as sandbox:
            await use(sandbox)
            order.append(index)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        engine.gate = anyio.Event()
        async with pool.lease() as first, anyio.create_task_group() as tg:
            await use(first)
            for index in range(6):
                tg.start_soon(take, index)
                await eventually(waiting(pool, index + 1))
            engine.gate.set()
        await eventually(lambda: len(order) == 6)

    await with_pool(pool, body)
    assert order == list(range(6))


async def test_containers_preload_while_calm_and_start_bare_for_waiting_runs(
    agents: TaskGroup, state_dir: Path
) -> None:
    """Containers made while the pool keeps up preload the modules; one made while a run waits starts bare."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=1, preload=["numpy", "pandas"], can_pause=True)
    got: list[str] = []

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        engine.gate = anyio.Event()
        async with pool.lease() as sandbox, anyio.create_task_group() as tg:
            await use(sandbox)
            await eventually(lambda: len(engine.created) == 2)  # the replacement, held at the gate
            tg.start_soon(take_one, pool, got)
            await eventually(lambda: len(engine.created) >= 3)
            engine.gate.set()
        await eventually(lambda: len(engine.destroyed) >= 2)
        first, replacement, extra = engine.created[:3]
        assert preload_of(engine, first) == "numpy,pandas"
        assert preload_of(engine, replacement) == "numpy,pandas"
        assert preload_of(engine, extra) == ""
        # It became ready while the run waited for it: pausing it would only have delayed that run.
        assert engine.count("pause", got[0]) == 0
        assert engine.count("pause", first) == 1

    await with_pool(pool, body)


@pytest.mark.parametrize(("demand", "preloaded"), [(True, "numpy,pandas"), (False, "")])
async def test_under_load_containers_preload_as_the_runs_claimed_lately_want(
    agents: TaskGroup, state_dir: Path, demand: bool, preloaded: str
) -> None:
    """A container made while a run waits preloads when the runs claimed lately wanted preloaded
    sandboxes (they import libraries), and starts bare when they did not."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, size=1, preload=["numpy", "pandas"], can_pause=True)
    got: list[str] = []

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        for _ in range(30):
            pool.note_demand(DEFAULT, demand)
        engine.gate = anyio.Event()
        async with pool.lease() as sandbox, anyio.create_task_group() as tg:
            await use(sandbox)
            await eventually(lambda: len(engine.created) == 2)
            tg.start_soon(take_one, pool, got)
            await eventually(lambda: len(engine.created) >= 3)
            engine.gate.set()
        await eventually(lambda: len(engine.destroyed) >= 2)
        assert preload_of(engine, engine.created[2]) == preloaded

    await with_pool(pool, body)


@pytest.mark.parametrize(
    ("code", "wants"),
    [
        (b"print(1)\n", False),
        (b"import os, sys\nfrom collections import Counter\nimport json as j\n", False),
        (b"import numpy as np\n", True),
        (b"import os\nimport pandas\n", True),
        (b"from matplotlib import pyplot\n", True),
        (b"import os.path, scipy.stats as st\n", True),
        (b"if True:\n    import pyarrow\n", True),
        (b"# import numpy\nx = 'import pandas'\n", False),
        (b"from . import x\nfrom __future__ import annotations\n", False),
        (b"x = 1\n" * 20000 + b"import numpy\n", False),
    ],
)
def test_runs_that_import_libraries_want_a_preloaded_sandbox(code: bytes, wants: bool) -> None:
    """A program importing a module from outside the standard library (in its first 64 KiB) wants
    a preloaded sandbox; one using the standard library only does not."""
    assert imports_libraries(code) is wants


async def take_one(pool: Pool, got: list[str]) -> None:
    """Lease a container, note which, and use it (so that it is destroyed after the block)."""
    async with pool.lease() as sandbox:
        await use(sandbox)
        got.append(sandbox.container_id)


async def test_failed_preloads_are_reported_and_containers_still_serve(
    agents: TaskGroup, state_dir: Path
) -> None:
    """Modules the agent could not preload show in the pool's stats, and runs go on."""
    engine = FakeEngine(agents)
    engine.hello = {**engine.hello, "preload_failed": ["nosuchmodule"]}
    pool = make_pool(engine, state_dir, size=1, preload=["numpy", "nosuchmodule"])

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        assert pool.stats().preload_failed == ["nosuchmodule"]
        async with pool.lease() as sandbox:
            assert sandbox.container_id == engine.created[0]

    await with_pool(pool, body)


async def test_memory_below_what_the_sandbox_holds_is_refused(agents: TaskGroup, state_dir: Path) -> None:
    """Lowering a sandbox's memory below what it held when ready raises InvalidRun, without an update."""
    engine = FakeEngine(agents)
    engine.hello = {**engine.hello, "memory": 60 * 1024 * 1024}
    pool = make_pool(engine, state_dir, size=1)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        async with pool.lease() as sandbox:
            assert sandbox.memory == 60 * 1024 * 1024
            with pytest.raises(InvalidRun, match="memory_mb must be at least 64 MiB"):
                await sandbox.limit_memory(32 * 1024 * 1024)
            assert engine.count("update_memory") == 0
            assert await sandbox.limit_memory(128 * 1024 * 1024)
            assert engine.count("update_memory") == 1

    await with_pool(pool, body)


async def test_after_a_failed_start_the_next_container_is_bare(agents: TaskGroup, state_dir: Path) -> None:
    """After a failed start the next container is bare, so a broken preload cannot keep the pool empty."""
    engine = FakeEngine(agents)
    engine.failing_creates = 1
    pool = make_pool(engine, state_dir, size=1, preload=["numpy"], backoff_max=0.05)

    async def body() -> None:
        await eventually(lambda: pool.stats().ready == 1)
        async with pool.lease() as sandbox:
            await use(sandbox)
        await eventually(lambda: len(engine.created) == 2)

    await with_pool(pool, body)
    bare, after = engine.created
    assert preload_of(engine, bare) == ""
    assert preload_of(engine, after) == "numpy"


@pytest.mark.parametrize(("preload", "at_once"), [(["numpy", "pandas"], 2), ([], 4)])
async def test_preloading_containers_are_made_one_per_cpu_at_once(
    agents: TaskGroup, state_dir: Path, monkeypatch: pytest.MonkeyPatch, preload: list[str], at_once: int
) -> None:
    """On 2 CPUs, a pool of 4 refilling 4 at once starts 2 preloading containers at a time (their
    imports would only take turns on the CPUs), and bare ones 4 at a time."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    engine = FakeEngine(agents)
    engine.gate = anyio.Event()
    pool = make_pool(engine, state_dir, size=4, refill_concurrency=4, preload=preload)

    async def body() -> None:
        await eventually(lambda: len(engine.created) == at_once)
        await anyio.sleep(0.1)
        assert len(engine.created) == at_once
        engine.gate.set()
        await eventually(lambda: pool.stats().ready == 4)
        assert {preload_of(engine, c) for c in engine.created} == {",".join(preload)}

    await with_pool(pool, body)
