"""Admission of batches over a real SQLite store: all or none, the refusals and what they say, a
retried batch, a stop, and a batch stored though the store's answer was lost."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
import pytest

from warmpod.errors import InvalidBatch, KeyBusy, KeyReused, QueueFull, ShuttingDown, StoreError
from warmpod.keys import Key
from warmpod.models import RunSpec
from warmpod.queue.admission import Admission, Shutdown
from warmpod.queue.store.base import Added, BatchReplay, Idempotency
from warmpod.queue.store.sqlite import SqliteStore
from warmpod.settings import QueueSettings

SPEC = RunSpec(code=b"print(1)", stdin=b"", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99)
SCI = msgspec.structs.replace(SPEC, environment="sci")
SETTINGS = QueueSettings(max_queued=10, max_batch=8)
ALICE = Key(name="alice", digest="0" * 64, max_active=4)


class LosingStore(SqliteStore):
    """A store whose batches are stored, but whose answer is lost (``lose``), or that fails before
    storing them (``fail``)."""

    lose = False
    fail = False

    async def add_batch(
        self,
        items: Sequence[tuple[str, RunSpec]],
        *,
        max_queued: int,
        key: str | None = None,
        max_active: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Added | BatchReplay:
        if self.fail:
            raise StoreError("the run store did not answer within 10 s")
        added = await super().add_batch(
            items, max_queued=max_queued, key=key, max_active=max_active, idempotency=idempotency
        )
        if self.lose:
            raise StoreError("the run store did not answer within 10 s")
        return added


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LosingStore]:
    """A fresh SQLite store, answering until told otherwise."""
    opened = await LosingStore.open(tmp_path / "runs.sqlite3")
    assert isinstance(opened, LosingStore)
    yield opened
    await opened.aclose()


@pytest.fixture
def admission(store: LosingStore) -> Admission:
    """Admission over ``store``, ten runs queued at most, eight to a batch."""
    return Admission(store, SETTINGS, Shutdown())


async def test_a_batch_is_queued_in_order_and_expected_by_the_backlog(
    admission: Admission, store: LosingStore
) -> None:
    """The runs come back queued, in the order of their specs, stored with them; the backlog
    knows their environment until they are heard of."""
    taken = await admission.take_batch([SPEC, SCI, SPEC])
    assert [status for _, status in taken] == ["queued"] * 3
    assert await store.queued() == [run_id for run_id, _ in taken]
    records = [await store.get(run_id) for run_id, _ in taken]
    assert [r.environment for r in records if r is not None] == ["default", "sci", "default"]
    for run_id, _ in taken:
        admission.backlog.heard("queued", run_id)
    assert admission.backlog.only_environment() is None
    admission.backlog.heard("changed", taken[1][0])
    assert admission.backlog.only_environment() == "default"


@pytest.mark.parametrize(
    ("count", "key", "words"),
    [
        (0, None, ["1 to 8", "WARMPOD_QUEUE__MAX_BATCH", "not 0"]),
        (9, None, ["1 to 8", "WARMPOD_QUEUE__MAX_BATCH", "not 9"]),
        (5, ALICE, ["alice", "max_active of 4"]),
    ],
)
async def test_a_batch_that_could_never_fit_is_refused_for_good(
    admission: Admission, store: LosingStore, count: int, key: Key | None, words: list[str]
) -> None:
    """None, more than max_batch, or more than the key's max_active: InvalidBatch (a 422, never a
    429 retried in vain), naming the bound; nothing stored."""
    with pytest.raises(InvalidBatch) as refused:
        await admission.take_batch([SPEC] * count, key)
    for word in words:
        assert word in str(refused.value)
    assert await store.queued() == []


async def test_a_batch_larger_than_the_queue_is_refused_for_good(store: LosingStore) -> None:
    """A queue of 5 can never hold a batch of 6, whatever max_batch says."""
    admission = Admission(store, QueueSettings(max_queued=5, max_batch=20), Shutdown())
    with pytest.raises(InvalidBatch, match="never fit a queue of 5"):
        await admission.take_batch([SPEC] * 6)


async def test_a_batch_without_room_is_refused_whole_with_retry_after(
    admission: Admission, store: LosingStore
) -> None:
    """Room for 5 of 6: QueueFull saying so, with Retry-After; room in the queue but not in the
    key's quota: KeyBusy saying so; nothing of either is stored."""
    await admission.take_batch([SPEC] * 5)
    with pytest.raises(QueueFull, match="no room for 6 more runs") as full:
        await admission.take_batch([SPEC] * 6)
    assert not isinstance(full.value, KeyBusy)
    assert full.value.retry_after == 1
    assert len(await store.queued()) == 5
    await admission.take_batch([SPEC] * 3, ALICE)
    with pytest.raises(KeyBusy, match="no room for 2 more runs within its max_active of 4"):
        await admission.take_batch([SPEC] * 2, ALICE)
    assert len(await store.queued()) == 8


async def test_a_retried_batch_answers_its_runs_and_another_body_is_refused(admission: Admission) -> None:
    """The same Idempotency-Key and specs answer the same ids in order; other specs under it, or
    one more run, are a reuse."""
    first = await admission.take_batch([SPEC, SCI], idempotency_key="k")
    assert await admission.take_batch([SPEC, SCI], idempotency_key="k") == first
    for other in ([SCI, SPEC], [SPEC, SCI, SPEC], [SPEC]):
        with pytest.raises(KeyReused, match=first[0][0]):
            await admission.take_batch(other, idempotency_key="k")


async def test_a_stopping_server_takes_no_batch_but_answers_a_retried_one(store: LosingStore) -> None:
    """Once the stop began a new batch is ShuttingDown, keyed or not; a stored one is still answered."""
    shutdown = Shutdown()
    admission = Admission(store, SETTINGS, shutdown)
    first = await admission.take_batch([SPEC, SPEC], idempotency_key="k")
    shutdown.begin(1.0)
    with pytest.raises(ShuttingDown):
        await admission.take_batch([SPEC])
    with pytest.raises(ShuttingDown):
        await admission.take_batch([SPEC], idempotency_key="new")
    assert await admission.take_batch([SPEC, SPEC], idempotency_key="k") == first


async def test_a_batch_stored_though_the_answer_was_lost_is_answered(
    admission: Admission, store: LosingStore
) -> None:
    """The COMMIT went through and only its answer was lost: the batch is answered with its ids.
    A store that failed before storing it raises, and the backlog expects none of it."""
    store.lose = True
    taken = await admission.take_batch([SPEC, SCI])
    assert await store.queued() == [run_id for run_id, _ in taken]
    store.lose, store.fail = False, True
    with pytest.raises(StoreError):
        await admission.take_batch([SCI, SCI])
    # What the backlog expects (private: no answer of it shows a stale expectation).
    assert set(admission.backlog._environments) == {run_id for run_id, _ in taken}
