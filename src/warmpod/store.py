"""Durable run records, their output and the queue: the ``Store`` interface and its SQLite default
(``pgstore`` has the PostgreSQL one that several nodes share)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus

from warmpod.errors import StoreError
from warmpod.models import NodeSeen, RunResult, RunSpec, RunStatus

log = logging.getLogger(__name__)

T = TypeVar("T")
B = TypeVar("B", RunSpec, RunResult)
Stream = Literal["stdout", "stderr"]
CancelOutcome = Literal["cancelled", "requested", "finished", "unknown"]


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a run's output, in the order the program printed it."""

    seq: int
    stream: Stream
    data: bytes


CHUNK_BYTES = 65536
"""The most output one chunk holds once merged (``runner.RunOutput`` merges adjacent chunks of a
stream up to it; one of the agent's frames carries at most as much)."""
OUTPUT_PAGE = 32
"""The most chunks one ``Store.output`` call returns: readers page through a run's output, each
page at most ``OUTPUT_PAGE * CHUNK_BYTES`` (2 MiB) however many chunks the run printed."""
ROW_SEGMENTS = 256
"""The most chunks one stored row packs (``output_rows``): with at most ``CHUNK_BYTES`` of data
too, a page read inside a row decodes a bounded row, and the row's own cost (its key, about 50
bytes) is shared by enough chunks to stay well under a byte per chunk."""
PACKED = "packed"
"""The ``stream`` of a stored row that packs several chunks (``output_rows``); a row whose stream
is ``stdout`` or ``stderr`` is one chunk, as every row was before rows packed chunks."""


Added = Literal["added", "queue-full", "key-busy"]
"""What ``Store.add`` did with a run."""


class Idempotency(msgspec.Struct, frozen=True, kw_only=True):
    """A submission's ``Idempotency-Key`` and the hash of what it asked to run: stored with the run
    (and purged with it), unique per API key name, so a retried submit finds its run again."""

    key: str
    request_hash: str


class Replay(msgspec.Struct, frozen=True, kw_only=True):
    """What ``Store.add`` answers when a run of the same API key already has the idempotency key."""

    run_id: str
    status: RunStatus
    same_request: bool
    """Whether that run was asked for with the same request hash (else the key was reused)."""


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
    node: str | None = None
    """The node that claimed it; None while it waits."""


class Owner(msgspec.Struct, frozen=True, kw_only=True):
    """A node as the store knows it: its name and the id of this start of it."""

    node: str
    incarnation: str


class Fence(msgspec.Struct, frozen=True, kw_only=True):
    """The proof a claim gives: every later write of the run carries it, and one that no longer
    matches the run's owner and attempt changes nothing, so a node that lost the run finds out."""

    run_id: str
    incarnation: str
    attempt: int


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """A queued run this node now holds, under a lease."""

    fence: Fence
    spec: RunSpec


class Beat(msgspec.Struct, frozen=True, kw_only=True):
    """What a heartbeat learns: which of the node's runs it still holds, how many runs wait, and
    the nodes seen alive."""

    held: frozenset[str]
    queued: int
    nodes: list[NodeSeen]


Notice = Literal["queued", "changed", "cancel", "reconnected"]
"""What ``listen`` reports, with a run id: a run was queued; a run changed (claimed, output,
final); a running run was asked to stop; or, with no id, notices may have been missed."""


class Store(Protocol):
    """Where runs wait and results stay; everything several warmpod nodes share lives here.

    Implementations must make ``claim`` hand each queued run to exactly one caller, accept a
    fenced write only from the run's current owner and attempt, and make ``finish`` final
    exactly once: the first final status written wins. Times are the store's clock.

    Output is kept as the chunks ``add_output`` and ``finish`` are given, and a stored chunk
    never changes: a reader that has seen up to ``seq`` N and asks for what comes after N
    (``/status/{id}/stream`` resumed with ``Last-Event-ID``) gets every later byte exactly once.
    How many chunks a run has is up to its writer: ``runner.RunOutput`` merges adjacent chunks of
    one stream up to ``CHUNK_BYTES`` until the scheduler takes them, at most once per
    ``scheduler.FLUSH_INTERVAL``, so a run keeps at most one chunk per stream switch, per
    ``CHUNK_BYTES`` and per interval, whatever the size of the program's writes. A write's chunks
    are stored packed, a row per ``ROW_SEGMENTS`` chunks or ``CHUNK_BYTES`` of data
    (``output_rows``), so a program switching streams at every byte costs the store a few bytes
    per byte, not a row per byte.

    A run's writer gives its chunks in rising seq order, each write carrying every chunk of the
    writes before it that failed, ahead of newer ones (``scheduler._tend`` gives them back to
    ``RunOutput`` for the next write). So a write's chunks at or below the highest seq already
    kept were kept, by an earlier write that committed though its caller saw an error: they are
    skipped, changing nothing, and only the chunks above are kept.
    """

    shared: bool
    """Whether several nodes share the store: only then may a run this node holds be reported
    by another once its lease runs out, so only then must the node stop it unrenewed."""

    async def join(self, owner: Owner, lease: float, message: str) -> list[str]:
        """At start: register ``owner``, and make runs its node's earlier starts held ``error``
        with ``message`` (``{node}`` filled in) and their output; return their ids.

        Raises:
            StoreError: another start of a node of the same name is alive.
        """
        ...

    async def leave(self, owner: Owner) -> None:
        """At a clean stop: drop ``owner`` from the nodes seen alive."""
        ...

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
        nor when a run of ``key`` already has ``idempotency.key`` (that run is answered, before any bound)."""
        ...

    async def queued(self) -> int:
        """How many runs wait."""
        ...

    async def claim(self, owner: Owner, lease: float, *, warm: bool = False) -> Claim | None:
        """Give the oldest queued run to ``owner`` for ``lease`` seconds; None when none waits.

        The oldest of those whose ``warm`` is the sandbox's (``RunSpec.warm``) comes first, unless
        another has waited ``PREFERRED_WAIT`` seconds: every run is taken within that of a free
        sandbox, whatever kind the pool makes. Among the runs that rule lets go first, a run of the
        key (NULL with keys off counts as one key) with the fewest runs ``running`` comes first,
        the oldest of them on a tie: a key that queued many runs does not make another key's run
        wait behind all of them, and with a single key the order is submission order."""
        ...

    async def release(self, fence: Fence) -> None:
        """Put a claimed run back in its place in the queue (it never reached a sandbox)."""
        ...

    async def heartbeat(self, owner: Owner, lease: float, fences: Sequence[Fence]) -> Beat:
        """Renew the leases of the runs ``owner`` holds by ``fences`` for ``lease`` seconds and
        record that it is alive."""
        ...

    async def reap(self, message: str) -> list[str]:
        """Make runs whose lease ran out ``error`` with ``message`` (``{node}``: their node's name)
        and the output they had printed; return their ids. They are never queued again."""
        ...

    async def add_output(self, fence: Fence, chunks: Sequence[Chunk]) -> bool:
        """Keep more of a running run's output; False, keeping nothing, if ``fence`` lost the run."""
        ...

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
        left (those ``result.files`` lists); False, keeping nothing, if it was already final or
        ``fence`` lost it. Without a fence (a run that never started) any owner's run is ended.

        True, changing nothing, when this very result is already recorded under ``fence``: a
        retry of a write that took effect though its answer was lost learns that it did."""
        ...

    async def file(self, run_id: str, path: str) -> bytes | None:
        """The content of a file the run left, or None."""
        ...

    async def file_size(self, run_id: str, path: str) -> int | None:
        """The size in bytes of a file the run left, or None; its content is not read."""
        ...

    async def file_piece(self, run_id: str, path: str, offset: int, size: int) -> bytes | None:
        """At most ``size`` bytes of a file the run left from ``offset`` on (none past its end), or
        None: a download reads a file in such pieces, never holding it whole."""
        ...

    async def small_files(self, run_id: str, max_bytes: int, total_bytes: int) -> dict[str, bytes]:
        """The content of the files ``inlined`` picks among those the run left, by path: no other
        file's bytes are read."""
        ...

    async def get(self, run_id: str) -> Record | None:
        """The run's record, or None for an id never stored (or purged)."""
        ...

    async def output(self, run_id: str, after: int = -1, limit: int = OUTPUT_PAGE) -> list[Chunk]:
        """The first ``limit`` of the run's output chunks with ``seq`` above ``after``, in order:
        fewer than ``limit`` when those are all there are. A page may end inside a stored row; the
        next call, after the last seq returned, goes on from there."""
        ...

    async def cancel(self, run_id: str, result: RunResult) -> CancelOutcome:
        """Cancel a queued run (it becomes ``result``) or flag a running one to be stopped."""
        ...

    async def cancel_requested(self, run_id: str) -> bool:
        """Whether ``cancel`` flagged this running run."""
        ...

    async def purge(self, retention: float) -> int:
        """Delete runs that ended more than ``retention`` seconds ago; return how many."""
        ...

    async def listen(
        self,
        notice: Callable[[Notice, str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``notice`` for every change any node makes, until cancelled."""
        ...

    async def aclose(self) -> None:
        """Release the store."""
        ...


def encode_blob(value: RunSpec | RunResult) -> bytes:
    """A spec or result as stored: ``[BLOB_VERSION, value]`` in msgpack."""
    return msgspec.msgpack.encode((BLOB_VERSION, value))


def decode_blob(raw: bytes, kind: type[B]) -> B:
    """The value ``encode_blob`` stored, or that a store before blob versions did (a bare map).

    Raises:
        msgspec.DecodeError: not one this version can read.
    """
    if raw[:1] != b"\x92":  # no fixarray of two: a bare struct of before versions
        return msgspec.msgpack.decode(raw, type=kind)
    version, value = msgspec.msgpack.decode(raw, type=tuple[int, msgspec.Raw])
    if version > BLOB_VERSION:
        raise msgspec.DecodeError(f"stored by a newer warmpod (blob version {version} > {BLOB_VERSION})")
    return msgspec.msgpack.decode(value, type=kind)


def run_ended(run_id: str, node: str | None, message: str, printed: tuple[str, str]) -> RunResult:
    """The ``error`` result of a run its node stopped holding, with what it printed: ``(stdout, stderr)``."""
    stdout, stderr = printed
    return RunResult.from_server(
        run_id,
        "error",
        stdout=stdout,
        stderr=stderr,
        error=message.format(node=node or "?"),
        node=node,
    )


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
)
SCHEMA_VERSION = len(_MIGRATIONS)
BLOB_VERSION = 1
PREFERRED_WAIT = 1.0
"""Seconds a queued run waits for a sandbox of its kind before any sandbox takes it (``claim``)."""
"""Of the msgpack specs and results in a store: ``decode_blob`` reads this one and older."""


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
        blob = encode_blob(spec)
        idempotency_key = None if idempotency is None else idempotency.key
        request_hash = None if idempotency is None else idempotency.request_hash

        def add(db: sqlite3.Connection) -> Added | Replay:
            # One call at a time on the one connection: the look-up, the counts and the insert
            # cannot interleave.
            if idempotency is not None:
                row = db.execute(
                    "SELECT id, status, request_hash FROM runs "
                    "WHERE coalesce(key, '') = ? AND idempotency_key = ?",
                    (key or "", idempotency.key),
                ).fetchone()
                if row is not None:
                    return Replay(
                        run_id=row[0], status=row[1], same_request=row[2] == idempotency.request_hash
                    )
            if max_active is not None:
                (active,) = db.execute(
                    "SELECT count(*) FROM runs WHERE key = ? AND status IN ('queued', 'running')", (key,)
                ).fetchone()
                if active >= max_active:
                    return "key-busy"
            cursor = db.execute(
                "INSERT INTO runs (id, status, spec, created, key, warm, idempotency_key, request_hash) "
                "SELECT ?, 'queued', ?, ?, ?, ?, ?, ? "
                "WHERE (SELECT count(*) FROM runs WHERE status = 'queued') < ?",
                (run_id, blob, time.time(), key, spec.warm, idempotency_key, request_hash, max_queued),
            )
            return "added" if cursor.rowcount == 1 else "queue-full"

        added = await self._call(add)
        if added == "added":
            self._notify("queued", run_id)
        return added

    async def queued(self) -> int:
        """How many runs wait."""
        return await self._call(_count_queued)

    async def claim(self, owner: Owner, lease: float, *, warm: bool = False) -> Claim | None:
        """Give the oldest queued run to ``owner`` for ``lease`` seconds, those of ``warm``'s kind
        first, then those of the key running fewest (see ``Store.claim``); None when none waits."""

        def claim(db: sqlite3.Connection) -> tuple[str, bytes, int] | None:
            now = time.time()
            return db.execute(  # type: ignore[no-any-return]
                "UPDATE runs SET status = 'running', started = ?, node = ?, incarnation = ?, "
                "attempt = attempt + 1, lease_until = ? WHERE n = "
                "(SELECT n FROM runs q WHERE status = 'queued' "
                "ORDER BY (warm = ? OR created < ?) DESC, "
                "(SELECT count(*) FROM runs r WHERE r.status = 'running' AND r.key IS q.key), n LIMIT 1) "
                "RETURNING id, spec, attempt",
                (now, owner.node, owner.incarnation, now + lease, warm, now - PREFERRED_WAIT),
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

    async def release(self, fence: Fence) -> None:
        """Put a claimed run back in its place in the queue (it never reached a sandbox)."""

        def release(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE runs SET status = 'queued', started = NULL, node = NULL, incarnation = NULL, "
                "lease_until = NULL WHERE id = ? AND status = 'running' AND incarnation = ? AND attempt = ?",
                (fence.run_id, fence.incarnation, fence.attempt),
            ).rowcount

        if await self._call(release):
            self._notify("queued", fence.run_id)

    async def heartbeat(self, owner: Owner, lease: float, fences: Sequence[Fence]) -> Beat:
        """Renew the leases of the runs ``owner`` holds by ``fences`` and record it alive."""

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
                    "INSERT INTO nodes (name, incarnation, seen, running) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET incarnation = excluded.incarnation, "
                    "seen = excluded.seen, running = excluded.running",
                    (owner.node, owner.incarnation, now, len(held)),
                )
                nodes = [
                    NodeSeen(name=name, incarnation=inc, seen_ago=max(0.0, now - seen), running=running)
                    for name, inc, seen, running in db.execute(
                        "SELECT name, incarnation, seen, running FROM nodes WHERE seen > ? ORDER BY name",
                        (now - lease,),
                    )
                ]
                return Beat(held=frozenset(held), queued=_count_queued(db), nodes=nodes)

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
            self._notify("changed", run_id)
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
                    "UPDATE runs SET status = ?, result = ?, finished = ?, spec = NULL, lease_until = NULL "
                    "WHERE id = ? AND status IN ('queued', 'running')",
                    (result.status, blob, time.time(), run_id),
                )
                if cursor.rowcount != 1:
                    return fence is not None and _finished_with(db, run_id, blob, fence)
                _keep_output(db, run_id, chunks)
                db.executemany("INSERT OR IGNORE INTO files VALUES (?, ?, ?)", file_rows)
                return True

        finished = await self._call(finish)
        if finished:
            self._notify("changed", run_id)
        return finished

    async def file(self, run_id: str, path: str) -> bytes | None:
        """The content of a file the run left, or None."""

        def file(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT data FROM files WHERE run_id = ? AND path = ?", (run_id, path)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._call(file)

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
            return db.execute(  # type: ignore[no-any-return]
                "SELECT status, key, created, started, finished, result, node FROM runs WHERE id = ?",
                (run_id,),
            ).fetchone()

        row = await self._call(get)
        return None if row is None else record(run_id, *row)

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
                    return "cancelled"
                if row[0] == "running":
                    db.execute("UPDATE runs SET cancel = 1 WHERE id = ?", (run_id,))
                    return "requested"
                return "finished"

        outcome = await self._call(cancel)
        if outcome == "cancelled":
            self._notify("changed", run_id)
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
                for table in ("output", "files"):
                    # The table name is one of the two literals above, never input.
                    query = f"DELETE FROM {table} WHERE run_id IN (SELECT id FROM runs WHERE finished < ?)"  # noqa: S608
                    db.execute(query, (before,))
                return db.execute("DELETE FROM runs WHERE finished < ?", (before,)).rowcount

        return await self._call(purge)

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


def _count_queued(db: sqlite3.Connection) -> int:
    (count,) = db.execute("SELECT count(*) FROM runs WHERE status = 'queued'").fetchone()
    return int(count)


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
    result = run_ended(run_id, node, message, joined(itertools.chain.from_iterable(map(segments, output))))
    db.execute(
        "UPDATE runs SET status = 'error', result = ?, finished = ?, spec = NULL, lease_until = NULL "
        "WHERE id = ?",
        (encode_blob(result), time.time(), run_id),
    )
    return run_id


async def unreadable(store: Store, fence: Fence, exc: msgspec.DecodeError) -> None:
    """End a claimed run whose spec this version cannot read: queued runs outlive restarts and
    upgrades, and one such row must not stop every start; the rest of the queue goes on."""
    log.error("queued run %s cannot be read from the store: %s", fence.run_id, exc)
    message = f"the queued run could not be read from the run store: {exc}"
    await store.finish(fence.run_id, RunResult.from_server(fence.run_id, "error", error=message), fence=fence)


def record(
    run_id: str,
    status: RunStatus,
    key: str | None,
    created: float,
    started: float | None,
    finished: float | None,
    blob: bytes | None,
    node: str | None,
) -> Record:
    """A run's record from its stored row."""
    return Record(
        id=run_id,
        status=status,
        key=key,
        created=created,
        started=started,
        finished=finished,
        result=None if blob is None else decode_blob(bytes(blob), RunResult),
        node=node,
    )


def inlined(sizes: Iterable[tuple[str, int]], max_bytes: int, total_bytes: int) -> list[str]:
    """Of a run's files, given as ``(path, size)``, those an answer carries inline: in path order,
    each of at most ``max_bytes`` that still fits in what is left of ``total_bytes``."""
    paths, left = [], total_bytes
    for path, size in sorted(sizes):
        if size <= min(max_bytes, left):
            paths.append(path)
            left -= size
    return paths


class _Packed(msgspec.Struct, array_like=True):
    """The ``data`` of a row of several chunks: one mark per chunk, ``size << 1 | stream`` (0 for
    stdout, 1 for stderr: one msgpack byte for a chunk under 64 bytes), and their data joined."""

    marks: list[int]
    data: bytes


_PACKED_DECODER = msgspec.msgpack.Decoder(_Packed)
_STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")


def output_rows(chunks: Sequence[Chunk], kept: int) -> Iterator[tuple[int, int, str, bytes]]:
    """The stored rows ``(seq, last, stream, data)`` of the chunks with seq above ``kept``.

    Chunks of consecutive seqs share a row up to ``ROW_SEGMENTS`` chunks and ``CHUNK_BYTES`` of
    data (a larger chunk is a row of its own); a row of one chunk is stored as it is, one of
    several as ``_Packed`` under the stream ``PACKED``."""
    group: list[Chunk] = []
    size = 0
    for chunk in chunks:
        if chunk.seq <= kept:
            continue
        if group and (
            chunk.seq != group[-1].seq + 1
            or len(group) == ROW_SEGMENTS
            or size + len(chunk.data) > CHUNK_BYTES
        ):
            yield _row(group)
            group, size = [], 0
        group.append(chunk)
        size += len(chunk.data)
    if group:
        yield _row(group)


def _row(group: list[Chunk]) -> tuple[int, int, str, bytes]:
    first, last = group[0], group[-1]
    if len(group) == 1:
        return first.seq, first.seq, first.stream, first.data
    marks = [len(c.data) << 1 | (c.stream == "stderr") for c in group]
    packed = _Packed(marks=marks, data=b"".join(c.data for c in group))
    return first.seq, last.seq, PACKED, msgspec.msgpack.encode(packed)


def unpacked(seq: int, stream: str, data: bytes, after: int = -1) -> Iterator[Chunk]:
    """The chunks with seq above ``after`` of a stored ``(seq, stream, data)`` row, in order
    (``output_rows`` made it); those at or below ``after`` are skipped without being copied."""
    if stream != PACKED:
        if seq > after:
            yield Chunk(seq=seq, stream="stderr" if stream == "stderr" else "stdout", data=bytes(data))
        return
    packed = _PACKED_DECODER.decode(data)
    view = memoryview(packed.data)
    skip = max(after + 1 - seq, 0)
    start = sum(mark >> 1 for mark in packed.marks[:skip])
    for index, mark in enumerate(packed.marks[skip:], start=skip):
        end = start + (mark >> 1)
        yield Chunk(seq=seq + index, stream=_STREAMS[mark & 1], data=bytes(view[start:end]))
        start = end


def segments(row: tuple[int, str, bytes]) -> Iterator[tuple[str, bytes]]:
    """The ``(stream, data)`` of each chunk of a stored ``(seq, stream, data)`` row, for ``joined``."""
    return ((chunk.stream, chunk.data) for chunk in unpacked(*row))


def page(rows: Iterable[tuple[int, str, bytes]], after: int, limit: int) -> list[Chunk]:
    """The first ``limit`` chunks above seq ``after`` of stored ``(seq, stream, data)`` rows in order."""
    found: list[Chunk] = []
    for seq, stream, data in rows:
        found += itertools.islice(unpacked(seq, stream, data, after), limit - len(found))
        if len(found) == limit:
            break
    return found


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
    printed = Printed()
    for stream, data in chunks:
        printed.add(stream, data)
    return printed.text()


class Printed:
    """A run's stdout and stderr gathered from its chunks as they are read, a page at a time."""

    def __init__(self) -> None:
        self._out = {"stdout": bytearray(), "stderr": bytearray()}

    def add(self, stream: str, data: bytes) -> None:
        """Append a chunk's ``data`` to its ``stream`` (anything but stderr is stdout)."""
        self._out.get(stream, self._out["stdout"]).extend(data)

    def text(self) -> tuple[str, str]:
        """The stdout and stderr so far, decoded (bytes that are not UTF-8 replaced)."""
        return self._out["stdout"].decode("utf-8", "replace"), self._out["stderr"].decode("utf-8", "replace")
