"""What the shared PostgreSQL queue costs and gives: latency, throughput of two nodes, writes per run.

Usage::

    .venv/bin/python bench/cluster.py [--runs N] [--duration S] [--clients N] [--pool-size N]
                                      [--preload MODULES] [--quick] [--output PATH]

In one run, on this machine, against a throwaway PostgreSQL started from Debian's packages with
its durable defaults (fsync and synchronous commits on; tests/support/postgres.py):

latency     ``print(1)`` through POST /run-json/, one at a time, each once /health shows the
            pool full, on one node with the SQLite store and then on one node with the
            PostgreSQL store: p50/p90 and what PostgreSQL adds per run.
throughput  ``--clients`` threads posting ``print(1)`` back to back for ``--duration`` seconds
            (runs/s, errors counted) at one node on PostgreSQL, then at two nodes on one
            PostgreSQL database, the clients alternating between them. The two nodes, their
            Podman services and PostgreSQL all share this machine's cores: the figure is what
            sharing a queue costs and how the work spreads, not what two machines would give.
writes      the database's own counters (pg_stat_database: xact_commit, tup_inserted,
            tup_updated, tup_deleted) over the two-node throughput phase, less those of the same
            two nodes left idle for as long (heartbeats, reapers, start and stop), divided by the
            runs: the store's load per run, for a capacity model.

All times are wall-clock on the client's side. It prints tables and writes every figure to a JSON
file. It is a measurement, not a test: nothing is asserted; failed runs are counted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import psycopg
from common import (
    ROOT,
    Series,
    Server,
    free_port,
    percentile,
    repeat,
    run_once,
    section,
    setup,
    wait_pool_full,
)
from run import ended, load

# The throwaway PostgreSQL server lives with the tests that use it too.
sys.path.insert(0, str(ROOT / "tests"))
from support import postgres

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "cluster.json"
COUNTERS = ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted")
QUICK = {"runs": 20, "duration": 5.0, "warmup": 1}


@contextmanager
def nodes(
    names: Sequence[str], args: argparse.Namespace, directory: Path, store_url: str | None
) -> Iterator[list[tuple[Server, httpx.Client]]]:
    """``warmpod serve`` once per name, on ``store_url`` (None: each its own SQLite file), healthy
    and with full pools; stopped (SIGTERM) at the end, their stop reports in ``stops``."""
    started: list[tuple[Server, httpx.Client]] = []
    try:
        for name in names:
            env = {"WARMPOD_POOL__PRELOAD": args.preload, "WARMPOD_NODE__NAME": name}
            if store_url is not None:
                env["WARMPOD_QUEUE__STORE_URL"] = store_url
            server = Server(args.pool_size, free_port(), directory / f"{name}.log", env)
            client = httpx.Client(base_url=server.base_url, timeout=120)
            started.append((server, client))
            with section(f"starting {name} on {server.base_url} ({'PostgreSQL' if store_url else 'SQLite'})"):
                server.wait_healthy(client)
        for _, client in started:
            wait_pool_full(client)
        yield started
    finally:
        for server, client in started:
            client.close()
            report = server.stop()
            if not report.get("graceful"):
                print(f"  {server.base_url} did not stop cleanly: {report}", file=sys.stderr)


def sequential(name: str, args: argparse.Namespace, clients: Sequence[httpx.Client]) -> Series:
    """``args.runs`` runs one at a time, each once the pool is full again (an idle service's latency)."""
    series = Series(name, "print(1), sequential, pool full before each")
    for _ in range(args.warmup):
        run_once(clients[0], Series("warmup", ""))
        wait_pool_full(clients[0])

    def step() -> None:
        wait_pool_full(clients[0])
        run_once(clients[0], series)

    with section(f"{name}: {args.runs} sequential runs"):
        repeat(args.runs, name, step)
    return ended(series)


def throughput(name: str, args: argparse.Namespace, clients: Sequence[httpx.Client]) -> Series:
    """``args.clients`` threads posting back to back for ``args.duration`` s, alternating nodes."""
    turn = itertools.cycle(clients)
    lock = threading.Lock()

    def step(series: Series) -> None:
        with lock:
            client = next(turn)
        run_once(client, series)

    with section(f"{name}: {args.clients} clients for {args.duration:g} s"):
        series = load(name, f"print(1), {args.clients} clients", args.clients, args.duration, step)
    series.extra["nodes"] = len(clients)
    return ended(series)


def counters(server: postgres.PostgresServer, database: str) -> dict[str, int]:
    """The database's cumulative write counters, read from another database so as not to add to them."""
    with psycopg.connect(server.url(), autocommit=True) as conn:
        row = conn.execute(
            f"SELECT {', '.join(COUNTERS)} FROM pg_stat_database WHERE datname = %s",  # names: constants
            (database,),
        ).fetchone()
    assert row is not None, f"no pg_stat_database row for {database}"
    return dict(zip(COUNTERS, (int(value) for value in row), strict=True))


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """``after`` less ``before``, counter by counter."""
    return {name: after[name] - before[name] for name in COUNTERS}


def bench(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    """Every phase, on one durable PostgreSQL server; returns the figures."""
    figures: dict[str, Any] = {"series": {}}
    rows: list[Series] = []
    with postgres.running(durable=True) as pg:
        # Latency: the same single node, SQLite then PostgreSQL.
        with nodes(["sqlite"], args, directory, None) as started:
            rows.append(sequential("latency sqlite", args, [c for _, c in started]))
        with nodes(["pg"], args, directory, pg.create_database("latency")) as started:
            rows.append(sequential("latency postgresql", args, [c for _, c in started]))

        # Throughput: one node, then two, each on a fresh database.
        with nodes(["one"], args, directory, pg.create_database("one_node")) as started:
            rows.append(throughput("throughput 1 node", args, [c for _, c in started]))
        # Counters are flushed by a backend when its session ends or within seconds of going
        # idle: read them before the nodes start and after they have stopped.
        two_url = pg.create_database("two_nodes")
        before = counters(pg, "two_nodes")
        with nodes(["node-1", "node-2"], args, directory, two_url) as started:
            two = throughput("throughput 2 nodes", args, [c for _, c in started])
        time.sleep(1)
        loaded = delta(before, counters(pg, "two_nodes"))
        with psycopg.connect(two_url) as conn:
            spread = conn.execute("SELECT node, count(*) FROM runs GROUP BY node ORDER BY node").fetchall()
        two.extra["runs_by_node"] = {str(node): int(count) for node, count in spread}
        rows.append(two)

        # The same two nodes idle for as long: what they write with no runs at all.
        idle_url = pg.create_database("idle_nodes")
        before = counters(pg, "idle_nodes")
        with (
            nodes(["node-1", "node-2"], args, directory, idle_url),
            section(f"two idle nodes for {two.extra['wall_s']:g} s"),
        ):
            time.sleep(two.extra["wall_s"])
        time.sleep(1)
        idle = delta(before, counters(pg, "idle_nodes"))

    runs = len(two.samples_ms) + len(two.failures)
    figures["writes"] = {
        "runs": runs,
        "loaded": loaded,
        "idle": idle,
        "per_run": {name: (loaded[name] - idle[name]) / runs if runs else None for name in COUNTERS},
        "idle_seconds": two.extra["wall_s"],
    }
    figures["series"] = {row.name: {**asdict(row), "summary": summary(row)} for row in rows}
    figures["rows"] = rows
    return figures


def summary(series: Series) -> dict[str, float | int | None]:
    """n, errors, p50, p90, p99 (ms) and runs/s of one series."""
    data = sorted(series.samples_ms)
    return {
        "n": len(data),
        "errors": len(series.failures),
        "p50": percentile(data, 50) if data else None,
        "p90": percentile(data, 90) if data else None,
        "p99": percentile(data, 99) if data else None,
        "runs_per_s": series.extra.get("runs_per_s"),
    }


def report(figures: dict[str, Any], cpus: int | None) -> str:
    """The figures side by side, then what they say."""

    def ms(value: float | None) -> str:
        return f"{'-':>8}" if value is None else f"{value:>8.1f}"

    header = f"{'series':<22} {'n':>6} {'err':>5} {'p50':>8} {'p90':>8} {'p99':>8} {'runs/s':>8}  (ms)"
    lines = [header, "-" * len(header)]
    for name, item in figures["series"].items():
        s = item["summary"]
        rate = s["runs_per_s"]
        lines.append(
            f"{name:<22} {s['n']:>6} {s['errors']:>5} {ms(s['p50'])} {ms(s['p90'])} {ms(s['p99'])} "
            f"{'' if rate is None else f'{rate:.2f}':>8}"
        )
    series = figures["series"]
    lite, pg = series["latency sqlite"]["summary"], series["latency postgresql"]["summary"]
    lines.append("")
    if lite["p50"] is not None and pg["p50"] is not None:
        lines.append(
            f"PostgreSQL (durable) adds {pg['p50'] - lite['p50']:+.1f} ms at p50 and "
            f"{pg['p90'] - lite['p90']:+.1f} ms at p90 to a sequential run, against SQLite"
        )
    one, two = series["throughput 1 node"]["summary"], series["throughput 2 nodes"]["summary"]
    if one["runs_per_s"] and two["runs_per_s"]:
        lines.append(
            f"two nodes on one PostgreSQL: {two['runs_per_s'] / one['runs_per_s']:.2f}x the runs/s of one "
            f"(both nodes, their Podman services and PostgreSQL share this machine's {cpus} cores); "
            f"runs by node {series['throughput 2 nodes']['extra'].get('runs_by_node')}"
        )
    writes = figures["writes"]
    per_run = writes["per_run"]
    if writes["runs"]:
        lines.append(
            "database transactions and rows per run (two nodes, their idle background taken off): "
            + ", ".join(f"{name} {per_run[name]:.1f}" for name in COUNTERS)
        )
        idle = writes["idle"]
        lines.append(
            f"two nodes started, idle for {writes['idle_seconds']:g} s and stopped (schema creation "
            "included): " + ", ".join(f"{name} {idle[name]}" for name in COUNTERS)
        )
        lines.append("(xact_commit counts read-only transactions too: status reads, polls, heartbeats)")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; --quick sets small counts unless they are given."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, help="sequential runs per store (100; quick 20)")
    parser.add_argument("--duration", type=float, help="seconds of each throughput phase (20; quick 5)")
    parser.add_argument("--warmup", type=int, help="untimed runs before the sequential ones (3; quick 1)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for throughput (8)")
    parser.add_argument("--pool-size", type=int, default=2, help="WARMPOD_POOL__SIZE of every node (2)")
    parser.add_argument(
        "--preload", default="", help="WARMPOD_POOL__PRELOAD of every node (none: refills cost less)"
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a check that it all works")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file ({DEFAULT_OUTPUT})")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"runs": 100, "duration": 20.0, "warmup": 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    ready = setup(args.output)
    if ready is None:
        return 1
    _, _, host = ready
    try:
        postgres.find_bin_dir()
    except postgres.PostgresMissing as exc:
        print(f"cannot benchmark the PostgreSQL store: {exc}", file=sys.stderr)
        return 1
    directory = args.output.parent / "cluster-logs"
    directory.mkdir(parents=True, exist_ok=True)
    figures = bench(args, directory)
    figures.pop("rows")
    text = report(figures, os.cpu_count())
    results = {
        "host": host,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **figures,
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(text)
    print(f"\nfigures: {args.output}; server logs: {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
