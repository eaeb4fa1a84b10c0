"""A report run with files in and out, through warmpod and through ``podman run --rm -v``, side by side.

Usage::

    .venv/bin/python bench/files.py [--runs N] [--naive-runs N] [--baseline REV] [--output PATH]

In one run, on this checkout's runner image:

report      POST /run-json/ with a 1 MiB CSV in ``files``: the script reads it with pandas, draws a
            scatter plot with matplotlib and saves it as ``out/chart.png`` (about 100 KB), which
            comes back inline in the result; each run once /health shows the pool full.
report+mpl  the same with ``WARMPOD_POOL__PRELOAD=numpy,pandas,matplotlib.pyplot``: what an
            operator whose users all plot can choose.
naive       the same script and CSV through ``podman run --rm --network none -v DIR:/work`` of the
            same image, the chart read back from DIR/out: what a container-per-run runner does.
trivial     ``print(1)`` through this checkout's ``warmpod serve`` ...
baseline    ... and through the server and image of ``--baseline`` (default: the last commit
            before runs took files), exported with ``git archive``: the cost of files for a run
            that has none (its agent creates out/ and scans it; the target is under 1 ms). The
            two take turns, ``--rounds`` times, each with a fresh server.

It prints one table and writes every sample to a JSON file. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import httpx
from common import (
    ROOT,
    Series,
    Server,
    free_port,
    repeat,
    run_once,
    section,
    setup,
    table,
    wait_pool_full,
)

from warmpod.host import facts as host
from warmpod.settings import Settings

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "files.json"
BASELINE = "90f8d5c0011bffb9de4b7eaca39d51072fb0b782"
"""The last commit whose runs took no files (its runner image holds numpy and pandas only)."""
REPORT = """
import pandas as pd
import matplotlib.pyplot as plt

data = pd.read_csv("data.csv")
fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
ax.scatter(data["x"], data["y"], s=1, alpha=0.5)
ax.set_title(f"{len(data)} points")
fig.savefig("out/chart.png")
print(len(data))
"""


def make_csv(size: int) -> bytes:
    """A CSV of random points, ``size`` bytes or a line more."""
    rng = random.Random(7)
    lines = ["x,y"]
    total = 4
    while total < size:
        line = f"{rng.gauss(0, 1):.6f},{rng.gauss(0, 1):.6f}"
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def report_once(client: httpx.Client, csv: bytes, series: Series) -> None:
    """One report run through warmpod, timed; its chart must come back inline."""
    body = {"code": REPORT, "files": [{"path": "data.csv", "content": base64.b64encode(csv).decode()}]}
    started = time.perf_counter()
    response = client.post("/run-json/", json=body)
    elapsed = (time.perf_counter() - started) * 1000
    result = response.json()
    chart = next((f for f in result.get("files", []) if f["path"] == "out/chart.png"), None)
    if (
        response.status_code != 200
        or result.get("status") != "succeeded"
        or not chart
        or not chart["content"]
    ):
        series.failures.append(f"{response.status_code} {result.get('status')}: {result.get('stderr')}"[:300])
        return
    series.samples_ms.append(elapsed)
    series.extra.setdefault("chart_bytes", []).append(chart["size"])


def naive_once(settings: Settings, ref: str, csv: bytes, series: Series) -> None:
    """The same report through ``podman run --rm -v``, timed from writing its inputs to reading its chart."""
    with tempfile.TemporaryDirectory(prefix="warmpod-bench-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        (work / "main.py").write_text(REPORT)
        (work / "data.csv").write_bytes(csv)
        (work / "out").mkdir()
        work.chmod(0o777)
        (work / "out").chmod(0o777)
        argv, env = host.podman_command(
            settings.engine,
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{work}:/work",
            "-w",
            "/work",
            "-e",
            "MPLCONFIGDIR=/tmp",
            ref,
            "python3",
            "main.py",
        )
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
        chart = work / "out" / "chart.png"
        data = chart.read_bytes() if chart.exists() else b""
        elapsed = (time.perf_counter() - started) * 1000
    if proc.returncode != 0 or not data:
        series.failures.append(f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return
    series.samples_ms.append(elapsed)
    series.extra.setdefault("chart_bytes", []).append(len(data))


def trivial_runs(series: Series, runs: int, log: Path, env: dict[str, str]) -> None:
    """``runs`` idle print(1) runs into ``series`` through a fresh server started with ``env``."""
    name = series.name
    server = Server(2, free_port(), log, env)
    try:
        with httpx.Client(base_url=server.base_url, timeout=600) as client:
            with section(f"{name}: starting warmpod serve"):
                server.wait_healthy(client)
                wait_pool_full(client, timeout=600)
            for _ in range(3):
                run_once(client, Series("warmup", ""))
                wait_pool_full(client)

            def step() -> None:
                wait_pool_full(client)
                run_once(client, series)

            with section(f"{name}: {runs} idle runs"):
                repeat(runs, name, step)
    finally:
        series.extra.setdefault("server_stops", []).append(server.stop())


def report_series(name: str, preload: str, csv: bytes, args: argparse.Namespace) -> Series:
    """``args.runs`` idle report runs through a fresh server preloading ``preload`` (empty: the default)."""
    series = Series(name, f"POST /run-json/ with a {len(csv)} B CSV in, out/chart.png back inline")
    env = {"WARMPOD_POOL__PRELOAD": preload} if preload else {}
    server = Server(2, free_port(), args.output.with_suffix(f".{name}.log"), env)
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            with section(f"{name}: starting warmpod serve (preload {preload or 'default'})"):
                server.wait_healthy(client)
                wait_pool_full(client)
            report_once(client, csv, Series("warmup", ""))

            def step() -> None:
                wait_pool_full(client)
                report_once(client, csv, series)

            with section(f"{name}: {args.runs} idle runs"):
                repeat(args.runs, name, step)
    finally:
        series.extra["server_stop"] = server.stop()
    return series


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30, help="warmpod runs per series (default 30)")
    parser.add_argument("--naive-runs", type=int, default=15, help="podman run repetitions (default 15)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of baseline and trivial (default 3)")
    parser.add_argument(
        "--preload", default=None, help="WARMPOD_POOL__PRELOAD of both trivial series (default: the default)"
    )
    parser.add_argument(
        "--report", action=argparse.BooleanOptionalAction, default=True, help="the report series"
    )
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline server")
    parser.add_argument(
        "--csv-bytes", type=int, default=2**20, help="size of the CSV sent in (default 1 MiB)"
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file (default {DEFAULT_OUTPUT})"
    )
    args = parser.parse_args(argv)
    ready = setup(args.output)
    if ready is None:
        return 1
    settings, ref, facts = ready
    csv = make_csv(args.csv_bytes)

    with tempfile.TemporaryDirectory(prefix="warmpod-baseline-") as tmp:
        baseline_tree = Path(tmp)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.baseline], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline_tree)], input=archive, check=True)
        # Its own modules first on the path: the same venv, the baseline's warmpod and pool/.
        preload = {"WARMPOD_POOL__PRELOAD": args.preload} if args.preload is not None else {}
        baseline_env = {"PYTHONPATH": str(baseline_tree / "src"), **preload}
        baseline = Series("baseline", f"POST /run-json/ print(1), warmpod at {args.baseline[:12]}")
        trivial = Series("trivial", "POST /run-json/ print(1), this checkout")
        # In turns, so that whatever else the host does falls on both alike.
        for _ in range(args.rounds):
            trivial_runs(
                baseline, args.runs // args.rounds, args.output.with_suffix(".baseline.log"), baseline_env
            )
            trivial_runs(trivial, args.runs // args.rounds, args.output.with_suffix(".trivial.log"), preload)
    series = [trivial, baseline]
    if args.report:
        report = report_series("report", "", csv, args)
        preloaded = report_series("report+mpl", "numpy,pandas,matplotlib.pyplot", csv, args)
        naive = Series("naive", f"podman run --rm --network none -v DIR:/work {ref} python3 main.py")
        naive_once(settings, ref, csv, Series("warmup", ""))
        with section(f"naive: {args.naive_runs} runs"):
            repeat(args.naive_runs, "naive", lambda: naive_once(settings, ref, csv, naive))
        series = [report, preloaded, naive, *series]
    p50 = {item.name: item.summary()["p50"] for item in series}
    results = {
        "host": facts,
        "settings": {
            "runs": args.runs,
            "csv_bytes": len(csv),
            "baseline": args.baseline,
            "preload": args.preload,
        },
        "series": {item.name: {**asdict(item), "summary": item.summary()} for item in series},
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(table(series))
    print()
    if args.report:
        charts = series[0].extra.get("chart_bytes") or [0]
        print(f"chart: {charts[0]} bytes; CSV in: {len(csv)} bytes")
    for name in ("report", "report+mpl"):
        if p50.get(name) and p50.get("naive"):
            print(f"naive / warmpod {name} p50: {p50['naive'] / p50[name]:.1f}x")
    for item in (trivial, baseline):
        program = item.extra.get("program_ms") or [0.0]
        print(
            f"{item.name}: the program's own time inside warmpod (agent), "
            f"p50 {statistics.median(program):.1f} ms"
        )
    if p50["trivial"] and p50["baseline"]:
        print(
            f"trivial p50: {p50['trivial']:.1f} ms now, {p50['baseline']:.1f} ms at the baseline "
            f"({p50['trivial'] - p50['baseline']:+.1f} ms)"
        )
    print(f"figures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
