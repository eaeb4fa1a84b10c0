"""How fast ``GET /runs`` answers from a store of a million runs: the history query's latency.

Usage::

    .venv/bin/python bench/history.py [--runs N] [--keys K] [--samples S] [--postgres URL|local]

It fills a fresh SQLite store (and a PostgreSQL one with ``--postgres``: a URL, or ``local`` for a
throwaway server from tests/support/postgres.py with its durable defaults) with ``--runs`` runs
spread over ``--keys`` keys, written straight into the tables (tests/support/history.py: every
final status, two environments, most runs with two or three labels), then times
``Store.list_runs``, the query behind ``GET /runs``, ``--samples`` times per case for a random key:
the first page, a page deep in the key's history (by cursor), a status filter, a label filter,
and a label filter deep. It prints p50 and p95 in milliseconds per case. A measurement, not a
test: nothing is asserted. The HTTP layer adds its own (small, constant) cost on top.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import postgres  # noqa: E402  (after the path)
from support.history import fill_postgres, fill_sqlite, made  # noqa: E402

from warmpod.queue.store.base import Position, RunFilter, Store  # noqa: E402
from warmpod.queue.store.postgres import PostgresStore  # noqa: E402
from warmpod.queue.store.sqlite import SqliteStore  # noqa: E402

PAGE = 50
START = 1.7e9


def position(i: int) -> Position:
    """The position of the i-th run ``made`` writes (its created and row number)."""
    return Position(START + (i // 3) * 0.5, i + 1)


def cases(runs: int, keys: int) -> dict[str, Callable[[int], tuple[RunFilter, Position | None]]]:
    """Each case: for a key's index, the filter and the position to page after."""
    deep = runs // keys // 2  # halfway down the key's history
    return {
        "first page": lambda k: (RunFilter(), None),
        "deep page (cursor)": lambda k: (RunFilter(), position(k + keys * deep)),
        "status=failed": lambda k: (RunFilter(statuses=("failed",)), None),
        "label night=n3": lambda k: (RunFilter(labels=(("night", "n3"),)), None),
        "label deep (cursor)": lambda k: (RunFilter(labels=(("night", "n3"),)), position(k + keys * deep)),
        "2 labels + env": lambda k: (
            RunFilter(labels=(("night", "n3"), ("rare", "yes")), environment="default"),
            None,
        ),
    }


async def measure(name: str, store: Store, runs: int, keys: int, samples: int) -> None:
    """Time each case ``samples`` times and print its p50 and p95."""
    names = [f"key{k:02d}" for k in range(keys)]
    rng = random.Random(1)
    print(f"\n{name}: {runs:,} runs, {keys} keys, {samples} samples per case, pages of {PAGE}")
    print(f"{'case':<22} {'p50 ms':>8} {'p95 ms':>8} {'rows':>6}")
    for case, make in cases(runs, keys).items():
        took, rows = [], 0
        for _ in range(samples):
            k = rng.randrange(keys)
            where, after = make(k)
            began = time.perf_counter()
            page = await store.list_runs(names[k], where, after, PAGE + 1)
            took.append((time.perf_counter() - began) * 1000)
            rows = len(page)
        took.sort()
        print(f"{case:<22} {took[len(took) // 2]:>8.2f} {took[int(len(took) * 0.95)]:>8.2f} {rows:>6}")


async def sqlite_case(args: argparse.Namespace) -> None:
    """Fill and time a SQLite store in a temporary directory."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "runs.sqlite3"
        await (await SqliteStore.open(path)).aclose()
        began = time.perf_counter()
        fill_sqlite(path, made(args.runs, [f"key{k:02d}" for k in range(args.keys)], START))
        print(f"sqlite: filled in {time.perf_counter() - began:.0f} s, {path.stat().st_size / 1e6:.0f} MB")
        store = await SqliteStore.open(path)
        try:
            await measure("sqlite", store, args.runs, args.keys, args.samples)
        finally:
            await store.aclose()


async def postgres_case(url: str, args: argparse.Namespace) -> None:
    """Fill and time a PostgreSQL store at ``url`` (an empty database)."""
    store = await PostgresStore.open(url)
    try:
        began = time.perf_counter()
        fill_postgres(url, made(args.runs, [f"key{k:02d}" for k in range(args.keys)], START))
        print(f"postgresql: filled in {time.perf_counter() - began:.0f} s")
        await measure("postgresql", store, args.runs, args.keys, args.samples)
    finally:
        await store.aclose()


def main() -> None:
    """Parse the arguments, then fill and time each store asked for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument(
        "--postgres", metavar="URL|local", help="also a PostgreSQL store (local: a throwaway server)"
    )
    parser.add_argument("--no-sqlite", action="store_true", help="only the PostgreSQL store")
    args = parser.parse_args()
    if not args.no_sqlite:
        anyio.run(sqlite_case, args)
    if args.postgres == "local":
        with postgres.running(durable=True) as server:
            anyio.run(postgres_case, server.create_database("history"), args)
    elif args.postgres:
        anyio.run(postgres_case, args.postgres, args)


if __name__ == "__main__":
    main()
