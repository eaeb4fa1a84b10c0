"""The run stores, SQLite and PostgreSQL alike: order, bounds, exactly-once claims and finishes,
leases, fencing, failover, notices, expiry; and what only one of them does (locking, migration)."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import psycopg
import pytest
from support.waiting import until

from warmpod.errors import StoreError
from warmpod.models import CHUNK_BYTES, Chunk, RunResult, RunSpec, RunStatus
from warmpod.queue.store.base import (
    OUTPUT_PAGE,
    PREFERRED_WAIT,
    Claim,
    Idempotency,
    Notice,
    Owner,
    Replay,
    Store,
    inlined,
)
from warmpod.queue.store.codec import ROW_SEGMENTS, decode_blob, encode_blob
from warmpod.queue.store.postgres import CALL_TIMEOUT, PostgresStore
from warmpod.queue.store.sqlite import SCHEMA_VERSION, SqliteStore

SPEC = RunSpec(
    code=b"print(1)", stdin=b"\x00\xff", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99
)
NODE = Owner(node="a", incarnation="a-1")
OTHER = Owner(node="b", incarnation="b-1")
LEASE = 15.0
LOST = "node {node} stopped while this run was executing"


def result(run_id: str, status: RunStatus = "succeeded", stdout: str = "1\n") -> RunResult:
    """A final result for ``run_id``."""
    return RunResult(
        id=run_id,
        status=status,
        exit_code=0,
        stdout=stdout,
        stderr="",
        stdout_truncated=False,
        stderr_truncated=False,
        limits_hit=[],
        duration_ms=1.0,
    )


async def claim(store: Store, owner: Owner = NODE, lease: float = LEASE) -> Claim:
    """The next run, which the test knows is there."""
    claimed = await store.claim(owner, lease)
    assert claimed is not None
    return claimed


async def test_runs_are_claimed_oldest_first_with_their_spec(store: Store) -> None:
    """Claims follow submission order and hand back the spec byte for byte, with the claimer as
    the run's node and a first attempt; then nothing is left."""
    for run_id in ("a", "b", "c"):
        assert await store.add(run_id, SPEC, max_queued=10) == "added"
    assert sorted(await store.queued()) == ["a", "b", "c"]
    claimed = [await claim(store) for _ in range(3)]
    assert [c.fence.run_id for c in claimed] == ["a", "b", "c"]
    assert all(c.spec == SPEC and c.fence.attempt == 1 for c in claimed)
    assert all(c.fence.incarnation == NODE.incarnation for c in claimed)
    assert await store.claim(NODE, LEASE) is None
    record = await store.get("a")
    assert record is not None
    assert (record.status, record.node) == ("running", "a")
    assert record.started is not None


async def test_a_sandbox_claims_a_run_of_its_kind_first_unless_another_waited_long(store: Store) -> None:
    """A preloaded sandbox takes the oldest run that wants one, a bare sandbox the oldest that does
    not; a run that has waited PREFERRED_WAIT goes to the next sandbox of either kind."""
    warm = msgspec.structs.replace(SPEC, warm=True)
    for run_id, spec in (("a", SPEC), ("b", warm), ("c", SPEC)):
        assert await store.add(run_id, spec, max_queued=10) == "added"
    taken = await store.claim(NODE, LEASE, warm=True)
    assert taken is not None
    assert (taken.fence.run_id, taken.spec) == ("b", warm)
    assert (await claim(store)).fence.run_id == "a"
    # No run of its kind: the oldest of the others.
    assert [(await store.claim(NODE, LEASE, warm=True)) is not None for _ in range(2)] == [True, False]
    assert await store.add("old", SPEC, max_queued=10) == "added"
    await anyio.sleep(PREFERRED_WAIT + 0.2)  # the wait is the test: "old" waits long on the store's clock
    assert await store.add("new", warm, max_queued=10) == "added"
    taken = await store.claim(NODE, LEASE, warm=True)
    assert taken is not None
    assert taken.fence.run_id == "old"


async def test_a_key_running_fewer_runs_is_claimed_before_older_runs_of_a_busier_key(store: Store) -> None:
    """With one of key A's five queued runs running, key B's later run is claimed before A's older
    ones, and A's then follow in submission order."""
    for i in range(5):
        assert await store.add(f"a{i}", SPEC, max_queued=10, key="alice") == "added"
    assert (await claim(store)).fence.run_id == "a0"
    assert await store.add("b0", SPEC, max_queued=10, key="bob") == "added"
    assert (await claim(store)).fence.run_id == "b0"
    # Both keys run one now: age decides among what is left, all of it A's.
    assert [(await claim(store)).fence.run_id for _ in range(4)] == ["a1", "a2", "a3", "a4"]


async def test_runs_of_a_single_key_or_no_key_are_claimed_in_submission_order(store: Store) -> None:
    """Fairness across keys leaves one key's runs, and runs with keys off, first in, first out,
    however many of them run."""
    for i in range(3):
        assert await store.add(f"k{i}", SPEC, max_queued=10, key="alice") == "added"
    assert [(await claim(store)).fence.run_id for _ in range(3)] == ["k0", "k1", "k2"]
    for i in range(3):
        assert await store.add(f"n{i}", SPEC, max_queued=10) == "added"
    assert [(await claim(store)).fence.run_id for _ in range(3)] == ["n0", "n1", "n2"]


async def test_a_run_of_the_sandboxes_kind_comes_before_a_run_of_a_less_busy_key(store: Store) -> None:
    """The warm rule orders claims before fairness: a preloaded sandbox takes the busy key's run
    that wants one over an idle key's run that does not, until that one waited PREFERRED_WAIT."""
    warm = msgspec.structs.replace(SPEC, warm=True)
    assert await store.add("a0", SPEC, max_queued=10, key="alice") == "added"
    assert (await claim(store)).fence.run_id == "a0"
    assert await store.add("a1", warm, max_queued=10, key="alice") == "added"
    assert await store.add("a2", warm, max_queued=10, key="alice") == "added"
    assert await store.add("b0", SPEC, max_queued=10, key="bob") == "added"
    taken = await store.claim(NODE, LEASE, warm=True)
    assert taken is not None
    assert taken.fence.run_id == "a1"
    await anyio.sleep(PREFERRED_WAIT + 0.2)  # the wait is the test: every run waits long
    # All have now waited long: fairness decides, bob running nothing, over alice's older a2.
    taken = await store.claim(NODE, LEASE, warm=True)
    assert taken is not None
    assert taken.fence.run_id == "b0"


async def test_the_queue_is_bounded(store: Store) -> None:
    """A run past max_queued is refused and not stored; running runs do not count."""
    assert await store.add("a", SPEC, max_queued=2) == "added"
    assert await store.add("b", SPEC, max_queued=2) == "added"
    assert await store.add("c", SPEC, max_queued=2) == "queue-full"
    assert await store.get("c") is None
    await claim(store)
    assert await store.add("c", SPEC, max_queued=2) == "added"


async def test_a_keys_active_runs_are_bounded_and_other_keys_are_not(store: Store) -> None:
    """max_active counts the key's queued and running runs; finished ones and other keys' do not."""
    assert await store.add("a", SPEC, max_queued=10, key="alice", max_active=2) == "added"
    assert await store.add("b", SPEC, max_queued=10, key="alice", max_active=2) == "added"
    first = await claim(store)  # a runs, b waits: both count
    assert await store.add("c", SPEC, max_queued=10, key="alice", max_active=2) == "key-busy"
    assert await store.get("c") is None
    assert await store.add("d", SPEC, max_queued=10, key="bob", max_active=1) == "added"
    assert await store.add("e", SPEC, max_queued=10) == "added"
    assert await store.finish("a", result("a"), fence=first.fence)
    assert await store.add("c", SPEC, max_queued=10, key="alice", max_active=2) == "added"
    record = await store.get("c")
    assert record is not None
    assert record.key == "alice"
    keyless = await store.get("e")
    assert keyless is not None
    assert keyless.key is None


async def test_concurrent_adds_hold_the_bound_and_the_quota(store: Store) -> None:
    """Forty adds at once (as from several nodes) never take the queue past its bound nor a key
    past its quota: the counts and the insert are one step."""
    outcomes: list[object] = []

    async def add(i: int) -> None:
        outcomes.append(await store.add(f"q{i}", SPEC, max_queued=10))
        outcomes.append(await store.add(f"k{i}", SPEC, max_queued=100, key="alice", max_active=3))

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(add, i)
    # Ten fit the bound; of the keyed ones three fit the quota, which the bound does not cap.
    assert outcomes.count("added") == 10 + 3
    assert len(await store.queued()) == 13


async def test_concurrent_claims_never_hand_a_run_out_twice(store: Store) -> None:
    """Fifty claimers of two nodes racing over forty runs get each run exactly once."""
    for i in range(40):
        await store.add(f"r{i}", SPEC, max_queued=100)
    got: list[str] = []

    async def claimer(owner: Owner) -> None:
        claimed = await store.claim(owner, LEASE)
        if claimed is not None:
            got.append(claimed.fence.run_id)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(claimer, NODE if i % 2 else OTHER)
    assert sorted(got) == sorted(f"r{i}" for i in range(40))


async def test_finish_is_final_once(store: Store) -> None:
    """The first final result wins; the output sent with it is kept in order."""
    await store.add("a", SPEC, max_queued=10)
    fence = (await claim(store)).fence
    assert await store.add_output(fence, [Chunk(seq=0, stream="stdout", data=b"x")])
    assert await store.finish("a", result("a"), [Chunk(seq=1, stream="stderr", data=b"y")], fence=fence)
    assert not await store.finish("a", result("a", "error"), fence=fence)
    assert not await store.finish("a", result("a", "error"))
    record = await store.get("a")
    assert record is not None
    assert record.status == "succeeded"
    assert record.result == result("a")
    assert [(c.seq, c.stream, c.data) for c in await store.output("a")] == [
        (0, "stdout", b"x"),
        (1, "stderr", b"y"),
    ]
    assert [c.seq for c in await store.output("a", after=0)] == [1]


async def test_writes_of_a_lost_run_are_refused_and_change_nothing(store: Store) -> None:
    """Once a run's lease ran out and it was reaped, its node's fence is refused: no output, no
    result; the reaped error keeps the output written before, and the run is never queued again."""
    await store.add("a", SPEC, max_queued=10)
    fence = (await claim(store, lease=0.2)).fence
    assert await store.add_output(fence, [Chunk(seq=0, stream="stdout", data=b"partial\n")])
    await anyio.sleep(0.3)  # the wait is the test: the lease runs out
    assert await store.reap(LOST) == ["a"]
    assert not await store.add_output(fence, [Chunk(seq=1, stream="stdout", data=b"late\n")])
    assert not await store.finish("a", result("a"), [Chunk(seq=2, stream="stdout", data=b"x")], fence=fence)
    record = await store.get("a")
    assert record is not None
    assert record.result is not None
    assert (record.result.status, record.result.error) == (
        "error",
        "node a stopped while this run was executing",
    )
    assert (record.result.stdout, record.result.node) == ("partial\n", "a")
    assert [c.data for c in await store.output("a")] == [b"partial\n"]
    assert await store.claim(OTHER, LEASE) is None
    assert await store.reap(LOST) == []


def alternating(count: int) -> list[Chunk]:
    """``count`` one-byte chunks switching stream each time, as a program alternating them leaves."""
    return [
        Chunk(seq=seq, stream="stdout" if seq % 2 == 0 else "stderr", data=str(seq % 10).encode())
        for seq in range(count)
    ]


async def test_output_comes_back_a_page_at_a_time(store: Store) -> None:
    """``output`` returns at most ``limit`` (by default OUTPUT_PAGE) chunks after ``after``; paging
    by the last seq seen gives every chunk once, in order."""
    written = alternating(2 * OUTPUT_PAGE + 5)
    await store.add("a", SPEC, max_queued=10)
    fence = (await claim(store)).fence
    assert await store.add_output(fence, written)
    assert len(await store.output("a")) == OUTPUT_PAGE
    assert [c.seq for c in await store.output("a", after=10, limit=3)] == [11, 12, 13]
    read: list[Chunk] = []
    after = -1
    while page := await store.output("a", after):
        assert len(page) <= OUTPUT_PAGE
        read += page
        after = page[-1].seq
    assert read == written


async def test_a_chunk_once_kept_never_changes(store: Store) -> None:
    """A chunk written again with a seq already kept (a retried write) changes nothing, so a
    reader resuming after that seq neither misses nor repeats a byte."""
    await store.add("a", SPEC, max_queued=10)
    fence = (await claim(store)).fence
    assert await store.add_output(fence, [Chunk(seq=0, stream="stdout", data=b"a")])
    assert await store.add_output(
        fence, [Chunk(seq=0, stream="stdout", data=b"a"), Chunk(seq=1, stream="stdout", data=b"b")]
    )
    assert [c.data for c in await store.output("a")] == [b"a", b"b"]
    assert [c.data for c in await store.output("a", after=0)] == [b"b"]


async def test_a_reaped_run_keeps_all_its_output_however_many_chunks(store: Store) -> None:
    """The error result of a reaped run holds every byte it printed, read page by page."""
    written = alternating(3 * OUTPUT_PAGE + 1)
    await store.add("a", SPEC, max_queued=10)
    fence = (await claim(store, lease=0.2)).fence
    assert await store.add_output(fence, written)
    await anyio.sleep(0.3)  # the wait is the test: the lease runs out
    assert await store.reap(LOST) == ["a"]
    record = await store.get("a")
    assert record is not None
    assert record.result is not None
    assert record.result.stdout == "".join(c.data.decode() for c in written if c.stream == "stdout")
    assert record.result.stderr == "".join(c.data.decode() for c in written if c.stream == "stderr")


class Raw(msgspec.Struct, frozen=True):
    """A store with a way around it to its database: ``query(sql)`` runs SQL that has no
    parameters (the same text in both dialects) on a connection of its own; ``blob(data)`` is
    the literal of ``data`` in the store's dialect."""

    store: Store
    query: Callable[[str], list[tuple[Any, ...]]]
    blob: Callable[[bytes], str]


@pytest.fixture(params=["sqlite", "postgres"])
async def raw(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Raw]:
    """A fresh store of each kind, as ``store`` gives, with direct access to its tables."""
    opened: Store
    if request.param == "sqlite":
        path = tmp_path / "runs.sqlite3"
        opened = await SqliteStore.open(path)

        def query(sql: str) -> list[tuple[Any, ...]]:
            with contextlib.closing(sqlite3.connect(path, timeout=10, isolation_level=None)) as db:
                return db.execute(sql).fetchall()

        def blob(data: bytes) -> str:
            return f"X'{data.hex()}'"

    else:
        url = request.getfixturevalue("postgres_db")
        opened = await PostgresStore.open(url)

        def query(sql: str) -> list[tuple[Any, ...]]:
            with psycopg.connect(url, autocommit=True) as conn:
                cursor = conn.execute(sql.encode())
                return cursor.fetchall() if cursor.description else []

        def blob(data: bytes) -> str:
            return f"'\\x{data.hex()}'::bytea"

    yield Raw(opened, query, blob)
    await opened.aclose()


async def read_all(store: Store, run_id: str, after: int = -1, limit: int = OUTPUT_PAGE) -> list[Chunk]:
    """Every chunk of ``run_id`` after ``after``, paged by ``limit`` as a resuming reader does."""
    read: list[Chunk] = []
    while page := await store.output(run_id, after, limit):
        assert len(page) <= limit
        assert sum(len(c.data) for c in page) <= limit * CHUNK_BYTES
        read += page
        after = page[-1].seq
    return read


async def test_a_write_of_alternating_one_byte_chunks_is_one_compact_row(raw: Raw) -> None:
    """A program switching streams at every byte costs one row per write, of about two bytes a
    byte, and reads back chunk for chunk."""
    written = alternating(ROW_SEGMENTS)
    await raw.store.add("a", SPEC, max_queued=10)
    fence = (await claim(raw.store)).fence
    assert await raw.store.add_output(fence, written)
    [(rows, size)] = raw.query("SELECT count(*), sum(length(data)) FROM output WHERE run_id = 'a'")
    assert rows == 1
    assert size <= 2 * len(written) + 16
    assert await read_all(raw.store, "a") == written


async def test_a_large_write_is_split_into_bounded_rows(raw: Raw) -> None:
    """Rows hold at most ROW_SEGMENTS chunks and CHUNK_BYTES of data (a larger chunk alone), and
    never join chunks whose seqs are not consecutive."""
    big = [
        Chunk(seq=seq, stream="stdout" if seq % 2 else "stderr", data=bytes([seq]) * (CHUNK_BYTES // 3))
        for seq in range(5)
    ]
    huge = Chunk(seq=5, stream="stdout", data=b"h" * (CHUNK_BYTES + 1))
    small = [msgspec.structs.replace(c, seq=c.seq + 6) for c in alternating(ROW_SEGMENTS + 10)]
    gapped = [Chunk(seq=small[-1].seq + 2, stream="stderr", data=b"g")]
    written = [*big, huge, *small, *gapped]
    await raw.store.add("a", SPEC, max_queued=10)
    fence = (await claim(raw.store)).fence
    assert await raw.store.add_output(fence, written)
    rows = raw.query("SELECT seq, last, length(data) FROM output WHERE run_id = 'a' ORDER BY seq")
    assert [(seq, last) for seq, last, _ in rows] == [
        (0, 2),
        (3, 4),
        (5, 5),
        (6, 6 + ROW_SEGMENTS - 1),
        (6 + ROW_SEGMENTS, 6 + ROW_SEGMENTS + 9),
        (gapped[0].seq, gapped[0].seq),
    ]
    assert all(size <= CHUNK_BYTES + 2 * ROW_SEGMENTS + 16 for seq, _, size in rows if seq != huge.seq)
    assert await read_all(raw.store, "a") == written


async def test_a_reader_resuming_anywhere_inside_a_row_gets_every_later_chunk_once(store: Store) -> None:
    """Pages may end inside a packed row: from every seq, paging on by the last seq returned gives
    exactly the chunks after it, in order, across rows of several writes and the finish."""
    written = alternating(50)
    await store.add("a", SPEC, max_queued=10)
    fence = (await claim(store)).fence
    for start in (0, 1, 20):
        assert await store.add_output(fence, written[start : start + 19 if start < 20 else 45])
    assert await store.finish("a", result("a"), written[45:], fence=fence)
    for after in range(-1, len(written)):
        assert await store.output("a", after, 3) == written[after + 1 : after + 4]
        assert await read_all(store, "a", after, 7) == written[after + 1 :]


async def test_a_retried_write_keeps_every_byte_once(raw: Raw) -> None:
    """A write given again (it committed, but its caller saw an error), alone or with newer chunks
    behind it as a worker retries, changes nothing already kept and keeps the new chunks once."""
    written = alternating(40)
    await raw.store.add("a", SPEC, max_queued=10)
    fence = (await claim(raw.store)).fence
    assert await raw.store.add_output(fence, written[:10])
    before = raw.query("SELECT seq, last, stream, data FROM output WHERE run_id = 'a' ORDER BY seq")
    assert await raw.store.add_output(fence, written[:10])
    assert raw.query("SELECT seq, last, stream, data FROM output WHERE run_id = 'a' ORDER BY seq") == before
    assert await raw.store.add_output(fence, written[:10])
    assert await raw.store.add_output(fence, written[:25])
    assert await raw.store.add_output(fence, written[5:30])
    assert await raw.store.finish("a", result("a"), written[20:], fence=fence)
    assert await read_all(raw.store, "a") == written
    assert await read_all(raw.store, "a", 12, 5) == written[13:]
    record = await raw.store.get("a")
    assert record is not None


async def test_rows_stored_before_rows_packed_chunks_still_read(raw: Raw) -> None:
    """Rows of one chunk without a last seq, as stores kept them before, read, page and reap
    alongside packed rows written after them."""
    await raw.store.add("a", SPEC, max_queued=10)
    fence = (await claim(raw.store, lease=0.3)).fence
    older = [
        Chunk(seq=0, stream="stdout", data=b"ab"),
        Chunk(seq=1, stream="stderr", data=b"c"),
        Chunk(seq=2, stream="stdout", data=b"d"),
    ]
    values = ", ".join(f"('a', {c.seq}, '{c.stream}', {raw.blob(c.data)})" for c in older)
    raw.query(f"INSERT INTO output (run_id, seq, stream, data) VALUES {values}")
    newer = [msgspec.structs.replace(c, seq=c.seq + 3) for c in alternating(9)]
    # Two of the old rows again, ahead of the new ones, as a retried write gives them.
    assert await raw.store.add_output(fence, [*older[1:], *newer])
    assert await read_all(raw.store, "a") == [*older, *newer]
    assert await read_all(raw.store, "a", 1, 2) == [*older[2:], *newer]
    await anyio.sleep(0.4)  # the wait is the test: the lease runs out
    assert await raw.store.reap(LOST) == ["a"]
    record = await raw.store.get("a")
    assert record is not None
    assert record.result is not None
    assert record.result.stdout == "abd" + "".join(c.data.decode() for c in newer if c.stream == "stdout")
    assert record.result.stderr == "c" + "".join(c.data.decode() for c in newer if c.stream == "stderr")


async def test_a_heartbeat_keeps_the_lease_and_reports_what_it_holds(store: Store) -> None:
    """Renewed leases outlive their first term; a fence of another attempt holds nothing; the
    beat lists the nodes seen alive and counts the queue."""
    for run_id in ("a", "b", "c"):
        await store.add(run_id, SPEC, max_queued=10)
    mine = (await claim(store, lease=0.5)).fence
    theirs = (await claim(store, OTHER, lease=0.5)).fence
    stale = msgspec.structs.replace(mine, attempt=2)
    for _ in range(4):
        await anyio.sleep(0.2)  # the pace is the test: beats renew a lease before it runs out
        beat = await store.heartbeat(NODE, 0.5, [mine, stale])
        assert beat.held == {"a"}
    assert beat.queued == 1
    assert [(n.name, n.running) for n in beat.nodes] == [("a", 1)]  # b never beat
    assert await store.reap(LOST) == [theirs.run_id]
    await store.heartbeat(OTHER, 0.5, [])
    beat = await store.heartbeat(NODE, 0.5, [mine])
    assert [n.name for n in beat.nodes] == ["a", "b"]
    assert all(0 <= n.seen_ago < 0.5 for n in beat.nodes)


async def test_join_reports_its_own_earlier_runs_only(store: Store, request: pytest.FixtureRequest) -> None:
    """A node's new start ends what its earlier starts held, with their output; on a shared store
    another node's live runs are left alone, and a second live node of the same name is refused
    once it has waited out the lease."""
    for run_id in ("mine", "theirs", "waits"):
        await store.add(run_id, SPEC, max_queued=10)
    mine = (await claim(store)).fence
    await claim(store, OTHER)
    await store.add_output(mine, [Chunk(seq=0, stream="stdout", data=b"partial\n")])
    restarted = Owner(node="a", incarnation="a-2")
    if isinstance(store, SqliteStore):
        # One node holds the file: whatever was running is its earlier start's.
        assert sorted(await store.join(restarted, LEASE, LOST)) == ["mine", "theirs"]
    else:
        assert await store.join(restarted, LEASE, LOST) == ["mine"]
        record = await store.get("theirs")
        assert record is not None
        assert record.status == "running"
        # While a-2 beats, a third start of the name waits out its lease (1 s here), then gives up.
        async with anyio.create_task_group() as tg:

            async def beat() -> None:
                while True:
                    await store.heartbeat(restarted, 1.0, [])
                    await anyio.sleep(0.2)  # a live node's pace of beats

            tg.start_soon(beat)
            with pytest.raises(StoreError, match="WARMPOD_NODE__NAME"):
                await store.join(Owner(node="a", incarnation="a-3"), 1.0, LOST)
            tg.cancel_scope.cancel()
    record = await store.get("mine")
    assert record is not None
    assert record.result is not None
    assert (record.result.status, record.result.stdout) == ("error", "partial\n")
    assert await store.queued() == ["waits"]


async def test_cancel_a_queued_run_flags_a_running_one_and_refuses_a_finished_one(store: Store) -> None:
    """Queued: cancelled at once and never claimed. Running: flagged and announced. Final: left alone."""
    notices: list[tuple[Notice, str]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(store.listen, lambda n, i: notices.append((n, i)))
        for run_id in ("queued", "running", "done"):
            await store.add(run_id, SPEC, max_queued=10)
        assert await store.cancel("queued", result("queued", "cancelled", "")) == "cancelled"
        assert (await claim(store)).fence.run_id == "running"
        done = await claim(store)
        assert await store.claim(NODE, LEASE) is None
        assert not await store.cancel_requested("running")
        assert await store.cancel("running", result("running", "cancelled")) == "requested"
        assert await store.cancel_requested("running")
        await store.finish("done", result("done"), fence=done.fence)
        assert await store.cancel("done", result("done", "cancelled")) == "finished"
        assert await store.cancel("nope", result("nope", "cancelled")) == "unknown"
        await until(lambda: ("cancel", "running") in notices and ("changed", "done") in notices)
        tg.cancel_scope.cancel()
    record = await store.get("queued")
    assert record is not None
    assert record.status == "cancelled"


async def test_purge_deletes_only_runs_that_ended_before_the_retention(store: Store) -> None:
    """Expired results and their output and files go; queued, running and recent runs stay."""
    for run_id in ("old", "running", "queued"):
        await store.add(run_id, SPEC, max_queued=10)
    old = (await claim(store)).fence
    await claim(store)
    await store.finish("old", result("old"), [Chunk(seq=0, stream="stdout", data=b"1\n")], fence=old)
    assert await store.purge(60) == 0
    await anyio.sleep(0.05)  # the wait is the test: the result grows older than the retention
    assert await store.purge(0.01) == 1
    assert await store.get("old") is None
    assert await store.output("old") == []
    assert await store.get("running") is not None
    assert await store.get("queued") is not None


async def test_files_are_kept_with_the_result_once_and_purged_with_it(store: Store) -> None:
    """A finish keeps the run's files (a second finish adds none); they read back whole or, under a
    size, inline; a purge removes them with the run."""
    files = (("out/a.png", b"\x89PNG" * 10), ("out/b.csv", b"x\n"))
    spec = msgspec.structs.replace(SPEC, files=(("data/in.csv", b"1,2\n"),))
    assert await store.add("r", spec, max_queued=10) == "added"
    claimed = await claim(store)
    assert claimed.spec.files == (("data/in.csv", b"1,2\n"),)
    assert await store.finish("r", result("r"), files=files, fence=claimed.fence)
    assert not await store.finish("r", result("r"), files=[("out/c", b"late")])
    assert await store.file_piece("r", "out/a.png", 0, 1024) == b"\x89PNG" * 10
    assert await store.file_piece("r", "out/c", 0, 1024) is None
    assert await store.file_piece("other", "out/a.png", 0, 1024) is None
    assert await store.small_files("r", 10, 10) == {"out/b.csv": b"x\n"}
    await anyio.sleep(0.05)  # the wait is the test: the result grows older than the retention
    assert await store.purge(0.01) == 1
    assert await store.file_piece("r", "out/a.png", 0, 1024) is None
    assert await store.small_files("r", 1000, 1000) == {}


async def test_a_file_reads_back_in_pieces_with_its_size(store: Store) -> None:
    """A file's size comes without its content, and pieces of any size reassemble it exactly
    (none past its end); an unknown path or run has neither."""
    data = bytes(range(256)) * 300 + b"tail"
    files = (("out/big.bin", data), ("out/empty", b""))
    assert await store.add("r", SPEC, max_queued=10) == "added"
    assert await store.finish("r", result("r"), files=files, fence=(await claim(store)).fence)
    assert await store.file_size("r", "out/big.bin") == len(data)
    assert await store.file_size("r", "out/empty") == 0
    for size in (4099, 65536, len(data), len(data) + 1):
        pieces = [await store.file_piece("r", "out/big.bin", at, size) for at in range(0, len(data), size)]
        assert all(piece is not None and len(piece) <= size for piece in pieces)
        assert b"".join(piece or b"" for piece in pieces) == data
    assert await store.file_piece("r", "out/big.bin", 257, 3) == bytes((1, 2, 3))
    assert await store.file_piece("r", "out/big.bin", len(data) - 2, 10) == b"il"
    assert await store.file_piece("r", "out/big.bin", len(data), 10) == b""
    assert await store.file_piece("r", "out/big.bin", len(data) + 5, 10) == b""
    assert await store.file_piece("r", "out/empty", 0, 10) == b""
    for run_id, path in (("r", "out/none"), ("other", "out/big.bin")):
        assert await store.file_size(run_id, path) is None
        assert await store.file_piece(run_id, path, 0, 10) is None


async def test_an_unreadable_queued_run_ends_in_error_and_the_queue_goes_on(store: Store) -> None:
    """A queued row whose spec cannot be decoded ends ``error`` with a message; the next run is claimed."""
    for run_id in ("bad", "good"):
        assert await store.add(run_id, SPEC, max_queued=10) == "added"
    garbage = b"\xc1not msgpack"
    if isinstance(store, SqliteStore):
        await store._call(lambda db: db.execute("UPDATE runs SET spec = ? WHERE id = 'bad'", (garbage,)))
    else:
        assert isinstance(store, PostgresStore)
        async with store._transaction() as db:
            await db.execute("UPDATE runs SET spec = %s WHERE id = 'bad'", (garbage,))
    claimed = await claim(store)
    assert (claimed.fence.run_id, claimed.spec) == ("good", SPEC)
    record = await store.get("bad")
    assert record is not None
    assert record.result is not None
    assert record.result.status == "error"
    assert "could not be read" in (record.result.error or "")
    assert await store.claim(NODE, LEASE) is None


def test_blobs_carry_their_version_and_older_ones_still_read() -> None:
    """A stored spec says its blob version; a bare struct of before versions decodes; a newer
    version is refused rather than misread."""
    blob = encode_blob(SPEC)
    assert msgspec.msgpack.decode(blob)[0] == 1
    assert decode_blob(blob, RunSpec) == SPEC
    assert decode_blob(msgspec.msgpack.encode(SPEC), RunSpec) == SPEC
    with pytest.raises(msgspec.DecodeError, match="newer warmpod"):
        decode_blob(msgspec.msgpack.encode((99, SPEC)), RunSpec)


async def test_a_store_made_before_versions_is_migrated_with_its_runs(tmp_path: Path) -> None:
    """A file of the layout before schema versions (no node columns, no key) opens: its queued run
    is kept and claimed, its output reads, and the file says the current version."""
    path = tmp_path / "runs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE runs (n INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,"
        " status TEXT NOT NULL, spec BLOB, result BLOB, created REAL NOT NULL, started REAL, finished REAL,"
        " cancel INTEGER NOT NULL DEFAULT 0);"
        "CREATE TABLE output (run_id TEXT NOT NULL, seq INTEGER NOT NULL, stream TEXT NOT NULL,"
        " data BLOB NOT NULL, PRIMARY KEY (run_id, seq)) WITHOUT ROWID;"
        "CREATE TABLE files (run_id TEXT NOT NULL, path TEXT NOT NULL, data BLOB NOT NULL,"
        " UNIQUE (run_id, path));"
    )
    db.execute(
        "INSERT INTO runs (id, status, spec, created) VALUES ('old', 'queued', ?, 0)",
        (msgspec.msgpack.encode(SPEC),),
    )
    db.execute("INSERT INTO output VALUES ('old', 0, 'stderr', ?)", (b"kept\n",))
    db.commit()
    db.close()
    store = await SqliteStore.open(path)
    try:
        claimed = await claim(store)
        assert (claimed.fence.run_id, claimed.spec) == ("old", SPEC)
        assert await store.add("new", SPEC, max_queued=10, key="alice", max_active=1) == "added"
        assert await store.output("old") == [Chunk(seq=0, stream="stderr", data=b"kept\n")]
    finally:
        await store.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION == 10


async def test_a_store_of_a_newer_warmpod_is_refused(tmp_path: Path, postgres_db: str) -> None:
    """A schema version above this warmpod's is an error naming it, for both stores."""
    path = tmp_path / "runs.sqlite3"
    sqlite3.connect(path).execute("PRAGMA user_version = 99").connection.close()
    with pytest.raises(StoreError, match="newer warmpod"):
        await SqliteStore.open(path)
    await (await PostgresStore.open(postgres_db)).aclose()  # creates the schema
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute("UPDATE warmpod_schema SET version = 99")
    with pytest.raises(StoreError, match="newer warmpod"):
        await PostgresStore.open(postgres_db)


async def test_two_nodes_starting_together_create_the_schema_once(postgres_db: str) -> None:
    """Several opens of one empty database at once all succeed (the migration takes a lock)."""
    stores: list[PostgresStore] = []

    async def open_one() -> None:
        stores.append(await PostgresStore.open(postgres_db))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(open_one)
    for store in stores:
        await store.aclose()


async def test_a_node_gone_silent_inside_a_transaction_loses_its_locks_with_its_lease(
    postgres_db: str,
) -> None:
    """A session left idle inside a transaction (its node cut off: no reset reaches the server)
    holds the run's row lock; the server ends it once the lease is over, and another node's reaper,
    which skips locked rows, then reports the run."""
    lease = 1.0
    a = await PostgresStore.open(postgres_db, lease=lease)
    b = await PostgresStore.open(postgres_db)
    try:
        await a.add("held", SPEC, max_queued=10)
        await claim(a, lease=lease)
        reaped: list[str] = []

        async def reported() -> bool:
            reaped.extend(await b.reap("node a stopped"))
            return bool(reaped)

        ended = False
        with anyio.fail_after(lease + 5):
            try:
                async with a._pool.connection() as conn:
                    # What a node's write holds (pgstore._holds), then silence: it never commits.
                    await conn.execute("BEGIN")
                    await conn.execute("SELECT 1 FROM runs WHERE id = 'held' FOR SHARE")
                    await until(reported, lease + 5, interval=0.1)
            except psycopg.errors.IdleInTransactionSessionTimeout:
                # The server's end of the session shows when the connection goes back to the pool.
                ended = True
        assert ended
        assert reaped == ["held"]
    finally:
        await a.aclose()
        await b.aclose()


async def test_an_unreachable_database_is_a_store_error_naming_the_setting() -> None:
    """A URL nobody answers on fails the open promptly with the setting's name and no password."""
    with anyio.fail_after(30):
        with pytest.raises(StoreError, match="WARMPOD_QUEUE__STORE_URL") as caught:
            await PostgresStore.open("postgresql://warmpod:secret@127.0.0.1:1/warmpod")
    assert "secret" not in str(caught.value)


async def test_sqlite_recovers_every_run_left_running_after_a_crash(tmp_path: Path) -> None:
    """After a crash, runs that were executing become error (output kept); queued ones stay queued."""
    path = tmp_path / "runs.sqlite3"
    store = await SqliteStore.open(path)
    await store.add("ran", SPEC, max_queued=10)
    await store.add("waits", SPEC, max_queued=10)
    fence = (await claim(store)).fence
    await store.add_output(fence, [Chunk(seq=0, stream="stdout", data=b"partial\n")])
    await store.aclose()

    reopened = await SqliteStore.open(path)
    try:
        assert await reopened.join(Owner(node="a", incarnation="a-2"), LEASE, LOST) == ["ran"]
        record = await reopened.get("ran")
        assert record is not None
        assert record.result is not None
        assert record.result.status == "error"
        assert record.result.error == "node a stopped while this run was executing"
        assert record.result.stdout == "partial\n"
        assert await reopened.queued() == ["waits"]
        assert (await claim(reopened)).spec == SPEC
    finally:
        await reopened.aclose()


async def test_a_second_opener_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    """One server per store file: a second open fails naming the setting, then works after close."""
    path = tmp_path / "runs.sqlite3"
    first = await SqliteStore.open(path)
    with pytest.raises(StoreError, match="WARMPOD_QUEUE__STORE_PATH"):
        await SqliteStore.open(path)
    await first.aclose()
    second = await SqliteStore.open(path)
    await second.aclose()


async def test_an_unusable_path_is_a_store_error(tmp_path: Path) -> None:
    """A store path under a file is refused with a clear error, not a crash."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot open the run store"):
        await SqliteStore.open(blocker / "runs.sqlite3")


async def test_small_files_stay_within_the_answers_budget(store: Store) -> None:
    """Small files come in path order while they fit in the budget; a file that no longer fits is
    skipped for smaller ones after it, and one above the per-file cap never comes."""
    files = (
        ("out/a", b"1" * 6),
        ("out/b", b"2" * 5),
        ("out/c", b"3" * 3),
        ("out/d", b"4" * 20),
        ("out/e", b""),
    )
    assert await store.add("r", SPEC, max_queued=10) == "added"
    claimed = await claim(store)
    assert await store.finish("r", result("r"), files=files, fence=claimed.fence)
    assert await store.small_files("r", 10, 10) == {"out/a": b"1" * 6, "out/c": b"333", "out/e": b""}
    assert await store.small_files("r", 10, 0) == {"out/e": b""}
    assert await store.small_files("r", 100, 100) == dict(files)


def test_the_inline_choice_is_in_path_order_whatever_order_the_sizes_come_in() -> None:
    """``inlined`` sorts by path (the result's order), so both stores pick the same files."""
    assert inlined([("out/z", 4), ("out/a", 4), ("out/m", 4)], 4, 8) == ["out/a", "out/m"]


async def test_sqlite_never_reaps_the_live_runs_of_the_node_that_holds_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a wall clock stepped far past the lease reaps none of the joined node's runs, and
    their results are still taken; a run of another start (left by a crash) still can be."""
    store = await SqliteStore.open(tmp_path / "runs.sqlite3")
    try:
        await store.add("stale", SPEC, max_queued=10)
        await claim(store, Owner(node="a", incarnation="a-0"), lease=1.0)
        await store.join(NODE, 1.0, LOST)
        await store.add("live", SPEC, max_queued=10)
        fence = (await claim(store, lease=1.0)).fence
        await store.add("crashed", SPEC, max_queued=10)
        await claim(store, Owner(node="a", incarnation="a-0"), lease=1.0)
        stepped = time.time() + 3600
        monkeypatch.setattr("warmpod.queue.store.sqlite.time.time", lambda: stepped)
        assert await store.reap(LOST) == ["crashed"]
        assert (await store.heartbeat(NODE, 1.0, [fence])).held == {"live"}
        assert await store.finish("live", result("live"), fence=fence)
    finally:
        await store.aclose()


async def test_an_idempotency_key_names_one_run_per_api_key(store: Store) -> None:
    """A second add with a key of the same API key name answers the first run (telling whether its
    request hash matched), stores nothing and passes even a full queue; other names have their own."""
    first = Idempotency(key="k-1", request_hash="h")
    assert await store.add("a", SPEC, max_queued=1, idempotency=first) == "added"
    assert await store.add("b", SPEC, max_queued=1, idempotency=first) == Replay(
        run_id="a", status="queued", same_request=True
    )
    other = Idempotency(key="k-1", request_hash="other")
    assert await store.add("c", SPEC, max_queued=1, idempotency=other) == Replay(
        run_id="a", status="queued", same_request=False
    )
    assert await store.add("d", SPEC, max_queued=5, key="alice", idempotency=first) == "added"
    assert await store.add("e", SPEC, max_queued=5, key="bob", idempotency=first) == "added"
    assert await store.add("f", SPEC, max_queued=5, key="alice", idempotency=first) == Replay(
        run_id="d", status="queued", same_request=True
    )
    fence = (await claim(store)).fence
    assert await store.finish("a", result("a"), fence=fence)
    assert await store.add("g", SPEC, max_queued=5, idempotency=first) == Replay(
        run_id="a", status="succeeded", same_request=True
    )
    assert await store.get("b") is None
    assert sorted(await store.queued()) == ["d", "e"]
    assert await store.purge(-1) == 1
    assert await store.add("h", SPEC, max_queued=5, idempotency=first) == "added"


async def test_a_heartbeat_goes_through_while_client_calls_hold_every_pooled_connection(
    postgres_db: str,
) -> None:
    """Client calls stuck in slow transactions take the whole pool: the node's heartbeat still
    renews its lease promptly, on a connection of its own, while a client call waits for the pool."""
    store = await PostgresStore.open(postgres_db, max_connections=2)
    try:
        await store.join(NODE, LEASE, LOST)
        await store.add("a", SPEC, max_queued=10)
        fence = (await claim(store)).fence
        held = 0

        async def hung_client_call() -> None:
            nonlocal held
            async with store._pool.connection() as conn:
                await conn.execute("BEGIN")
                await conn.execute("SELECT count(*) FROM output")
                held += 1
                await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(hung_client_call)
            await until(lambda: held >= 2)
            with anyio.move_on_after(0.5) as waited:
                await store.get("a")
            assert waited.cancelled_caught  # the pool is taken
            with anyio.fail_after(1):
                beat = await store.heartbeat(NODE, LEASE, [fence])
            assert beat.held == {"a"}
            tg.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_two_starts_of_one_name_at_once_let_one_in(postgres_db: str) -> None:
    """Two nodes of one name join together and beat: the name's advisory lock lets exactly one in,
    the other is refused as another live node of that name; once the first store is closed (its
    process gone) a new start of the name gets in at once, without waiting out a lease."""
    stores = [await PostgresStore.open(postgres_db) for _ in range(3)]
    outcomes: dict[str, str] = {}
    joined = anyio.Event()

    async def start(store: PostgresStore, incarnation: str) -> None:
        owner = Owner(node="a", incarnation=incarnation)
        try:
            await store.join(owner, 1.0, LOST)
        except StoreError as exc:
            outcomes[incarnation] = str(exc)
            return
        outcomes[incarnation] = "joined"
        while not joined.is_set():  # as the node's membership does, a third of a lease apart
            await store.heartbeat(owner, 1.0, [])
            await anyio.sleep(0.3)  # a live node's pace of beats

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(start, stores[0], "a-1")
            tg.start_soon(start, stores[1], "a-2")
            await until(lambda: len(outcomes) >= 2)
            joined.set()
        refused, entered = sorted(outcomes.values())
        assert (
            refused
            == "another node named 'a' is alive on this queue: give each node its own WARMPOD_NODE__NAME"
        )
        assert entered == "joined"
        winner = 0 if outcomes["a-1"] == "joined" else 1
        await stores[winner].aclose()
        with anyio.fail_after(0.9):
            assert await stores[2].join(Owner(node="a", incarnation="a-3"), 1.0, LOST) == []
    finally:
        for store in stores:
            await store.aclose()


async def test_a_start_of_a_name_whose_holder_stopped_beating_takes_it_over(postgres_db: str) -> None:
    """The session holding a name lingers (its node frozen) without a heartbeat past the lease: a
    new start of the name ends that session and gets in; the frozen one's run is reported and its
    heartbeats fail from then on."""
    frozen = await PostgresStore.open(postgres_db)
    fresh = await PostgresStore.open(postgres_db)
    try:
        await frozen.join(NODE, 1.0, LOST)
        await frozen.add("held", SPEC, max_queued=10)
        fence = (await claim(frozen, lease=1.0)).fence
        with anyio.fail_after(5):
            ended = await fresh.join(Owner(node="a", incarnation="a-2"), 1.0, LOST)
        assert ended == ["held"]
        with pytest.raises(StoreError):
            await frozen.heartbeat(NODE, 1.0, [fence])
        with pytest.raises(StoreError, match="another node named 'a' is alive"):
            await frozen.heartbeat(NODE, 1.0, [fence])
    finally:
        await frozen.aclose()
        await fresh.aclose()


def lose_an_answer(store: PostgresStore, monkeypatch: pytest.MonkeyPatch, *, committed: bool) -> None:
    """Make the store's next transaction fail as a COMMIT whose answer is lost: after it took
    effect (``committed``), or with the transaction rolled back; later ones are left alone."""
    real = store._transaction
    fired = False

    @contextlib.asynccontextmanager
    async def lossy() -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        nonlocal fired
        if fired:
            async with real() as db:
                yield db
            return
        fired = True
        async with real() as db:
            yield db
            if not committed:
                raise StoreError("the run store failed: server closed the connection unexpectedly")
        raise StoreError(f"the run store did not answer within {CALL_TIMEOUT:g} s")

    monkeypatch.setattr(store, "_transaction", lossy)


async def test_a_claim_whose_commit_answer_is_lost_is_read_back(
    postgres_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that committed though its answer timed out is handed to the caller (its fence
    holds the run); one that rolled back is an error and the run stays queued for the next claim."""
    store = await PostgresStore.open(postgres_db)
    try:
        await store.add("a", SPEC, max_queued=10)
        lose_an_answer(store, monkeypatch, committed=True)
        claimed = await claim(store)
        assert (claimed.fence.run_id, claimed.fence.attempt, claimed.spec) == ("a", 1, SPEC)
        assert (await store.heartbeat(NODE, LEASE, [claimed.fence])).held == {"a"}

        await store.add("b", SPEC, max_queued=10)
        lose_an_answer(store, monkeypatch, committed=False)
        with pytest.raises(StoreError):
            await store.claim(NODE, LEASE)
        assert await store.queued() == ["b"]
        assert (await claim(store)).fence.run_id == "b"
    finally:
        await store.aclose()


async def test_a_finish_whose_commit_answer_is_lost_is_read_back(
    postgres_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result that was recorded though the answer was lost counts as recorded, at once; one
    that rolled back is an error, and its retry records it."""
    store = await PostgresStore.open(postgres_db)
    try:
        for run_id in ("a", "b"):
            await store.add(run_id, SPEC, max_queued=10)
        first, second = (await claim(store)).fence, (await claim(store)).fence
        lose_an_answer(store, monkeypatch, committed=True)
        assert await store.finish("a", result("a"), [Chunk(seq=0, stream="stdout", data=b"1\n")], fence=first)
        lose_an_answer(store, monkeypatch, committed=False)
        with pytest.raises(StoreError):
            await store.finish("b", result("b"), fence=second)
        assert await store.finish("b", result("b"), fence=second)
        for run_id in ("a", "b"):
            record = await store.get(run_id)
            assert record is not None
            assert record.result == result(run_id)
    finally:
        await store.aclose()


async def test_a_retried_finish_of_a_recorded_result_is_told_it_was_recorded(store: Store) -> None:
    """Writing the same result again under the same fence (a retry whose first answer was lost)
    answers True and changes nothing; another result, or another attempt's fence, is still refused."""
    await store.add("a", SPEC, max_queued=10)
    fence = (await claim(store)).fence
    assert await store.finish("a", result("a"), fence=fence)
    assert await store.finish("a", result("a"), fence=fence)
    assert not await store.finish("a", result("a", "error"), fence=fence)
    assert not await store.finish("a", result("a"), fence=msgspec.structs.replace(fence, attempt=2))
    record = await store.get("a")
    assert record is not None
    assert record.result == result("a")


async def test_a_heartbeat_after_the_server_ended_the_nodes_session_renews_and_keeps_the_name(
    postgres_db: str,
) -> None:
    """The server ends every session (a failover): the next heartbeat goes through on a new
    connection, which takes the node's name lock again, so a second start of the name is refused."""
    store = await PostgresStore.open(postgres_db)
    rival = await PostgresStore.open(postgres_db)
    try:
        await store.join(NODE, LEASE, LOST)
        await store.add("a", SPEC, max_queued=10)
        fence = (await claim(store)).fence
        async with await psycopg.AsyncConnection.connect(postgres_db, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert (await store.heartbeat(NODE, LEASE, [fence])).held == {"a"}

        async def beat() -> None:
            while True:
                await anyio.sleep(0.3)  # a live node's pace of beats
                await store.heartbeat(NODE, 1.0, [fence])

        async with anyio.create_task_group() as tg:
            tg.start_soon(beat)
            with pytest.raises(StoreError, match="another node named 'a' is alive"):
                await rival.join(Owner(node="a", incarnation="a-2"), 1.0, LOST)
            tg.cancel_scope.cancel()
    finally:
        await store.aclose()
        await rival.aclose()
