"""Run history in both stores: every run of a key exactly once, in order, under each filter, page
after page; labels kept and purged with their run; and a query plan that walks the indexes."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import psycopg
import pytest
from support.history import Stored, fill_postgres, fill_sqlite, made

from warmpod.models import RunResult, RunSpec
from warmpod.queue.store.base import Owner, Position, RunFilter, Store
from warmpod.queue.store.history import history_query
from warmpod.queue.store.postgres import PostgresStore
from warmpod.queue.store.sqlite import SqliteStore

SPEC = RunSpec(code=b"print(1)", stdin=b"", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99)
NODE = Owner(node="a", incarnation="a-1")
KEYS = ("alice", "bob", None)
RUNS = 10_000
FILTERS = {
    "none": RunFilter(),
    "one status": RunFilter(statuses=("failed",)),
    "statuses": RunFilter(statuses=("error", "timeout")),
    "label": RunFilter(labels=(("team", "t1"),)),
    "labels": RunFilter(labels=(("rare", "yes"), ("night", "n2"))),
    "environment": RunFilter(environment="sci"),
    "since and until": RunFilter(since=1.7e9 + 300, until=1.7e9 + 1200.5),
    "all at once": RunFilter(
        statuses=("succeeded",), labels=(("team", "t0"),), environment="sci", since=1.7e9 + 10
    ),
}


@dataclass
class Kind:
    """A store of one kind and how to write rows into it, or run SQL on it, from the side."""

    store: Store
    fill: Callable[[list[Stored]], int]
    sql: Callable[[str, list[object]], list[tuple[object, ...]]]
    name: str


@pytest.fixture(params=["sqlite", "postgres"])
async def kind(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Kind]:
    """A fresh, migrated store of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "runs.sqlite3"
        store: Store = await SqliteStore.open(path)

        def sql_lite(query: str, params: list[object]) -> list[tuple[object, ...]]:
            with contextlib.closing(sqlite3.connect(path)) as db:
                return db.execute(query, params).fetchall()

        yield Kind(store, lambda runs: fill_sqlite(path, runs), sql_lite, "sqlite")
    else:
        url = request.getfixturevalue("postgres_db")
        store = await PostgresStore.open(url)

        def sql_pg(query: str, params: list[object]) -> list[tuple[object, ...]]:
            with psycopg.connect(url, autocommit=True) as db:
                # A small table would be read whole, or its few rows sorted: as at a million rows,
                # the plan must then walk the index, in order.
                db.execute("SET enable_seqscan = off")
                db.execute("SET enable_bitmapscan = off")
                return db.execute(query.replace("?", "%s").encode(), params).fetchall()

        yield Kind(store, lambda runs: fill_postgres(url, runs), sql_pg, "postgres")
    await store.aclose()


def expected(runs: list[Stored], key: str | None, where: RunFilter) -> list[str]:
    """The ids ``list_runs`` must answer, worked out here from what was stored."""
    picked = [
        run
        for run in runs
        if run.key == key
        and (not where.statuses or run.status in where.statuses)
        and all(run.labels.get(name) == value for name, value in where.labels)
        and (where.environment is None or run.environment == where.environment)
        and (where.since is None or run.created >= where.since)
        and (where.until is None or run.created < where.until)
    ]
    return [run.id for run in sorted(picked, key=lambda run: (run.created, run.n), reverse=True)]


async def listed(store: Store, key: str | None, where: RunFilter, limit: int) -> list[str]:
    """Every id of the key's history under ``where``, page after page, each page after the last one's end."""
    ids: list[str] = []
    after: Position | None = None
    while True:
        page = await store.list_runs(key, where, after, limit)
        ids += [item.summary.id for item in page]
        if len(page) < limit:
            return ids
        after = page[-1].position


async def test_paging_answers_every_run_of_the_key_once_in_order_under_each_filter(kind: Kind) -> None:
    """Ten thousand runs of three keys (one of them keys off): paged by a cursor, each filter
    gives every run of the key it picks exactly once, newest first, ties by row number, and no
    run of another key."""
    runs = list(made(RUNS, KEYS))
    assert await anyio.to_thread.run_sync(kind.fill, runs) == RUNS
    for name, where in FILTERS.items():
        for key in KEYS:
            want = expected(runs, key, where)
            assert want, (name, key)  # a filter that picks nothing would prove nothing
            assert await listed(kind.store, key, where, 250) == want, (name, key)
    assert await listed(kind.store, "carol", RunFilter(), 250) == []


async def test_a_page_after_another_keys_run_still_answers_only_the_callers(kind: Kind) -> None:
    """A position taken from another key's run (a forged cursor) only says where to start: the
    page holds the caller's runs older than it, never the other key's."""
    runs = list(made(300, KEYS))
    await anyio.to_thread.run_sync(kind.fill, runs)
    bobs = await kind.store.list_runs("bob", RunFilter(), None, 10)
    page = await kind.store.list_runs("alice", RunFilter(), bobs[4].position, 500)
    assert page
    assert {item.summary.id for item in page} <= {run.id for run in runs if run.key == "alice"}


async def test_labels_and_the_end_are_kept_with_the_run_and_purged_with_it(kind: Kind) -> None:
    """A run added with labels has them in its record and its result; once finished its summary
    has its exit code and duration; a purge removes its label rows with it."""
    spec = msgspec.structs.replace(SPEC, labels=(("night", "2026-11-03"), ("team", "sales")))
    assert await kind.store.add("r1", spec, max_queued=10, key="alice") == "added"
    assert await kind.store.add("r2", SPEC, max_queued=10, key="alice") == "added"
    record = await kind.store.get("r1")
    assert record is not None
    assert record.labels == {"night": "2026-11-03", "team": "sales"}
    claim = await kind.store.claim(NODE, 15.0)
    assert claim is not None
    result = RunResult.from_server("r1", "failed", exit_code=3, duration_ms=12.5)
    assert await kind.store.finish("r1", result, fence=claim.fence)
    record = await kind.store.get("r1")
    assert record is not None
    assert record.result is not None
    assert record.result.labels == {"night": "2026-11-03", "team": "sales"}
    page = await kind.store.list_runs("alice", RunFilter(labels=(("team", "sales"),)), None, 10)
    assert [(i.summary.id, i.summary.exit_code, i.summary.duration_ms) for i in page] == [("r1", 3, 12.5)]
    assert page[0].summary.labels == {"night": "2026-11-03", "team": "sales"}
    assert await kind.store.list_runs("bob", RunFilter(labels=(("team", "sales"),)), None, 10) == []
    await anyio.sleep(0.05)
    assert await kind.store.purge(0.0) == 1
    rows = await anyio.to_thread.run_sync(kind.sql, "SELECT count(*) FROM run_labels", [])
    assert rows == [(0,)]
    assert [i.summary.id for i in await kind.store.list_runs("alice", RunFilter(), None, 10)] == ["r2"]


PLANS = {
    "runs_history": RunFilter(environment="sci", since=1.7e9),
    "runs_history_by_status": RunFilter(statuses=("failed",)),
    "run_labels_by_value": RunFilter(labels=(("team", "t1"), ("night", "n0")), statuses=("failed", "error")),
}


async def test_the_query_walks_an_index_for_each_kind_of_filter(kind: Kind) -> None:
    """EXPLAIN of the history query, first page and a page by cursor: each kind of filter is
    served by its index: on SQLite read in order (no sort, no scan of the table); on PostgreSQL
    an index scan on it with sequential and bitmap scans off, which a few thousand rows would
    not need (how it does at a million: bench/history.py)."""
    await anyio.to_thread.run_sync(kind.fill, list(made(2000, KEYS)))
    for index, where in PLANS.items():
        for after in (None, Position(1.7e9 + 200, 700)):
            query, params = history_query("alice", where, after, 51)
            prefix = "EXPLAIN QUERY PLAN " if kind.name == "sqlite" else "EXPLAIN "
            rows = await anyio.to_thread.run_sync(kind.sql, prefix + query, params)
            plan = "\n".join(str(row[-1]) for row in rows)
            assert index in plan, plan
            if kind.name == "sqlite":
                assert "USE TEMP B-TREE FOR ORDER BY" not in plan, plan
                assert not any(line.endswith(("SCAN r", "SCAN runs")) for line in plan.splitlines()), plan
            else:
                assert f"Scan using {index} " in plan or f"Scan Backward using {index} " in plan, plan
                assert "Seq Scan" not in plan, plan
