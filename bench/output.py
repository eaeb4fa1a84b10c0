"""What a run's output costs the service: a chatty program, a paced one-byte writer, slow readers.

Usage::

    .venv/bin/python bench/output.py [--baseline REV] [--only {baseline,current}] [--output PATH]

Two servers run side by side, this checkout's and ``--baseline``'s (default: ``main``, exported
with ``git archive`` and run from the same venv and its own runner image); each gets, the chatty
runs in turns with the other's:

chatty      POST /run-json/ of ``for i in range(100000): print(i)`` (589 KB of stdout): the wall
            time of the request (median of 15), and the output rows and bytes its run left in the store.
paced       POST /run-json/ of a program writing one byte per ``os.write(1, b"x")``, 0.1 ms apart,
            for ``--paced-seconds``: the bytes it kept, the growth of the SQLite store's file and
            WAL as they are, and of the database once the WAL is copied back (a checkpoint), per
            output byte.
alternating the paced writer switching between stdout and stderr at each byte: chunks that
            nothing may merge without losing their order.
readers     five clients replaying the paced run's ``/status/{id}/stream`` slowly (one event,
            a pause, then the rest): the rise of the server's resident memory while they read.

It prints one table with both servers side by side and writes every figure to a JSON file (with
``--only``, figures of the other server already in that file are kept). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, Server, free_port, section, setup, wait_pool_full

sys.path.insert(0, str(ROOT / "tests"))
from support.hostile import alternating_program, paced_program  # tests/ joins the path first

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "output.json"
CHATTY = "for i in range(100000):\n    print(i)\n"
CHATTY_RUNS = 15
CHATTY_BYTES = sum(len(f"{i}\n") for i in range(100000))
READERS = 5


def store_bytes(path: Path) -> int:
    """The SQLite store's size on disk: its file and its write-ahead log."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def database_bytes(path: Path) -> int:
    """The SQLite store's size once its write-ahead log is copied back (the WAL is reused, not grown)."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        db.execute("PRAGMA wal_checkpoint(FULL)")
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    return int(pages) * int(page_size)


def stored_output(path: Path, run_id: str) -> tuple[int, int]:
    """How many output rows and bytes of output the store holds for ``run_id``."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows, size = db.execute(
            "SELECT count(*), coalesce(sum(length(data)), 0) FROM output WHERE run_id = ?", (run_id,)
        ).fetchone()
    return int(rows), int(size)


def rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run(client: httpx.Client, code: str, timeout: float) -> tuple[dict[str, Any], float]:
    """One POST /run-json/ of ``code``: its result and the request's wall time in seconds."""
    started = time.perf_counter()
    response = client.post("/run-json/", json={"code": code, "timeout": timeout})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body, elapsed


def slow_reader(base_url: str, run_id: str, events: list[int]) -> None:
    """Replay a run's stream: one line, a pause while the server holds the rest, then all of it."""
    count = 0
    with (
        httpx.Client(base_url=base_url, timeout=120) as client,
        client.stream("GET", f"/status/{run_id}/stream") as response,
    ):
        lines = response.iter_lines()
        next(lines)
        time.sleep(3)
        for line in lines:
            count += line.startswith("data:")
    events.append(count)


@dataclass
class Subject:
    """One server under measurement: its name, process, client, store and figures."""

    name: str
    server: Server
    client: httpx.Client
    store: Path
    figures: dict[str, Any] = field(default_factory=dict)


def start(name: str, log: Path, env: dict[str, str]) -> Subject:
    """A server started with ``env``, its pool full."""
    server = Server(2, free_port(), log, env)
    client = httpx.Client(base_url=server.base_url, timeout=600)
    with section(f"{name}: starting warmpod serve"):
        server.wait_healthy(client)
        wait_pool_full(client, timeout=600)
    return Subject(name, server, client, log.with_suffix(".sqlite3"))


def chatty(subjects: Sequence[Subject]) -> None:
    """The chatty program on every server, in turns, so that the host's other load falls on all alike."""
    with section("chatty, in turns"):
        for _ in range(CHATTY_RUNS):
            for subject in subjects:
                wait_pool_full(subject.client)
                body, elapsed = run(subject.client, CHATTY, 30)
                assert body["status"] == "succeeded", body
                assert len(body["stdout"]) == CHATTY_BYTES, len(body["stdout"])
                subject.figures.setdefault("chatty_samples", []).append(elapsed)
                subject.figures.setdefault("chatty_program_samples", []).append(body["duration_ms"])
                subject.figures["chatty_rows"], subject.figures["chatty_stored_bytes"] = stored_output(
                    subject.store, body["id"]
                )
    for subject in subjects:
        subject.figures["chatty_seconds"] = statistics.median(subject.figures["chatty_samples"])
        subject.figures["chatty_program_ms"] = statistics.median(subject.figures["chatty_program_samples"])


def measure(subject: Subject, paced_seconds: float) -> None:
    """The paced and alternating writers and the slow readers on one server."""
    name, client, store, figures = subject.name, subject.client, subject.store, subject.figures
    with section(f"{name}: paced"):
        wait_pool_full(client)
        before, before_db = store_bytes(store), database_bytes(store)
        body, _ = run(client, paced_program(paced_seconds), paced_seconds + 10)
        assert body["status"] == "succeeded", body
        grown = store_bytes(store) - before
        grown_db = database_bytes(store) - before_db
        kept = len(body["stdout"])
        rows, _ = stored_output(store, body["id"])
        figures["paced_kept_bytes"] = kept
        figures["paced_rows"] = rows
        figures["paced_store_growth"] = grown
        figures["paced_database_growth"] = grown_db
        figures["paced_store_per_byte"] = grown_db / max(kept, 1)
    with section(f"{name}: alternating"):
        wait_pool_full(client)
        before_db = database_bytes(store)
        alternating, _ = run(client, alternating_program(paced_seconds), paced_seconds + 10)
        assert alternating["status"] == "succeeded", alternating
        kept = len(alternating["stdout"]) + len(alternating["stderr"])
        figures["alternating_kept_bytes"] = kept
        figures["alternating_rows"] = stored_output(store, alternating["id"])[0]
        figures["alternating_store_per_byte"] = (database_bytes(store) - before_db) / max(kept, 1)
    with section(f"{name}: {READERS} slow readers"):
        pid = subject.server.proc.pid
        idle = rss(pid)
        peak = idle
        events: list[int] = []
        threads = [
            threading.Thread(target=slow_reader, args=(subject.server.base_url, body["id"], events))
            for _ in range(READERS)
        ]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, rss(pid))
            time.sleep(0.05)
        figures["readers_rss_rise"] = peak - idle
        figures["readers_events"] = events


ROWS = (
    ("chatty_seconds", f"chatty: POST /run-json/ wall time (s, median of {CHATTY_RUNS})", "{:.3f}"),
    ("chatty_program_ms", "chatty: program duration (ms, median)", "{:.0f}"),
    ("chatty_rows", "chatty: output rows stored", "{}"),
    ("chatty_stored_bytes", "chatty: output bytes stored", "{}"),
    ("paced_kept_bytes", "paced: stdout bytes kept", "{}"),
    ("paced_rows", "paced: output rows stored", "{}"),
    ("paced_store_growth", "paced: store file + WAL growth (bytes)", "{}"),
    ("paced_database_growth", "paced: database growth, WAL copied back (bytes)", "{}"),
    ("paced_store_per_byte", "paced: database bytes per output byte", "{:.2f}"),
    ("alternating_kept_bytes", "alternating: stdout + stderr bytes kept", "{}"),
    ("alternating_rows", "alternating: output rows stored", "{}"),
    ("alternating_store_per_byte", "alternating: database bytes per output byte", "{:.2f}"),
    ("readers_rss_rise", f"{READERS} slow readers: server RSS rise (MiB)", "MiB"),
)


def table(results: dict[str, dict[str, Any]]) -> str:
    """The figures of both servers side by side."""
    names = [name for name in ("current", "baseline") if name in results]
    lines = [f"{'':52} " + " ".join(f"{name:>12}" for name in names)]
    for key, label, fmt in ROWS:
        cells = []
        for name in names:
            value = results[name].get(key)
            if value is None:
                cells.append(f"{'-':>12}")
            elif fmt == "MiB":
                cells.append(f"{value / 2**20:>12.1f}")
            else:
                cells.append(f"{fmt.format(value):>12}")
        lines.append(f"{label:52} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", help="baseline revision (default main)")
    parser.add_argument("--only", choices=("baseline", "current"), help="measure one server only")
    parser.add_argument("--paced-seconds", type=float, default=8.0, help="how long the paced writer writes")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file (default {DEFAULT_OUTPUT})"
    )
    args = parser.parse_args(argv)
    if setup(args.output) is None:
        return 1
    results: dict[str, dict[str, Any]] = {}
    if args.only and args.output.exists():
        results = json.loads(args.output.read_text()).get("results", {})
    with tempfile.TemporaryDirectory(prefix="warmpod-output-") as tmp:
        subjects: list[Subject] = []
        try:
            if args.only != "current":
                tree = Path(tmp) / "baseline"
                tree.mkdir()
                archive = subprocess.run(
                    ["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True
                ).stdout
                subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
                # Its own modules first on the path: the same venv, the baseline's warmpod and pool/.
                env = {"PYTHONPATH": str(tree / "src")}
                subjects.append(start("baseline", Path(tmp) / "baseline.log", env))
                subjects[-1].figures["revision"] = args.baseline
            if args.only != "baseline":
                subjects.append(start("current", Path(tmp) / "current.log", {}))
            chatty(subjects)
            for subject in subjects:
                measure(subject, args.paced_seconds)
        finally:
            for subject in subjects:
                subject.client.close()
                subject.figures["server_stop"] = subject.server.stop()
                results[subject.name] = subject.figures
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"results": results}, indent=2) + "\n")
    print(table(results))
    print(f"figures in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
