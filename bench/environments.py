"""Environments side by side: a server with ``default`` and a ``bare`` one against today's single one.

Usage::

    .venv/bin/python bench/environments.py [--runs N] [--load-runs N] [--clients N] [--rounds N]
                                           [--pool-size N] [--output PATH]

It writes an environments file declaring ``default`` (today's libraries and numpy/pandas preload)
and ``bare`` (an empty requirements.in: the interpreter alone, no preload), builds ``bare``'s image
offline (pip's wheel from warmpod's cache in a local find-links directory), and starts two
``warmpod serve`` at once with the same pool size: ``single`` (no environments file) and ``two``
(the file). Then, in one run:

idle     ``print(1)`` through POST /run-json/ one at a time, taking turns: single's default, two's
         default, two's bare; each once every pool of both servers is at its ready target, then a
         short pause: the latency a caller sees from an idle service.
mixed    ``--clients`` threads at once, half sending a pandas program to ``default`` and half
         ``print(1)`` (to ``bare`` on two, to ``default`` on single), ``--load-runs`` runs of each
         kind; the servers take turns ``--rounds`` times. Per kind: runs/s (its runs over the time
         its last one finished), p50/p95/max, errors and whether it starved.
memory   each idle warm container's memory cgroup (usage and anonymous), the environment known by
         its image, after start-up and warm-up.

All times are wall-clock on the client's side. It prints the tables and writes every sample to a
JSON file. It is a measurement, not a test: nothing is asserted; failed runs are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from common import (
    ROOT,
    Series,
    Server,
    add_pip_wheel,
    cgroup_memory,
    fmt,
    free_port,
    index_settings,
    podman,
    run_once,
    section,
    setup,
)

from warmpod.sandbox.pool import LABEL_PID
from warmpod.settings import Settings

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "environments.json"
TRIVIAL = ("print(1)", "1\n")
PANDAS = ("import pandas as pd; print(pd.DataFrame({'a': [1, 2]}).sum().iloc[0])", "3\n")
IDLE_PAUSE = 0.1
"""Seconds between a pool found full and the next idle run."""
STARVED_AFTER_MS = 30_000.0
"""A run waiting longer than this (the pool's acquire timeout) counts its kind as starved."""
MIB = 1024 * 1024


@dataclass
class Target:
    """Where one series' runs go: a server and the environment its runs name (None: none)."""

    server: str
    client: httpx.Client
    environment: str | None


def declare(directory: Path) -> dict[str, str] | None:
    """Write the environments file of ``default`` and ``bare`` and build their images offline.

    Returns the settings a server needs for them (the file and the offline index); None, with a
    message, when no pip wheel is cached or the build failed.
    """
    links = directory / "links"
    links.mkdir(parents=True, exist_ok=True)
    if not add_pip_wheel(links):
        return None
    (directory / "bare.in").write_text("")
    file = directory / "environments.toml"
    file.write_text('[default]\n\n[bare]\nrequirements = "bare.in"\n')
    settings = {"WARMPOD_ENVIRONMENTS__FILE": str(file), **index_settings(links)}
    built = warmpod_cli(settings, "image", "build")
    if built.returncode != 0:
        print(f"warmpod image build failed:\n{built.stderr[-3000:]}", file=sys.stderr)
        return None
    return settings


def warmpod_cli(settings: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The ``warmpod`` command with extra settings; its output, unchecked."""
    env = {**os.environ, **settings}
    return subprocess.run(
        [sys.executable, "-m", "warmpod", *args], env=env, capture_output=True, text=True, timeout=900
    )


def image_refs(settings: dict[str, str]) -> dict[str, str]:
    """Each environment's name by its runner image reference."""
    listed = warmpod_cli(settings, "image", "ref").stdout
    return {ref: name for name, ref in (line.split() for line in listed.splitlines())}


def post(target: Target, program: tuple[str, str], series: Series) -> None:
    """One POST /run-json/ of ``program`` (code, expected stdout) in ``target``'s environment, timed."""
    code, expected = program
    body: dict[str, Any] = {"code": code}
    if target.environment is not None:
        body["environment"] = target.environment
    run_once(target.client, series, body, expected)


def pool_full(client: httpx.Client) -> bool:
    """Whether the pool and each of its environments hold their ready target, none starting."""
    pool = client.get("/health").json().get("pool") or {}
    if not pool.get("target") or pool.get("ready", 0) < pool["target"] or pool.get("starting", 0):
        return False
    return all(kind["ready"] >= kind["target"] for kind in (pool.get("environments") or {}).values())


def wait_all_full(clients: Sequence[httpx.Client], timeout: float = 120.0) -> None:
    """Block until every server's pool is full (``pool_full``)."""
    deadline = time.monotonic() + timeout
    while not all(pool_full(client) for client in clients):
        if time.monotonic() > deadline:
            raise SystemExit(f"a pool did not refill within {timeout:.0f} s")
        time.sleep(0.02)


def idle(targets: dict[str, Target], runs: int) -> dict[str, Series]:
    """``runs`` idle ``print(1)`` runs per target, the targets taking turns run by run."""
    clients = list({id(t.client): t.client for t in targets.values()}.values())
    series = {name: Series(name, f"idle print(1) on {t.server}") for name, t in targets.items()}
    for done in range(1, runs + 1):
        for name, target in targets.items():
            wait_all_full(clients)
            time.sleep(IDLE_PAUSE)
            post(target, TRIVIAL, series[name])
        if done == runs or done % 10 == 0:
            print(f"\r  idle: {done}/{runs}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return series


def mixed(
    kinds: dict[str, tuple[Target, tuple[str, str]]], per_kind: int, clients: int
) -> dict[str, dict[str, Any]]:
    """``clients`` threads at once, split evenly between the kinds, ``per_kind`` runs of each kind.

    Returns, per kind, its series and the seconds from the start to its last run's end.
    """
    started = time.perf_counter()
    lock = threading.Lock()
    out: dict[str, dict[str, Any]] = {name: {"series": Series(name, ""), "finished_s": 0.0} for name in kinds}
    threads: list[threading.Thread] = []
    share = clients // len(kinds)
    for name, (target, program) in kinds.items():
        for index in range(share):
            count = per_kind // share + (1 if index < per_kind % share else 0)

            def worker(name: str = name, target: Target = target, program: tuple[str, str] = program,
                       count: int = count) -> None:  # fmt: skip
                mine = Series(name, "")
                for _ in range(count):
                    post(target, program, mine)
                with lock:
                    record = out[name]
                    record["series"].samples_ms.extend(mine.samples_ms)
                    record["series"].failures.extend(mine.failures)
                    record["finished_s"] = max(record["finished_s"], time.perf_counter() - started)

            threads.append(threading.Thread(target=worker))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def memory_by_environment(server: Server, settings: Settings, refs: dict[str, str]) -> dict[str, Any]:
    """Each live container's cgroup memory (usage, anonymous) in MiB, grouped by its environment."""
    listed = podman(
        settings,
        "ps", "-a", "--no-trunc", "--filter", f"label={LABEL_PID}={server.proc.pid}",
        "--format", "{{.ID}} {{.Image}} {{.State}}",
    ).stdout  # fmt: skip
    found: dict[str, Any] = {}
    for line in listed.splitlines():
        container, ref, state = line.split(maxsplit=2)
        usage = cgroup_memory(container, settings)
        if not usage:
            continue
        kind = found.setdefault(refs.get(ref, ref), {"usage_mib": [], "anon_mib": [], "states": []})
        kind["usage_mib"].append(round(usage["usage"] / MIB, 1))
        kind["anon_mib"].append(round(usage["anon"] / MIB, 1))
        kind["states"].append(state.split()[0].lower())
    return found


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100, help="idle runs per series (100)")
    parser.add_argument("--load-runs", type=int, default=100, help="mixed-load runs per kind (100)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the mixed load (8)")
    parser.add_argument("--rounds", type=int, default=2, help="turns of the servers under load (2)")
    parser.add_argument("--pool-size", type=int, default=4, help="WARMPOD_POOL__SIZE of both servers (4)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per idle series first (3)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file ({DEFAULT_OUTPUT})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    ready = setup(args.output)
    if ready is None:
        return 1
    settings, _, facts = ready
    directory = args.output.with_name(f"{args.output.stem}.files")
    with section(f"building the bare environment's image offline in {directory}"):
        declared = declare(directory)
    if declared is None:
        return 1
    refs = image_refs(declared)
    offline = {key: value for key, value in declared.items() if key != "WARMPOD_ENVIRONMENTS__FILE"}
    servers = {
        "single": Server(args.pool_size, free_port(), args.output.with_suffix(".single.log"), offline),
        "two": Server(args.pool_size, free_port(), args.output.with_suffix(".two.log"), declared),
    }
    results: dict[str, Any] = {"host": facts, "images": refs, "settings": vars(args) | {"output": ""}}
    clients = {name: httpx.Client(base_url=s.base_url, timeout=300) for name, s in servers.items()}
    try:
        measure(args, settings, refs, servers, clients, results)
    finally:
        for client in clients.values():
            client.close()
        with section("stopping both servers"):
            results["stop"] = {name: server.stop() for name, server in servers.items()}
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(report(results, args))
    print(f"\nfigures: {args.output}")
    return 0


def measure(
    args: argparse.Namespace,
    settings: Settings,
    refs: dict[str, str],
    servers: dict[str, Server],
    clients: dict[str, httpx.Client],
    results: dict[str, Any],
) -> None:
    """Every figure, into ``results``."""
    with section("starting both servers"):
        for name, server in servers.items():
            results.setdefault("health", {})[name] = server.wait_healthy(clients[name])
        wait_all_full(list(clients.values()))
    targets = {
        "single default": Target("single", clients["single"], None),
        "two default": Target("two", clients["two"], "default"),
        "two bare": Target("two", clients["two"], "bare"),
    }
    with section(f"warm-up: {args.warmup} runs per series"):
        idle(targets, args.warmup)
    time.sleep(2)  # the pools settle: their paused containers are what an idle service holds
    results["memory"] = {name: memory_by_environment(s, settings, refs) for name, s in servers.items()}
    with section(f"idle: {args.runs} runs per series, taking turns"):
        results["idle"] = {
            name: asdict(s) | {"summary": s.summary()} for name, s in idle(targets, args.runs).items()
        }
    results["mixed"] = load(args, targets, clients)


def load(
    args: argparse.Namespace, targets: dict[str, Target], clients: dict[str, httpx.Client]
) -> dict[str, Any]:
    """The mixed load on each server in turn, ``args.rounds`` times; per kind, every round's figures."""
    loads = {
        "single": {
            "pandas": (targets["single default"], PANDAS),
            "trivial": (targets["single default"], TRIVIAL),
        },
        "two": {"pandas": (targets["two default"], PANDAS), "trivial": (targets["two bare"], TRIVIAL)},
    }
    totals: dict[str, dict[str, Any]] = {}
    per_round = max(1, args.load_runs // args.rounds)
    for round_ in range(args.rounds):
        for server, kinds in loads.items():
            wait_all_full(list(clients.values()), timeout=300)
            with section(f"mixed c{args.clients}, round {round_ + 1}, {server}: {per_round} runs per kind"):
                records = mixed(kinds, per_round, args.clients)
            pool = clients[server].get("/health").json().get("pool")
            both = {
                "series": Series("both", ""),
                "finished_s": max(r["finished_s"] for r in records.values()),
            }
            for record in records.values():
                both["series"].samples_ms.extend(record["series"].samples_ms)
                both["series"].failures.extend(record["series"].failures)
            for kind, record in {**records, "both": both}.items():
                total = totals.setdefault(
                    f"{server} {kind}", {"series": Series(f"{server} {kind}", ""), "requested": 0}
                )
                total["series"].samples_ms.extend(record["series"].samples_ms)
                total["series"].failures.extend(record["series"].failures)
                total.setdefault("finished_s", []).append(round(record["finished_s"], 3))
                total.setdefault("pool_after", []).append(pool)
                total["requested"] += per_round * (len(kinds) if kind == "both" else 1)
    return {
        name: {
            **asdict(t["series"]),
            "summary": t["series"].summary(),
            **{k: v for k, v in t.items() if k != "series"},
        }
        for name, t in totals.items()
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The three tables: idle latency, the mixed load per kind, idle memory per environment."""
    lines = [f"idle print(1), one at a time, pool size {args.pool_size} (ms)"]
    header = f"{'series':<16} {'n':>5} {'err':>4} {'p50':>7} {'p95':>7} {'max':>7}"
    lines += [header, "-" * len(header)]
    for name, row in results.get("idle", {}).items():
        s = row["summary"]
        figures = " ".join(f"{fmt(s[key]):>7}" for key in ("p50", "p95", "max"))
        lines.append(f"{name:<16} {s['n']:>5} {len(row['failures']):>4} {figures}")
    lines += ["", f"mixed load, {args.clients} clients (half each kind), {args.rounds} rounds (ms)"]
    header = (
        f"{'server kind':<16} {'asked':>5} {'ok':>5} {'err':>4} {'done s':>7} {'runs/s':>7} "
        f"{'p50':>7} {'p95':>7} {'max':>8}  starved"
    )
    lines += [header, "-" * len(header)]
    for name, row in results.get("mixed", {}).items():
        s = row["summary"]
        done = sum(row["finished_s"])
        rate = s["n"] / done if done else 0.0
        starved = s["n"] < row["requested"] or (s["max"] or 0) > STARVED_AFTER_MS
        lines.append(
            f"{name:<16} {row['requested']:>5} {s['n']:>5} {len(row['failures']):>4} {done:>7.1f} "
            f"{rate:>7.2f} {fmt(s['p50']):>7} {fmt(s['p95']):>7} {fmt(s['max']):>8}  "
            f"{'YES' if starved else 'no'}"
        )
    lines.append(
        "done s: when the kind's last run ended, rounds summed; runs/s: its runs over that; starved: "
        f"fewer runs ended well than asked, or one took over {STARVED_AFTER_MS / 1000:.0f} s"
    )
    lines += ["", "idle warm containers' memory cgroup, median usage / anonymous (MiB)"]
    for server, kinds in results.get("memory", {}).items():
        for environment, mem in kinds.items():
            paused = sum(state == "paused" for state in mem["states"])
            lines.append(
                f"{server + ' ' + environment:<16} {statistics.median(mem['usage_mib']):>7.1f} / "
                f"{statistics.median(mem['anon_mib']):>6.1f}  over {len(mem['usage_mib'])} ({paused} paused)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
