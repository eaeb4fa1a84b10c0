"""A burst of non-blocking runs: nothing lost or duplicated, and /health stays fast throughout.

Usage::

    .venv/bin/python bench/burst.py [--runs 200] [--pool-size 4] [--naive-concurrency 4] [--output PATH]

It starts ``warmpod serve`` (its own store in a temporary directory), submits ``--runs`` programs at
once with ``wait=false`` from 32 client threads, polls every run to its end, and samples
``GET /health`` every 20 ms the whole time. Each program prints a token of its own, so a result
that is missing, doubled or mixed up shows. Beside it, in the same run, the same programs go
through the naive way, ``podman run --rm`` at ``--naive-concurrency`` at a time. It prints one table
and writes the figures to a JSON file. A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, Server, built_image, free_port, percentile

from warmpod.environments import Environments
from warmpod.host import facts as host
from warmpod.host import image
from warmpod.settings import from_env

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "burst.json"
FINAL = {"succeeded", "failed", "timeout", "error", "cancelled"}


def program(token: str) -> str:
    """A small program whose output names its run: a little work, then its token."""
    return f"total = sum(i * i for i in range(20000))\nprint({token!r}, total)\n"


def expected(token: str) -> str:
    """What ``program(token)`` prints."""
    return f"{token} {sum(i * i for i in range(20000))}\n"


class HealthProbe:
    """Times ``GET /health`` every ``interval`` seconds, from a process of its own: in this one its
    timings would include waiting for the GIL behind the submitting threads."""

    def __init__(self, base_url: str, interval: float = 0.02) -> None:
        self._stop = multiprocessing.Event()
        self._results: multiprocessing.Queue[tuple[list[float], dict[int, int], int]] = (
            multiprocessing.Queue()
        )
        self._process = multiprocessing.Process(
            target=self._probe, args=(base_url, interval, self._stop, self._results), daemon=True
        )
        self.samples_ms: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors = 0

    def start(self) -> None:
        """Start probing."""
        self._process.start()

    def stop(self) -> None:
        """Stop probing and collect the samples."""
        self._stop.set()
        samples, statuses, self.errors = self._results.get(timeout=30)
        self._process.join()
        self.samples_ms = samples
        self.statuses = Counter(statuses)

    @staticmethod
    def _probe(base_url: str, interval: float, stop: Any, results: Any) -> None:
        samples: list[float] = []
        statuses: Counter[int] = Counter()
        errors = 0
        with httpx.Client(base_url=base_url, timeout=10) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = client.get("/health")
                except httpx.HTTPError:
                    errors += 1
                else:
                    samples.append((time.perf_counter() - started) * 1000)
                    statuses[response.status_code] += 1
                stop.wait(interval)
        results.put((samples, dict(statuses), errors))


def summary(samples: Sequence[float]) -> dict[str, float | None]:
    """p50/p99/max of ``samples``."""
    data = sorted(samples)
    if not data:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": percentile(data, 50), "p99": percentile(data, 99), "max": data[-1]}


def warmpod_burst(base_url: str, runs: int) -> dict[str, Any]:
    """Submit ``runs`` programs at once, poll them all to the end, and check each result."""
    tokens = [f"token-{i:04d}" for i in range(runs)]
    submit_ms: list[float] = []
    submit_codes: Counter[int] = Counter()
    ids: dict[str, str] = {}
    lock = threading.Lock()

    def submit(client: httpx.Client, token: str) -> None:
        started = time.perf_counter()
        response = client.post("/run-json/", json={"code": program(token), "wait": False})
        elapsed = (time.perf_counter() - started) * 1000
        with lock:
            submit_ms.append(elapsed)
            submit_codes[response.status_code] += 1
            if response.status_code == 202:
                ids[token] = response.json()["id"]

    started = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=60) as client, ThreadPoolExecutor(32) as threads:
        list(threads.map(lambda token: submit(client, token), tokens))
        submitted = time.perf_counter() - started
        results: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + 600
        while len(results) < len(ids) and time.monotonic() < deadline:
            for token, run_id in ids.items():
                if token in results:
                    continue
                body = client.get(f"/status/{run_id}").json()
                if body["status"] in FINAL:
                    results[token] = body
            time.sleep(0.1)
    wall = time.perf_counter() - started
    statuses = Counter(body["status"] for body in results.values())
    wrong = sorted(token for token, body in results.items() if body["stdout"] != expected(token))
    return {
        "runs": runs,
        "accepted": len(ids),
        "distinct_ids": len(set(ids.values())),
        "submit_status_codes": dict(submit_codes),
        "submit_all_seconds": round(submitted, 3),
        "submit_ms": summary(submit_ms),
        "finished": len(results),
        "lost": len(ids) - len(results),
        "statuses": dict(statuses),
        "wrong_output": wrong,
        "wall_seconds": round(wall, 3),
        "runs_per_second": round(len(results) / wall, 2),
    }


def store_counts(path: Path) -> dict[str, int]:
    """Runs per status as the store holds them once the server stopped."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return dict(db.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())


def naive_burst(runs: int, concurrency: int) -> dict[str, Any]:
    """The same programs through ``podman run --rm``, ``concurrency`` at a time."""
    settings = from_env()
    ref = image.image_ref(settings, Environments.load(settings).default)
    ok = Counter[str]()

    def one(i: int) -> None:
        token = f"token-{i:04d}"
        argv, env = host.podman_command(
            settings.engine, "run", "--rm", "--network", "none", ref, "python3", "-c", program(token)
        )
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
        ok["succeeded" if done.returncode == 0 and done.stdout == expected(token) else "failed"] += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as threads:
        list(threads.map(one, range(runs)))
    wall = time.perf_counter() - started
    return {
        "runs": runs,
        "concurrency": concurrency,
        "statuses": dict(ok),
        "wall_seconds": round(wall, 3),
        "runs_per_second": round(runs / wall, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--naive-concurrency", type=int, default=4)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    settings = from_env()
    if built_image(settings) is None:
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="warmpod-bench-") as tmp:
        store = Path(tmp) / "runs.sqlite3"
        server = Server(
            args.pool_size,
            free_port(),
            args.output.with_suffix(".server.log"),
            extra_env={
                "WARMPOD_QUEUE__STORE_PATH": str(store),
                "WARMPOD_QUEUE__MAX_QUEUED": str(args.runs),
                # One client submits every run at once and polls them all as fast as it is answered:
                # what is measured is the service's throughput, not one key's share of it.
                "WARMPOD_SERVER__KEY_RATE": "100000",
                "WARMPOD_SERVER__KEY_BURST": str(max(200, args.runs)),
            },
        )
        try:
            with httpx.Client(base_url=server.base_url, timeout=60) as client:
                server.wait_healthy(client)
            print(f"warmpod: {args.runs} runs, wait=false, pool of {args.pool_size}", file=sys.stderr)
            probe = HealthProbe(server.base_url)
            probe.start()
            burst = warmpod_burst(server.base_url, args.runs)
            probe.stop()
        finally:
            stop = server.stop()
        stored = store_counts(store)
    print(f"naive: {args.runs} x podman run --rm, {args.naive_concurrency} at a time", file=sys.stderr)
    naive = naive_burst(args.runs, args.naive_concurrency)
    health = {"samples": len(probe.samples_ms), "status_codes": dict(probe.statuses), "errors": probe.errors}
    health.update(summary(probe.samples_ms))
    results = {"warmpod": burst, "health": health, "store_after_stop": stored, "naive": naive, "stop": stop}
    args.output.write_text(json.dumps(results, indent=2) + "\n")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    print()
    print(
        f"| {args.runs} runs submitted at once | warmpod (pool min {args.pool_size}, max 16) "
        f"| naive podman run --rm ({args.naive_concurrency} at a time) |"
    )
    print("|---|---|---|")
    print(f"| finished / lost | {burst['finished']} / {burst['lost']} | {args.runs} / 0 |")
    print(f"| statuses | {burst['statuses']} | {naive['statuses']} |")
    print(f"| wrong or doubled output | {len(burst['wrong_output'])} | - |")
    print(f"| wall time, all done | {burst['wall_seconds']} s | {naive['wall_seconds']} s |")
    print(f"| throughput | {burst['runs_per_second']} runs/s | {naive['runs_per_second']} runs/s |")
    print(
        f"| 202 answer p50 / p99 | {ms(burst['submit_ms']['p50'])} / {ms(burst['submit_ms']['p99'])} ms | - |"
    )
    print(
        f"| GET /health p50 / p99 / max ({health['samples']} samples) | {ms(health['p50'])} / "
        f"{ms(health['p99'])} / {ms(health['max'])} ms | - |"
    )
    print(f"store after the stop: {stored}; server stop: {stop}")
    print(f"figures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
