"""Unit tests of one sandbox's life, from start to removal, against a fake engine and fake agents."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from support import fakes
from support.fakes import FakeEngine

from warmpod.errors import InvalidRun, ProtocolError
from warmpod.sandbox import protocol
from warmpod.sandbox.protocol import Job, Output, Result
from warmpod.sandbox.sandbox import MEMORY_HEADROOM, Sandbox
from warmpod.settings import LimitSettings

LIMITS = LimitSettings(memory_mb=256, pids=64, cpus=0.5, tmpfs_mb=32, cpu_time=5)
MIB = 1024 * 1024
WAIT = 3.0


@pytest.fixture
def directory() -> Iterator[Path]:
    """An empty directory for one agent's socket, under a short path (unix socket paths are limited)."""
    parent = Path(tempfile.mkdtemp(prefix="wp-", dir="/tmp"))
    path = parent / "warmpod-x-1"
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
async def engine() -> AsyncIterator[FakeEngine]:
    """A fake engine whose agents run until the test ends."""
    async with anyio.create_task_group() as tg:
        yield FakeEngine(tg)
        tg.cancel_scope.cancel()


async def start(engine: FakeEngine, directory: Path, **changes: Any) -> Sandbox:
    """A sandbox started on ``engine`` in ``directory``, preloading nothing unless ``changes`` say."""
    options: dict[str, Any] = {
        "image": "img",
        "seccomp_profile": Path("/p/seccomp.json"),
        "name": directory.name,
        "labels": {"a": "b"},
        "directory": directory,
        "limits": LIMITS,
        "can_limit": True,
        "timeout": WAIT,
    }
    options.update(changes)
    return await Sandbox.start(engine, **options)


async def test_a_started_sandbox_is_greeted_and_leaving_it_removes_container_and_directory(
    engine: FakeEngine, directory: Path
) -> None:
    """``start`` creates and starts a container from the spec and keeps what its agent's greeting
    says; leaving ``async with`` removes the container and the agent's directory."""
    engine.hello = {**engine.hello, "memory": 60 * MIB, "landlock": 3, "preload_failed": ["nosuch"]}
    async with await start(engine, directory, preload=("numpy", "nosuch")) as sandbox:
        assert engine.created == [sandbox.container_id]
        assert engine.count("start", sandbox.container_id) == 1
        assert engine.specs[sandbox.container_id]["name"] == directory.name
        assert (sandbox.memory, sandbox.landlock, sandbox.preload_failed) == (60 * MIB, 3, ["nosuch"])
        assert sandbox.warm
        assert sandbox.memory_floor == 60 * MIB + MEMORY_HEADROOM
        assert (sandbox.used, sandbox.answered, sandbox.paused) == (False, False, False)
    assert engine.destroyed == [sandbox.container_id]
    assert not directory.exists()


@pytest.mark.parametrize(
    ("hello", "silent"),
    [
        ({"type": "hello", "version": protocol.PROTOCOL_VERSION + 1, "pid": 1}, False),
        (None, True),
    ],
    ids=["wrong-version", "silent"],
)
async def test_a_sandbox_that_fails_to_start_leaves_nothing_behind(
    engine: FakeEngine, directory: Path, hello: dict[str, Any] | None, silent: bool
) -> None:
    """An agent that greets wrongly, or not in time, is a ProtocolError; its container and
    directory are removed before ``start`` raises."""
    if hello is not None:
        engine.hello = hello
    engine.silent = silent
    with pytest.raises(ProtocolError, match=r"greeted with|did not answer in time"):
        await start(engine, directory, timeout=0.2)
    assert engine.destroyed == engine.created
    assert len(engine.created) == 1
    assert not directory.exists()


async def test_its_flags_follow_its_own_operations() -> None:
    """Paused by ``pause`` until ``thaw``; used once a job is sent; answered once the agent's
    last frame arrives, not at its output."""
    async with fakes.scripted_sandbox(fakes.output("stdout", b"1\n"), fakes.result()) as sandbox:
        await sandbox.pause()
        assert sandbox.paused
        await sandbox.thaw()
        assert not sandbox.paused
        assert not sandbox.used
        await sandbox.send(Job(code=b"print(1)", stdin=b"", timeout=1.0, max_output_bytes=100))
        assert sandbox.used
        assert not sandbox.answered
        with anyio.fail_after(WAIT):
            assert isinstance(await sandbox.receive(), Output)
            assert not sandbox.answered
            assert isinstance(await sandbox.receive(), Result)
        assert sandbox.answered


async def test_asked_to_lower_its_memory_it_serves_no_other_run_even_if_it_refuses(
    engine: FakeEngine, directory: Path
) -> None:
    """A limit below its floor is refused with InvalidRun and no engine call, and the sandbox
    counts as used all the same; one at the floor is applied."""
    engine.hello = {**engine.hello, "memory": 60 * MIB}
    async with await start(engine, directory) as sandbox:
        with pytest.raises(InvalidRun, match="memory_mb must be at least 64 MiB"):
            await sandbox.limit_memory(32 * MIB)
        assert sandbox.used
        assert engine.count("update_memory") == 0
        assert await sandbox.limit_memory(64 * MIB)
        assert engine.count("update_memory") == 1


async def test_a_sandbox_that_cannot_be_paused_keeps_running(engine: FakeEngine, directory: Path) -> None:
    """A pause the engine fails leaves the sandbox running (not paused), an error for no one."""
    engine.failing_pause = True
    async with await start(engine, directory) as sandbox:
        await sandbox.pause()
        assert not sandbox.paused
        assert engine.count("unpause", sandbox.container_id) == 1  # in case it stayed half frozen


async def test_watching_a_resting_sandbox_ends_when_it_is_taken_or_dies(
    engine: FakeEngine, directory: Path
) -> None:
    """``watch`` returns False once ``take`` ends its rest, and True when its agent hangs up while
    it rests again."""
    async with await start(engine, directory) as sandbox:
        watched: list[bool] = []

        async def watch() -> None:
            watched.append(await sandbox.watch())

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.sleep(0.05)
            assert watched == []
            sandbox.take()
        assert watched == [False]
        sandbox.rest()
        await engine.crash(sandbox.container_id)
        with anyio.fail_after(WAIT):
            assert await sandbox.watch()
