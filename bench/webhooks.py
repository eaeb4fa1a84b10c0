"""Completion webhooks against none, in one run: what they cost a run, how soon and how surely they
arrive, and whether one key's slow receiver delays another key's webhooks.

Usage::

    .venv/bin/python bench/webhooks.py [--runs N] [--load-runs N] [--clients N] [--rounds N]
                                       [--pool-size N] [--slow-runs N] [--fast-runs N] [--no-slow]
                                       [--output PATH]

It starts a loopback receiver (``Receiver``, tests/support/receivers.py) and two ``warmpod serve``
at once with the same pool size, each with a fresh SQLite store of its own: ``plain`` (no webhook
settings) and ``hooked`` (``WARMPOD_WEBHOOKS__ALLOW`` naming the receiver, one signing secret,
every other webhook setting at its default: a look at the outbox each second, or at once when a
run ends). Then, in one run:

idle    ``print(1)`` through POST /run-json/ one at a time, the servers taking turns, each run once
        both pools are full; every hooked run names a ``callback_url``, and the next run waits for
        its webhook. Run latency on both; on hooked, each webhook's delivery latency: from the
        client holding the 200 answer (the run is final) to the receiver holding the webhook, both
        ``time.time()`` in this process (negative when the webhook comes first).
load    ``--clients`` threads at once, ``--load-runs`` runs per server, the servers taking turns
        ``--rounds`` times: runs/s and run latency on both; on hooked, each webhook's delivery
        latency, the webhooks counted by ``webhook-id`` (missing, repeated, badly signed) once the
        last one arrived and a quiet while passed, and the time from the round's last answer to
        its last webhook.
slow    unless ``--no-slow``, once those two stopped: a server with keys ``a`` and ``b`` and
        ``WARMPOD_WEBHOOKS__TIMEOUT=3``. ``b``'s ``--fast-runs`` runs back to back (each as soon
        as the one before was answered) to a receiver that answers at once, alone; then again,
        interleaved with ``a``'s ``--slow-runs`` runs to a receiver that takes 2 s over each
        answer, more than a key's share of the deliverer's slots (a quarter) can keep up with:
        ``b``'s delivery latency both ways, and ``a``'s.

It prints the tables and writes every sample to a JSON file. It is a measurement, not a test:
nothing is asserted; failed runs and missing webhooks are counted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from common import (
    PROGRAM,
    ROOT,
    Series,
    Server,
    fmt,
    free_port,
    repeat,
    run_once,
    section,
    setup,
    wait_pool_full,
)
from receiving import Hook, SlowReceiver

sys.path.insert(0, str(ROOT / "tests"))
from support.receivers import Receiver
from support.webhooks import webhook_counts

from warmpod.client.webhooks import new_secret

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "webhooks.json"
IDLE_PAUSE = 0.1
"""Seconds between pools found full and the next idle run."""
QUIET = 2.0
"""Seconds to wait once every webhook arrived, so that a repeat still on its way is counted."""
SLOW_ANSWER = 2.0
"""Seconds the slow receiver takes over each answer."""
SLOW_TRY_TIMEOUT = 3.0
"""``WARMPOD_WEBHOOKS__TIMEOUT`` of the slow case: long enough for the slow receiver's answer."""


def dump(series: Series) -> dict[str, Any]:
    """A series as the JSON file keeps it: its samples and their summary."""
    return asdict(series) | {"summary": series.summary()}


def server(name: str, args: argparse.Namespace, extra_env: dict[str, str]) -> Server:
    """A ``warmpod serve`` whose log and store sit beside the output, the store of an earlier run removed."""
    log = args.output.with_suffix(f".{name}.log")
    for leftover in log.parent.glob(f"{log.with_suffix('.sqlite3').name}*"):
        leftover.unlink()
    return Server(args.pool_size, free_port(), log, extra_env)


def body(hook: Hook | None) -> dict[str, Any]:
    """The trivial program's request, naming ``hook``'s URL as its callback if there is one."""
    return {"code": PROGRAM} if hook is None else {"code": PROGRAM, "callback_url": hook.url}


def idle_run(
    clients: dict[str, httpx.Client], name: str, series: Series, hook: Hook | None, answered: dict[str, float]
) -> None:
    """Once every pool is full, one run by ``clients[name]``; with ``hook``, its answer's time into
    ``answered``, then a wait for its webhook."""
    for client in clients.values():
        wait_pool_full(client)
    time.sleep(IDLE_PAUSE)
    result = run_once(clients[name], series, body(hook))
    if result is not None and hook is not None:
        answered[result["id"]] = time.time()
        hook.wait([result["id"]])


def idle(
    clients: dict[str, httpx.Client], hook: Hook, count: int, answered: dict[str, float]
) -> dict[str, Series]:
    """``count`` idle runs per server, the servers taking turns; only ``hooked``'s name ``hook``."""
    series = {name: Series(name, "idle print(1), one at a time") for name in clients}

    def turn() -> None:
        for name in clients:
            idle_run(clients, name, series[name], hook if name == "hooked" else None, answered)

    repeat(count, "idle", turn)
    return series


def concurrent(
    client: httpx.Client, count: int, threads: int, hook: Hook | None
) -> tuple[Series, dict[str, float], float]:
    """``count`` runs by ``threads`` clients at once: their series, each run's answer time by id,
    and the seconds until the last one ended."""
    series = Series("load", "print(1), clients at once")
    answered: dict[str, float] = {}
    left = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            result = run_once(client, series, body(hook))
            if result is not None:
                answered[result["id"]] = time.time()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    started = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return series, answered, time.perf_counter() - started


def load(args: argparse.Namespace, clients: dict[str, httpx.Client], hook: Hook) -> dict[str, Any]:
    """The concurrent load on each server in turn, ``args.rounds`` times, who goes first alternating."""
    per_round = max(1, args.load_runs // args.rounds)
    runs = {name: Series(name, f"print(1), {args.clients} clients at once") for name in clients}
    seconds: dict[str, list[float]] = {name: [] for name in clients}
    answered: dict[str, float] = {}
    drains: list[float | None] = []
    for round_ in range(args.rounds):
        order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
        for name in order:
            for client in clients.values():
                wait_pool_full(client, timeout=300)
            hooked = hook if name == "hooked" else None
            with section(f"load c{args.clients}, round {round_ + 1}, {name}: {per_round} runs"):
                series, answers, took = concurrent(clients[name], per_round, args.clients, hooked)
                if hooked is not None:
                    answered |= answers
                    hook.wait(answers)
                    time.sleep(QUIET)
                    drains.append(hook.deliveries(name, answers).extra["tail_ms"])
            runs[name].samples_ms.extend(series.samples_ms)
            runs[name].failures.extend(series.failures)
            seconds[name].append(round(took, 3))
    return {
        "per_round": per_round,
        "runs": {name: dump(series) | {"seconds": seconds[name]} for name, series in runs.items()},
        "delivery": dump(hook.deliveries("load", answered)),
        "last_webhook_after_last_answer_ms": drains,
        "metrics": webhook_counts(clients["hooked"].get("/metrics").text),
    }


def add_key(name: str, file: Path) -> str:
    """``warmpod keys add NAME --file FILE``: the new key's token."""
    added = subprocess.run(
        [sys.executable, "-m", "warmpod", "keys", "add", name, "--file", str(file)],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    return added.stdout.strip()


def interleaved(slow_runs: int, fast_runs: int) -> list[str]:
    """``a`` ``slow_runs`` times and ``b`` ``fast_runs`` times, ``b`` spread evenly among them."""
    total = slow_runs + fast_runs
    return ["b" if (i + 1) * fast_runs // total > i * fast_runs // total else "a" for i in range(total)]


def back_to_back(
    clients: dict[str, httpx.Client], hooks: dict[str, Hook], order: Sequence[str], series: Series
) -> dict[str, dict[str, float]]:
    """A run of each key of ``order`` in turn, each as soon as the one before was answered; then a
    wait for their webhooks. Each key's runs' answer times by id."""
    answered: dict[str, dict[str, float]] = {key: {} for key in hooks}
    steps = iter(order)

    def step() -> None:
        key = next(steps)
        result = run_once(clients[key], series, body(hooks[key]))
        if result is not None:
            answered[key][result["id"]] = time.time()

    repeat(len(order), "runs", step)
    for key, hook in hooks.items():
        hook.wait(answered[key])
    time.sleep(QUIET)
    return answered


def slow(args: argparse.Namespace) -> dict[str, Any]:
    """Key b's delivery latency alone, then beside key a's runs whose receiver answers slowly."""
    keys = args.output.with_suffix(".keys")
    keys.unlink(missing_ok=True)
    tokens = {key: add_key(key, keys) for key in ("a", "b")}
    secret = new_secret()
    with SlowReceiver(SLOW_ANSWER) as slow_receiver, Receiver() as fast_receiver:
        hooks = {
            "a": Hook(slow_receiver, slow_receiver.url("/slow"), secret),
            "b": Hook(fast_receiver, fast_receiver.url("/fast"), secret),
        }
        keyed = server("keyed", args, {
            "WARMPOD_SERVER__API_KEYS_FILE": str(keys),
            "WARMPOD_WEBHOOKS__ALLOW": f"{slow_receiver.url('/')},{fast_receiver.url('/')}",
            "WARMPOD_WEBHOOKS__SECRETS": secret,
            "WARMPOD_WEBHOOKS__TIMEOUT": str(SLOW_TRY_TIMEOUT),
        })  # fmt: skip
        clients = {
            key: httpx.Client(
                base_url=keyed.base_url, timeout=300, headers={"authorization": f"Bearer {token}"}
            )
            for key, token in tokens.items()
        }
        try:
            return slow_cases(args, keyed, clients, hooks)
        finally:
            for client in clients.values():
                client.close()
            with section("stopping the keyed server"):
                keyed.stop()


def slow_cases(
    args: argparse.Namespace, keyed: Server, clients: dict[str, httpx.Client], hooks: dict[str, Hook]
) -> dict[str, Any]:
    """The two cases of :func:`slow` on a started server."""
    with section("starting the keyed server"):
        keyed.wait_healthy(clients["b"])
    runs = Series("keyed", "print(1), back to back, both keys")
    back_to_back(clients, hooks, ["b"] * args.warmup, Series("warm-up", ""))
    wait_pool_full(clients["b"])
    with section(f"slow: b alone, {args.fast_runs} runs"):
        alone = back_to_back(clients, hooks, ["b"] * args.fast_runs, runs)
    wait_pool_full(clients["b"])
    order = interleaved(args.slow_runs, args.fast_runs)
    with section(f"slow: b's {args.fast_runs} runs among a's {args.slow_runs}"):
        beside = back_to_back(clients, hooks, order, runs)
    return {
        "runs": dump(runs),
        "b alone": dump(hooks["b"].deliveries("b alone", alone["b"])),
        "b beside a": dump(hooks["b"].deliveries("b beside a", beside["b"])),
        "a": dump(hooks["a"].deliveries("a, slow receiver", beside["a"])),
        "metrics": webhook_counts(clients["b"].get("/metrics").text),
    }


def measure(
    args: argparse.Namespace,
    servers: dict[str, Server],
    clients: dict[str, httpx.Client],
    hook: Hook,
    results: dict[str, Any],
) -> None:
    """The idle and load figures of ``plain`` and ``hooked``, into ``results``."""
    with section("starting both servers"):
        for name, each in servers.items():
            results.setdefault("health", {})[name] = each.wait_healthy(clients[name])
    with section(f"warm-up: {args.warmup} runs per server"):
        idle(clients, hook, args.warmup, {})
    answered: dict[str, float] = {}
    with section(f"idle: {args.runs} runs per server, taking turns"):
        series = idle(clients, hook, args.runs, answered)
    results["idle"] = {name: dump(each) for name, each in series.items()}
    results["idle_delivery"] = dump(hook.deliveries("idle", answered))
    results["load"] = load(args, clients, hook)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100, help="idle runs per server (100)")
    parser.add_argument("--load-runs", type=int, default=200, help="runs per server under load (200)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the load (8)")
    parser.add_argument("--rounds", type=int, default=2, help="turns of the servers under load (2)")
    parser.add_argument("--pool-size", type=int, default=4, help="WARMPOD_POOL__SIZE of every server (4)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed idle runs per server first (3)")
    parser.add_argument("--slow-runs", type=int, default=30, help="key a's runs, slow receiver (30)")
    parser.add_argument("--fast-runs", type=int, default=10, help="key b's runs, each case (10)")
    parser.add_argument("--no-slow", action="store_true", help="skip the slow receiver's case")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file ({DEFAULT_OUTPUT})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    ready = setup(args.output)
    if ready is None:
        return 1
    results: dict[str, Any] = {"host": ready[2], "settings": vars(args) | {"output": ""}}
    with Receiver() as receiver:
        hook = Hook(receiver, receiver.url("/hook"), new_secret())
        hooked = {"WARMPOD_WEBHOOKS__ALLOW": receiver.url("/"), "WARMPOD_WEBHOOKS__SECRETS": hook.secret}
        servers = {"plain": server("plain", args, {}), "hooked": server("hooked", args, hooked)}
        clients = {name: httpx.Client(base_url=each.base_url, timeout=300) for name, each in servers.items()}
        try:
            measure(args, servers, clients, hook, results)
        finally:
            for client in clients.values():
                client.close()
            with section("stopping both servers"):
                results["stop"] = {name: each.stop() for name, each in servers.items()}
    if not args.no_slow:
        results["slow"] = slow(args)
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(report(results, args))
    print(f"\nfigures: {args.output}")
    return 0


def figures(row: dict[str, Any]) -> str:
    """A dumped series' count, failures, p50, p95 and max."""
    s = row["summary"]
    spread = " ".join(f"{fmt(s[key]):>8}" for key in ("p50", "p95", "max"))
    return f"{s['n']:>5} {len(row['failures']):>4} {spread}"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    """The tables: idle run latency, delivery latency, the load, the slow receiver's case."""
    idle_rows = results.get("idle", {})
    lines = [f"idle print(1), one at a time, the servers taking turns, pool size {args.pool_size} (ms)"]
    header = f"{'series':<26} {'n':>5} {'err':>4} {'p50':>8} {'p95':>8} {'max':>8}"
    lines += [header, "-" * len(header)]
    lines += [f"{name:<26} {figures(row)}" for name, row in idle_rows.items()]
    if {"plain", "hooked"} <= idle_rows.keys() and idle_rows["plain"]["summary"]["n"]:
        p50 = {name: idle_rows[name]["summary"]["p50"] or 0.0 for name in ("plain", "hooked")}
        lines.append(f"hooked - plain at p50: {p50['hooked'] - p50['plain']:+.1f} ms")
    load = results.get("load", {})
    lines += [
        "",
        f"load: {args.clients} clients at once, {args.rounds} rounds of {load.get('per_round')} runs",
    ]
    header = (
        f"{'server':<26} {'n':>5} {'err':>4} {'p50':>8} {'p95':>8} {'max':>8} {'done s':>7} {'runs/s':>7}"
    )
    lines += [header, "-" * len(header)]
    for name, row in load.get("runs", {}).items():
        done = sum(row["seconds"])
        rate = row["summary"]["n"] / done if done else 0.0
        lines.append(f"{name:<26} {figures(row)} {done:>7.1f} {rate:>7.2f}")
    lines += ["", "webhook delivery: from the run's 200 answer to the receiver holding it (ms)"]
    header = f"{'runs':<26} {'n':>5} {'miss':>4} {'p50':>8} {'p95':>8} {'max':>8} {'repeat':>6} {'badsig':>6}"
    lines += [header, "-" * len(header)]
    slow_case = results.get("slow", {})
    for name, row in (
        ("idle, one at a time", results.get("idle_delivery")),
        (f"load c{args.clients}", load.get("delivery")),
        ("key b alone", slow_case.get("b alone")),
        ("key b beside a's slow", slow_case.get("b beside a")),
        (f"key a (answers in {SLOW_ANSWER:.0f} s)", slow_case.get("a")),
    ):
        if row is not None:
            extra = row["extra"]
            lines.append(f"{name:<26} {figures(row)} {extra['repeats']:>6} {extra['badly_signed']:>6}")
    lines.append(
        "n: webhooks that arrived (a run's first); miss: runs whose webhook never came; repeat: "
        "webhooks that came again; badsig: requests whose signature did not verify"
    )
    if load:
        drains = ", ".join(
            "-" if ms is None else f"{ms:.0f}" for ms in load["last_webhook_after_last_answer_ms"]
        )
        lines.append(f"load: the last webhook came {drains} ms after the round's last answer")
        lines.append(f"hooked's /metrics, webhook tries: {load['metrics']}")
    if slow_case:
        lines.append(f"keyed server's /metrics, webhook tries: {slow_case['metrics']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
