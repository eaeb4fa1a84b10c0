"""The SQLite run store: order, bounds, exactly-once claims and finishes, recovery, expiry, locking."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from warmpod.errors import StoreError
from warmpod.models import RunResult, RunSpec
from warmpod.store import Chunk, SqliteStore

SPEC = RunSpec(
    code=b"print(1)", stdin=b"\x00\xff", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99
)


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


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A fresh store in a temporary file."""
    opened = await SqliteStore.open(tmp_path / "runs.sqlite3")
    yield opened
    await opened.aclose()


async def test_runs_are_claimed_oldest_first_with_their_spec(store: SqliteStore) -> None:
    """Claims follow submission order and hand back the spec byte for byte; then nothing is left."""
    for run_id in ("a", "b", "c"):
        assert await store.add(run_id, SPEC, max_queued=10) == "added"
    assert await store.queued() == 3
    claimed = [await store.claim() for _ in range(3)]
    assert [c[0] for c in claimed if c] == ["a", "b", "c"]
    assert all(c is not None and c[1] == SPEC for c in claimed)
    assert await store.claim() is None
    record = await store.get("a")
    assert record is not None
    assert record.status == "running"
    assert record.started is not None


async def test_the_queue_is_bounded(store: SqliteStore) -> None:
    """A run past max_queued is refused and not stored; running runs do not count."""
    assert await store.add("a", SPEC, max_queued=2) == "added"
    assert await store.add("b", SPEC, max_queued=2) == "added"
    assert await store.add("c", SPEC, max_queued=2) == "queue-full"
    assert await store.get("c") is None
    await store.claim()
    assert await store.add("c", SPEC, max_queued=2) == "added"


async def test_a_keys_active_runs_are_bounded_and_other_keys_are_not(store: SqliteStore) -> None:
    """max_active counts the key's queued and running runs; finished ones and other keys' do not."""
    assert await store.add("a", SPEC, max_queued=10, key="alice", max_active=2) == "added"
    assert await store.add("b", SPEC, max_queued=10, key="alice", max_active=2) == "added"
    await store.claim()  # a runs, b waits: both count
    assert await store.add("c", SPEC, max_queued=10, key="alice", max_active=2) == "key-busy"
    assert await store.get("c") is None
    assert await store.add("d", SPEC, max_queued=10, key="bob", max_active=1) == "added"
    assert await store.add("e", SPEC, max_queued=10) == "added"
    await store.finish("a", result("a"))
    assert await store.add("c", SPEC, max_queued=10, key="alice", max_active=2) == "added"
    record = await store.get("c")
    assert record is not None
    assert record.key == "alice"
    keyless = await store.get("e")
    assert keyless is not None
    assert keyless.key is None


async def test_concurrent_claims_never_hand_a_run_out_twice(store: SqliteStore) -> None:
    """Fifty claimers racing over forty runs get each run exactly once."""
    for i in range(40):
        await store.add(f"r{i}", SPEC, max_queued=100)
    got: list[str] = []

    async def claimer() -> None:
        claimed = await store.claim()
        if claimed is not None:
            got.append(claimed[0])

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(claimer)
    assert sorted(got) == sorted(f"r{i}" for i in range(40))


async def test_a_requeued_run_keeps_its_place(store: SqliteStore) -> None:
    """A claimed run that never reached a sandbox goes back ahead of later ones."""
    await store.add("a", SPEC, max_queued=10)
    await store.add("b", SPEC, max_queued=10)
    assert (await store.claim() or ("",))[0] == "a"
    await store.requeue("a")
    assert (await store.claim() or ("",))[0] == "a"


async def test_finish_is_final_once(store: SqliteStore) -> None:
    """The first final result wins; the output sent with it is kept in order."""
    await store.add("a", SPEC, max_queued=10)
    await store.claim()
    await store.add_output("a", [Chunk(seq=0, stream="stdout", data=b"x")])
    assert await store.finish("a", result("a"), [Chunk(seq=1, stream="stderr", data=b"y")])
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


async def test_cancel_a_queued_run_flags_a_running_one_and_refuses_a_finished_one(store: SqliteStore) -> None:
    """Queued: cancelled at once and never claimed. Running: flagged. Final: left alone."""
    for run_id in ("queued", "running", "done"):
        await store.add(run_id, SPEC, max_queued=10)
    await store.claim()  # "queued" was first: take it and put it back to reorder
    await store.requeue("queued")
    assert await store.cancel("queued", result("queued", "cancelled", "")) == "cancelled"
    assert (await store.claim() or ("",))[0] == "running"
    assert (await store.claim() or ("",))[0] == "done"
    assert await store.claim() is None
    assert not await store.cancel_requested("running")
    assert await store.cancel("running", result("running", "cancelled")) == "requested"
    assert await store.cancel_requested("running")
    await store.finish("done", result("done"))
    assert await store.cancel("done", result("done", "cancelled")) == "finished"
    assert await store.cancel("nope", result("nope", "cancelled")) == "unknown"
    record = await store.get("queued")
    assert record is not None
    assert record.status == "cancelled"


async def test_recover_reports_runs_left_running_as_errors_with_their_output(tmp_path: Path) -> None:
    """After a crash, runs that were executing become error (output kept); queued ones stay queued."""
    path = tmp_path / "runs.sqlite3"
    store = await SqliteStore.open(path)
    await store.add("ran", SPEC, max_queued=10)
    await store.add("waits", SPEC, max_queued=10)
    await store.claim()
    await store.add_output("ran", [Chunk(seq=0, stream="stdout", data=b"partial\n")])
    await store.aclose()

    reopened = await SqliteStore.open(path)
    try:
        assert await reopened.recover("the server stopped") == ["ran"]
        record = await reopened.get("ran")
        assert record is not None
        assert record.result is not None
        assert record.result.status == "error"
        assert record.result.error == "the server stopped"
        assert record.result.stdout == "partial\n"
        assert await reopened.queued() == 1
        assert (await reopened.claim() or ("", None))[1] == SPEC
    finally:
        await reopened.aclose()


async def test_purge_deletes_only_runs_that_ended_before_the_cutoff(store: SqliteStore) -> None:
    """Expired results and their output go; queued, running and recent runs stay."""
    for run_id in ("old", "running", "queued"):
        await store.add(run_id, SPEC, max_queued=10)
    await store.claim()
    await store.claim()
    await store.finish("old", result("old"), [Chunk(seq=0, stream="stdout", data=b"1\n")])
    assert await store.purge(time.time() + 1) == 1
    assert await store.get("old") is None
    assert await store.output("old") == []
    assert await store.get("running") is not None
    assert await store.get("queued") is not None


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


async def test_an_unreadable_queued_run_ends_in_error_and_the_queue_goes_on(store: SqliteStore) -> None:
    """A queued row whose spec cannot be decoded ends ``error`` with a message; the next run is claimed."""
    for run_id in ("bad", "good"):
        assert await store.add(run_id, SPEC, max_queued=10) == "added"
    await store._call(
        lambda db: db.execute("UPDATE runs SET spec = ? WHERE id = 'bad'", (b"\xc1not msgpack",))
    )
    claimed = await store.claim()
    assert claimed == ("good", SPEC)
    record = await store.get("bad")
    assert record is not None
    assert record.result is not None
    assert record.result.status == "error"
    assert "could not be read" in (record.result.error or "")
    assert await store.claim() is None


async def test_files_are_kept_with_the_result_once_and_purged_with_it(store: SqliteStore) -> None:
    """A finish keeps the run's files (a second finish adds none); they read back whole or, under a
    size, inline; a purge removes them with the run."""
    files = (("out/a.png", b"\x89PNG" * 10), ("out/b.csv", b"x\n"))
    spec = msgspec.structs.replace(SPEC, files=(("data/in.csv", b"1,2\n"),))
    assert await store.add("r", spec, max_queued=10)
    claimed = await store.claim()
    assert claimed is not None
    assert claimed[1].files == (("data/in.csv", b"1,2\n"),)
    assert await store.finish("r", result("r"), files=files)
    assert not await store.finish("r", result("r"), files=[("out/c", b"late")])
    assert await store.file("r", "out/a.png") == b"\x89PNG" * 10
    assert await store.file("r", "out/c") is None
    assert await store.file("other", "out/a.png") is None
    assert await store.small_files("r", 10) == {"out/b.csv": b"x\n"}
    assert await store.purge(time.time() + 1) == 1
    assert await store.file("r", "out/a.png") is None
    assert await store.small_files("r", 1000) == {}
