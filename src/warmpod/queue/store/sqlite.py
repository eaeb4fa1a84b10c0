"""The embedded run store: one SQLite file in WAL mode, owned by one node at a time."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus

from warmpod.environments import DEFAULT
from warmpod.errors import StoreError
from warmpod.models import Chunk, NodeSeen, RunResult, RunSpec
from warmpod.queue.store import outbox
from warmpod.queue.store.base import (
    GET,
    OUTPUT_PAGE,
    PREFERRED_WAIT,
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
    batch_keys,
    inlined,
    labels_column,
    lost_result,
    record,
    replayed,
    summary,
    unreadable,
)
from warmpod.queue.store.codec import (
    decode_blob,
    encode_blob,
    joined,
    output_rows,
    page,
    segments,
)
from warmpod.queue.store.history import history_query
from warmpod.queue.store.outbox import Delivery, Tried

log = logging.getLogger(__name__)

T = TypeVar("T")


# Each step takes a store from the version before it (PRAGMA user_version) to its own number.
_MIGRATIONS = (
    # 1: runs, their output and files (stores made before versions begin here, ``key`` aside).
    """
    CREATE TABLE IF NOT EXISTS runs (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        spec BLOB,
        result BLOB,
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        cancel INTEGER NOT NULL DEFAULT 0
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
    """,
    # 2: API keys (a store that has the column already got it before versions).
    "ALTER TABLE runs ADD COLUMN key TEXT;"
    "CREATE INDEX IF NOT EXISTS runs_by_key ON runs (key, status) WHERE key IS NOT NULL;",
    # 3: nodes, claims under a lease, fencing.
    """
    ALTER TABLE runs ADD COLUMN node TEXT;
    ALTER TABLE runs ADD COLUMN incarnation TEXT;
    ALTER TABLE runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN lease_until REAL;
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        incarnation TEXT NOT NULL,
        seen REAL NOT NULL,
        running INTEGER NOT NULL DEFAULT 0
    );
    """,
    # 4: which runs a preloaded sandbox serves best (RunSpec.warm), for claims by kind.
    "ALTER TABLE runs ADD COLUMN warm INTEGER NOT NULL DEFAULT 0;",
    # 5: the Idempotency-Key a run was submitted with, unique per API key name, and its request's hash.
    """
    ALTER TABLE runs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE runs ADD COLUMN request_hash TEXT;
    CREATE UNIQUE INDEX runs_by_idempotency_key ON runs (coalesce(key, ''), idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # 6: rows that pack several chunks (``output_rows``) carry their last seq; NULL in a row of
    # before, one chunk, whose last seq is its seq.
    "ALTER TABLE output ADD COLUMN last INTEGER;",
    # 7: a key's running runs, counted for each queued run at every claim (fairness across keys).
    "CREATE INDEX runs_by_status_key ON runs (status, key);",
    # 8: the environment a run names (its runs so far are the default one's) and those each node
    # serves, comma-joined (a name has no comma); claims look a run up by its environment.
    """
    ALTER TABLE runs ADD COLUMN environment TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE nodes ADD COLUMN environments TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX runs_by_status_environment ON runs (status, environment, n);
    """,
    # 9: run history (``history.py``): a run's labels (a JSON object), its exit code and duration
    # for summaries without its result, a key's runs newest first, by status too, and each label
    # in a table of its own that carries its run's key and time, so a label's runs come in order.
    """
    ALTER TABLE runs ADD COLUMN labels TEXT;
    ALTER TABLE runs ADD COLUMN exit_code INTEGER;
    ALTER TABLE runs ADD COLUMN duration_ms REAL;
    CREATE INDEX runs_history ON runs (coalesce(key, ''), created, n);
    CREATE INDEX runs_history_by_status ON runs (coalesce(key, ''), status, created, n);
    CREATE TABLE run_labels (
        run_n INTEGER NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        owner TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (run_n, name)
    ) WITHOUT ROWID;
    CREATE INDEX run_labels_by_value ON run_labels (owner, name, value, created, run_n);
    """,
    # 10: the webhook outbox (``outbox.py``): a row per run with a webhook, due ones by time.
    """
    CREATE TABLE webhooks (
        run_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        url TEXT NOT NULL,
        state TEXT NOT NULL,
        due REAL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_status INTEGER,
        last_error TEXT,
        delivered REAL
    ) WITHOUT ROWID;
    CREATE INDEX webhooks_due ON webhooks (due) WHERE state = 'pending';
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


def default_path() -> Path:
    """``$XDG_STATE_HOME/warmpod/runs.sqlite3``, or under ``~/.local/state``."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "warmpod" / "runs.sqlite3"


class SqliteStore:
    """The embedded store: one SQLite file in WAL mode, owned by one node at a time.

    Every call runs in a worker thread, one at a time, so the event loop never waits on the disk.
    WAL with ``synchronous=NORMAL`` survives the server being killed at any point (not a power loss
    between checkpoints: the operator can set ``PRAGMA synchronous=FULL`` on the file if that matters).
    Notices come from this process's own calls: no other node writes the file.
    """

    shared = False

    def __init__(self, connection: sqlite3.Connection, lock: int) -> None:
        self._db = connection
        self._lock = lock
        # The start that joined: the file lock makes it the only live one, so its runs are never
        # reaped, whatever the wall clock does or however long a write waited.
        self._joined: str | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._listeners: list[Callable[[Notice, str], None]] = []

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open (or create, or migrate) the store at ``path``.

        Raises:
            StoreError: the file cannot be opened, another warmpod server holds it, or a newer
                warmpod made it.
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
                "WARMPOD_QUEUE__STORE_PATH, or share a PostgreSQL store (WARMPOD_QUEUE__STORE_URL)"
            ) from None
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            _migrate(db, path)
        except (sqlite3.Error, StoreError) as exc:
            os.close(lock)
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot open the run store {path}: {exc}") from exc
        return cls(db, lock)

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            try:
                return fn(self._db)
            except sqlite3.Error as exc:
                raise StoreError(f"the run store failed: {exc}") from exc

        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    def _ended(self, run_id: str) -> None:
        """Tell listeners the run is final: it changed, and its webhook (if it has one) is due."""
        self._notify("changed", run_id)
        self._notify("webhook", run_id)

    def _notify(self, notice: Notice, run_id: str) -> None:
        for listener in self._listeners:
            listener(notice, run_id)

    async def listen(
        self,
        notice: Callable[[Notice, str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``notice`` for every change made through this store, until cancelled."""
        self._listeners.append(notice)
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            self._listeners.remove(notice)

    async def join(self, owner: Owner, lease: float, message: str) -> list[str]:
        """At start: register ``owner``; every run left running is its own earlier start's (one
        node holds the file), so each becomes ``error`` with ``message`` and its output."""

        def join(db: sqlite3.Connection) -> list[str]:
            with _transaction(db):
                db.execute("DELETE FROM nodes")
                db.execute(
                    "INSERT INTO nodes (name, incarnation, seen) VALUES (?, ?, ?)",
                    (owner.node, owner.incarnation, time.time()),
                )
                rows = db.execute("SELECT id, node FROM runs WHERE status = 'running'").fetchall()
                return [_end_lost(db, run_id, node, message) for run_id, node in rows]

        lost = await self._call(join)
        self._joined = owner.incarnation
        return lost

    async def leave(self, owner: Owner) -> None:
        """At a clean stop: drop ``owner`` from the nodes seen alive."""
        await self._call(
            lambda db: db.execute("DELETE FROM nodes WHERE incarnation = ?", (owner.incarnation,))
        )

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
        """Queue a run of ``key`` (a key's name); nothing is stored unless it is ``added``: not when
        ``max_queued`` runs already wait, nor when ``max_active`` runs of the key are queued or running,
        nor when a run of ``key`` already has ``idempotency.key`` (that run is answered)."""
        keys = None if idempotency is None else [idempotency.key]
        added = await self._add([(run_id, spec)], max_queued, key, max_active, keys, idempotency)
        if isinstance(added, BatchReplay):
            ((found, status),) = added.runs
            return Replay(run_id=found, status=status, same_request=added.same_request)
        return added

    async def add_batch(
        self,
        items: Sequence[tuple[str, RunSpec]],
        *,
        max_queued: int,
        key: str | None = None,
        max_active: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Added | BatchReplay:
        """Queue the runs ``items`` of ``key`` together or none of them (see ``Store.add_batch``)."""
        keys = None if idempotency is None else batch_keys(idempotency.key, len(items))
        return await self._add(items, max_queued, key, max_active, keys, idempotency)

    async def _add(
        self,
        items: Sequence[tuple[str, RunSpec]],
        max_queued: int,
        key: str | None,
        max_active: int | None,
        idempotency_keys: Sequence[str] | None,
        idempotency: Idempotency | None,
    ) -> Added | BatchReplay:
        """Store ``items`` under ``idempotency_keys`` (one each), all within the bounds, or none."""
        request_hash = None if idempotency is None else idempotency.request_hash
        stored_keys: Sequence[str | None] = idempotency_keys or [None] * len(items)

        def add(db: sqlite3.Connection) -> Added | BatchReplay:
            # One call at a time on the one connection: the look-up, the counts and the inserts
            # cannot interleave.
            if idempotency_keys:
                replay = _replay(db, key, idempotency_keys, request_hash)
                if replay is not None:
                    return replay
            with _transaction(db):
                if max_active is not None:
                    (active,) = db.execute(
                        "SELECT count(*) FROM runs WHERE key = ? AND status IN ('queued', 'running')", (key,)
                    ).fetchone()
                    if active + len(items) > max_active:
                        return "key-busy"
                (queued,) = db.execute("SELECT count(*) FROM runs WHERE status = 'queued'").fetchone()
                if queued + len(items) > max_queued:
                    return "queue-full"
                created = time.time()
                for (run_id, spec), stored_key in zip(items, stored_keys, strict=True):
                    _insert_run(db, run_id, spec, created, key, stored_key, request_hash)
            return "added"

        added = await self._call(add)
        if added == "added":
            for run_id, _ in items:
                self._notify("queued", run_id)
        return added

    async def queued(self) -> list[str]:
        """The ids of the runs that wait."""

        def queued(db: sqlite3.Connection) -> list[str]:
            return [run_id for (run_id,) in db.execute("SELECT id FROM runs WHERE status = 'queued'")]

        return await self._call(queued)

    async def claim(
        self, owner: Owner, lease: float, *, environment: str = DEFAULT, warm: bool = False
    ) -> Claim | None:
        """Give the oldest queued run of ``environment`` to ``owner`` for ``lease`` seconds, those
        of ``warm``'s kind first, then those of the key running fewest (see ``Store.claim``); None
        when none of it waits."""

        def claim(db: sqlite3.Connection) -> tuple[str, bytes, int] | None:
            now = time.time()
            return db.execute(  # type: ignore[no-any-return]
                "UPDATE runs SET status = 'running', started = ?, node = ?, incarnation = ?, "  # noqa: S608  (constants and placeholders only)
                "attempt = attempt + 1, lease_until = ? WHERE n = "
                "(SELECT n FROM runs q WHERE status = 'queued' AND environment = ? "
                "ORDER BY (warm = ? OR created < ?) DESC, "
                f"{_KEY_RUNNING}, n LIMIT 1) "
                "RETURNING id, spec, attempt",
                (now, owner.node, owner.incarnation, now + lease, environment, warm, now - PREFERRED_WAIT),
            ).fetchone()

        while True:
            row = await self._call(claim)
            if row is None:
                return None
            run_id, raw, attempt = row
            self._notify("changed", run_id)
            fence = Fence(run_id=run_id, incarnation=owner.incarnation, attempt=attempt)
            try:
                return Claim(fence=fence, spec=decode_blob(raw, RunSpec))
            except msgspec.DecodeError as exc:
                await unreadable(self, fence, exc)

    async def next_environment(self, environments: Sequence[str], ready: Sequence[str] = ()) -> str | None:
        """The environment among ``environments`` of the queued run to claim next, those of
        ``ready`` first (see ``Store.next_environment``); None when none of them has one."""
        if not environments:
            return None
        names, free = list(environments), list(ready)

        def pick(db: sqlite3.Connection) -> str | None:
            row = db.execute(
                "SELECT environment FROM runs q WHERE status = 'queued' "  # noqa: S608  (constants and placeholders only)
                f"AND environment IN ({','.join('?' * len(names))}) "
                f"ORDER BY (environment IN ({','.join('?' * len(free))}) OR created < ?) DESC, "
                f"{_KEY_RUNNING}, n LIMIT 1",
                [*names, *free, time.time() - PREFERRED_WAIT],
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._call(pick)

    async def heartbeat(
        self, owner: Owner, lease: float, fences: Sequence[Fence], environments: Sequence[str] = (DEFAULT,)
    ) -> Beat:
        """Renew the leases of the runs ``owner`` holds by ``fences`` and record it alive, serving
        ``environments``."""
        served = ",".join(environments)

        def beat(db: sqlite3.Connection) -> Beat:
            now = time.time()
            held = set()
            with _transaction(db):
                for fence in fences:
                    cursor = db.execute(
                        "UPDATE runs SET lease_until = ? WHERE id = ? AND status = 'running' "
                        "AND incarnation = ? AND attempt = ?",
                        (now + lease, fence.run_id, fence.incarnation, fence.attempt),
                    )
                    if cursor.rowcount:
                        held.add(fence.run_id)
                db.execute(
                    "INSERT INTO nodes (name, incarnation, seen, running, environments) "
                    "VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET incarnation = excluded.incarnation, "
                    "seen = excluded.seen, running = excluded.running, environments = excluded.environments",
                    (owner.node, owner.incarnation, now, len(held), served),
                )
                nodes = [
                    NodeSeen(
                        name=name,
                        incarnation=inc,
                        seen_ago=max(0.0, now - seen),
                        running=running,
                        environments=_split(names),
                    )
                    for name, inc, seen, running, names in db.execute(
                        "SELECT name, incarnation, seen, running, environments FROM nodes "
                        "WHERE seen > ? ORDER BY name",
                        (now - lease,),
                    )
                ]
                waiting = dict(
                    db.execute(
                        "SELECT environment, count(*) FROM runs WHERE status = 'queued' GROUP BY environment"
                    ).fetchall()
                )
                return Beat(
                    held=frozenset(held),
                    queued=sum(waiting.values()),
                    nodes=nodes,
                    queued_by_environment=waiting,
                )

        return await self._call(beat)

    async def reap(self, message: str) -> list[str]:
        """Make runs whose lease ran out ``error`` with ``message`` and their output; never those
        of the start that joined, which alone holds the file (leases are for several nodes)."""

        def reap(db: sqlite3.Connection) -> list[str]:
            with _transaction(db):
                rows = db.execute(
                    "SELECT id, node FROM runs WHERE status = 'running' AND lease_until < ? "
                    "AND incarnation IS NOT ?",
                    (time.time(), self._joined),
                ).fetchall()
                return [_end_lost(db, run_id, node, message) for run_id, node in rows]

        reaped = await self._call(reap)
        for run_id in reaped:
            self._ended(run_id)
        return reaped

    async def add_output(self, fence: Fence, chunks: Sequence[Chunk]) -> bool:
        """Keep more of a running run's output; False, keeping nothing, if ``fence`` lost the run."""

        def add(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                if not _holds(db, fence):
                    return False
                _keep_output(db, fence.run_id, chunks)
                return True

        held = await self._call(add)
        if held and chunks:
            self._notify("changed", fence.run_id)
        return held

    async def finish(
        self,
        run_id: str,
        result: RunResult,
        chunks: Sequence[Chunk] = (),
        files: Sequence[tuple[str, bytes]] = (),
        *,
        fence: Fence | None = None,
    ) -> bool:
        """Record the run's last output, final result and ``(path, content)`` of the files it
        left; False, keeping nothing, if it was already final or ``fence`` lost it."""
        file_rows = [(run_id, path, data) for path, data in files]
        blob = encode_blob(result)

        def finish(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                if fence is not None and not _holds(db, fence):
                    return fence is not None and _finished_with(db, run_id, blob, fence)
                cursor = db.execute(
                    "UPDATE runs SET status = ?, result = ?, finished = ?, spec = NULL, lease_until = NULL, "
                    "exit_code = ?, duration_ms = ? WHERE id = ? AND status IN ('queued', 'running')",
                    (result.status, blob, time.time(), result.exit_code, result.duration_ms, run_id),
                )
                if cursor.rowcount != 1:
                    return fence is not None and _finished_with(db, run_id, blob, fence)
                _keep_output(db, run_id, chunks)
                db.executemany("INSERT OR IGNORE INTO files VALUES (?, ?, ?)", file_rows)
                db.execute(_DUE, (run_id,))
                return True

        finished = await self._call(finish)
        if finished:
            self._ended(run_id)
        return finished

    async def file_size(self, run_id: str, path: str) -> int | None:
        """The size in bytes of a file the run left, or None; its content is not read."""

        def size(db: sqlite3.Connection) -> int | None:
            # length() of a BLOB reads its size from the row's header, not its pages.
            row = db.execute(
                "SELECT length(data) FROM files WHERE run_id = ? AND path = ?", (run_id, path)
            ).fetchone()
            return None if row is None else int(row[0])

        return await self._call(size)

    async def file_piece(self, run_id: str, path: str, offset: int, size: int) -> bytes | None:
        """At most ``size`` bytes of a file the run left from ``offset`` on (none past its end), or
        None: a download reads a file in such pieces, never holding it whole."""

        def piece(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT rowid FROM files WHERE run_id = ? AND path = ?", (run_id, path)
            ).fetchone()
            if row is None:
                return None
            # The incremental blob API reads only the pages the piece is on: substr() would load
            # the whole value for every piece.
            with db.blobopen("files", "data", row[0], readonly=True) as blob:
                blob.seek(min(offset, len(blob)))
                return blob.read(size)

        return await self._call(piece)

    async def small_files(self, run_id: str, max_bytes: int, total_bytes: int) -> dict[str, bytes]:
        """The content of the files ``inlined`` picks among those the run left, by path: no other
        file's bytes are read."""

        def small(db: sqlite3.Connection) -> dict[str, bytes]:
            # length() of a BLOB reads its size from the row's header, not its pages.
            sizes = db.execute("SELECT path, length(data) FROM files WHERE run_id = ?", (run_id,))
            paths = inlined(sizes, max_bytes, total_bytes)
            if not paths:
                return {}
            rows = db.execute(
                f"SELECT path, data FROM files WHERE run_id = ? AND path IN ({','.join('?' * len(paths))})",  # noqa: S608  (placeholders only)
                (run_id, *paths),
            )
            return {path: bytes(data) for path, data in rows}

        return await self._call(small)

    async def get(self, run_id: str) -> Record | None:
        """The run's record, or None for an id never stored (or purged)."""

        def get(db: sqlite3.Connection) -> tuple[Any, ...] | None:
            return db.execute(GET, (run_id,)).fetchone()  # type: ignore[no-any-return]

        row = await self._call(get)
        return None if row is None else record(run_id, *row)

    async def list_runs(
        self, key: str | None, where: RunFilter, after: Position | None, limit: int
    ) -> list[Listed]:
        """At most ``limit`` of ``key``'s runs that ``where`` picks, newest first, after ``after``
        (see ``Store.list_runs``)."""
        query, params = history_query(key, where, after, limit)

        def listed(db: sqlite3.Connection) -> list[Listed]:
            return [summary(*row) for row in db.execute(query, params)]

        return await self._call(listed)

    async def output(self, run_id: str, after: int = -1, limit: int = OUTPUT_PAGE) -> list[Chunk]:
        """The first ``limit`` of the run's output chunks with ``seq`` above ``after``, in order."""

        def output(db: sqlite3.Connection) -> list[Chunk]:
            # Every row selected holds a chunk above ``after`` (its last seq is), so ``limit`` rows
            # are enough; the only one that may start at or below ``after`` is the last to start
            # there, and the bound on seq lets the primary key find the rows without a scan.
            rows = db.execute(
                "SELECT seq, stream, data FROM output WHERE run_id = ? "
                "AND seq >= coalesce((SELECT max(seq) FROM output WHERE run_id = ? AND seq <= ?), ?) "
                "AND coalesce(last, seq) > ? ORDER BY seq LIMIT ?",
                (run_id, run_id, after, after, after, limit),
            )
            return page(rows, after, limit)

        return await self._call(output)

    async def cancel(self, run_id: str, result: RunResult) -> CancelOutcome:
        """Cancel a queued run (it becomes ``result``) or flag a running one to be stopped."""
        blob = encode_blob(result)

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
                    db.execute(_DUE, (run_id,))
                    return "cancelled"
                if row[0] == "running":
                    db.execute("UPDATE runs SET cancel = 1 WHERE id = ?", (run_id,))
                    return "requested"
                return "finished"

        outcome = await self._call(cancel)
        if outcome == "cancelled":
            self._ended(run_id)
        elif outcome == "requested":
            self._notify("cancel", run_id)
        return outcome

    async def cancel_requested(self, run_id: str) -> bool:
        """Whether ``cancel`` flagged this running run."""

        def flagged(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT cancel FROM runs WHERE id = ?", (run_id,)).fetchone()
            return bool(row and row[0])

        return await self._call(flagged)

    async def purge(self, retention: float) -> int:
        """Delete runs that ended more than ``retention`` seconds ago; return how many."""

        def purge(db: sqlite3.Connection) -> int:
            before = time.time() - retention
            with _transaction(db):
                db.execute(
                    "DELETE FROM run_labels WHERE run_n IN (SELECT n FROM runs WHERE finished < ?)", (before,)
                )
                db.execute(outbox.PURGE, (before,))
                for table in ("output", "files"):
                    # The table name is one of the two literals above, never input.
                    query = f"DELETE FROM {table} WHERE run_id IN (SELECT id FROM runs WHERE finished < ?)"  # noqa: S608
                    db.execute(query, (before,))
                return db.execute("DELETE FROM runs WHERE finished < ?", (before,)).rowcount

        return await self._call(purge)

    async def claim_webhook(self, lease: float, skip: Sequence[str | None] = ()) -> Delivery | None:
        """Take the webhook due the longest, not of the keys in ``skip``, for one try (``Store``)."""
        owners = [key or "" for key in skip]
        query = outbox.claim_query(len(owners)).replace("{now}", _NOW)

        def claim(db: sqlite3.Connection) -> Delivery | None:
            with _transaction(db):
                row = db.execute(query, (lease, *owners)).fetchone()
            return None if row is None else outbox.delivery(tuple(row))

        return await self._call(claim)

    async def record_webhook(self, delivery: Delivery, tried: Tried) -> bool:
        """Keep how ``delivery``'s try went (``Store``)."""
        params = tried.params(delivery)

        def record(db: sqlite3.Connection) -> bool:
            with _transaction(db):
                return db.execute(_RECORD, params).rowcount == 1

        return await self._call(record)

    async def aclose(self) -> None:
        """Close the file and let another server open it."""

        def close(db: sqlite3.Connection) -> None:
            db.close()
            os.close(self._lock)

        with anyio.CancelScope(shield=True):
            await self._call(close)


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"the run store {path} has schema version {version}, made by a newer warmpod "
            f"(this one reads up to {SCHEMA_VERSION})"
        )
    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    for number, script in enumerate(_MIGRATIONS, start=1):
        if number <= version:
            continue
        if number == 2 and "key" in columns:  # added on open before stores had versions
            script = "CREATE INDEX IF NOT EXISTS runs_by_key ON runs (key, status) WHERE key IS NOT NULL;"
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, script.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")


# The clock of the outbox's statements, in seconds since the epoch as ``time.time()`` gives.
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
_DUE = outbox.DUE.replace("{now}", _NOW)
_RECORD = outbox.RECORD.replace("{now}", _NOW)

# A queued run's key's runs running now (NULL, keys off, counts as one key): the fairness order
# of ``claim`` and ``next_environment``.
_KEY_RUNNING = "(SELECT count(*) FROM runs r WHERE r.status = 'running' AND r.key IS q.key)"


def _split(environments: str) -> list[str]:
    """The environments a node serves, from their stored comma-joined names."""
    return environments.split(",") if environments else []


def _replay(
    db: sqlite3.Connection, key: str | None, idempotency_keys: Sequence[str], request_hash: str | None
) -> BatchReplay | None:
    """The runs of ``key`` stored under any of ``idempotency_keys``, as ``replayed`` answers them."""
    rows = db.execute(
        "SELECT idempotency_key, id, status, request_hash FROM runs "  # noqa: S608  (placeholders only)
        "WHERE coalesce(key, '') = ? AND idempotency_key IS NOT NULL "
        f"AND idempotency_key IN ({','.join('?' * len(idempotency_keys))})",
        (key or "", *idempotency_keys),
    )
    return replayed(rows, idempotency_keys, request_hash)


def _insert_run(
    db: sqlite3.Connection,
    run_id: str,
    spec: RunSpec,
    created: float,
    key: str | None,
    idempotency_key: str | None,
    request_hash: str | None,
) -> None:
    """Store one queued run: its row, a row per label (``run_labels``), and its webhook's (``webhooks``)."""
    cursor = db.execute(
        "INSERT INTO runs (id, status, spec, created, key, warm, environment, idempotency_key, "
        "request_hash, labels) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run_id,
            encode_blob(spec),
            created,
            key,
            spec.warm,
            spec.environment,
            idempotency_key,
            request_hash,
            labels_column(spec),
        ),
    )
    db.executemany(
        "INSERT INTO run_labels (run_n, name, value, owner, created) VALUES (?, ?, ?, ?, ?)",
        [(cursor.lastrowid, name, value, key or "", created) for name, value in spec.labels],
    )
    if spec.callback_url is not None:
        db.execute(outbox.ADD, (run_id, key or "", spec.callback_url))


def _holds(db: sqlite3.Connection, fence: Fence) -> bool:
    row = db.execute(
        "SELECT 1 FROM runs WHERE id = ? AND status = 'running' AND incarnation = ? AND attempt = ?",
        (fence.run_id, fence.incarnation, fence.attempt),
    ).fetchone()
    return row is not None


def _finished_with(db: sqlite3.Connection, run_id: str, blob: bytes, fence: Fence | None) -> bool:
    # The run is final with this very result (by the fence's attempt): the writer's own earlier write.
    row = db.execute(
        "SELECT incarnation, attempt FROM runs "
        "WHERE id = ? AND result = ? AND status NOT IN ('queued', 'running')",
        (run_id, blob),
    ).fetchone()
    return row is not None and (fence is None or tuple(row) == (fence.incarnation, fence.attempt))


def _keep_output(db: sqlite3.Connection, run_id: str, chunks: Sequence[Chunk]) -> None:
    """Store the chunks above the run's highest kept seq (``Store``'s rule for retried writes)."""
    if not chunks:
        return
    row = db.execute(
        "SELECT coalesce(last, seq) FROM output WHERE run_id = ? ORDER BY seq DESC LIMIT 1", (run_id,)
    ).fetchone()
    rows = [(run_id, *stored) for stored in output_rows(chunks, -1 if row is None else row[0])]
    db.executemany(
        "INSERT OR IGNORE INTO output (run_id, seq, last, stream, data) VALUES (?, ?, ?, ?, ?)", rows
    )


def _end_lost(db: sqlite3.Connection, run_id: str, node: str | None, message: str) -> str:
    # The cursor yields row by row: the run's chunks are never all held at once.
    output = db.execute("SELECT seq, stream, data FROM output WHERE run_id = ? ORDER BY seq", (run_id,))
    result = lost_result(run_id, node, message, joined(itertools.chain.from_iterable(map(segments, output))))
    db.execute(
        "UPDATE runs SET status = 'error', result = ?, finished = ?, spec = NULL, lease_until = NULL "
        "WHERE id = ?",
        (encode_blob(result), time.time(), run_id),
    )
    db.execute(_DUE, (run_id,))
    return run_id


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
