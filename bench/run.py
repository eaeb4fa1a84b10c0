"""warmpod against the naive ``podman run --rm``, side by side in one run: latency, load and memory.

Usage::

    .venv/bin/python bench/run.py [--runs N] [--naive-runs N] [--duration S] [--levels 1,2,4,8,16]
                                  [--modes preload,bare] [--output PATH]

In one process and one run, on the same runner image and the same two programs (``trivial``:
``print(1)``; ``pandas``: ``import numpy, pandas`` and a small DataFrame group-by):

naive       ``podman run --rm --network none IMAGE python3 main.py`` (the program bind-mounted),
            sequential, then at each concurrency level for ``--duration`` seconds.
floor       ``python3 -I -c pass`` on the host: the start-up of any fresh interpreter.
warmpod     for each mode (``preload``: the pool preloads numpy and pandas, the default;
            ``bare``: ``WARMPOD_POOL__PRELOAD=""``) a fresh ``warmpod serve``: sequential
            POST /run-json/, each once /health shows the pool full (the latency of an idle
            service); the same at each concurrency level for ``--duration`` seconds (throughput,
            p50/p99, errors); memory of each idle pool container (its cgroup) and of the server.

All times are wall-clock on the client's side. It prints one table and writes every figure to a
JSON file, with the host's load average as each series ended (other work on a shared host shows
there). It is a measurement, not a test: nothing is asserted; failed runs are counted.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from common import (
    ROOT,
    Series,
    Server,
    cgroup_memory,
    free_port,
    podman,
    repeat,
    section,
    setup,
    time_process,
    wait_pool_full,
)

from warmpod.host.facts import podman_command
from warmpod.settings import Settings

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "run.json"
PROGRAMS = {
    "trivial": "print(1)\n",
    "pandas": (
        "import numpy as np, pandas as pd\n"
        'df = pd.DataFrame({"k": np.arange(1000) % 7, "v": np.arange(1000, dtype=float)})\n'
        'print(df.groupby("k")["v"].mean()[3])\n'
    ),
}
_three = [float(i) for i in range(1000) if i % 7 == 3]
EXPECTED = {"trivial": "1\n", "pandas": f"{sum(_three) / len(_three)}\n"}
MODES = {"preload": "numpy,pandas", "bare": ""}


def naive(settings: Settings, ref: str, programs: Path, program: str) -> Callable[[Series], None]:
    """One timed ``podman run --rm`` of a program file, the way warmpod's own Podman is configured."""
    argv, env = podman_command(
        settings.engine,
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{programs / program}:/src:ro",
        "-w",
        "/work",
        ref,
        "python3",
        "/src/main.py",
    )
    return functools.partial(_timed, argv, env, EXPECTED[program])


def _timed(argv: list[str], env: dict[str, str], expected: str, series: Series) -> None:
    time_process(argv, env, series, expected)


def post(client: httpx.Client, program: str, series: Series) -> None:
    """One POST /run-json/ of ``program``, timed and checked."""
    started = time.perf_counter()
    try:
        response = client.post("/run-json/", json={"code": PROGRAMS[program]})
    except httpx.HTTPError as exc:
        series.failures.append(f"{type(exc).__name__}: {exc}")
        return
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        series.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
        return
    body = response.json()
    if body.get("status") != "succeeded" or body.get("stdout") != EXPECTED[program]:
        series.failures.append(f"{body.get('status')}: {body.get('error') or body.get('stderr')}"[:300])
        return
    series.samples_ms.append(elapsed)


def load(
    name: str, description: str, workers: int, duration: float, step: Callable[[Series], None]
) -> Series:
    """``workers`` threads calling ``step`` back to back for ``duration`` seconds."""
    series = Series(name, description)
    deadline = time.monotonic() + duration
    lock = threading.Lock()

    def worker() -> None:
        mine = Series(name, "")
        while time.monotonic() < deadline:
            step(mine)
        with lock:
            series.samples_ms.extend(mine.samples_ms)
            series.failures.extend(mine.failures)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    series.extra = {"concurrency": workers, "wall_s": round(wall, 3)}
    series.extra["runs_per_s"] = round(len(series.samples_ms) / wall, 2)
    return series


def ended(series: Series) -> Series:
    """Note the host's 1-minute load average as ``series`` ends: other work on the host shows there."""
    series.extra["load_average"] = round(os.getloadavg()[0], 2)
    return series


def rss(pid: int) -> int:
    """Resident memory of one process, in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """The direct children of ``pid``."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def memory(server: Server, settings: Settings) -> dict[str, Any]:
    """Memory of each idle pool container and of the server and its private Podman service."""
    ids = podman(
        settings, "ps", "-a", "-q", "--no-trunc", "--filter", f"label=io.warmpod.pid={server.proc.pid}"
    ).stdout.split()
    containers = [cgroup_memory(cid, settings) for cid in ids]
    mib = 1024 * 1024
    return {
        "containers": len(containers),
        "container_usage_mib": [round(c["usage"] / mib, 1) for c in containers if c],
        "container_anon_mib": [round(c["anon"] / mib, 1) for c in containers if c],
        "server_rss_mib": round(rss(server.proc.pid) / mib, 1),
        "podman_service_rss_mib": round(sum(rss(p) for p in children(server.proc.pid)) / mib, 1),
    }


def bench_warmpod(
    mode: str, args: argparse.Namespace, settings: Settings
) -> tuple[list[Series], dict[str, Any]]:
    """Every warmpod figure for one preload mode, from one fresh server."""
    log = args.output.with_name(f"{args.output.stem}.{mode}.server.log")
    server = Server(args.min_size, free_port(), log, {"WARMPOD_POOL__PRELOAD": MODES[mode]})
    results: list[Series] = []
    facts: dict[str, Any] = {}
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            with section(f"[{mode}] starting warmpod serve on {server.base_url}"):
                facts["health"] = server.wait_healthy(client)
                wait_pool_full(client)
            for _ in range(args.warmup):
                post(client, "trivial", Series("warmup", ""))
                wait_pool_full(client)
            # Let the pool settle: the paused containers' memory is what an idle service holds.
            time.sleep(2)
            facts["memory_idle"] = memory(server, settings)
            for program in PROGRAMS:
                series = Series(f"{mode} {program}", f"warmpod ({mode}), sequential, pool full before each")

                def idle_step(program: str = program, series: Series = series) -> None:
                    wait_pool_full(client)
                    post(client, program, series)

                with section(f"[{mode}] {program}: {args.runs} sequential runs"):
                    repeat(args.runs, program, idle_step)
                results.append(ended(series))
            for program, levels in (("trivial", args.levels), ("pandas", args.pandas_levels)):
                for workers in levels:
                    wait_pool_full(client, timeout=300)
                    with section(f"[{mode}] {program} at concurrency {workers} for {args.duration:g} s"):

                        def step(series: Series, program: str = program) -> None:
                            post(client, program, series)

                        series = load(
                            f"{mode} {program} c{workers}",
                            f"warmpod ({mode}) under load",
                            workers,
                            args.duration,
                            step,
                        )
                    series.extra["health_after"] = client.get("/health").json().get("pool")
                    results.append(ended(series))
    finally:
        with section(f"[{mode}] stopping warmpod"):
            facts["stop"] = server.stop()
    return results, facts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )

    def levels(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser.add_argument("--runs", type=int, default=100, help="sequential warmpod runs per program (100)")
    parser.add_argument("--naive-runs", type=int, default=20, help="sequential podman runs per program (20)")
    parser.add_argument("--floor-runs", type=int, default=50, help="bare python3 runs (50)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load level (10)")
    parser.add_argument("--levels", type=levels, default=[2, 4, 8, 16], help="concurrency levels (2,4,8,16)")
    parser.add_argument("--pandas-levels", type=levels, default=[8], help="the pandas program's levels (8)")
    parser.add_argument("--modes", default="preload,bare", help="warmpod modes: preload, bare (both)")
    parser.add_argument("--min-size", type=int, default=4, help="WARMPOD_POOL__SIZE (4)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warmpod runs first (3)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file ({DEFAULT_OUTPUT})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    ready = setup(args.output)
    if ready is None:
        return 1
    settings, ref, host = ready
    facts: dict[str, Any] = {"host": host}
    rows: list[Series] = []
    programs = Path(tempfile.mkdtemp(prefix="warmpod-bench-"))
    try:
        programs.chmod(0o755)
        for name, code in PROGRAMS.items():
            (programs / name).mkdir(mode=0o755)
            (programs / name / "main.py").write_text(code)
        python3 = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or "python3"
        floor = Series("floor", f"{python3} -I -c pass on the host")
        with section(f"floor: {args.floor_runs} x python3 -I -c pass"):
            repeat(
                args.floor_runs, "floor", lambda: time_process([python3, "-I", "-c", "pass"], None, floor, "")
            )
        rows.append(ended(floor))
        for program in PROGRAMS:
            series = Series(f"naive {program}", "podman run --rm, sequential")
            with section(f"naive {program}: {args.naive_runs} sequential runs"):
                step = naive(settings, ref, programs, program)
                repeat(args.naive_runs, program, functools.partial(step, series))
            rows.append(ended(series))
        for program, levels in (("trivial", args.levels), ("pandas", args.pandas_levels)):
            step = naive(settings, ref, programs, program)
            for workers in levels:
                with section(f"naive {program} at concurrency {workers} for {args.duration:g} s"):
                    name = f"naive {program} c{workers}"
                    rows.append(ended(load(name, "podman run --rm under load", workers, args.duration, step)))
        for mode in args.modes.split(","):
            mode_rows, mode_facts = bench_warmpod(mode, args, settings)
            rows.extend(mode_rows)
            facts[mode] = mode_facts
    finally:
        shutil.rmtree(programs, ignore_errors=True)

    results = {
        **facts,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "series": {row.name: {**asdict(row), "summary": row.summary()} for row in rows},
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(report(rows, facts))
    print(f"\nfigures: {args.output}")
    return 0


def report(rows: Sequence[Series], facts: dict[str, Any]) -> str:
    """One table of every series, then the memory figures and the ratios to the naive baseline."""
    header = (
        f"{'series':<26} {'n':>5} {'err':>4} {'p50':>7} {'p95':>7} {'p99':>7} {'runs/s':>7} {'load':>5}  (ms)"
    )
    lines = [header, "-" * len(header)]
    summaries = {row.name: row.summary() for row in rows}
    for row in rows:
        s = summaries[row.name]
        rate = row.extra.get("runs_per_s")
        lines.append(
            f"{row.name:<26} {s['n']:>5} {len(row.failures):>4} {fmt(s['p50'])} {fmt(s['p95'])} "
            f"{fmt(s['p99'])} {'' if rate is None else f'{rate:>7.2f}':>7} {row.extra['load_average']:>5.1f}"
        )
    lines.append("")
    for mode in MODES:
        mem = facts.get(mode, {}).get("memory_idle")
        if mem:
            usage = statistics.median(mem["container_usage_mib"] or [0])
            anon = statistics.median(mem["container_anon_mib"] or [0])
            lines.append(
                f"{mode}: idle container memory (cgroup usage / anonymous) median {usage} / {anon} MiB "
                f"over {mem['containers']}; server RSS {mem['server_rss_mib']} MiB, "
                f"its podman service {mem['podman_service_rss_mib']} MiB"
            )
        for program in PROGRAMS:
            ours, naive = summaries.get(f"{mode} {program}"), summaries.get(f"naive {program}")
            if ours and naive and ours["p50"] and naive["p50"]:
                lines.append(f"{mode}: {program} p50 {naive['p50'] / ours['p50']:.1f}x faster than naive")
    return "\n".join(lines)


def fmt(value: float | int | None) -> str:
    """A milliseconds figure for the table."""
    return f"{'-':>7}" if value is None else f"{value:>7.1f}"


if __name__ == "__main__":
    sys.exit(main())
