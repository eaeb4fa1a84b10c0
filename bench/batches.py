"""What a batch saves: queueing N runs with one ``Store.add_batch`` against N ``Store.add`` calls.

Usage::

    .venv/bin/python bench/batches.py [--size N] [--samples S] [--postgres URL|local]

On a fresh SQLite store (and a PostgreSQL one with ``--postgres``: a URL, or ``local`` for a
throwaway server from tests/support/postgres.py), it times queueing ``--size`` runs (default 20,
Judge0's and warmpod's default batch bound) ``--samples`` times each way, taking turns: one
``add_batch`` (one transaction, under the queue's guard), and ``--size`` ``add`` calls one after
the other (as ``--size`` ``POST /run-json/?wait=false`` would queue them). The queue is emptied
between samples. It prints p50 and p95 in milliseconds and the ratio. The HTTP layer adds its own
cost per request on top, which a batch pays once. A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from support import postgres  # noqa: E402  (after the path)

from warmpod.models import RunResult, RunSpec  # noqa: E402
from warmpod.queue.store.base import Owner, Store  # noqa: E402
from warmpod.queue.store.postgres import PostgresStore  # noqa: E402
from warmpod.queue.store.sqlite import SqliteStore  # noqa: E402

SPEC = RunSpec(code=b"print(1)", stdin=b"", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99)
NODE = Owner(node="bench", incarnation="bench-1")


async def drain(store: Store) -> None:
    """Take every queued run and end it, so the next sample starts from an empty queue."""
    while (claim := await store.claim(NODE, 60.0)) is not None:
        await store.finish(claim.fence.run_id, RunResult.from_server(claim.fence.run_id, "succeeded"))


async def measure(store: Store, size: int, samples: int) -> dict[str, list[float]]:
    """Milliseconds per sample of each way of queueing ``size`` runs."""
    times: dict[str, list[float]] = {"add_batch": [], "add x N": []}
    for _ in range(samples):
        items = [(uuid.uuid4().hex, SPEC) for _ in range(size)]
        started = time.perf_counter()
        assert await store.add_batch(items, max_queued=10 * size, key="bench") == "added"
        times["add_batch"].append((time.perf_counter() - started) * 1000)
        await drain(store)
        started = time.perf_counter()
        for _ in range(size):
            assert await store.add(uuid.uuid4().hex, SPEC, max_queued=10 * size, key="bench") == "added"
        times["add x N"].append((time.perf_counter() - started) * 1000)
        await drain(store)
    return times


def report(kind: str, size: int, times: dict[str, list[float]]) -> None:
    """Print p50 and p95 of each way, and the ratio of the p50s."""
    print(f"\n{kind}: queueing {size} runs, {len(times['add_batch'])} samples each (ms)")
    print(f"{'way':<12} {'p50':>8} {'p95':>8}")
    p50 = {}
    for way, data in times.items():
        data = sorted(data)
        p50[way] = statistics.median(data)
        print(f"{way:<12} {p50[way]:>8.2f} {data[int(0.95 * (len(data) - 1))]:>8.2f}")
    print(f"add x N / add_batch: {p50['add x N'] / p50['add_batch']:.1f}x")


async def sqlite_case(size: int, samples: int) -> None:
    """The SQLite store's figures."""
    with tempfile.TemporaryDirectory() as directory:
        store = await SqliteStore.open(Path(directory) / "runs.sqlite3")
        try:
            report("SQLite", size, await measure(store, size, samples))
        finally:
            await store.aclose()


async def postgres_case(url: str, size: int, samples: int) -> None:
    """The PostgreSQL store's figures."""
    store = await PostgresStore.open(url)
    try:
        report("PostgreSQL", size, await measure(store, size, samples))
    finally:
        await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20, help="runs per batch (20)")
    parser.add_argument("--samples", type=int, default=50, help="samples each way (50)")
    parser.add_argument(
        "--postgres", metavar="URL|local", help="also a PostgreSQL store (local: a throwaway server)"
    )
    args = parser.parse_args()
    anyio.run(sqlite_case, args.size, args.samples)
    if args.postgres == "local":
        with postgres.running(durable=True) as server:
            anyio.run(postgres_case, server.create_database("batches"), args.size, args.samples)
    elif args.postgres:
        anyio.run(postgres_case, args.postgres, args.size, args.samples)


if __name__ == "__main__":
    main()
