"""warmpod's own series outside the app: each Podman call timed under its fixed name."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream, TaskStatus
from prometheus_client import REGISTRY

from warmpod.errors import EngineError
from warmpod.host.podman_api import PodmanApi
from warmpod.metrics import PODMAN_CALLS

CONTAINER = "c0ffee" * 10


def calls(name: str) -> float:
    """How many ``name`` calls were timed so far."""
    return REGISTRY.get_sample_value("warmpod_podman_call_seconds_count", {"call": name}) or 0.0


async def failing_engine(path: Path, *, task_status: TaskStatus[None]) -> None:
    """A Podman API socket at ``path`` that answers every request 500."""
    listener = await anyio.create_unix_listener(path)

    async def answer(stream: SocketStream) -> None:
        async with stream:
            await stream.receive()
            await stream.send(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
            )

    async with listener:
        task_status.started()
        await listener.serve(answer)


async def test_each_podman_call_is_timed_under_its_name_even_when_it_fails(tmp_path: Path) -> None:
    """A call the engine fails is timed once, under its own name (one of a fixed set, never a
    container id), and still raises an EngineError naming it."""
    async with anyio.create_task_group() as tg:
        await tg.start(failing_engine, tmp_path / "podman.sock")
        runtime = PodmanApi(f"unix://{tmp_path}/podman.sock", 1)
        before = {name: calls(name) for name in PODMAN_CALLS}
        try:
            with pytest.raises(EngineError, match="podman start failed"):
                await runtime.start(CONTAINER)
            with pytest.raises(EngineError, match="podman pause failed"):
                await runtime.pause(CONTAINER)
        finally:
            runtime.close()
        tg.cancel_scope.cancel()
    moved = {name: calls(name) - before[name] for name in PODMAN_CALLS}
    assert moved == {name: 1.0 if name in ("start", "pause") else 0.0 for name in PODMAN_CALLS}
    assert REGISTRY.get_sample_value("warmpod_podman_call_seconds_count", {"call": CONTAINER}) is None
