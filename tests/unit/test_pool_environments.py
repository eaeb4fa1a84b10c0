"""The pool with several environments: each keeps its own warm sandboxes, a run waits only for one
of its environment, the spare capacity follows the runs, and nothing idle starves a busy one."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import TaskGroup
from support.fakes import FakeEngine
from support.waiting import until

from warmpod.environments import DEFAULT, EnvironmentSpec
from warmpod.sandbox.pool import Pool
from warmpod.sandbox.protocol import Job
from warmpod.sandbox.sandbox import Sandbox
from warmpod.settings import Settings, from_env

pytestmark = pytest.mark.anyio

IMAGES = {DEFAULT: "localhost/warmpod-runner:default", "bare": "localhost/warmpod-runner:bare"}


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="wp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def agents() -> AsyncIterator[TaskGroup]:
    """The task group the fake agents run in; cancelled after the test."""
    async with anyio.create_task_group() as tg:
        yield tg
        tg.cancel_scope.cancel()


def settings(**pool: Any) -> Settings:
    values: dict[str, Any] = {
        "min_size": 2,
        "max_size": 4,
        "acquire_timeout": 2.0,
        "start_timeout": 1.0,
        "refill_concurrency": 2,
        "backoff_max": 0.1,
        "preload": [],
    }
    values.update(pool)
    return from_env({}, pool=values)


def make_pool(engine: FakeEngine, state_dir: Path, min_warm: dict[str, int], **pool: Any) -> Pool:
    given = settings(**pool)
    return Pool(
        given,
        engine,
        environments=[
            (EnvironmentSpec(name, None, (), warm, given.limits), IMAGES[name])
            for name, warm in min_warm.items()
        ],
        state_dir=state_dir,
        instance="0123456789abcdef",
        can_pause=False,
        can_limit=True,
    )


def images(engine: FakeEngine, pool: Pool, environment: str, state: str = "ready") -> int:
    """How many of ``environment``'s sandboxes are in ``state``."""
    return int(getattr(pool.stats().environments[environment], state))


async def use(sandbox: Sandbox) -> None:
    await sandbox.send(Job(code=b"pass", stdin=b"", timeout=1.0, max_output_bytes=100))


async def test_each_environment_is_warm_with_its_own_image(agents: TaskGroup, state_dir: Path) -> None:
    """Both environments have their min_warm ready at once, each container made from its image."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, {DEFAULT: 1, "bare": 1})
    async with anyio.create_task_group() as tg:
        await tg.start(pool.serve)
        await pool.wait_serving(2.0)
        await until(lambda: images(engine, pool, DEFAULT) >= 1 and images(engine, pool, "bare") >= 1)
        made = {str(spec["image"]) for spec in engine.specs.values()}
        assert made == set(IMAGES.values())
        assert pool.served() == [DEFAULT, "bare"]
        async with pool.lease("bare") as sandbox:
            assert engine.specs[sandbox.container_id]["image"] == IMAGES["bare"]
            await use(sandbox)
        tg.cancel_scope.cancel()


async def test_a_run_waits_only_for_its_environment(agents: TaskGroup, state_dir: Path) -> None:
    """With every default sandbox ready and none of bare's, a bare lease gets a bare one, never a default."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, {DEFAULT: 1, "bare": 1})
    async with anyio.create_task_group() as tg:
        await tg.start(pool.serve)
        await pool.wait_serving(2.0)
        async with pool.lease("bare") as first:
            await use(first)
            async with pool.lease("bare") as second:
                assert engine.specs[second.container_id]["image"] == IMAGES["bare"]
                await use(second)
        tg.cancel_scope.cancel()


async def test_the_spare_capacity_follows_the_runs(agents: TaskGroup, state_dir: Path) -> None:
    """Runs claimed of one environment move the capacity above the min_warm floors its way."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, {DEFAULT: 1, "bare": 1}, min_size=4, max_size=4)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.serve)
        await pool.wait_serving(2.0)
        for _ in range(40):
            pool.note_demand("bare", False)
        targets = {name: counts.target for name, counts in pool.stats().environments.items()}
        assert targets == {DEFAULT: 1, "bare": 3}
        tg.cancel_scope.cancel()


async def test_an_idle_environment_makes_room_for_a_busy_one(agents: TaskGroup, state_dir: Path) -> None:
    """With the pool at its maximum and bare's only sandbox busy, the next bare lease is served by
    closing an idle default sandbox above default's min_warm: idle capacity never starves a run."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, {DEFAULT: 1, "bare": 1}, min_size=3, max_size=3)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.serve)
        await pool.wait_serving(2.0)
        for _ in range(40):
            pool.note_demand(DEFAULT, False)
        await until(lambda: images(engine, pool, DEFAULT) == 2 and images(engine, pool, "bare") == 1)
        async with pool.lease("bare") as first:
            await use(first)
            with anyio.fail_after(2.0):
                async with pool.lease("bare") as second:
                    await use(second)
            assert images(engine, pool, DEFAULT) >= 1  # its min_warm stays
        tg.cancel_scope.cancel()


async def test_min_warm_is_kept_whatever_the_demand(agents: TaskGroup, state_dir: Path) -> None:
    """An environment no run asks for gives up its containers above its min_warm to runs of the
    busy one that wait, and keeps its min_warm ready."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, {DEFAULT: 0, "bare": 2}, min_size=4, max_size=4)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.serve)
        await pool.wait_serving(2.0)
        await until(lambda: images(engine, pool, "bare") == 3)
        for _ in range(60):
            pool.note_demand(DEFAULT, False)
        with anyio.fail_after(3.0):
            async with pool.lease(DEFAULT) as first:
                await use(first)
                async with pool.lease(DEFAULT) as second:
                    await use(second)
                    assert images(engine, pool, "bare") == 2
        assert images(engine, pool, "bare") == 2
        tg.cancel_scope.cancel()


async def test_an_environment_without_min_warm_still_gets_its_first_sandbox(
    agents: TaskGroup, state_dir: Path
) -> None:
    """With the floors filling the target, an environment of min_warm 0 still gets the one sandbox
    the start-up self-test needs, and the pool serves."""
    engine = FakeEngine(agents)
    pool = make_pool(engine, state_dir, {DEFAULT: 2, "bare": 0}, min_size=2, max_size=3)
    async with anyio.create_task_group() as tg:
        await tg.start(pool.serve)
        await pool.wait_serving(2.0)
        assert pool.served() == [DEFAULT, "bare"]
        tg.cancel_scope.cancel()
