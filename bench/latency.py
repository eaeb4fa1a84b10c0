"""Latency of a trivial run through warmpod, against a naive ``podman run`` and a bare interpreter.

Usage::

    .venv/bin/python bench/latency.py [--runs N] [--pool-size N] [--naive-runs N] [--output PATH]

In one run it starts ``warmpod serve`` on a free local port, waits for ``/health``, and measures
``print(1)`` four ways:

idle        POST /run-json/, one at a time, each started only once /health shows the pool back at
            its target ready count: the latency a caller sees from an idle service.
sustained   the same, back to back without waiting: the pool may drain, so this is the sequential
            throughput-bound latency.
naive       ``podman run --rm --network none <runner image> python3 -c 'print(1)'`` with warmpod's
            containers.conf and runtime: what warmpod replaces.
floor       ``python3 -I -c pass`` on the host: interpreter start-up, the floor of any fresh process.

All times are wall-clock from the client's side (``time.perf_counter``). It prints one table and
writes every sample to a JSON file. It is a measurement, not a test: nothing is asserted, and runs
that failed are counted and reported rather than timed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from common import (
    EXPECTED,
    PROGRAM,
    ROOT,
    Series,
    Server,
    free_port,
    podman,
    pool_ready,
    repeat,
    run_once,
    section,
    setup,
    table,
    time_process,
    wait_pool_full,
)

from warmpod.host import facts as host
from warmpod.sandbox.pool import LABEL_PID

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "latency.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100, help="warmpod runs per series (default 100)")
    parser.add_argument(
        "--pool-size", type=int, default=4, help="WARMPOD_POOL__SIZE for the server (default 4)"
    )
    parser.add_argument("--naive-runs", type=int, default=30, help="podman run repetitions (default 30)")
    parser.add_argument("--floor-runs", type=int, default=100, help="bare python3 repetitions (default 100)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warmpod runs first (default 3)")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file (default {DEFAULT_OUTPUT})"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    ready = setup(args.output)
    if ready is None:
        return 1
    settings, ref, facts = ready
    python3 = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"

    idle = Series("idle", "POST /run-json/ print(1), each once /health shows the pool full")
    sustained = Series("sustained", "POST /run-json/ print(1), back to back")
    naive = Series("naive", f"podman run --rm --network none {ref} python3 -c 'print(1)'")
    floor = Series("floor", f"{python3} -I -c pass on the host")

    server = Server(args.pool_size, free_port(), args.output.with_suffix(".server.log"))
    stop_report: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            with section(f"starting warmpod serve (pool size {args.pool_size}) on {server.base_url}"):
                health = server.wait_healthy(client)
                facts["warmpod_health"] = health
                wait_pool_full(client)
            with section(f"warm-up: {args.warmup} runs, untimed"):
                for _ in range(args.warmup):
                    run_once(client, Series("warmup", ""))
                    wait_pool_full(client)

            with section(f"(a) idle: {args.runs} runs, each after the pool refilled"):
                refill_s: list[float] = []

                def idle_step() -> None:
                    refill_s.append(wait_pool_full(client))
                    run_once(client, idle)

                repeat(args.runs, "idle", idle_step)
                idle.extra["refill_wait_ms"] = [round(s * 1000, 3) for s in refill_s]

            with section(f"(b) sustained: {args.runs} runs back to back"):
                wait_pool_full(client)
                started = time.perf_counter()
                repeat(args.runs, "sustained", lambda: run_once(client, sustained))
                wall = time.perf_counter() - started
                sustained.extra["runs_per_second"] = round(args.runs / wall, 2)
                sustained.extra["pool_after"] = pool_ready(client)

            # Let the refill after (b) finish so it does not slow the baselines down.
            wait_pool_full(client)
            naive_argv, naive_env = host.podman_command(
                settings.engine, "run", "--rm", "--network", "none", ref, "python3", "-c", PROGRAM
            )
            naive.extra["argv"] = naive_argv
            with section(f"(c) naive: {args.naive_runs} x {' '.join(naive_argv)}"):
                repeat(args.naive_runs, "naive", lambda: time_process(naive_argv, naive_env, naive, EXPECTED))
            with section(f"(d) floor: {args.floor_runs} x {python3} -I -c pass"):
                floor_argv = [python3, "-I", "-c", "pass"]
                repeat(args.floor_runs, "floor", lambda: time_process(floor_argv, None, floor, ""))
    finally:
        with section("stopping warmpod (SIGTERM)"):
            stop_report = server.stop()
            left = podman(settings, "ps", "-a", "-q", "--filter", f"label={LABEL_PID}={server.proc.pid}")
            stop_report["containers_left"] = len(left.stdout.split())
        print(f"  {stop_report}", file=sys.stderr)

    series = [idle, sustained, naive, floor]
    idle_p50 = idle.summary()["p50"]
    naive_p50 = naive.summary()["p50"]
    ratio = naive_p50 / idle_p50 if idle_p50 and naive_p50 else None
    results = {
        "host": facts,
        "settings": {"runs": args.runs, "pool_size": args.pool_size, "warmup": args.warmup},
        "series": {item.name: {**asdict(item), "summary": item.summary()} for item in series},
        "naive_over_warmpod_idle_p50": ratio,
        "server_stop": stop_report,
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")

    print()
    print(table(series))
    print()
    if ratio is not None:
        print(f"naive / warmpod (idle) p50: {ratio:.1f}x")
    program = idle.extra.get("program_ms") or []
    if program:
        print(f"program's own run time inside warmpod (agent), p50: {statistics.median(program):.1f} ms")
    print(f"sustained: {sustained.extra.get('runs_per_second')} runs/s with a pool of {args.pool_size}")
    print(f"server stop: {stop_report}")
    print(f"figures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
