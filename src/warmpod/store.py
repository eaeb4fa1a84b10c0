"""Durable run records, their output and the queue: the ``Store`` interface and its SQLite default."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import anyio
import msgspec

from warmpod.errors import StoreError
from warmpod.models import RunResult, RunSpec, RunStatus

log = logging.getLogger(__name__)

T = TypeVar("T")
Stream = Literal["stdout", "stderr"]
CancelOutcome = Literal["cancelled", "requested", "finished", "unknown"]


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a run's output, in the order the program printed it."""

    seq: int
    stream: Stream
    data: bytes


Added = Literal["added", "queue-full", "key-busy"]
"""What ``Store.add`` did with a run."""


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """What the store knows of one run."""

    id: str
    status: RunStatus
    """``queued``, ``running`` or a final status of ``RunResult``."""
    key: str | None = None
    """The name of the API key that submitted it; None where keys are off."""
    created: float
    started: float | None
    finished: float | None
    result: RunResult | None
    """Set once the run is final."""


class Store(Protocol):
    """Where runs wait and results stay; everything several warmpod nodes would share lives here.

    Implementations must make ``claim`` hand each queued run to exactly one caller, and ``finish``
    final exactly once: the first final status written wins.
    """

    async def add(
        self,
        run_id: str,
        spec: RunSpec,
        *,
        max_queued: int,
        key: str | None = None,
        max_active: int | None = None,
    ) -> Added:
        """Queue a run of ``key`` (a key's name); nothing is stored unless it is ``added``: not when
        ``max_queued`` runs already wait, nor when ``max_active`` runs of the key are queued or running."""
        ...

    async def queued(self) -> int:
        """How many runs wait."""
        ...

    async def claim(self) -> tuple[str, RunSpec] | None:
        """Mark the oldest queued run running and return it; None when none waits."""
        ...

    async def requeue(self, run_id: str) -> None:
        """Put a claimed run back in its place in the queue (it never reached a sandbox)."""
        ...

    async def add_output(self, run_id: str, chunks: Sequence[Chunk]) -> None:
        """Keep more of a running run's output."""
        ...

    async def finish(
        self,
        run_id: str,
        result: RunResult,
        chunks: Sequence[Chunk] = (),
        files: Sequence[tuple[str, bytes]] = (),
    ) -> bool:
        """Record the run's last output, final result and ``(path, content)`` of the files it
        left (those ``result.files`` lists); False, keeping nothing, if it was already final."""
        ...

    async def file(self, run_id: str, path: str) -> bytes | None:
        """The content of a file the run left, or None."""
        ...

    async def small_files(self, run_id: str, max_bytes: int) -> dict[str, bytes]:
        """The content of each file the run left that is at most ``max_bytes`` long, by path."""
        ...

    async def get(self, run_id: str) -> Record | None:
        """The run's record, or None for an id never stored (or purged)."""
        ...

    async def output(self, run_id: str, after: int = -1) -> list[Chunk]:
        """The run's output chunks with ``seq`` above ``after``, in order."""
        ...

    async def cancel(self, run_id: str, result: RunResult) -> CancelOutcome:
        """Cancel a queued run (it becomes ``result``) or flag a running one to be stopped."""
        ...

    async def cancel_requested(self, run_id: str) -> bool:
        """Whether ``cancel`` flagged this running run."""
        ...

    async def recover(self, message: str) -> list[str]:
        """At start: runs left ``running`` by a server that died become ``error`` with ``message``."""
        ...

    async def purge(self, finished_before: float) -> int:
        """Delete runs that ended before ``finished_before``; return how many."""
        ...

    async def aclose(self) -> None:
        """Release the store."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    spec BLOB,
    result BLOB,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    cancel INTEGER NOT NULL DEFAULT 0,
    key TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, n);
CREATE INDEX IF NOT EXISTS runs_by_finished ON runs (finished) WHERE finished IS NOT NULL;
CREATE TABLE IF NOT EXISTS output (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    stream TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
-- A rowid table: the rows are large (SQLite advises WITHOUT ROWID only for small ones).
CREATE TABLE IF NOT EXISTS files (
    run_id TEXT NOT NULL,
    path TEXT NOT NULL,
    data BLOB NOT NULL,
    UNIQUE (run_id, path)
);
"""


def default_path() -> Path:
    """``$XDG_STATE_HOME/warmpod/runs.sqlite3``, or under ``~/.local/state``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "warmpod" / "runs.sqlite3"


class SqliteStore:
    """The embedded store: one SQLite file in WAL mode, owned by one server at a time.

    Every call runs in a worker thread, one at a time, so the event loop never waits on the disk.
    WAL with ``synchronous=NORMAL`` survives the server being killed at any point (not a power loss
    between checkpoints: the operator can set ``PRAGMA synchronous=FULL`` on the file if that matters).
    """

    def __init__(self, connection: sqlite3.Connection, lock: int) -> None:
        self._db = connection
        self._lock = lock
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (or create) the store at ``path``.

        Raises:
            StoreError: the file cannot be opened, or another warmpod server holds it.
        """
        return await anyio.to_thread.run_sync(cls._open, path)

    @classmethod
    def _open(cls, path: Path) -> SqliteStore:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the run store {path}: {exc} (WARMPOD_QUEUE__STORE_PATH)") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock)
            raise StoreError(
                f"another warmpod server uses the run store {path}: give each server its own "
                "WARMPOD_QUEUE__STORE_PATH"
            ) from None
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            # A store made before API keys: its runs belong to no key.
            if "key" not in {row[1] for row in db.execute("PRAGMA table_info(runs)")}:
                db.execute("ALTER TABLE runs ADD COLUMN key TEXT")
            db.execute("CREATE INDEX IF NOT EXISTS runs_by_key ON runs (key, status) WHERE key IS NOT NULL")
        except sqlite3.Error as exc:
            os.close(lock)
            raise StoreError(f"cannot open the run store {path}: {exc}") from exc
        return cls(db, lock)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"the run store failed: {exc}") from exc

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def add(
        self,
        run_id: str,
        spec: RunSpec,
        *,
        max_queued: int,
        key: str | None = None,
        max_active: int | None = None,
    ) -> Added:
        """Queue a run of ``key`` (a key's name); nothing is stored unless it is ``added``: not when
        ``max_queued`` runs already wait, nor when ``max_active`` runs of the key are queued or running."""
        blob = msgspec.msgpack.encode(spec)

        def add(db: sqlite3.Connection) -> Added:
            # One call at a time on the one connection: the counts and the insert cannot interleave.
            if max_active is not None:
                (active,) = db.execute(
                    "SELECT count(*) FROM runs WHERE key = ? AND status IN ('queued', 'running')", (key,)
                ).fetchone()
                if active >= max_active:
                    return "key-busy"
            cursor = db.execute(
                "INSERT INTO runs (id, status, spec, created, key) SELECT ?, 'queued', ?, ?, ? "
                "WHERE (SELECT count(*) FROM runs WHERE status = 'queued') < ?",
                (run_id, blob, time.time(), key, max_queued),
            )
            return "added" if cursor.rowcount == 1 else "queue-full"

        return await self._call(add)

    async def queued(self) -> int:
        """How many runs wait."""

        def count(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT count(*) FROM runs WHERE status = 'queued'").fetchone()
            return int(row[0])

        return await self._call(count)

    async def claim(self) -> tuple[str, RunSpec] | None:
        """Mark the oldest queued run running and return it; None when none waits."""

        def claim(db: sqlite3.Connection) -> tuple[str, bytes] | None:
            row = db.execute(
                "UPDATE runs SET status = 'running', started = ? WHERE n = "
                "(SELECT n FROM runs WHERE status = 'queued' ORDER BY n LIMIT 1) RETURNING id, spec",
                (time.time(),),
            ).fetchone()
            return None if row is None else (row[0], row[1])

        while True:
            claimed = await self._call(claim)
            if claimed is None:
                return None
            run_id, raw = claimed
            try:
                return run_id, msgspec.msgpack.decode(raw, type=RunSpec)
            except msgspec.DecodeError as exc:
                # Queued runs outlive restarts: one row this version cannot read must end, or it
                # would stop every start; the rest of the queue goes on.
                log.error("queued run %s cannot be read from the store: %s", run_id, exc)
                message = f"the queued run could not be read from the run store: {exc}"
                await self.finish(run_id, RunResult.from_server(run_id, "error", error=message))

    async def requeue(self, run_id: str) -> None:
        """Put a claimed run back in its place in the queue (it never reached a sandbox)."""
        await self._call(
            lambda db: db.execute(
                "UPDATE runs SET status = 'queued', started = NULL WHERE id = ? AND status = 'running'",
                (run_id,),
            )
        )

    async def add_output(self, run_id: str, chunks: Sequence[Chunk]) -> None:
        """Keep more of a running run's output."""
        rows = [(run_id, chunk.seq, chunk.stream, chunk.data) for chunk in chunks]

        def add(db: sqlite3.Connection) -> None:
            db.executemany("INSERT OR IGNORE INTO output VALUES (?, ?, ?, ?)", rows)

        if rows:
            await self._call(add)

    async def finish(
        self,
        run_id: str,
        result: RunResult,
        chunks: Sequence[Chunk] = (),
        files: Sequence[tuple[str, bytes]] = (),
    ) -> bool:
        """Record the run's last output, final result and ``(path, content)`` of the files it
        left (those ``result.files`` lists); False, keeping nothing, if it was already final."""
        rows = [(run_id, chunk.seq, chunk.stream, chunk.data) for chunk in chunks]
        file_rows = [(run_id, path, data) for path, data in files]
        blob = msgspec.msgpack.encode(result)

        def finish(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                db.executemany("INSERT OR IGNORE INTO output VALUES (?, ?, ?, ?)", rows)
                cursor = db.execute(
                    "UPDATE runs SET status = ?, result = ?, finished = ?, spec = NULL "
                    "WHERE id = ? AND status IN ('queued', 'running')",
                    (result.status, blob, time.time(), run_id),
                )
                if cursor.rowcount != 1:
                    return False
                db.executemany("INSERT OR IGNORE INTO files VALUES (?, ?, ?)", file_rows)
                return True

        return await self._call(finish)

    async def file(self, run_id: str, path: str) -> bytes | None:
        """The content of a file the run left, or None."""

        def file(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT data FROM files WHERE run_id = ? AND path = ?", (run_id, path)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._call(file)

    async def small_files(self, run_id: str, max_bytes: int) -> dict[str, bytes]:
        """The content of each file the run left that is at most ``max_bytes`` long, by path."""

        def small(db: sqlite3.Connection) -> dict[str, bytes]:
            rows = db.execute(
                "SELECT path, data FROM files WHERE run_id = ? AND length(data) <= ?", (run_id, max_bytes)
            )
            return {path: bytes(data) for path, data in rows}

        return await self._call(small)

    async def get(self, run_id: str) -> Record | None:
        """The run's record, or None for an id never stored (or purged)."""

        def get(
            db: sqlite3.Connection,
        ) -> tuple[RunStatus, str | None, float, float | None, float | None, bytes | None] | None:
            return db.execute(  # type: ignore[no-any-return]
                "SELECT status, key, created, started, finished, result FROM runs WHERE id = ?", (run_id,)
            ).fetchone()

        row = await self._call(get)
        if row is None:
            return None
        status, key, created, started, finished, blob = row
        result = None if blob is None else msgspec.msgpack.decode(blob, type=RunResult)
        return Record(
            id=run_id,
            status=status,
            key=key,
            created=created,
            started=started,
            finished=finished,
            result=result,
        )

    async def output(self, run_id: str, after: int = -1) -> list[Chunk]:
        """The run's output chunks with ``seq`` above ``after``, in order."""

        def output(db: sqlite3.Connection) -> list[tuple[int, str, bytes]]:
            return db.execute(
                "SELECT seq, stream, data FROM output WHERE run_id = ? AND seq > ? ORDER BY seq",
                (run_id, after),
            ).fetchall()

        rows = await self._call(output)
        return [
            Chunk(seq=seq, stream="stderr" if stream == "stderr" else "stdout", data=data)
            for seq, stream, data in rows
        ]

    async def cancel(self, run_id: str, result: RunResult) -> CancelOutcome:
        """Cancel a queued run (it becomes ``result``) or flag a running one to be stopped."""
        blob = msgspec.msgpack.encode(result)

        def cancel(db: sqlite3.Connection) -> CancelOutcome:
            with _transaction(db):
                row = db.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is None:
                    return "unknown"
                if row[0] == "queued":
                    db.execute(
                        "UPDATE runs SET status = 'cancelled', result = ?, finished = ?, spec = NULL "
                        "WHERE id = ?",
                        (blob, time.time(), run_id),
                    )
                    return "cancelled"
                if row[0] == "running":
                    db.execute("UPDATE runs SET cancel = 1 WHERE id = ?", (run_id,))
                    return "requested"
                return "finished"

        return await self._call(cancel)

    async def cancel_requested(self, run_id: str) -> bool:
        """Whether ``cancel`` flagged this running run."""

        def flagged(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT cancel FROM runs WHERE id = ?", (run_id,)).fetchone()
            return bool(row and row[0])

        return await self._call(flagged)

    async def recover(self, message: str) -> list[str]:
        """At start: runs left ``running`` by a server that died become ``error`` with ``message``."""

        def recover(db: sqlite3.Connection) -> list[str]:
            with _transaction(db):
                ids = [row[0] for row in db.execute("SELECT id FROM runs WHERE status = 'running'")]
                for run_id in ids:
                    stdout, stderr = joined(
                        db.execute("SELECT stream, data FROM output WHERE run_id = ? ORDER BY seq", (run_id,))
                    )
                    result = RunResult.from_server(
                        run_id, "error", stdout=stdout, stderr=stderr, error=message
                    )
                    db.execute(
                        "UPDATE runs SET status = 'error', result = ?, finished = ?, spec = NULL "
                        "WHERE id = ?",
                        (msgspec.msgpack.encode(result), time.time(), run_id),
                    )
                return ids

        return await self._call(recover)

    async def purge(self, finished_before: float) -> int:
        """Delete runs that ended before ``finished_before``; return how many."""

        def purge(db: sqlite3.Connection) -> int:
            with _transaction(db):
                for table in ("output", "files"):
                    # The table name is one of the two literals above, never input.
                    query = f"DELETE FROM {table} WHERE run_id IN (SELECT id FROM runs WHERE finished < ?)"  # noqa: S608
                    db.execute(query, (finished_before,))
                return db.execute("DELETE FROM runs WHERE finished < ?", (finished_before,)).rowcount

        return await self._call(purge)

    async def aclose(self) -> None:
        """Close the file and let another server open it."""

        def close(db: sqlite3.Connection) -> None:
            db.close()
            os.close(self._lock)

        with anyio.CancelScope(shield=True):
            await self._call(close)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` on an exception (autocommit connection)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def joined(chunks: Iterable[tuple[str, bytes]]) -> tuple[str, str]:
    """A run's stdout and stderr as text, from its ``(stream, data)`` chunks in order."""
    out = {"stdout": bytearray(), "stderr": bytearray()}
    for stream, data in chunks:
        out.get(stream, out["stdout"]).extend(data)
    return out["stdout"].decode("utf-8", "replace"), out["stderr"].decode("utf-8", "replace")
