"""The run stores' batches, SQLite and PostgreSQL alike: all of a batch's runs or none, within the
queue bound and the key's quota, against single adds racing it; their notices; their idempotency keys."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import msgspec
from support.waiting import until

from warmpod.models import RunResult, RunSpec
from warmpod.queue.store.base import BatchReplay, Idempotency, Notice, Owner, Replay, RunFilter, Store

SPEC = RunSpec(code=b"print(1)", stdin=b"", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99)
NODE = Owner(node="a", incarnation="a-1")
LEASE = 15.0
EDGE = 25
"""The queue bound of the edge tests: six runs queued leave room for 19, one fewer than a batch of 20."""


def batch(prefix: str, count: int, spec: RunSpec = SPEC) -> list[tuple[str, RunSpec]]:
    """``count`` runs of ``spec``, their ids ``prefix`` and their place."""
    return [(f"{prefix}{i}", spec) for i in range(count)]


async def stored(store: Store, items: Sequence[tuple[str, RunSpec]]) -> list[bool]:
    """Whether each of ``items`` is in the store."""
    return [await store.get(run_id) is not None for run_id, _ in items]


async def test_a_batch_at_the_queues_edge_is_stored_whole_or_not_at_all(store: Store) -> None:
    """With 19 places left, a batch of 20 is refused and none of it stored; one of 19 fills them,
    and its runs are claimed in the batch's order."""
    for run_id, spec in batch("s", 6):
        assert await store.add(run_id, spec, max_queued=EDGE) == "added"
    twenty = batch("t", 20)
    assert await store.add_batch(twenty, max_queued=EDGE) == "queue-full"
    assert await stored(store, twenty) == [False] * 20
    assert len(await store.queued()) == 6
    nineteen = batch("n", 19)
    assert await store.add_batch(nineteen, max_queued=EDGE) == "added"
    assert len(await store.queued()) == EDGE
    assert await store.add("late", SPEC, max_queued=EDGE) == "queue-full"
    claimed = []
    while (claim := await store.claim(NODE, LEASE)) is not None:
        claimed.append(claim.fence.run_id)
    assert claimed == [run_id for run_id, _ in batch("s", 6) + nineteen]


async def test_a_batch_is_held_to_its_keys_quota_whole(store: Store) -> None:
    """A key with 2 of its 5 runs active (one running, one queued) may add 3 more in a batch, not
    4; nothing of a refused batch is stored, and another key is not held back."""
    for run_id in ("a0", "a1"):
        assert await store.add(run_id, SPEC, max_queued=100, key="alice", max_active=5) == "added"
    assert await store.claim(NODE, LEASE) is not None
    four = batch("f", 4)
    assert await store.add_batch(four, max_queued=100, key="alice", max_active=5) == "key-busy"
    assert await stored(store, four) == [False] * 4
    three = batch("t", 3)
    assert await store.add_batch(three, max_queued=100, key="alice", max_active=5) == "added"
    record = await store.get("t2")
    assert record is not None
    assert (record.key, record.status) == ("alice", "queued")
    assert await store.add_batch(batch("b", 5), max_queued=100, key="bob", max_active=5) == "added"


async def test_batches_and_single_adds_racing_never_pass_the_bounds(store: Store) -> None:
    """Forty single adds and eight batches of five at once (as from several nodes) never take the
    queue past its bound nor a key past its quota, and each batch is stored whole or not at all."""
    singles: list[object] = []
    batches: dict[str, object] = {}

    async def single(i: int) -> None:
        singles.append(await store.add(f"s{i}", SPEC, max_queued=30))

    async def whole(i: int) -> None:
        batches[f"b{i}-"] = await store.add_batch(batch(f"b{i}-", 5), max_queued=30)

    async def keyed(i: int) -> None:
        batches[f"k{i}-"] = await store.add_batch(
            batch(f"k{i}-", 3), max_queued=1000, key="alice", max_active=10
        )

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(single, i)
            if i % 5 == 0:
                tg.start_soon(whole, i)
            if i % 4 == 0:
                tg.start_soon(keyed, i)
    for prefix, outcome in batches.items():
        count = 3 if prefix.startswith("k") else 5
        assert await stored(store, batch(prefix, count)) == [outcome == "added"] * count, prefix
    plain = singles.count("added") + 5 * [o for p, o in batches.items() if p.startswith("b")].count("added")
    keyed_added = [o for p, o in batches.items() if p.startswith("k")].count("added")
    # The queue's own bound: the keyed batches were given a larger one of their own.
    assert plain <= 30
    # The key's quota fits three batches of three, and nothing else competes for it.
    assert keyed_added == 3
    assert len(await store.queued()) == plain + 3 * keyed_added


async def test_every_run_of_a_batch_is_announced_and_none_of_a_refused_one(store: Store) -> None:
    """A batch added is one ``queued`` notice per run; a refused batch sends none."""
    notices: list[tuple[Notice, str]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(store.listen, lambda notice, run_id: notices.append((notice, run_id)))
        assert await store.add_batch(batch("x", 4), max_queued=3) == "queue-full"
        assert await store.add_batch(batch("y", 3), max_queued=3) == "added"
        expected = [("queued", f"y{i}") for i in range(3)]
        # Notices arrive in commit order: once the added batch's are in, a refused one's would be.
        await until(lambda: all(notice in notices for notice in expected))
        tg.cancel_scope.cancel()
    assert sorted(notices) == expected


async def test_a_batchs_runs_keep_their_own_specs_and_labels(store: Store) -> None:
    """Each run of a batch is stored with its own spec and labels, found by them in the history."""
    labelled = msgspec.structs.replace(SPEC, code=b"print(2)", labels=(("team", "sales"),))
    items = [("plain", SPEC), ("labelled", labelled)]
    assert await store.add_batch(items, max_queued=10, key="alice") == "added"
    claims = [await store.claim(NODE, LEASE) for _ in items]
    assert [(c.fence.run_id, c.spec) for c in claims if c is not None] == items
    found = await store.list_runs("alice", RunFilter(labels=(("team", "sales"),)), None, 10)
    assert [listed.summary.id for listed in found] == ["labelled"]


async def test_a_retried_batch_is_answered_with_its_runs_never_stored_twice(store: Store) -> None:
    """The same idempotency key and hash again answers the batch's runs in order with their
    status; another hash is a reuse; a single run's key of the same text is another key."""
    keyed = Idempotency(key="k-1", request_hash="h")
    items = batch("r", 3)
    assert await store.add_batch(items, max_queued=10, key="alice", idempotency=keyed) == "added"
    assert await store.claim(NODE, LEASE) is not None
    again = await store.add_batch(batch("x", 3), max_queued=10, key="alice", idempotency=keyed)
    assert again == BatchReplay(
        runs=(("r0", "running"), ("r1", "queued"), ("r2", "queued")), same_request=True
    )
    assert await store.get("x0") is None
    other = Idempotency(key="k-1", request_hash="other")
    reused = await store.add_batch(batch("y", 3), max_queued=10, key="alice", idempotency=other)
    assert isinstance(reused, BatchReplay)
    assert not reused.same_request
    # Another API key, or a single run, has keys of its own.
    assert await store.add_batch(batch("b", 3), max_queued=10, key="bob", idempotency=keyed) == "added"
    assert await store.add("s", SPEC, max_queued=10, key="alice", idempotency=keyed) == "added"
    assert await store.add("t", SPEC, max_queued=10, key="alice", idempotency=keyed) == Replay(
        run_id="s", status="queued", same_request=True
    )


async def test_a_batch_whose_runs_partly_expired_answers_the_rest(store: Store) -> None:
    """Once one of a keyed batch's runs is purged, a retry finds the others alone, with the same
    hash: the caller can tell the batch is no longer whole."""
    keyed = Idempotency(key="k-2", request_hash="h")
    assert await store.add_batch(batch("r", 2), max_queued=10, idempotency=keyed) == "added"
    first = await store.claim(NODE, LEASE)
    assert first is not None
    ended = RunResult.from_server("r0", "succeeded", exit_code=0)
    assert await store.finish("r0", ended, fence=first.fence)
    await anyio.sleep(0.05)  # the wait is the test: the result grows older than the retention
    assert await store.purge(0.01) == 1
    again = await store.add_batch(batch("x", 2), max_queued=10, idempotency=keyed)
    assert again == BatchReplay(runs=(("r1", "queued"),), same_request=True)
