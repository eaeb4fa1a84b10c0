"""Sustained load: ordinary and hostile programs at saturation, every run and the server checked.

Usage::

    .venv/bin/python bench/load.py [--minutes 10] [--concurrency N] [--pool-size 4] [--output PATH]

It starts ``warmpod serve`` on loopback (a pool of exactly ``--pool-size`` containers, its own
store in a temporary directory) and for ``--minutes`` keeps ``--concurrency`` clients (default
twice the pool) submitting a rotating mix: ``trivial`` (a print), ``pandas`` (a DataFrame
group-by), ``timeout`` (a busy loop past a 1 s timeout), ``flood`` (writing far past
``max_output_bytes``, on stdout or stderr) and ``memory`` (allocating past ``memory_mb``). Half
the clients wait for their results, half submit with ``wait=false`` and poll ``/status/{id}``; a
429 is retried after its ``Retry-After``. Every 2 s it samples the server's RSS, its containers
(``podman ps``) and ``/health``. Then it stops the server with SIGTERM.

It checks that every accepted run ended once, as its kind should, with a result that never
changed and that the store holds; that no answer was a 5xx; that the load saturated the pool;
that the server's memory stayed flat; that the containers stayed within the pool's maximum; and
that none were left after the stop. It prints a table, writes the figures to a JSON file, and
exits 1 naming each check that failed. It stops by itself: after ``--minutes``, or after
``--max-runs`` runs if that comes first.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from burst import FINAL
from common import ROOT, Series, Server, fmt, free_port, podman, section, setup
from run import EXPECTED, PROGRAMS, rss

from warmpod.sandbox.pool import LABEL_INSTANCE, LABEL_PID
from warmpod.settings import Settings, from_env

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "load.json"
POOL_SIZE = 4
KINDS = ("trivial", "pandas", "timeout", "flood", "memory")
MODES = ("blocking", "polling")
# The server's default largest timeout: wall time is not what these kinds test, and on this 2-core
# host, shared with other jobs, a bare container's pandas run once took over 10 s.
RUN_TIMEOUT = 60.0
SPIN_TIMEOUT = 1.0
FLOOD_CAP = 16384
BOMB_MB = 128
POLL_INTERVAL = 0.1
SAMPLE_INTERVAL = 2.0
# How often a read of a final result that was throttled (429) is asked again, after its Retry-After.
RECHECK_TRIES = 20
# A run not final this long after it was accepted never ends: it waits behind at most the pool's
# and the queue's runs, a pool's worth at a time, then takes at most RUN_TIMEOUT itself.
RUN_DEADLINE = 180.0
# The count bound: about 3x what two cores serve, so there time ends the load; it caps what a much
# faster host (or a server that answers without running anything) would put in the store.
MAX_RUNS_PER_SECOND = 30
# What "flat" allows between the medians of the second and last quarters of the RSS samples (the
# first quarter is warm-up). Measured here: the server (about 57 MiB) grew 3.5 MiB while it warmed
# up (SQLite's 2 MiB page cache filling, the worker threads' malloc arenas), then 0.5 MiB in the
# last 6 minutes of a 10-minute run. 10 MiB is far above that drift, and over the 10-minute form
# (quarter medians 300 s apart) it catches a leak of about 18 KiB a run at 1.9 runs/s: one flood's
# kept output.
MEMORY_GROWTH_MIB = 10.0
MIB = 1024 * 1024
# Podman states of a container the pool has let go of: killed or exited, waiting to be removed.
RELEASED = {"exited", "stopped", "stopping", "removing"}
RANK = {"queued": 0, "running": 1}


def request(kind: str, token: str, n: int) -> dict[str, Any]:
    """The body of run ``n``: a program of ``kind`` that prints ``token`` first."""
    head = f"print({token!r}, flush=True)\n"
    if kind == "trivial":
        return {"code": head, "timeout": RUN_TIMEOUT}
    if kind == "pandas":
        return {"code": head + PROGRAMS["pandas"], "timeout": RUN_TIMEOUT}
    if kind == "timeout":
        return {"code": head + "while True:\n    pass\n", "timeout": SPIN_TIMEOUT}
    if kind == "flood":
        code = f"import sys\nwhile True:\n    sys.{flood_stream(n)}.write('x' * 65536)\n"
        return {"code": head + code, "timeout": RUN_TIMEOUT, "max_output_bytes": FLOOD_CAP}
    code = "held = []\nwhile True:\n    held.append(bytearray(10**7))\n"
    return {"code": head + code, "timeout": RUN_TIMEOUT, "memory_mb": BOMB_MB}


def flood_stream(n: int) -> str:
    """The stream flood run ``n`` writes to: every other one stderr."""
    return ("stdout", "stderr")[n // len(KINDS) % 2]


def expected(kind: str, token: str, n: int) -> dict[str, Any]:
    """The fields a final RunResult of run ``n`` must have."""
    line = f"{token}\n"
    clean = {"stdout_truncated": False, "stderr_truncated": False, "error": None}
    if kind == "trivial":
        return {
            **clean,
            "status": "succeeded",
            "exit_code": 0,
            "stdout": line,
            "stderr": "",
            "limits_hit": [],
        }
    if kind == "pandas":
        stdout = line + EXPECTED["pandas"]
        return {
            **clean,
            "status": "succeeded",
            "exit_code": 0,
            "stdout": stdout,
            "stderr": "",
            "limits_hit": [],
        }
    if kind == "timeout":
        return {**clean, "status": "timeout", "exit_code": -9, "stdout": line, "limits_hit": ["wall_time"]}
    if kind == "flood":
        stream = flood_stream(n)
        outputs = {"stdout": line, "stderr": ""}
        outputs[stream] = (outputs[stream] + "x" * FLOOD_CAP)[:FLOOD_CAP]
        flags = {"stdout_truncated": stream == "stdout", "stderr_truncated": stream == "stderr"}
        return {**clean, **outputs, **flags, "status": "failed", "exit_code": -9, "limits_hit": ["output"]}
    return {**clean, "status": "failed", "exit_code": -9, "stdout": line, "limits_hit": ["memory"]}


def server_settings(pool_size: int = POOL_SIZE, max_queued: int | None = None) -> dict[str, str]:
    """The server's settings: a pool of exactly ``pool_size``, at most ``max_queued`` runs waiting.

    min = max, so the pool maximum is one number the checks can name; the queue holds as many runs
    as the pool by default, so that twice as many clients fill it now and then and get 429s.
    """
    return {
        "WARMPOD_POOL__MIN_SIZE": str(pool_size),
        "WARMPOD_POOL__MAX_SIZE": str(pool_size),
        "WARMPOD_QUEUE__MAX_QUEUED": str(max_queued or pool_size),
    }


@dataclass
class Run:
    """One submission and what became of it."""

    n: int
    kind: str
    mode: str
    token: str
    run_id: str = ""
    latency_ms: float | None = None
    statuses: list[str] = field(default_factory=list)
    result: dict[str, Any] | None = None
    problem: str | None = None


@dataclass
class Sample:
    """One look at the server: its RSS, its containers by Podman state, and /health."""

    at: float
    rss: int
    containers: dict[str, int] | None
    health: dict[str, Any] | None


@dataclass
class Observed:
    """Everything the load saw, before it is judged."""

    settings: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    codes: Counter[int] = field(default_factory=Counter)
    queue_full: int = 0
    server_errors: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Load:
    """``concurrency`` client threads against one server until the deadline, and a sampler."""

    def __init__(self, url: str, pid: int, instance: str, observed: Observed, run_deadline: float) -> None:
        self.url = url
        self.pid = pid
        self.instance = instance
        self.observed = observed
        self.run_deadline = run_deadline
        self.settings = from_env()
        self._lock = threading.Lock()
        self._numbers = itertools.count()
        self._stop = threading.Event()
        self.deadline = 0.0

    def send(self, http: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """One request, its status code counted; a 5xx or no answer is noted as a server error."""
        try:
            response = http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            with self._lock:
                self.observed.server_errors.append(f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        with self._lock:
            self.observed.codes[response.status_code] += 1
            if response.status_code >= 500:
                self.observed.server_errors.append(
                    f"{method} {path}: {response.status_code} {response.text[:200]}"
                )
        return response

    def client(self, index: int) -> None:
        """Submit runs of the rotating mix one after another until the deadline or the count bound."""
        mode = MODES[index % len(MODES)]
        with httpx.Client(base_url=self.url, timeout=self.run_deadline) as http:
            while time.monotonic() < self.deadline:
                n = next(self._numbers)
                if n >= self.observed.settings["max_runs"]:
                    return
                run = Run(n, KINDS[n % len(KINDS)], mode, f"load-{n:06d}")
                try:
                    accepted = self.execute(http, run)
                except (ValueError, KeyError, TypeError) as exc:
                    # An answer that is not the JSON the API promises: a failed run, not a dead client.
                    run.problem, accepted = f"{run.kind} run {run.run_id}: bad answer: {exc!r}", True
                if accepted:
                    with self._lock:
                        self.observed.runs.append(run)

    def execute(self, http: httpx.Client, run: Run) -> bool:
        """Submit ``run`` (again after each 429) and follow it to its end; False if never accepted."""
        body = {**request(run.kind, run.token, run.n), "wait": run.mode == "blocking"}
        while True:
            started = time.perf_counter()
            response = self.send(http, "POST", "/run-json/", json=body)
            if response is None or response.status_code != 429:
                break
            with self._lock:
                self.observed.queue_full += 1
            time.sleep(float(response.headers.get("retry-after", "1")))
            if time.monotonic() >= self.deadline:
                return False
        if response is None or response.status_code not in (200, 202):
            answer = "no answer" if response is None else f"{response.status_code} {response.text[:200]}"
            run.problem = f"submission answered {answer}"
            return True
        answer = response.json()
        run.run_id = answer["id"]
        result = answer if response.status_code == 200 else self.poll(http, run)
        if result is None:
            return True
        run.latency_ms = (time.perf_counter() - started) * 1000
        run.result = result
        want = expected(run.kind, run.token, run.n)
        wrong = {key: result.get(key) for key, value in want.items() if result.get(key) != value}
        if wrong:
            run.problem = f"{run.kind} run {run.run_id}: {wrong}"[:400]
        return True

    def poll(self, http: httpx.Client, run: Run) -> dict[str, Any] | None:
        """GET /status/{id} until the run is final; None (with the problem noted) if it never is."""
        deadline = time.monotonic() + self.run_deadline
        while time.monotonic() < deadline:
            response = self.send(http, "GET", f"/status/{run.run_id}")
            if response is None or response.status_code != 200:
                answer = "no answer" if response is None else f"{response.status_code} {response.text[:200]}"
                run.problem = f"status of {run.run_id} answered {answer}"
                return None
            body: dict[str, Any] = response.json()
            if not run.statuses or run.statuses[-1] != body["status"]:
                run.statuses.append(body["status"])
            if body["status"] in FINAL:
                return body
            time.sleep(POLL_INTERVAL)
        run.problem = f"run {run.run_id} never ended: still {run.statuses[-1]} after {self.run_deadline:g} s"
        return None

    def sample(self) -> None:
        """Every SAMPLE_INTERVAL until stopped: the server's RSS, its containers and /health."""
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                started = time.monotonic()
                listed = podman(
                    self.settings, "ps", "-a", "--filter", f"label={LABEL_INSTANCE}={self.instance}",
                    "--format", "json",
                )  # fmt: skip
                states = (
                    Counter(str(c["State"]) for c in json.loads(listed.stdout or "[]"))
                    if listed.returncode == 0
                    else None
                )
                response = self.send(http, "GET", "/health")
                health = response.json() if response is not None and response.status_code == 200 else None
                counts = None if states is None else dict(states)
                self.observed.samples.append(Sample(started, rss(self.pid), counts, health))
                self._stop.wait(max(0.0, SAMPLE_INTERVAL - (time.monotonic() - started)))

    def recheck(self) -> None:
        """Every final result read again once the load is over: it must not have changed."""

        def check(http: httpx.Client, run: Run) -> None:
            response = self.send(http, "GET", f"/status/{run.run_id}")
            # A throttled read (this client's rate, or its requests in flight) is asked again.
            for _ in range(RECHECK_TRIES):
                if response is None or response.status_code != 429:
                    break
                time.sleep(min(float(response.headers.get("retry-after", "1")), 5.0))
                response = self.send(http, "GET", f"/status/{run.run_id}")
            again = None if response is None or response.status_code != 200 else response.json()
            if again != run.result:
                with self._lock:
                    self.observed.changed.append(f"{run.run_id}: {run.result} then {again}"[:400])

        finished = [run for run in self.observed.runs if run.result is not None]
        with httpx.Client(base_url=self.url, timeout=30) as http, ThreadPoolExecutor(4) as threads:
            list(threads.map(lambda run: check(http, run), finished))

    def drive(self, seconds: float, concurrency: int) -> None:
        """Run the clients for ``seconds``, sampling throughout, then recheck every result."""
        sampler = threading.Thread(target=self.sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        self.deadline = started + seconds
        clients = [threading.Thread(target=self.client, args=(i,)) for i in range(concurrency)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        self.observed.seconds = time.monotonic() - started
        self._stop.set()
        sampler.join()
        self.recheck()


def drive(
    url: str,
    pid: int,
    instance: str,
    *,
    minutes: float,
    pool_size: int = POOL_SIZE,
    concurrency: int | None = None,
    max_queued: int | None = None,
    max_runs: int | None = None,
    run_deadline: float = RUN_DEADLINE,
) -> Observed:
    """Load the server at ``url`` (process ``pid``, containers labelled ``instance``) for ``minutes``.

    ``pool_size`` and ``max_queued`` must be what the server was given (``server_settings``);
    ``concurrency`` is twice the pool size unless given, enough to keep runs waiting.
    """
    seconds = minutes * 60
    concurrency = concurrency or 2 * pool_size
    settings = {
        "minutes": minutes,
        "concurrency": concurrency,
        "pool_size": pool_size,
        "max_queued": max_queued or pool_size,
        "max_runs": max_runs if max_runs is not None else int(MAX_RUNS_PER_SECOND * seconds),
        "run_deadline_s": run_deadline,
    }
    observed = Observed(settings)
    Load(url, pid, instance, observed, run_deadline).drive(seconds, concurrency)
    return observed


def instance_of(settings: Settings, pid: int) -> str:
    """The instance label of the containers server ``pid`` made."""
    listed = podman(settings, "ps", "-a", "--filter", f"label={LABEL_PID}={pid}", "--format", "json")
    instances = {c["Labels"][LABEL_INSTANCE] for c in json.loads(listed.stdout or "[]")}
    if len(instances) != 1:
        raise SystemExit(f"containers of server {pid} name instances {instances}")
    return str(instances.pop())


def stored_runs(path: Path) -> dict[str, str]:
    """Each run's status as the store holds it."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return dict(db.execute("SELECT id, status FROM runs").fetchall())


def memory(samples: Sequence[Sample]) -> dict[str, Any]:
    """The server's RSS: first, last, max, and the medians the flatness check compares."""
    values = [s.rss / MIB for s in samples if s.rss]
    if len(values) < 4:
        return {"samples": len(values)}
    quarter = len(values) // 4
    second = statistics.median(values[quarter : 2 * quarter])
    last = statistics.median(values[3 * quarter :])
    return {
        "samples": len(values),
        "first_mib": round(values[0], 1),
        "last_mib": round(values[-1], 1),
        "max_mib": round(max(values), 1),
        "second_quarter_median_mib": round(second, 1),
        "last_quarter_median_mib": round(last, 1),
        "allowed_growth_mib": MEMORY_GROWTH_MIB,
        "series_mib": [round(v, 1) for v in values],
    }


def containers(samples: Sequence[Sample], pool_size: int) -> dict[str, Any]:
    """The containers Podman listed and the pool's own counts, at their highest."""
    listed = [s.containers for s in samples if s.containers is not None]
    pools = [s.health["pool"] for s in samples if s.health is not None]
    queues = [s.health["queue"] for s in samples if s.health is not None]
    alive = [sum(n for state, n in c.items() if state not in RELEASED) for c in listed]
    return {
        "pool_max": pool_size,
        "samples": len(listed),
        "podman_failed": sum(s.containers is None for s in samples),
        "max_listed": max((sum(c.values()) for c in listed), default=0),
        "max_alive": max(alive, default=0),
        "max_released": max((sum(n for st, n in c.items() if st in RELEASED) for c in listed), default=0),
        "states_seen": sorted({state for c in listed for state in c}),
        "health_samples": len(pools),
        "max_pool_counted": max((p["ready"] + p["busy"] + p["starting"] for p in pools), default=0),
        "max_starting": max((p["starting"] for p in pools), default=0),
        "max_target": max((p["target"] for p in pools), default=0),
        "saturated_share": round(sum(q["queued"] > 0 for q in queues) / len(queues), 3) if queues else 0.0,
    }


def report(
    observed: Observed, *, stored: dict[str, str] | None = None, stop: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The figures and the verdict of every check, as plain data."""
    runs = observed.runs
    finished = [run for run in runs if run.result is not None]
    kinds: dict[str, Any] = {}
    for kind in KINDS:
        mine = [run for run in runs if run.kind == kind]
        ended = [run for run in mine if run.result is not None]
        kinds[kind] = {
            "runs": len(mine),
            "blocking": sum(run.mode == "blocking" for run in mine),
            "statuses": dict(Counter(run.result["status"] for run in ended if run.result is not None)),
            "unexpected": sum(run.problem is not None for run in mine),
            "runs_per_second": round(len(mine) / observed.seconds, 2) if observed.seconds else 0.0,
            "latency_ms": Series(kind, "", [run.latency_ms for run in ended if run.latency_ms]).summary(),
            # The program's own wall time: the rest of the latency is waiting in the queue.
            "program_ms": Series(
                kind, "", [run.result["duration_ms"] for run in ended if run.result]
            ).summary(),
        }
    ids = Counter(run.run_id for run in runs if run.run_id)
    out: dict[str, Any] = {
        "settings": observed.settings,
        "load": {
            "seconds": round(observed.seconds, 1),
            "accepted": len(ids),
            "finished": len(finished),
            "runs_per_second": round(len(finished) / observed.seconds, 2) if observed.seconds else 0.0,
            "queue_full_429": observed.queue_full,
            "http_codes": {str(code): n for code, n in sorted(observed.codes.items())},
        },
        "kinds": kinds,
        "memory": memory(observed.samples),
        "containers": containers(observed.samples, observed.settings["pool_size"]),
        "stop": stop,
        "problems": [run.problem for run in runs if run.problem][:50],
        "server_errors": observed.server_errors[:50],
        "changed": observed.changed[:50],
    }
    out["checks"] = checks(out, runs, ids, stored, observed)
    return out


def checks(
    out: dict[str, Any],
    runs: Sequence[Run],
    ids: Counter[str],
    stored: dict[str, str] | None,
    observed: Observed,
) -> list[dict[str, Any]]:
    """Each check with whether it held and the figures that say so."""
    never = [run.problem for run in runs if run.run_id and run.result is None]
    twice = sorted(run_id for run_id, n in ids.items() if n > 1)
    backwards = [
        f"{run.run_id}: {run.statuses}"
        for run in runs
        if [RANK.get(s, 2) for s in run.statuses] != sorted(RANK.get(s, 2) for s in run.statuses)
    ]
    # Answered but wrong, or refused outright (a run with an id and no result is counted above).
    unexpected = [run.problem for run in runs if run.problem and (run.result is not None or not run.run_id)]
    empty = [kind for kind, figures in out["kinds"].items() if not figures["statuses"]]
    memory, pool = out["memory"], out["containers"]
    results = [
        ("every accepted run ended", not never, f"{len(ids)} accepted, {len(never)} not final: {never[:3]}"),
        ("no run id twice", not twice, f"ids seen twice: {twice[:5]}"),
        (
            "each result final once and unchanged",
            not backwards and not observed.changed,
            f"{len(backwards)} went backwards {backwards[:3]}, {len(observed.changed)} changed later",
        ),
        (
            "each kind ended as expected",
            not unexpected and not empty,
            f"{len(unexpected)} unexpected {unexpected[:3]}; kinds with no result: {empty}",
        ),
        (
            "no 5xx and no lost answers",
            not observed.server_errors,
            f"{len(observed.server_errors)}: {observed.server_errors[:3]}",
        ),
        (
            "the load saturated the pool",
            pool["saturated_share"] >= 0.5,
            f"runs waited in {pool['saturated_share']:.0%} of /health samples (at least half wanted)",
        ),
    ]
    if "last_quarter_median_mib" in memory:
        growth = memory["last_quarter_median_mib"] - memory["second_quarter_median_mib"]
        results.append(
            (
                "server memory flat",
                growth <= MEMORY_GROWTH_MIB,
                f"median RSS {memory['second_quarter_median_mib']} -> "
                f"{memory['last_quarter_median_mib']} MiB (second to last quarter, "
                f"+{MEMORY_GROWTH_MIB:g} MiB allowed)",
            )
        )
    else:
        results.append(("server memory flat", False, f"only {memory['samples']} RSS samples"))
    results.append(
        (
            "containers within the pool maximum",
            pool["samples"] > 0
            and pool["health_samples"] > 0
            and pool["max_alive"] <= pool["pool_max"]
            and pool["max_pool_counted"] <= pool["pool_max"],
            f"most alive {pool['max_alive']} (listed {pool['max_listed']}, "
            f"{pool['max_released']} being removed), pool's own count {pool['max_pool_counted']}, "
            f"maximum {pool['pool_max']}",
        )
    )
    if stored is not None:
        accepted = {run.run_id: run.result["status"] for run in runs if run.result is not None}
        extra = sorted(set(stored) - set(ids))
        differ = sorted(run_id for run_id, status in accepted.items() if stored.get(run_id) != status)
        results.append(
            (
                "the store holds each accepted run once, final",
                not extra and not differ and all(status in FINAL for status in stored.values()),
                f"{len(stored)} stored, {len(extra)} not accepted {extra[:3]}, "
                f"{len(differ)} differ {differ[:3]}, statuses {dict(Counter(stored.values()))}",
            )
        )
    if out["stop"] is not None:
        stop = out["stop"]
        results.append(
            (
                "graceful stop, no container left",
                bool(stop.get("graceful")) and stop.get("containers_left") == 0,
                f"{stop}",
            )
        )
    return [{"name": name, "ok": ok, "detail": detail} for name, ok, detail in results]


def failures(out: dict[str, Any]) -> list[str]:
    """The checks that failed, each with its figures."""
    return [f"{check['name']}: {check['detail']}" for check in out["checks"] if not check["ok"]]


def table(out: dict[str, Any]) -> str:
    """The figures as plain text."""
    header = (
        f"{'kind':<8} {'runs':>5} {'block':>5} {'bad':>4} {'p50 ms':>8} {'p95 ms':>8} {'own p50':>8} "
        f"{'runs/s':>7}  statuses"
    )
    lines = [header, "-" * len(header)]
    for kind, k in out["kinds"].items():
        latency = k["latency_ms"]
        lines.append(
            f"{kind:<8} {k['runs']:>5} {k['blocking']:>5} {k['unexpected']:>4} {fmt(latency['p50']):>8} "
            f"{fmt(latency['p95']):>8} {fmt(k['program_ms']['p50']):>8} {k['runs_per_second']:>7}  "
            f"{k['statuses']}"
        )
    load, mem, pool = out["load"], out["memory"], out["containers"]
    lines += [
        "",
        f"load: {load['finished']} of {load['accepted']} accepted runs finished in {load['seconds']} s, "
        f"{load['runs_per_second']} runs/s; 429 (retried): {load['queue_full_429']}; "
        f"HTTP {load['http_codes']}",
        f"server RSS MiB: first {mem.get('first_mib')}, last {mem.get('last_mib')}, "
        f"max {mem.get('max_mib')}; medians {mem.get('second_quarter_median_mib')} (2nd quarter) -> "
        f"{mem.get('last_quarter_median_mib')} (last) over {mem['samples']} samples",
        f"containers: most alive {pool['max_alive']}, most listed {pool['max_listed']} "
        f"(being removed: {pool['max_released']}), pool's own count at most {pool['max_pool_counted']} "
        f"(starting {pool['max_starting']}), maximum {pool['pool_max']}; runs waited in "
        f"{pool['saturated_share']:.0%} of samples",
        f"stop: {out['stop'] or 'not part of these figures'}",
        "",
    ]
    lines += [f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}" for c in out["checks"]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    parser.add_argument(
        "--pool-size", type=int, default=POOL_SIZE, help=f"pool containers, min and max (default {POOL_SIZE})"
    )
    parser.add_argument("--concurrency", type=int, help="clients at once (default twice the pool size)")
    parser.add_argument(
        "--max-queued", type=int, help="WARMPOD_QUEUE__MAX_QUEUED (default the pool size, so 429s happen)"
    )
    parser.add_argument(
        "--max-runs", type=int, help=f"stop after this many runs (default {MAX_RUNS_PER_SECOND}/s)"
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file (default {DEFAULT_OUTPUT})"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the load; return 1 if any check failed."""
    args = parse_args(argv)
    ready = setup(args.output)
    if ready is None:
        return 1
    settings, _ref, facts = ready
    with tempfile.TemporaryDirectory(prefix="warmpod-load-") as tmp:
        store = Path(tmp) / "runs.sqlite3"
        extra = {**server_settings(args.pool_size, args.max_queued), "WARMPOD_QUEUE__STORE_PATH": str(store)}
        server = Server(args.pool_size, free_port(), args.output.with_suffix(".server.log"), extra)
        try:
            with (
                httpx.Client(base_url=server.base_url, timeout=60) as client,
                section(f"starting warmpod serve (pool of {args.pool_size}) on {server.base_url}"),
            ):
                server.wait_healthy(client)
            instance = instance_of(settings, server.proc.pid)
            with section(f"{args.minutes:g} min of load"):
                observed = drive(
                    server.base_url,
                    server.proc.pid,
                    instance,
                    minutes=args.minutes,
                    pool_size=args.pool_size,
                    concurrency=args.concurrency,
                    max_queued=args.max_queued,
                    max_runs=args.max_runs,
                )
        finally:
            with section("stopping warmpod (SIGTERM)"):
                stop = server.stop()
        left = podman(settings, "ps", "-a", "-q", "--filter", f"label={LABEL_INSTANCE}={instance}")
        stop["containers_left"] = len(left.stdout.split())
        out = report(observed, stored=stored_runs(store), stop=stop)
    facts["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.output.write_text(json.dumps({"host": facts, **out}, indent=2) + "\n")
    print()
    print(table(out))
    print(f"figures: {args.output}")
    failed = failures(out)
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
