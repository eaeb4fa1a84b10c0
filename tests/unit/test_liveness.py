"""A node's own live runs survive what only several nodes need leases for: on SQLite, a store
that cannot be renewed for longer than the lease stops nothing; and a submit whose store answer
was lost still names the run it stored (fake sandboxes, the real store)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest
from support.fakes import FakeLeaser, RecordingRunner
from support.waiting import until

from warmpod.errors import StoreError
from warmpod.models import RunSpec
from warmpod.queue.node import QueueNode
from warmpod.queue.store.base import Added, Beat, Fence, Owner, Replay
from warmpod.queue.store.sqlite import SqliteStore
from warmpod.settings import LimitSettings, NodeSettings, QueueSettings

LEASE = 1.0
SPEC = RunSpec(code=b"pass", stdin=b"", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=1 << 20)


async def test_a_sqlite_node_keeps_its_run_through_a_store_outage_longer_than_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats fail for three leases on SQLite: the run is neither stopped nor reaped, and its
    result is recorded once the store answers again."""
    store = await SqliteStore.open(tmp_path / "runs.sqlite3")
    leaser = FakeLeaser()
    runner = RecordingRunner(leaser, LimitSettings())
    runner.hold = anyio.Event()
    queue = QueueNode(store, leaser, runner, QueueSettings(), 1, node=NodeSettings(name="a", lease=LEASE))
    renew = store.heartbeat

    async def unreachable(
        owner: Owner, lease: float, fences: list[Fence], environments: Sequence[str] = ()
    ) -> Beat:
        raise StoreError("database is locked")

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(queue.serve)
            run_id = await queue.admission.submit(SPEC)
            await until(lambda: queue.workers.running > 0)
            monkeypatch.setattr(store, "heartbeat", unreachable)
            await anyio.sleep(LEASE * 3)  # the outage is the test: three leases without a beat
            assert queue.workers.running == 1
            monkeypatch.setattr(store, "heartbeat", renew)
            runner.hold.set()
            result = await queue.results.wait(run_id, 5)
            tg.cancel_scope.cancel()
        assert result is not None
        assert result.status == "succeeded"
    finally:
        await store.aclose()


async def test_a_submit_whose_add_answer_is_lost_names_the_stored_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store keeps the run but its answer is lost: the submit still answers the run's id (read
    back), so the client has no reason to submit it again; an add that stored nothing stays an error."""
    store = await SqliteStore.open(tmp_path / "runs.sqlite3")
    leaser = FakeLeaser()
    queue = QueueNode(store, leaser, RecordingRunner(leaser, LimitSettings()), QueueSettings(), 1)
    real = store.add
    committed = True

    async def answer_lost(run_id: str, spec: RunSpec, **options: Any) -> Added | Replay:
        if committed:
            await real(run_id, spec, **options)
        raise StoreError("the run store did not answer within 10 s")

    monkeypatch.setattr(store, "add", answer_lost)
    try:
        run_id = await queue.admission.submit(SPEC)
        record = await store.get(run_id)
        assert record is not None
        assert record.status == "queued"
        committed = False
        with pytest.raises(StoreError):
            await queue.admission.submit(SPEC)
        assert await store.queued() == [run_id]
    finally:
        await store.aclose()


async def test_a_slow_heartbeat_does_not_push_the_next_one_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beats start a third of a lease apart however long each took: one that took most of its time
    (a store under load) followed by one that failed must leave a beat before the lease runs out."""
    store = await SqliteStore.open(tmp_path / "runs.sqlite3")
    leaser = FakeLeaser()
    queue = QueueNode(
        store,
        leaser,
        RecordingRunner(leaser, LimitSettings()),
        QueueSettings(),
        1,
        node=NodeSettings(lease=LEASE),
    )
    renew = store.heartbeat
    started: list[float] = []

    async def slow(owner: Owner, lease: float, fences: list[Fence], environments: Sequence[str] = ()) -> Beat:
        started.append(time.monotonic())
        await anyio.sleep(LEASE / 4)  # the delay is the test: a beat that takes most of its time
        return await renew(owner, lease, fences, environments)

    monkeypatch.setattr(store, "heartbeat", slow)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(queue.serve)
            await until(lambda: len(started) >= 4)
            tg.cancel_scope.cancel()
    finally:
        await store.aclose()
    gaps = [round(later - earlier, 3) for earlier, later in itertools.pairwise(started)]
    assert max(gaps) < LEASE / 3 + 0.1, f"seconds between beats' starts: {gaps}"
