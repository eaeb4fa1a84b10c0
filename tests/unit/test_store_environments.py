"""The run stores and environments, SQLite and PostgreSQL alike: claims by environment, which
environment goes next, queue counts by environment, what each node serves, and stores made before."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import anyio
import msgspec
import psycopg

from warmpod.models import RunSpec
from warmpod.queue.store import postgres, sqlite
from warmpod.queue.store.base import PREFERRED_WAIT, Owner, Store
from warmpod.queue.store.codec import encode_blob
from warmpod.queue.store.postgres import PostgresStore
from warmpod.queue.store.sqlite import SqliteStore

SPEC = RunSpec(code=b"print(1)", stdin=b"", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99)
SCI = msgspec.structs.replace(SPEC, environment="sci")
NODE = Owner(node="a", incarnation="a-1")
OTHER = Owner(node="b", incarnation="b-1")
LEASE = 15.0


async def claimed(store: Store, environment: str = "default", *, warm: bool = False) -> str | None:
    """The id of the run a claim of ``environment`` takes, or None."""
    claim = await store.claim(NODE, LEASE, environment=environment, warm=warm)
    return None if claim is None else claim.fence.run_id


async def test_a_claim_takes_only_runs_of_its_environment(store: Store) -> None:
    """Runs of two environments queued in turn: each environment's claims take its own runs in
    order, with their spec, and find none once those are gone though the other's still wait."""
    for run_id, spec in (("d0", SPEC), ("s0", SCI), ("d1", SPEC), ("s1", SCI)):
        assert await store.add(run_id, spec, max_queued=10) == "added"
    claim = await store.claim(NODE, LEASE, environment="sci")
    assert claim is not None
    assert (claim.fence.run_id, claim.spec) == ("s0", SCI)
    assert await claimed(store, "sci") == "s1"
    assert await claimed(store, "sci") is None
    assert await claimed(store, "gpu") is None
    assert [await claimed(store) for _ in range(3)] == ["d0", "d1", None]


async def test_a_run_that_waited_long_is_still_not_taken_by_another_environment(store: Store) -> None:
    """The warm rule lets any sandbox take a run that waited PREFERRED_WAIT, but only within the
    run's environment: a sandbox of another never does."""
    warm = msgspec.structs.replace(SCI, warm=True)
    assert await store.add("old", SPEC, max_queued=10) == "added"
    await anyio.sleep(PREFERRED_WAIT + 0.2)  # the wait is the test: "old" waits long on the store's clock
    assert await store.add("new", warm, max_queued=10) == "added"
    assert await claimed(store, "sci", warm=False) == "new"
    assert await claimed(store, "sci", warm=True) is None
    assert await claimed(store, warm=True) == "old"


async def test_next_environment_follows_the_claims_fairness_across_environments(store: Store) -> None:
    """A key flooding one environment, with a run running, does not hold back another key's later
    run of another: its environment comes next; among keys running alike, the oldest run's does;
    the warm rule plays no part."""
    for i in range(3):
        spec = msgspec.structs.replace(SCI, warm=True)
        assert await store.add(f"a{i}", spec, max_queued=10, key="alice") == "added"
    assert await store.next_environment(["default", "sci"]) == "sci"
    assert await claimed(store, "sci") == "a0"
    assert await store.add("b0", SPEC, max_queued=10, key="bob") == "added"
    assert await store.next_environment(["default", "sci"]) == "default"
    # Asked only of the environment the key floods: its runs are all there is.
    assert await store.next_environment(["sci"]) == "sci"
    assert await claimed(store) == "b0"
    # Both keys run one now: the oldest waiting run's environment, alice's.
    assert await store.add("b1", SPEC, max_queued=10, key="bob") == "added"
    assert await store.next_environment(["sci", "default"]) == "sci"


async def test_next_environment_puts_the_environments_with_a_free_sandbox_first(store: Store) -> None:
    """A run whose environment has a sandbox free goes before older runs of an environment whose
    sandboxes are all busy, until one of those has waited PREFERRED_WAIT: then it goes first."""
    assert await store.add("d0", SPEC, max_queued=10) == "added"
    assert await store.add("s0", SCI, max_queued=10) == "added"
    assert await store.next_environment(["default", "sci"]) == "default"
    assert await store.next_environment(["default", "sci"], ["sci"]) == "sci"
    assert await store.next_environment(["default", "sci"], []) == "default"
    await anyio.sleep(PREFERRED_WAIT + 0.2)  # the wait is the test: "d0" waits long on the store's clock
    assert await store.next_environment(["default", "sci"], ["sci"]) == "default"


async def test_next_environment_claims_nothing_and_is_none_when_none_of_them_waits(store: Store) -> None:
    """Asked of environments without a queued run (or of none), the answer is None; asking never
    takes a run off the queue."""
    assert await store.next_environment(["default", "sci"]) is None
    assert await store.add("s0", SCI, max_queued=10) == "added"
    assert await store.next_environment(["default", "gpu"]) is None
    assert await store.next_environment([]) is None
    assert await store.next_environment(["sci"]) == "sci"
    assert await store.next_environment(["sci"]) == "sci"
    assert await store.queued() == ["s0"]
    assert await claimed(store, "sci") == "s0"
    assert await store.next_environment(["default", "sci"]) is None


async def test_a_beat_counts_the_queue_by_environment_and_records_what_each_node_serves(store: Store) -> None:
    """A beat counts the runs waiting in all and by environment (running ones are not counted), and
    lists each node seen with the environments its last beat said it serves."""
    for run_id, spec in (("d0", SPEC), ("d1", SPEC), ("s0", SCI)):
        assert await store.add(run_id, spec, max_queued=10) == "added"
    assert await claimed(store) == "d0"
    await store.heartbeat(OTHER, LEASE, [], ["sci"])
    beat = await store.heartbeat(NODE, LEASE, [], ["default", "sci"])
    assert (beat.queued, beat.queued_by_environment) == (2, {"default": 1, "sci": 1})
    assert [(n.name, n.environments) for n in beat.nodes] == [("a", ["default", "sci"]), ("b", ["sci"])]
    await store.heartbeat(OTHER, LEASE, [])
    beat = await store.heartbeat(NODE, LEASE, [], [])
    assert [(n.name, n.environments) for n in beat.nodes] == [("a", []), ("b", ["default"])]
    assert await claimed(store, "sci") == "s0"
    assert await claimed(store) == "d1"
    beat = await store.heartbeat(NODE, LEASE, [])
    assert (beat.queued, beat.queued_by_environment) == (0, {})


async def test_a_sqlite_store_of_before_environments_counts_its_runs_as_the_default_ones(
    tmp_path: Path,
) -> None:
    """A file of the schema before environments opens: its queued run is the default environment's,
    counted, picked and claimed as such, and the file says the current version."""
    path = tmp_path / "runs.sqlite3"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        for script in sqlite._MIGRATIONS[:7]:
            db.executescript(script)
        db.execute("PRAGMA user_version = 7")
        db.execute(
            "INSERT INTO runs (id, status, spec, created) VALUES ('old', 'queued', ?, 0)",
            (encode_blob(SPEC),),
        )
    store = await SqliteStore.open(path)
    try:
        await old_run_is_the_default_ones(store)
    finally:
        await store.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        (version,) = db.execute("PRAGMA user_version").fetchone()
    assert version == sqlite.SCHEMA_VERSION == 10


async def test_a_postgres_store_of_before_environments_counts_its_runs_as_the_default_ones(
    postgres_db: str,
) -> None:
    """A database of the schema before environments opens: its queued run is the default
    environment's, and a node of before (beating without environments) serves the default one."""
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE warmpod_schema (version integer NOT NULL)")
        for script in postgres._MIGRATIONS[:5]:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement.encode())
        conn.execute("INSERT INTO warmpod_schema VALUES (5)")
        conn.execute(
            "INSERT INTO runs (id, status, spec, created) VALUES ('old', 'queued', %s, warmpod_now())",
            (encode_blob(SPEC),),
        )
        conn.execute("INSERT INTO nodes (name, incarnation, seen) VALUES ('before', 'x', warmpod_now())")
    store = await PostgresStore.open(postgres_db)
    try:
        beat = await store.heartbeat(NODE, LEASE, [], ["sci"])
        assert [(n.name, n.environments) for n in beat.nodes] == [("a", ["sci"]), ("before", ["default"])]
        await old_run_is_the_default_ones(store)
    finally:
        await store.aclose()
    with psycopg.connect(postgres_db, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM warmpod_schema").fetchall() == [(postgres.SCHEMA_VERSION,)]
    assert postgres.SCHEMA_VERSION == 8


async def old_run_is_the_default_ones(store: Store) -> None:
    """The run ``old``, stored before environments, waits as the default environment's."""
    beat = await store.heartbeat(NODE, LEASE, [])
    assert (beat.queued, beat.queued_by_environment) == (1, {"default": 1})
    assert await store.next_environment(["sci"]) is None
    assert await store.next_environment(["sci", "default"]) == "default"
    assert await claimed(store, "sci") is None
    claim = await store.claim(NODE, LEASE)
    assert claim is not None
    assert (claim.fence.run_id, claim.spec.environment) == ("old", "default")
