"""The run stores, SQLite and PostgreSQL alike: order, bounds, exactly-once claims and finishes,
leases, fencing, failover, notices, expiry; and what only one of them does (locking, migration)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import psycopg
import pytest

from warmpod.errors import StoreError
from warmpod.models import RunResult, RunSpec
from warmpod.pgstore import PostgresStore
from warmpod.store import (
    PREFERRED_WAIT,
    SCHEMA_VERSION,
    Chunk,
    Claim,
    Notice,
    Owner,
    SqliteStore,
    Store,
    decode_blob,
    encode_blob,
    inlined,
)

SPEC = RunSpec(
    code=b"print(1)", stdin=b"\x00\xff", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99
)
NODE = Owner(node="a", incarnation="a-1")
OTHER = Owner(node="b", incarnation="b-1")
LEASE = 15.0
LOST = "node {node} stopped while this run was executing"


def result(run_id: str, status: str = "succeeded", stdout: str = "1\n") -> RunResult:
    """A final result for ``run_id``."""
    return RunResult(
        id=run_id,
        status=status,  # type: ignore[arg-type]
        exit_code=0,
        stdout=stdout,
        stderr="",
        stdout_truncated=False,
        stderr_truncated=False,
        limits_hit=[],
        duration_ms=1.0,
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh store of each kind: a temporary SQLite file, an empty PostgreSQL database."""
    opened: Store
    if request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "runs.sqlite3")
    else:
        opened = await PostgresStore.open(request.getfixturevalue("postgres_db"))
    yield opened
    await opened.aclose()


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
    assert await store.queued() == 3
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
    await anyio.sleep(PREFERRED_WAIT + 0.2)
    assert await store.add("new", warm, max_queued=10) == "added"
    taken = await store.claim(NODE, LEASE, warm=True)
    assert taken is not None
    assert taken.fence.run_id == "old"


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
    outcomes: list[str] = []

    async def add(i: int) -> None:
        outcomes.append(await store.add(f"q{i}", SPEC, max_queued=10))
        outcomes.append(await store.add(f"k{i}", SPEC, max_queued=100, key="alice", max_active=3))

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(add, i)
    # Ten fit the bound; of the keyed ones three fit the quota, which the bound does not cap.
    assert outcomes.count("added") == 10 + 3
    assert await store.queued() == 13


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


async def test_a_released_run_keeps_its_place(store: Store) -> None:
    """A claimed run that never reached a sandbox goes back ahead of later ones, and is announced."""
    notices: list[tuple[Notice, str]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(store.listen, lambda n, i: notices.append((n, i)))
        await store.add("a", SPEC, max_queued=10)
        await store.add("b", SPEC, max_queued=10)
        first = await claim(store)
        assert first.fence.run_id == "a"
        await store.release(first.fence)
        again = await claim(store)
        assert (again.fence.run_id, again.fence.attempt) == ("a", 2)
        with anyio.fail_after(5):
            while notices.count(("queued", "a")) < 2:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()


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
    await anyio.sleep(0.3)
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


async def test_a_heartbeat_keeps_the_lease_and_reports_what_it_holds(store: Store) -> None:
    """Renewed leases outlive their first term; a fence of another attempt holds nothing; the
    beat lists the nodes seen alive and counts the queue."""
    for run_id in ("a", "b", "c"):
        await store.add(run_id, SPEC, max_queued=10)
    mine = (await claim(store, lease=0.5)).fence
    theirs = (await claim(store, OTHER, lease=0.5)).fence
    stale = msgspec.structs.replace(mine, attempt=2)
    for _ in range(4):
        await anyio.sleep(0.2)
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
                    await anyio.sleep(0.2)

            tg.start_soon(beat)
            with pytest.raises(StoreError, match="WARMPOD_NODE__NAME"):
                await store.join(Owner(node="a", incarnation="a-3"), 1.0, LOST)
            tg.cancel_scope.cancel()
    record = await store.get("mine")
    assert record is not None
    assert record.result is not None
    assert (record.result.status, record.result.stdout) == ("error", "partial\n")
    assert await store.queued() == 1


async def test_cancel_a_queued_run_flags_a_running_one_and_refuses_a_finished_one(store: Store) -> None:
    """Queued: cancelled at once and never claimed. Running: flagged and announced. Final: left alone."""
    notices: list[tuple[Notice, str]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(store.listen, lambda n, i: notices.append((n, i)))
        for run_id in ("queued", "running", "done"):
            await store.add(run_id, SPEC, max_queued=10)
        await store.release((await claim(store)).fence)  # "queued" was first: take it and put it back
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
        with anyio.fail_after(5):
            while ("cancel", "running") not in notices or ("changed", "done") not in notices:
                await anyio.sleep(0.01)
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
    await anyio.sleep(0.05)
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
    assert await store.file("r", "out/a.png") == b"\x89PNG" * 10
    assert await store.file("r", "out/c") is None
    assert await store.file("other", "out/a.png") is None
    assert await store.small_files("r", 10, 10) == {"out/b.csv": b"x\n"}
    await anyio.sleep(0.05)
    assert await store.purge(0.01) == 1
    assert await store.file("r", "out/a.png") is None
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
    is kept and claimed, and the file says the current version."""
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
    db.commit()
    db.close()
    store = await SqliteStore.open(path)
    try:
        claimed = await claim(store)
        assert (claimed.fence.run_id, claimed.spec) == ("old", SPEC)
        assert await store.add("new", SPEC, max_queued=10, key="alice", max_active=1) == "added"
    finally:
        await store.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
    assert version == SCHEMA_VERSION == 4


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

        async def reap_until_reported() -> None:
            while not reaped:
                reaped.extend(await b.reap("node a stopped"))
                await anyio.sleep(0.1)

        ended = False
        with anyio.fail_after(lease + 5):
            try:
                async with a._pool.connection() as conn:
                    # What a node's write holds (pgstore._holds), then silence: it never commits.
                    await conn.execute("BEGIN")
                    await conn.execute("SELECT 1 FROM runs WHERE id = 'held' FOR SHARE")
                    await reap_until_reported()
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
        assert await reopened.queued() == 1
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
