"""A node's own live runs survive what only several nodes need leases for: on SQLite, a store
that cannot be renewed for longer than the lease stops nothing (fake sandboxes, the real store)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from fakes import FakeLeaser, RecordingRunner

from warmpod.errors import StoreError
from warmpod.models import RunSpec
from warmpod.scheduler import Scheduler
from warmpod.settings import LimitSettings, NodeSettings, QueueSettings
from warmpod.store import Beat, Fence, Owner, SqliteStore

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
    scheduler = Scheduler(store, leaser, runner, QueueSettings(), 1, node=NodeSettings(name="a", lease=LEASE))
    renew = store.heartbeat

    async def unreachable(owner: Owner, lease: float, fences: list[Fence]) -> Beat:
        raise StoreError("database is locked")

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            run_id = await scheduler.submit(SPEC)
            with anyio.fail_after(5):
                while scheduler.running == 0:
                    await anyio.sleep(0.02)
            monkeypatch.setattr(store, "heartbeat", unreachable)
            await anyio.sleep(LEASE * 3)
            assert scheduler.running == 1
            monkeypatch.setattr(store, "heartbeat", renew)
            runner.hold.set()
            result = await scheduler.wait(run_id, 5)
            tg.cancel_scope.cancel()
        assert result is not None
        assert result.status == "succeeded"
    finally:
        await store.aclose()
