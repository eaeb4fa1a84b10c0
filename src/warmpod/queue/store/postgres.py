"""The shared store: runs, their output and the queue in PostgreSQL, for several warmpod nodes."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, LiteralString

import anyio
import msgspec
import psycopg
import psycopg_pool
from anyio.abc import TaskStatus
from psycopg import sql
from psycopg.rows import TupleRow

from warmpod.backoff import Backoff
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
from warmpod.queue.store.codec import Printed, decode_blob, encode_blob, output_rows, page, segments
from warmpod.queue.store.history import history_query
from warmpod.queue.store.outbox import Delivery, Tried

log = logging.getLogger(__name__)

Connection = psycopg.AsyncConnection[TupleRow]
# Taken in every transaction that adds runs (one, or a batch), so the counts of the queue bound and
# the key quotas cannot interleave with another node's add (READ COMMITTED sees no uncommitted rows).
ADD_LOCK: Final = 0x77617270  # "warp"
# Taken while the schema is created or migrated, so two nodes starting together do it once.
SCHEMA_LOCK: Final = 0x77617271
CHANNELS: Final[dict[str, Notice]] = {
    "warmpod_queued": "queued",
    "warmpod_changed": "changed",
    "warmpod_cancel": "cancel",
    "warmpod_webhook": "webhook",
}
CONNECT_TIMEOUT = 5.0
# A call that takes longer fails: a path to the database that drops packets silently would hold
# it (and the task waiting on it) for TCP's own timeout, many minutes.
CALL_TIMEOUT = 10.0
# How many times a write whose answer was lost is read back before its outcome is given up on.
SETTLE_TRIES = 3

# Each step takes the schema from the version before it (table warmpod_schema) to its own number.
_MIGRATIONS = (
    """
    -- The database's clock in seconds since the epoch: the one clock every node's lease is read by.
    CREATE FUNCTION warmpod_now() RETURNS float8 LANGUAGE sql VOLATILE
        AS 'SELECT extract(epoch FROM clock_timestamp())::float8';
    CREATE TABLE runs (
        n bigserial PRIMARY KEY,
        id text NOT NULL UNIQUE,
        status text NOT NULL,
        spec bytea,
        result bytea,
        created float8 NOT NULL,
        started float8,
        finished float8,
        cancel boolean NOT NULL DEFAULT false,
        key text,
        node text,
        incarnation text,
        attempt integer NOT NULL DEFAULT 0,
        lease_until float8
    );
    CREATE INDEX runs_queued ON runs (n) WHERE status = 'queued';
    CREATE INDEX runs_running ON runs (lease_until) WHERE status = 'running';
    CREATE INDEX runs_active_by_key ON runs (key) WHERE key IS NOT NULL AND status IN ('queued', 'running');
    CREATE INDEX runs_by_finished ON runs (finished) WHERE finished IS NOT NULL;
    CREATE TABLE output (
        run_id text NOT NULL,
        seq integer NOT NULL,
        stream text NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (run_id, seq)
    );
    CREATE TABLE files (
        run_id text NOT NULL,
        path text NOT NULL,
        data bytea NOT NULL,
        PRIMARY KEY (run_id, path)
    );
    CREATE TABLE nodes (
        name text PRIMARY KEY,
        incarnation text NOT NULL,
        seen float8 NOT NULL,
        running integer NOT NULL DEFAULT 0,
        host text,
        pid integer
    );
    """,
    # 2: which runs a preloaded sandbox serves best (RunSpec.warm), for claims by kind.
    "ALTER TABLE runs ADD COLUMN warm boolean NOT NULL DEFAULT false;",
    # 3: the Idempotency-Key a run was submitted with, unique per API key name, and its request's hash.
    """
    ALTER TABLE runs ADD COLUMN idempotency_key text, ADD COLUMN request_hash text;
    CREATE UNIQUE INDEX runs_by_idempotency_key ON runs ((coalesce(key, '')), idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    """,
    # 4: rows that pack several chunks (``store.output_rows``) carry their last seq; NULL in a row
    # of before, one chunk, whose last seq is its seq.
    "ALTER TABLE output ADD COLUMN last integer;",
    # 5: a key's running runs, counted for each queued run at every claim (fairness across keys).
    # By ``coalesce(key, '')``, as runs_by_idempotency_key (a key's name is never empty): IS NOT
    # DISTINCT FROM, the plain spelling of "the same key or both none", cannot use an index.
    "CREATE INDEX runs_running_by_key ON runs ((coalesce(key, ''))) WHERE status = 'running';",
    # 6: the environment a run names (its runs so far are the default one's) and those each node
    # serves; claims look a queued run up by its environment.
    """
    ALTER TABLE runs ADD COLUMN environment text NOT NULL DEFAULT 'default';
    ALTER TABLE nodes ADD COLUMN environments text[] NOT NULL DEFAULT '{default}';
    CREATE INDEX runs_queued_by_environment ON runs (environment, n) WHERE status = 'queued';
    """,
    # 7: run history (``history.py``): a run's labels (a JSON object), its exit code and duration
    # for summaries without its result, a key's runs newest first, by status too, and each label
    # in a table of its own that carries its run's key and time, so a label's runs come in order.
    """
    ALTER TABLE runs ADD COLUMN labels text, ADD COLUMN exit_code integer, ADD COLUMN duration_ms float8;
    CREATE INDEX runs_history ON runs ((coalesce(key, '')), created, n);
    CREATE INDEX runs_history_by_status ON runs ((coalesce(key, '')), status, created, n);
    CREATE TABLE run_labels (
        run_n bigint NOT NULL,
        name text NOT NULL,
        value text NOT NULL,
        owner text NOT NULL,
        created float8 NOT NULL,
        PRIMARY KEY (run_n, name)
    );
    CREATE INDEX run_labels_by_value ON run_labels (owner, name, value, created, run_n);
    """,
    # 8: the webhook outbox (``outbox.py``): a row per run with a webhook, due ones by time.
    """
    CREATE TABLE webhooks (
        run_id text PRIMARY KEY,
        owner text NOT NULL,
        url text NOT NULL,
        state text NOT NULL,
        due float8,
        attempts integer NOT NULL DEFAULT 0,
        last_status integer,
        last_error text,
        delivered float8
    );
    CREATE INDEX webhooks_due ON webhooks (due) WHERE state = 'pending';
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


class PostgresStore:
    """The store several nodes share: one PostgreSQL database, through a pool of connections, one
    connection of its own per node for LISTEN (a pooled one would lose its notifications), and
    one for what keeps the node alive (join, heartbeat, leave): client calls, however many and
    however slow, can take every pooled connection but never that one. It also holds the node
    name's advisory lock, so one session at a time is the node of that name."""

    shared = True

    def __init__(
        self, url: str, pool: psycopg_pool.AsyncConnectionPool[Connection], vital_url: str | None = None
    ) -> None:
        self._url = url
        self._pool = pool
        self._vital_url = vital_url or url
        self._vital: Connection | None = None
        self._vital_lock = anyio.Lock()
        self._named: str | None = None
        """The node name whose advisory lock the vital connection holds (taken by ``join``)."""

    @classmethod
    async def open(cls, url: str, max_connections: int = 8, *, lease: float | None = None) -> PostgresStore:
        """Connect to the database at ``url`` and create or migrate its schema; with ``lease``,
        the server ends a session of this node's left idle inside a transaction that long.

        Raises:
            StoreError: it cannot be reached, or a newer warmpod made its schema.
        """
        # An idle connection that lost its path is noticed within about 11 s (LISTEN waits idle).
        url = psycopg.conninfo.make_conninfo(
            url, keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3
        )
        # A node cut off mid-transaction (packets dropped, no reset) leaves its session idle in
        # it on the server, holding its row locks until the server's TCP gives up (hours): the
        # other nodes' reaper skips locked rows, so that node's run was never reported. Its locks
        # now go when its lease would. Not on the LISTEN connection, which never opens one.
        pooled = url
        if lease is not None:
            given = psycopg.conninfo.conninfo_to_dict(url).get("options") or ""
            timeout = f"-c idle_in_transaction_session_timeout={math.ceil(lease * 1000)}"
            pooled = psycopg.conninfo.make_conninfo(url, options=f"{given} {timeout}".strip())
        pool: psycopg_pool.AsyncConnectionPool[Connection] = psycopg_pool.AsyncConnectionPool(
            pooled,
            min_size=1,
            max_size=max_connections,
            timeout=CONNECT_TIMEOUT,
            # A connection the server ended (a failover, pg_terminate_backend) is found out and
            # replaced when it is taken, not handed to a call that then fails.
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            kwargs={"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT)},
            open=False,
        )
        store = cls(url, pool, pooled)
        try:
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT * 2)
            await store._migrate()
        except (psycopg.Error, psycopg_pool.PoolTimeout, StoreError) as exc:
            await pool.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(
                f"cannot open the run store {_safe(url)}: {exc} (WARMPOD_QUEUE__STORE_URL)"
            ) from exc
        return store

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Connection]:
        try:
            with anyio.fail_after(CALL_TIMEOUT):
                async with self._pool.connection() as conn, conn.transaction():
                    yield conn
        except TimeoutError as exc:
            raise StoreError(f"the run store did not answer within {CALL_TIMEOUT:g} s") from exc
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise StoreError(f"the run store failed: {exc}") from exc

    @asynccontextmanager
    async def _vital_transaction(self) -> AsyncIterator[Connection]:
        """A transaction on the node's own connection (see the class), one call at a time; a
        connection that failed, timed out or was cancelled mid-call is closed and made anew (its
        name lock taken again) by the next call."""
        async with self._vital_lock:
            try:
                with anyio.fail_after(CALL_TIMEOUT):
                    conn = await self._vital_connection()
                    async with conn.transaction():
                        yield conn
            except TimeoutError as exc:
                await self._drop_vital()
                raise StoreError(f"the run store did not answer within {CALL_TIMEOUT:g} s") from exc
            except psycopg.Error as exc:
                await self._drop_vital()
                raise StoreError(f"the run store failed: {exc}") from exc
            except anyio.get_cancelled_exc_class():
                await self._drop_vital()  # a query may still be under way on it
                raise

    async def _vital_connection(self) -> Connection:
        if self._vital is not None and not self._vital.closed and not self._vital.broken:
            # As the pool checks its own: a session the server ended (a failover) is replaced
            # now, not found out by the renewal it would fail.
            with contextlib.suppress(psycopg.Error):
                await psycopg_pool.AsyncConnectionPool.check_connection(self._vital)
                return self._vital
        await self._drop_vital()
        conn = await psycopg.AsyncConnection.connect(
            self._vital_url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)
        )
        if self._named is not None and not await _one(
            conn, "SELECT pg_try_advisory_lock(%s)::int", (_name_lock(self._named),)
        ):
            await conn.close()
            raise StoreError(
                f"another node named {self._named!r} is alive on this queue: it took the name while "
                "this node's connection to the store was lost"
            )
        self._vital = conn
        return conn

    async def _drop_vital(self) -> None:
        conn, self._vital = self._vital, None
        if conn is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CONNECT_TIMEOUT):
                await conn.close()

    async def _settle(self, took: Callable[[Connection], Awaitable[bool]]) -> bool:
        """Whether a write whose answer was lost took effect, by ``took`` read in a transaction of
        its own: tried a few times, as the failure that lost the answer may last a moment.

        Raises:
            StoreError: the store could not be read.
        """
        backoff = Backoff(0.2, 2.0)
        for attempt in range(SETTLE_TRIES):
            try:
                async with self._transaction() as db:
                    return await took(db)
            except StoreError:
                if attempt == SETTLE_TRIES - 1:
                    raise
                await backoff.sleep()
        raise AssertionError("unreachable")

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            await db.execute("CREATE TABLE IF NOT EXISTS warmpod_schema (version integer NOT NULL)")
            row = await (await db.execute("SELECT max(version) FROM warmpod_schema")).fetchone()
            version = (row[0] if row else None) or 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the run store {_safe(self._url)} has schema version {version}, made by a newer "
                    f"warmpod (this one reads up to {SCHEMA_VERSION})"
                )
            for number, script in enumerate(_MIGRATIONS, start=1):
                if number > version:
                    for statement in filter(str.strip, script.split(";")):
                        await db.execute(statement.encode())
            if version < SCHEMA_VERSION:
                await db.execute("DELETE FROM warmpod_schema")
                await db.execute("INSERT INTO warmpod_schema VALUES (%s)", (SCHEMA_VERSION,))

    async def listen(
        self,
        notice: Callable[[Notice, str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``notice`` for every NOTIFY any node sends, on a connection of its own; after a
        lost connection, ``reconnected`` once it is back, for the caller to look for what it missed."""
        backoff = Backoff(0.5, 10.0)
        started = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT)
                )
                async with conn:
                    for channel in CHANNELS:
                        await conn.execute(f"LISTEN {channel}".encode())
                    backoff.reset()
                    if started:
                        notice("reconnected", "")
                    else:
                        started = True
                        task_status.started()
                    async for note in conn.notifies():
                        kind = CHANNELS.get(note.channel)
                        if kind is not None and len(note.payload) <= 64:
                            notice(kind, note.payload)
            except psycopg.Error as exc:
                log.warning("lost the run store's notifications (retrying in %.1f s): %s", backoff.delay, exc)
            if not started:
                # Start anyway: a node without notifications still finds work by its heartbeat's poll.
                started = True
                task_status.started()
            await backoff.sleep()

    async def join(self, owner: Owner, lease: float, message: str) -> list[str]:
        """At start: take the node name's advisory lock, register ``owner`` and end what its
        node's earlier starts held.

        The lock lives as long as this node's own connection: a start of the same name whose
        session is gone (its process ended) is dead, and taken over at once. One whose session
        lingers without a heartbeat for the lease (frozen, or cut off) has it ended. Otherwise,
        or while a start of the same name through this very store beats, the lease is waited out.

        Raises:
            StoreError: another start of the same name stays alive.
        """
        hostname, pid = socket.gethostname(), os.getpid()
        lock = _name_lock(owner.node)
        took = False  # whether this join took the lock: then no other start of the name lives
        deadline = anyio.current_time() + lease + 1.0
        while True:
            async with self._vital_transaction() as db:
                if self._named != owner.node:
                    if await _one(db, "SELECT pg_try_advisory_lock(%s)::int", (lock,)):
                        self._named, took = owner.node, True
                    else:
                        await _end_frozen(db, owner.node, lock, lease)
                if self._named == owner.node:
                    row = await (
                        await db.execute(
                            "SELECT incarnation, warmpod_now() - seen FROM nodes WHERE name = %s FOR UPDATE",
                            (owner.node,),
                        )
                    ).fetchone()
                    if took or row is None or row[0] == owner.incarnation or row[1] >= lease:
                        await db.execute(
                            "INSERT INTO nodes (name, incarnation, seen, host, pid) "
                            "VALUES (%s, %s, warmpod_now(), %s, %s) "
                            "ON CONFLICT (name) DO UPDATE SET incarnation = excluded.incarnation, "
                            "seen = excluded.seen, running = 0, host = excluded.host, pid = excluded.pid",
                            (owner.node, owner.incarnation, hostname, pid),
                        )
                        rows = await (
                            await db.execute(
                                "SELECT id, node FROM runs WHERE status = 'running' AND node = %s "
                                "AND incarnation <> %s FOR UPDATE",
                                (owner.node, owner.incarnation),
                            )
                        ).fetchall()
                        return [await _end_lost(db, run_id, node, message) for run_id, node in rows]
            if anyio.current_time() >= deadline:
                raise StoreError(
                    f"another node named {owner.node!r} is alive on this queue: give each node its own "
                    "WARMPOD_NODE__NAME"
                )
            log.info("waiting for the lease of an earlier start of node %r to run out", owner.node)
            await anyio.sleep(0.5)

    async def leave(self, owner: Owner) -> None:
        """At a clean stop: drop ``owner`` from the nodes seen alive and free its name."""
        async with self._vital_transaction() as db:
            await db.execute("DELETE FROM nodes WHERE incarnation = %s", (owner.incarnation,))
            if self._named == owner.node:
                await db.execute("SELECT pg_advisory_unlock(%s)", (_name_lock(owner.node),))
                self._named = None

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
        """Queue a run of ``key``, within the queue bound and the key's quota over every node, unless
        a run of ``key`` already has ``idempotency.key`` (that run is answered)."""
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
        """Queue the runs ``items`` of ``key`` together or none of them, within the bounds over
        every node (see ``Store.add_batch``)."""
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
        async with self._transaction() as db:
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (ADD_LOCK,))
            if idempotency_keys:
                rows = await (
                    await db.execute(
                        "SELECT idempotency_key, id, status, request_hash FROM runs "
                        "WHERE coalesce(key, '') = %s AND idempotency_key IS NOT NULL "
                        "AND idempotency_key = ANY(%s)",
                        (key or "", list(idempotency_keys)),
                    )
                ).fetchall()
                replay = replayed(rows, idempotency_keys, request_hash)
                if replay is not None:
                    return replay
            if max_active is not None:
                active = await _one(
                    db, "SELECT count(*) FROM runs WHERE key = %s AND status IN ('queued', 'running')", (key,)
                )
                if active + len(items) > max_active:
                    return "key-busy"
            if await _one(db, "SELECT count(*) FROM runs WHERE status = 'queued'") + len(items) > max_queued:
                return "queue-full"
            for (run_id, spec), stored_key in zip(items, stored_keys, strict=True):
                await _insert_run(db, run_id, spec, key, stored_key, request_hash)
                await db.execute("SELECT pg_notify('warmpod_queued', %s)", (run_id,))
        return "added"

    async def queued(self) -> list[str]:
        """The ids of the runs that wait."""
        async with self._transaction() as db:
            rows = await (await db.execute("SELECT id FROM runs WHERE status = 'queued'")).fetchall()
        return [run_id for (run_id,) in rows]

    async def claim(
        self, owner: Owner, lease: float, *, environment: str = DEFAULT, warm: bool = False
    ) -> Claim | None:
        """Give the oldest queued run of ``environment`` to ``owner``, those of ``warm``'s kind
        first, then those of the key running fewest (see ``Store.claim``); SKIP LOCKED lets other
        nodes take the next one. A claim whose COMMIT's answer was lost (a timeout, a dropped
        connection) is read back: it holds if it took effect."""
        while True:
            row: tuple[Any, ...] | None = None
            try:
                async with self._transaction() as db:
                    row = await (
                        await db.execute(
                            "UPDATE runs SET status = 'running', started = warmpod_now(), node = %s, "  # noqa: S608  (constants and placeholders only)
                            "incarnation = %s, attempt = attempt + 1, lease_until = warmpod_now() + %s "
                            "WHERE n = (SELECT n FROM runs q WHERE status = 'queued' AND environment = %s "
                            "ORDER BY (warm = %s OR created < warmpod_now() - %s) DESC, "
                            f"{_KEY_RUNNING}, n LIMIT 1 FOR UPDATE SKIP LOCKED) "
                            "RETURNING id, spec, attempt",
                            (owner.node, owner.incarnation, lease, environment, warm, PREFERRED_WAIT),
                        )
                    ).fetchone()
                    if row is None:
                        return None
                    await db.execute("SELECT pg_notify('warmpod_changed', %s)", (row[0],))
            except StoreError:
                if row is None:
                    raise
                taken = Fence(run_id=row[0], incarnation=owner.incarnation, attempt=row[2])
                # Else the run would stay ``running`` under this node, unrenewed and never run,
                # until a reaper reported it as ended by a stopped node.
                if not await self._settle(functools.partial(_holds, fence=taken)):
                    raise
            run_id, raw, attempt = row
            fence = Fence(run_id=run_id, incarnation=owner.incarnation, attempt=attempt)
            try:
                return Claim(fence=fence, spec=decode_blob(bytes(raw), RunSpec))
            except msgspec.DecodeError as exc:
                await unreadable(self, fence, exc)

    async def next_environment(self, environments: Sequence[str], ready: Sequence[str] = ()) -> str | None:
        """The environment among ``environments`` of the queued run to claim next, those of
        ``ready`` first (see ``Store.next_environment``); None when none of them has one.
        Runs other nodes are claiming (locked) are not skipped: the answer is a hint, and the
        claim that follows takes whatever is next."""
        if not environments:
            return None
        async with self._transaction() as db:
            row = await (
                await db.execute(
                    "SELECT environment FROM runs q WHERE status = 'queued' AND environment = ANY(%s) "  # noqa: S608  (constants and placeholders only)
                    "ORDER BY (environment = ANY(%s) OR created < warmpod_now() - %s) DESC, "
                    f"{_KEY_RUNNING}, n LIMIT 1",
                    (list(environments), list(ready), PREFERRED_WAIT),
                )
            ).fetchone()
        return None if row is None else str(row[0])

    async def heartbeat(
        self, owner: Owner, lease: float, fences: Sequence[Fence], environments: Sequence[str] = (DEFAULT,)
    ) -> Beat:
        """Renew ``owner``'s leases by the database's clock and record it alive, serving
        ``environments``, in one transaction on the node's own connection."""
        async with self._vital_transaction() as db:
            held: set[str] = set()
            if fences:
                rows = await (
                    await db.execute(
                        "UPDATE runs SET lease_until = warmpod_now() + %s FROM unnest(%s::text[], %s::int[]) "
                        "AS held(id, attempt) WHERE runs.id = held.id AND runs.attempt = held.attempt "
                        "AND runs.status = 'running' AND runs.incarnation = %s RETURNING runs.id",
                        (
                            lease,
                            [f.run_id for f in fences],
                            [f.attempt for f in fences],
                            owner.incarnation,
                        ),
                    )
                ).fetchall()
                held = {row[0] for row in rows}
            await db.execute(
                "INSERT INTO nodes (name, incarnation, seen, running, environments) "
                "VALUES (%s, %s, warmpod_now(), %s, %s) "
                # A start that a later one of the same name took over (it was frozen past its
                # lease) does not take the row back.
                "ON CONFLICT (name) DO UPDATE SET seen = excluded.seen, running = excluded.running, "
                "environments = excluded.environments WHERE nodes.incarnation = excluded.incarnation",
                (owner.node, owner.incarnation, len(held), list(environments)),
            )
            nodes = [
                NodeSeen(
                    name=name, incarnation=inc, seen_ago=max(0.0, ago), running=running, environments=served
                )
                for name, inc, ago, running, served in await (
                    await db.execute(
                        "SELECT name, incarnation, warmpod_now() - seen, running, environments FROM nodes "
                        "WHERE seen > warmpod_now() - %s ORDER BY name",
                        (lease,),
                    )
                ).fetchall()
            ]
            waiting: dict[str, int] = dict(
                await (
                    await db.execute(
                        "SELECT environment, count(*)::int FROM runs WHERE status = 'queued' "
                        "GROUP BY environment"
                    )
                ).fetchall()
            )
        return Beat(
            held=frozenset(held), queued=sum(waiting.values()), nodes=nodes, queued_by_environment=waiting
        )

    async def reap(self, message: str) -> list[str]:
        """End runs whose lease ran out; SKIP LOCKED: two reapers never end the same run twice."""
        async with self._transaction() as db:
            rows = await (
                await db.execute(
                    "SELECT id, node FROM runs WHERE status = 'running' AND lease_until < warmpod_now() "
                    "FOR UPDATE SKIP LOCKED"
                )
            ).fetchall()
            return [await _end_lost(db, run_id, node, message) for run_id, node in rows]

    async def add_output(self, fence: Fence, chunks: Sequence[Chunk]) -> bool:
        """Keep more of a running run's output, if ``fence`` still holds it."""
        async with self._transaction() as db:
            if not await _holds(db, fence):
                return False
            if chunks:
                await _keep_output(db, fence.run_id, chunks)
                await db.execute("SELECT pg_notify('warmpod_changed', %s)", (fence.run_id,))
        return True

    async def finish(
        self,
        run_id: str,
        result: RunResult,
        chunks: Sequence[Chunk] = (),
        files: Sequence[tuple[str, bytes]] = (),
        *,
        fence: Fence | None = None,
    ) -> bool:
        """Record the run's final result, its last output and its files, once. True also when
        this very result is already recorded under ``fence``: a write whose COMMIT's answer was
        lost is read back at once, and a retry of it finds it done."""
        blob = encode_blob(result)
        written = False
        try:
            async with self._transaction() as db:
                if fence is not None and not await _holds(db, fence):
                    return fence is not None and await _finished_with(db, run_id, blob, fence)
                cursor = await db.execute(
                    "UPDATE runs SET status = %s, result = %s, finished = warmpod_now(), spec = NULL, "
                    "lease_until = NULL, exit_code = %s, duration_ms = %s "
                    "WHERE id = %s AND status IN ('queued', 'running')",
                    (result.status, blob, result.exit_code, result.duration_ms, run_id),
                )
                if cursor.rowcount != 1:
                    return fence is not None and await _finished_with(db, run_id, blob, fence)
                written = True
                await _due(db, run_id)
                await _keep_output(db, run_id, chunks)
                await _insert(
                    db, "files (run_id, path, data)", [(run_id, path, data) for path, data in files]
                )
                await db.execute("SELECT pg_notify('warmpod_changed', %s)", (run_id,))
        except StoreError:
            # Not yet written: the caller tries again. Written: only a read tells whether it took.
            if not written or not await self._settle(lambda db: _finished_with(db, run_id, blob, fence)):
                raise
        return True

    async def file_size(self, run_id: str, path: str) -> int | None:
        """The size in bytes of a file the run left, or None; its content is not read."""
        async with self._transaction() as db:
            # octet_length() of a bytea stored out of line reads its TOAST pointer, not its value.
            row = await (
                await db.execute(
                    "SELECT octet_length(data) FROM files WHERE run_id = %s AND path = %s", (run_id, path)
                )
            ).fetchone()
        return None if row is None else int(row[0])

    async def file_piece(self, run_id: str, path: str, offset: int, size: int) -> bytes | None:
        """At most ``size`` bytes of a file the run left from ``offset`` on (none past its end), or
        None: a download reads a file in such pieces, never holding it whole."""
        async with self._transaction() as db:
            # A slice of a value stored out of line and uncompressed fetches only the TOAST chunks
            # it spans; a compressed one is decompressed only as far as the slice's end.
            row = await (
                await db.execute(
                    "SELECT substring(data FROM %s FOR %s) FROM files WHERE run_id = %s AND path = %s",
                    (offset + 1, size, run_id, path),
                )
            ).fetchone()
        return None if row is None else bytes(row[0])

    async def small_files(self, run_id: str, max_bytes: int, total_bytes: int) -> dict[str, bytes]:
        """The content of the files ``inlined`` picks among those the run left, by path: no other
        file's bytes are read."""
        async with self._transaction() as db:
            # octet_length() of a bytea stored out of line reads its TOAST pointer, not its value.
            sizes = await (
                await db.execute("SELECT path, octet_length(data) FROM files WHERE run_id = %s", (run_id,))
            ).fetchall()
            paths = inlined(sizes, max_bytes, total_bytes)
            if not paths:
                return {}
            rows = await (
                await db.execute(
                    "SELECT path, data FROM files WHERE run_id = %s AND path = ANY(%s)", (run_id, paths)
                )
            ).fetchall()
        return {path: bytes(data) for path, data in rows}

    async def get(self, run_id: str) -> Record | None:
        """The run's record, or None for an id never stored (or purged)."""
        async with self._transaction() as db:
            row = await (await db.execute(_GET, (run_id,))).fetchone()
        return None if row is None else record(run_id, *row)

    async def list_runs(
        self, key: str | None, where: RunFilter, after: Position | None, limit: int
    ) -> list[Listed]:
        """At most ``limit`` of ``key``'s runs that ``where`` picks, newest first, after ``after``
        (see ``Store.list_runs``)."""
        query, params = history_query(key, where, after, limit)
        async with self._transaction() as db:
            rows = await (await db.execute(query.replace("?", "%s").encode(), params)).fetchall()
        return [summary(*row) for row in rows]

    async def output(self, run_id: str, after: int = -1, limit: int = OUTPUT_PAGE) -> list[Chunk]:
        """The first ``limit`` of the run's output chunks with ``seq`` above ``after``, in order."""
        async with self._transaction() as db:
            # As in SqliteStore.output: each row selected holds a chunk above ``after``.
            rows = await (
                await db.execute(
                    "SELECT seq, stream, data FROM output WHERE run_id = %(run)s AND seq >= coalesce("
                    "(SELECT max(seq) FROM output WHERE run_id = %(run)s AND seq <= %(after)s), %(after)s) "
                    "AND coalesce(last, seq) > %(after)s ORDER BY seq LIMIT %(limit)s",
                    {"run": run_id, "after": after, "limit": limit},
                )
            ).fetchall()
        return page(rows, after, limit)

    async def cancel(self, run_id: str, result: RunResult) -> CancelOutcome:
        """Cancel a queued run, or flag a running one and tell its node."""
        async with self._transaction() as db:
            row = await (
                await db.execute("SELECT status FROM runs WHERE id = %s FOR UPDATE", (run_id,))
            ).fetchone()
            if row is None:
                return "unknown"
            if row[0] == "queued":
                await db.execute(
                    "UPDATE runs SET status = 'cancelled', result = %s, finished = warmpod_now(), "
                    "spec = NULL WHERE id = %s",
                    (encode_blob(result), run_id),
                )
                await _due(db, run_id)
                await db.execute("SELECT pg_notify('warmpod_changed', %s)", (run_id,))
                return "cancelled"
            if row[0] == "running":
                await db.execute("UPDATE runs SET cancel = true WHERE id = %s", (run_id,))
                await db.execute("SELECT pg_notify('warmpod_cancel', %s)", (run_id,))
                return "requested"
            return "finished"

    async def cancel_requested(self, run_id: str) -> bool:
        """Whether ``cancel`` flagged this running run."""
        async with self._transaction() as db:
            row = await (await db.execute("SELECT cancel FROM runs WHERE id = %s", (run_id,))).fetchone()
        return bool(row and row[0])

    async def purge(self, retention: float) -> int:
        """Delete runs that ended more than ``retention`` seconds ago, by the database's clock."""
        async with self._transaction() as db:
            return await _one(
                db,
                "WITH gone AS (DELETE FROM runs WHERE finished < warmpod_now() - %s RETURNING id, n), "
                "o AS (DELETE FROM output WHERE run_id IN (SELECT id FROM gone)), "
                "l AS (DELETE FROM run_labels WHERE run_n IN (SELECT n FROM gone)), "
                "w AS (DELETE FROM webhooks WHERE run_id IN (SELECT id FROM gone)), "
                "f AS (DELETE FROM files WHERE run_id IN (SELECT id FROM gone)) "
                "SELECT count(*) FROM gone",
                (retention,),
            )

    async def claim_webhook(self, lease: float, skip: Sequence[str | None] = ()) -> Delivery | None:
        """Take the webhook due the longest, not of the keys in ``skip``, for one try (``Store``):
        a row another node is claiming is skipped, not waited for."""
        owners = [key or "" for key in skip]
        query = _pg(outbox.claim_query(len(owners), lock=" FOR UPDATE SKIP LOCKED"))
        async with self._transaction() as db:
            row = await (await db.execute(query, (lease, *owners))).fetchone()
        return None if row is None else outbox.delivery(tuple(row))

    async def record_webhook(self, delivery: Delivery, tried: Tried) -> bool:
        """Keep how ``delivery``'s try went (``Store``)."""
        async with self._transaction() as db:
            cursor = await db.execute(_RECORD, tried.params(delivery))
        return cursor.rowcount == 1

    async def aclose(self) -> None:
        """Close every connection (which frees the node's name)."""
        with anyio.CancelScope(shield=True):
            await self._drop_vital()
            await self._pool.close()


async def _due(db: Connection, run_id: str) -> None:
    """Make the final run's webhook due, if it has one, and tell every node (at COMMIT): one round
    trip on every run's end, webhook or not."""
    await db.execute(_DUE, (run_id,))


def _pg(query: str) -> bytes:
    """A statement written for both stores (``?``, ``{now}``) in PostgreSQL's terms."""
    return query.replace("{now}", "warmpod_now()").replace("?", "%s").encode()


_GET = _pg(GET)
_ADD = _pg(outbox.ADD)
_DUE = _pg(
    f"WITH due AS ({outbox.DUE} RETURNING run_id) SELECT pg_notify('warmpod_webhook', run_id) FROM due"  # noqa: S608  (constants only)
)
_RECORD = _pg(outbox.RECORD)

# A queued run's key's runs running now (no key counts as one key): the fairness order of ``claim``
# and ``next_environment``. By ``coalesce(key, '')`` so that runs_running_by_key serves it.
_KEY_RUNNING = (
    "(SELECT count(*) FROM runs r WHERE r.status = 'running' AND coalesce(r.key, '') = coalesce(q.key, ''))"
)


async def _one(db: Connection, query: str, params: tuple[Any, ...] = ()) -> int:
    row = await (await db.execute(query.encode(), params)).fetchone()
    return int(row[0]) if row else 0


async def _holds(db: Connection, fence: Fence) -> bool:
    # FOR SHARE: a reaper's FOR UPDATE waits for this write, or this waits for it and sees `error`.
    row = await (
        await db.execute(
            "SELECT 1 FROM runs WHERE id = %s AND status = 'running' AND incarnation = %s AND attempt = %s "
            "FOR SHARE",
            (fence.run_id, fence.incarnation, fence.attempt),
        )
    ).fetchone()
    return row is not None


async def _finished_with(db: Connection, run_id: str, blob: bytes, fence: Fence | None) -> bool:
    """Whether the run is final with the result ``blob`` (and, with a ``fence``, by its attempt):
    this writer's own earlier write, whose answer it never got."""
    query = "SELECT 1 FROM runs WHERE id = %s AND result = %s AND status NOT IN ('queued', 'running')"
    params: tuple[Any, ...] = (run_id, blob)
    if fence is not None:
        query += " AND incarnation = %s AND attempt = %s"
        params += (fence.incarnation, fence.attempt)
    return await (await db.execute(query.encode(), params)).fetchone() is not None


async def _keep_output(db: Connection, run_id: str, chunks: Sequence[Chunk]) -> None:
    """Store the chunks above the run's highest kept seq (``Store``'s rule for retried writes)."""
    if not chunks:
        return
    row = await (
        await db.execute(
            "SELECT coalesce(last, seq) FROM output WHERE run_id = %s ORDER BY seq DESC LIMIT 1", (run_id,)
        )
    ).fetchone()
    rows = [(run_id, *stored) for stored in output_rows(chunks, -1 if row is None else row[0])]
    await _insert(db, "output (run_id, seq, last, stream, data)", rows)


async def _insert_run(
    db: Connection,
    run_id: str,
    spec: RunSpec,
    key: str | None,
    idempotency_key: str | None,
    request_hash: str | None,
) -> None:
    """Store one queued run: its row, a row per label (``run_labels``), and its webhook's (``webhooks``)."""
    inserted = await (
        await db.execute(
            "INSERT INTO runs (id, status, spec, created, key, warm, environment, idempotency_key, "
            "request_hash, labels) VALUES (%s, 'queued', %s, warmpod_now(), %s, %s, %s, %s, %s, %s) "
            "RETURNING n, created",
            (
                run_id,
                encode_blob(spec),
                key,
                spec.warm,
                spec.environment,
                idempotency_key,
                request_hash,
                labels_column(spec),
            ),
        )
    ).fetchone()
    assert inserted is not None
    n, created = inserted
    await _insert(
        db,
        "run_labels (run_n, name, value, owner, created)",
        [(n, name, value, key or "", created) for name, value in spec.labels],
    )
    if spec.callback_url is not None:
        await db.execute(_ADD, (run_id, key or "", spec.callback_url))


async def _insert(db: Connection, into: LiteralString, rows: Sequence[tuple[Any, ...]]) -> None:
    """Insert ``rows`` into ``into`` (a table and its columns) in one statement, skipping those
    already there. Not ``executemany``: psycopg pipelines it and sends the Sync last, and a node cut
    off between its rows and that Sync leaves a session the server does not count as idle in its
    transaction, so idle_in_transaction_session_timeout never frees the run's row lock."""
    if not rows:
        return
    row = sql.SQL("({})").format(sql.SQL(", ").join([sql.Placeholder()] * len(rows[0])))
    query = sql.SQL("INSERT INTO {} VALUES {} ON CONFLICT DO NOTHING").format(
        sql.SQL(into), sql.SQL(", ").join([row] * len(rows))
    )
    await db.execute(query, [value for values in rows for value in values])


async def _end_lost(db: Connection, run_id: str, node: str | None, message: str) -> str:
    printed = Printed()
    # A server-side cursor: the run's chunks come OUTPUT_PAGE at a time, never all at once.
    async with db.cursor(name="warmpod_output") as cursor:
        cursor.itersize = OUTPUT_PAGE
        await cursor.execute("SELECT seq, stream, data FROM output WHERE run_id = %s ORDER BY seq", (run_id,))
        async for row in cursor:
            for stream, data in segments(row):
                printed.add(stream, data)
    result = lost_result(run_id, node, message, printed.text())
    await db.execute(
        "UPDATE runs SET status = 'error', result = %s, finished = warmpod_now(), spec = NULL, "
        "lease_until = NULL WHERE id = %s",
        (encode_blob(result), run_id),
    )
    await _due(db, run_id)
    await db.execute("SELECT pg_notify('warmpod_changed', %s)", (run_id,))
    return run_id


def _name_lock(node: str) -> int:
    """The advisory lock key of a node name: 64 bits of its SHA-256, as a signed bigint."""
    return int.from_bytes(hashlib.sha256(b"warmpod node " + node.encode()).digest()[:8], "big", signed=True)


async def _end_frozen(db: Connection, node: str, lock: int, lease: float) -> None:
    """End the session holding ``node``'s name lock if that node has not beaten for ``lease``: its
    process is frozen or cut off (a paused VM's socket can stay open for hours), and only ending
    the session frees the name; its writes are fenced off once its runs are ended."""
    await db.execute(
        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN nodes n ON n.name = %s "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid "
        "AND n.seen < warmpod_now() - %s AND l.pid <> pg_backend_pid()",
        (node, (lock >> 32) & 0xFFFFFFFF, lock & 0xFFFFFFFF, lease),
    )


def _safe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(unparsable URL)"
    info.pop("password", None)
    return psycopg.conninfo.make_conninfo("", **{k: v for k, v in info.items() if v is not None})
