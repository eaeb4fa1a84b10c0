"""Stand-ins for what a test never calls (an engine, a store, an agent), each of the real protocol:
any call fails the test."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import anyio
from anyio.abc import ByteStream, TaskStatus

from warmpod.environments import DEFAULT
from warmpod.models import Chunk, RunResult, RunSpec
from warmpod.queue.store.base import (
    OUTPUT_PAGE,
    Added,
    BatchReplay,
    Beat,
    CancelOutcome,
    Claim,
    Fence,
    Idempotency,
    Listed,
    Notice,
    Owner,
    Position,
    Record,
    Replay,
    RunFilter,
)
from warmpod.queue.store.outbox import Delivery, Tried
from warmpod.sandbox.protocol import MAX_FRAME, Channel
from warmpod.sandbox.sandbox import Sandbox


def never(what: str) -> NoReturn:
    """Fail the test: it called ``what``, which it never should."""
    raise AssertionError(f"{what} was called, and this test never calls it")


class NoEngine:
    """A ``sandbox.Engine`` the pool is never run against (the API suites' pool only reports)."""

    async def create(self, spec: dict[str, object]) -> str:
        never("Engine.create")

    async def start(self, container_id: str) -> None:
        never("Engine.start")

    async def pause(self, container_id: str) -> None:
        never("Engine.pause")

    async def unpause(self, container_id: str) -> None:
        never("Engine.unpause")

    async def destroy(self, container_id: str) -> None:
        never("Engine.destroy")

    async def oom_killed(self, container_id: str) -> bool:
        never("Engine.oom_killed")

    async def update_memory(self, container_id: str, limit_bytes: int) -> None:
        never("Engine.update_memory")

    async def list_labelled(self, label: str) -> list[tuple[str, dict[str, str]]]:
        never("Engine.list_labelled")


class NoAgent(ByteStream):
    """The connection of a sandbox whose agent is never spoken to."""

    async def receive(self, max_bytes: int = 65536) -> bytes:
        never("the agent connection's receive")

    async def send(self, item: bytes) -> None:
        never("the agent connection's send")

    async def send_eof(self) -> None:
        never("the agent connection's send_eof")

    async def aclose(self) -> None:
        never("the agent connection's aclose")


def placeholder_sandbox() -> Sandbox:
    """A bare sandbox for a runner that never touches it: its agent and engine fail the test."""
    return Sandbox(
        "c000", "warmpod-placeholder", Path("/nonexistent"), Channel(NoAgent(), MAX_FRAME), NoEngine()
    )


class NoStore:
    """A ``queue.store.Store`` for a queue node that is never started (what /health reads before the
    app's lifespan has run)."""

    shared = False

    async def join(self, owner: Owner, lease: float, message: str) -> list[str]:
        never("Store.join")

    async def leave(self, owner: Owner) -> None:
        never("Store.leave")

    async def add(
        self,
        run_id: str,
        spec: RunSpec,
        *,
        max_queued: int,
        key: str | None = None,
        max_active: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Added | Replay:
        never("Store.add")

    async def add_batch(
        self,
        items: Sequence[tuple[str, RunSpec]],
        *,
        max_queued: int,
        key: str | None = None,
        max_active: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Added | BatchReplay:
        never("Store.add_batch")

    async def queued(self) -> list[str]:
        never("Store.queued")

    async def claim(
        self, owner: Owner, lease: float, *, environment: str = DEFAULT, warm: bool = False
    ) -> Claim | None:
        never("Store.claim")

    async def next_environment(self, environments: Sequence[str], ready: Sequence[str] = ()) -> str | None:
        never("Store.next_environment")

    async def heartbeat(
        self, owner: Owner, lease: float, fences: Sequence[Fence], environments: Sequence[str] = (DEFAULT,)
    ) -> Beat:
        never("Store.heartbeat")

    async def reap(self, message: str) -> list[str]:
        never("Store.reap")

    async def add_output(self, fence: Fence, chunks: Sequence[Chunk]) -> bool:
        never("Store.add_output")

    async def finish(
        self,
        run_id: str,
        result: RunResult,
        chunks: Sequence[Chunk] = (),
        files: Sequence[tuple[str, bytes]] = (),
        *,
        fence: Fence | None = None,
    ) -> bool:
        never("Store.finish")

    async def file_size(self, run_id: str, path: str) -> int | None:
        never("Store.file_size")

    async def file_piece(self, run_id: str, path: str, offset: int, size: int) -> bytes | None:
        never("Store.file_piece")

    async def small_files(self, run_id: str, max_bytes: int, total_bytes: int) -> dict[str, bytes]:
        never("Store.small_files")

    async def get(self, run_id: str) -> Record | None:
        never("Store.get")

    async def list_runs(
        self, key: str | None, where: RunFilter, after: Position | None, limit: int
    ) -> list[Listed]:
        never("Store.list_runs")

    async def claim_webhook(self, lease: float, skip: Sequence[str | None] = ()) -> Delivery | None:
        never("Store.claim_webhook")

    async def record_webhook(self, delivery: Delivery, tried: Tried) -> bool:
        never("Store.record_webhook")

    async def output(self, run_id: str, after: int = -1, limit: int = OUTPUT_PAGE) -> list[Chunk]:
        never("Store.output")

    async def cancel(self, run_id: str, result: RunResult) -> CancelOutcome:
        never("Store.cancel")

    async def cancel_requested(self, run_id: str) -> bool:
        never("Store.cancel_requested")

    async def purge(self, retention: float) -> int:
        never("Store.purge")

    async def listen(
        self,
        notice: Callable[[Notice, str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        never("Store.listen")

    async def aclose(self) -> None:
        never("Store.aclose")
