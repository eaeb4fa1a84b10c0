"""Can one tenant hurt the service? Three abuse patterns, each measured beside the service at idle.

Usage::

    .venv/bin/python bench/abuse.py [--quick] [--patterns A,B,C] [--victim-runs N]
                                    [--chatty-seconds S] [--readers K] [--stalled M]
                                    [--flood N] [--flood-seconds S] [--postgres URL|local]
                                    [--output PATH]

It starts one ``warmpod serve`` on loopback with a keys file of two keys, ``abuser`` and
``victim``, and its own store (SQLite, or PostgreSQL with ``--postgres``). Then, phase by phase
on that one server, the abuser does one thing while the victim makes ``--victim-runs`` trivial
``print(1)`` runs one after the other:

idle        no abuse: the abuser prints as many bytes as the chatty program keeps, in one write.
A write     "chatty store": the abuser's program writes one byte per ``os.write`` (a 1 ms sleep
            every 16 bytes) for ``--chatty-seconds``.
A replay    ``--readers`` connections at once ask for that finished run's
            ``GET /status/{id}/stream`` (Server-Sent Events) and never read the answer.
C flood     ``--flood`` client threads of the abuser poll ``GET /status/{id}`` back to back for
            ``--flood-seconds``, one request in four a ``wait=false`` submit of ``pass`` (at most
            ``--flood-submits``; those still queued at the end are cancelled).
B files     the abuser's run leaves 16 files of 1 MB in ``out/``; then ``--stalled`` connections
            ask for its ``GET /status/{id}`` (every file inline) and never read the answer.

B comes last: the memory it takes is not all given back to the system, and would inflate the
peaks of any phase after it. Each phase holds its abuse on for ``--hold`` seconds at least.

Per phase it reports the server process's peak resident memory (VmRSS of ``warmpod serve``
itself, not its Podman service, sampled every 20 ms) and how much it grew during the phase; the
store's growth (the SQLite database as read through its write-ahead log, or the PostgreSQL
database) per byte of output the abuser's runs kept (stdout, or the files of B); the victim's
latency, p50 and p95; and the server's WARNING and ERROR log lines (a lease it could not renew,
a run it lost). The abuser's requests are counted as answered, refused (429 or 503: a server
that limits a key says so) or failed. It prints one table and writes the figures to a JSON
file. A measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from common import ROOT, Series, Server, fmt, free_port, repeat, run_once, section, setup, wait_pool_full

# The hostile programs, the slow clients and the memory sampler are shared with the tests.
sys.path.insert(0, str(ROOT / "tests"))
from support.hostile import chatty_program, file_heavy_program
from support.live import PeakResident, stalled_requests, stored_bytes

from warmpod import keys

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "abuse.json"
MIB = 1024 * 1024
REFUSED = {429, 503}
CALM = "import sys; sys.stdout.write('x' * {size})\n"
CALM_SIZE = 64 * 1024
QUICK = {
    "victim_runs": 6,
    "chatty_seconds": 4.0,
    "readers": 20,
    "stalled": 40,
    "flood": 16,
    "flood_seconds": 5.0,
    "flood_submits": 40,
    "hold": 3.0,
}


@dataclass
class Outcome:
    """What the abuser did in one phase: its output kept and how its requests were answered."""

    kept_bytes: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def count(self, status: int | None) -> None:
        """Count one answer (None: no answer, a transport error)."""
        if status is not None and status < 400:
            self.add("answered")
        elif status in REFUSED:
            self.add("refused")
        else:
            self.add("failed")

    def add(self, kind: str, count: int = 1) -> None:
        """Count ``count`` requests of one kind."""
        self.requests[kind] = self.requests.get(kind, 0) + count


@dataclass
class Phase:
    """One phase's figures."""

    name: str
    rss_start_mib: float
    rss_peak_mib: float
    store_growth_bytes: int
    victim: Series
    abuser: Outcome
    warnings: list[str]
    """The server's WARNING and ERROR log lines written during the phase."""

    def store_per_byte(self) -> float | None:
        """Bytes the store grew per byte of output the abuser's runs kept."""
        if not self.abuser.kept_bytes:
            return None
        return self.store_growth_bytes / self.abuser.kept_bytes


def sqlite_bytes(path: Path) -> Callable[[], int]:
    """The SQLite store's size as SQLite sees it through its write-ahead log (pages in use and
    free): the log's own preallocated growth says nothing of what a run costs."""
    return lambda: stored_bytes(path) if path.exists() else 0


def postgres_bytes(url: str) -> Callable[[], int]:
    """The PostgreSQL store's database size (its tables and indexes; the server's WAL is shared)."""

    def size() -> int:
        with psycopg.connect(url) as db:
            row = db.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0

    return size


def submit(client: httpx.Client, outcome: Outcome, code: str, timeout: float) -> dict[str, Any] | None:
    """POST ``code`` to /run-json/ and wait for its RunResult (None if it was refused or failed)."""
    try:
        response = client.post("/run-json/", json={"code": code, "timeout": timeout})
    except httpx.HTTPError:
        outcome.count(None)
        return None
    outcome.count(response.status_code)
    if response.status_code != 200:
        outcome.extra.setdefault("answers", []).append(f"{response.status_code} {response.text[:200]}")
        return None
    result: dict[str, Any] = response.json()
    return result


def held(seconds: float) -> Callable[[], None]:
    """A function that sleeps until ``seconds`` have passed since this call."""
    until = time.monotonic() + seconds

    def wait() -> None:
        time.sleep(max(0.0, until - time.monotonic()))

    return wait


def release(sockets: Sequence[socket.socket], outcome: Outcome) -> None:
    """Count how far each stalled connection got (the status line, if any came), then close it."""
    outcome.add("opened", len(sockets))
    for sock in sockets:
        sock.setblocking(False)
        try:
            head = sock.recv(16)
        except (BlockingIOError, OSError):
            head = b""
        sock.close()
        parts = head.split()
        if len(parts) >= 2 and parts[1].isdigit():
            outcome.count(int(parts[1]))
        else:
            outcome.add("no answer yet")


@contextmanager
def calm(abuser: httpx.Client, outcome: Outcome) -> Iterator[None]:
    """idle: the abuser's one well-behaved run prints ``CALM_SIZE`` bytes in one write."""
    result = submit(abuser, outcome, CALM.format(size=CALM_SIZE), 10)
    if result is not None:
        outcome.kept_bytes += len(result["stdout"].encode())
    yield


@contextmanager
def chatty(abuser: httpx.Client, outcome: Outcome, seconds: float, hold: float) -> Iterator[None]:
    """A write: the chatty program runs while the victim does; its run's id goes to ``outcome``."""
    done: list[dict[str, Any] | None] = []
    code = chatty_program(seconds)
    worker = threading.Thread(target=lambda: done.append(submit(abuser, outcome, code, seconds + 20)))
    wait = held(hold)
    worker.start()
    try:
        yield
    finally:
        wait()
        worker.join()
    result = done[0] if done else None
    if result is not None:
        outcome.kept_bytes = len(result["stdout"].encode())
        outcome.extra.update(run_id=result["id"], status=result["status"], writes=len(result["stdout"]))


@contextmanager
def stalled(url: str, key: str, path: str, count: int, outcome: Outcome, hold: float) -> Iterator[None]:
    """A replay and B: ``count`` connections ask for ``path`` and do not read, for ``hold`` s at least."""
    wait = held(hold)
    sockets = stalled_requests(url, path, {"Authorization": f"Bearer {key}"}, count)
    try:
        yield
    finally:
        wait()
        release(sockets, outcome)


@contextmanager
def files_then_stalled(
    abuser: httpx.Client, url: str, key: str, count: int, outcome: Outcome, hold: float
) -> Iterator[None]:
    """B: the abuser's run leaves its files, then ``count`` stalled connections ask for its result."""
    result = submit(abuser, outcome, file_heavy_program(), 30)
    if result is None:
        print(f"B's stalled readers skipped: the file-heavy run was not answered {outcome}", file=sys.stderr)
        yield
        return
    outcome.kept_bytes = sum(entry["size"] for entry in result["files"])
    outcome.extra.update(run_id=result["id"], files=len(result["files"]))
    with stalled(url, key, f"/status/{result['id']}", count, outcome, hold):
        yield


@contextmanager
def flood(
    abuser: httpx.Client, run_id: str, threads: int, seconds: float, max_submits: int, outcome: Outcome
) -> Iterator[None]:
    """C: ``threads`` loops of the abuser's requests, for ``seconds`` at least (and while the victim runs)."""
    stop = threading.Event()
    lock = threading.Lock()
    budget = threading.Semaphore(max_submits)
    submitted: list[str] = []

    def one(turn: int) -> int | None:
        if turn % 4 != 3 or not budget.acquire(blocking=False):
            return abuser.get(f"/status/{run_id}").status_code
        response = abuser.post("/run-json/", json={"code": "pass", "wait": False})
        if response.status_code == 202:
            with lock:
                submitted.append(response.json()["id"])
        return response.status_code

    def loop() -> None:
        turn = 0
        while not stop.is_set():
            try:
                status: int | None = one(turn)
            except httpx.HTTPError:
                status = None
            with lock:
                outcome.count(status)
            turn += 1

    wait = held(seconds)
    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        wait()
        stop.set()
        for worker in workers:
            worker.join()
        outcome.extra["submitted"] = len(submitted)
        # What is still queued would slow the next phase down.
        outcome.extra["cancelled"] = sum(cancel(abuser, run) for run in submitted)


def cancel(client: httpx.Client, run_id: str) -> bool:
    """DELETE one run; whether it was still there to cancel."""
    try:
        return client.delete(f"/status/{run_id}").status_code == 200
    except httpx.HTTPError:
        return False


def measure(
    name: str,
    server: Server,
    store_size: Callable[[], int],
    victim: httpx.Client,
    runs: int,
    abuse: Callable[[Outcome], AbstractContextManager[None]],
) -> Phase:
    """The victim's ``runs`` trivial runs while ``abuse`` is on, with the server's memory and store."""
    wait_pool_full(victim)
    outcome = Outcome()
    series = Series(name, "victim's print(1), one after the other")
    before = store_size()
    logged = server.log_path.stat().st_size
    with section(f"{name}: {runs} victim runs"), PeakResident(server.proc.pid) as memory, abuse(outcome):
        repeat(runs, name, lambda: run_once(victim, series))
    growth = store_size() - before
    with server.log_path.open("rb") as log:
        log.seek(logged)
        lines = log.read().decode(errors="replace").splitlines()
    warnings = [line for line in lines if line.startswith(("WARNING", "ERROR", "CRITICAL"))]
    return Phase(
        name, round(memory.start / MIB, 1), round(memory.peak / MIB, 1), growth, series, outcome, warnings
    )


COLUMNS = (
    ("phase", "<9"),
    ("RSS peak MiB", ">12"),
    ("RSS + MiB", ">9"),
    ("store + KiB", ">11"),
    ("kept KiB", ">9"),
    ("store/kept", ">10"),
    ("victim ok/fail", ">14"),
    ("p50 ms", ">8"),
    ("p95 ms", ">8"),
    ("warnings", ">8"),
    ("abuser's requests", ""),
)


def row(phase: Phase) -> list[str]:
    """One phase's cells, in the order of COLUMNS."""
    summary = phase.victim.summary()
    growth = phase.store_growth_bytes
    per_byte = phase.store_per_byte()
    return [
        phase.name,
        f"{phase.rss_peak_mib:.1f}",
        f"{phase.rss_peak_mib - phase.rss_start_mib:+.1f}",
        f"{growth / 1024:.0f}",
        f"{phase.abuser.kept_bytes / 1024:.1f}",
        "-" if per_byte is None else f"{per_byte:.1f}",
        f"{summary['n']}/{len(phase.victim.failures)}",
        fmt(summary["p50"]),
        fmt(summary["p95"]),
        str(len(phase.warnings)),
        " ".join(f"{name} {count}" for name, count in phase.abuser.requests.items()),
    ]


def table(phases: Sequence[Phase]) -> str:
    """The phases as a plain-text table."""
    lines = [[title for title, _ in COLUMNS], *(row(phase) for phase in phases)]
    text = [
        " ".join(f"{cell:{align}}" for cell, (_, align) in zip(line, COLUMNS, strict=True)) for line in lines
    ]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def write_keys(path: Path) -> dict[str, str]:
    """A keys file with the abuser's and the victim's keys, neither with a quota of its own."""
    return {name: keys.add(path, name) for name in ("abuser", "victim")}


@contextmanager
def store_url(option: str | None) -> Iterator[str | None]:
    """The PostgreSQL store's URL: as given, a throwaway local server's for ``local``, or None."""
    if option != "local":
        yield option
        return
    # The throwaway PostgreSQL server lives with the tests that use it too.
    sys.path.insert(0, str(ROOT / "tests"))
    from support import postgres

    with postgres.running(durable=True) as server:
        yield server.create_database("abuse")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``--quick`` replaces the defaults of the sizes it names."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=f"smaller, under 90 s: {QUICK}")
    parser.add_argument("--patterns", default="A,B,C", help="which of A, B, C to run (default A,B,C)")
    parser.add_argument("--pool-size", type=int, default=4, help="WARMPOD_POOL__SIZE (default 4)")
    parser.add_argument("--victim-runs", type=int, default=10, help="victim runs per phase (default 10)")
    parser.add_argument("--chatty-seconds", type=float, default=10.0, help="A's write time (default 10)")
    parser.add_argument("--readers", type=int, default=50, help="A's stalled SSE readers (default 50)")
    parser.add_argument("--stalled", type=int, default=150, help="B's stalled connections (default 150)")
    parser.add_argument("--flood", type=int, default=32, help="C's client threads (default 32)")
    parser.add_argument("--flood-seconds", type=float, default=10.0, help="C's length (default 10)")
    parser.add_argument("--flood-submits", type=int, default=100, help="C's submits at most (default 100)")
    parser.add_argument("--hold", type=float, default=5.0, help="least seconds of each abuse (default 5)")
    parser.add_argument("--postgres", metavar="URL|local", help="a PostgreSQL store instead of SQLite")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"JSON file (default {DEFAULT_OUTPUT})"
    )
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit status."""
    args = parse_args(argv)
    patterns = {part.strip().upper() for part in args.patterns.split(",")}
    ready = setup(args.output)
    if ready is None:
        return 1
    _, _, facts = ready
    phases: list[Phase] = []
    with tempfile.TemporaryDirectory(prefix="warmpod-abuse-") as tmp, ExitStack() as stack:
        directory = Path(tmp)
        secrets = write_keys(directory / "keys")
        postgres = stack.enter_context(store_url(args.postgres))
        store = directory / "runs.sqlite3"
        store_size = postgres_bytes(postgres) if postgres else sqlite_bytes(store)
        env = {
            "WARMPOD_SERVER__API_KEYS_FILE": str(directory / "keys"),
            "WARMPOD_QUEUE__STORE_PATH": str(store),
            **({"WARMPOD_QUEUE__STORE_URL": postgres} if postgres else {}),
        }
        server = Server(args.pool_size, free_port(), args.output.with_suffix(".server.log"), env)
        url = server.base_url
        clients = {
            name: stack.enter_context(
                httpx.Client(
                    base_url=server.base_url, timeout=120, headers={"Authorization": f"Bearer {key}"}
                )
            )
            for name, key in secrets.items()
        }
        abuser, victim = clients["abuser"], clients["victim"]
        try:
            with section(f"starting warmpod serve (pool {args.pool_size}) on {server.base_url}"):
                facts["warmpod_health"] = server.wait_healthy(victim)
            # The first runs of a fresh server are slower; they belong to no phase.
            repeat(2, "warm-up", lambda: run_once(victim, Series("warm-up", "")))

            def phase(name: str, abuse: Callable[[Outcome], AbstractContextManager[None]]) -> Phase:
                phases.append(measure(name, server, store_size, victim, args.victim_runs, abuse))
                return phases[-1]

            phase("idle", lambda outcome: calm(abuser, outcome))
            if "A" in patterns:
                written = phase("A write", lambda o: chatty(abuser, o, args.chatty_seconds, args.hold))
                run_id = written.abuser.extra.get("run_id")
                if not run_id:
                    print(
                        f"A replay skipped: the chatty run was not answered {written.abuser}", file=sys.stderr
                    )
                else:
                    path = f"/status/{run_id}/stream"
                    phase(
                        "A replay",
                        lambda o: stalled(url, secrets["abuser"], path, args.readers, o, args.hold),
                    )
            if "C" in patterns:
                first = Outcome()
                tiny = submit(abuser, first, "print(1)", 10)
                if tiny is None:
                    print(f"C skipped: the abuser's first run was not answered {first}", file=sys.stderr)
                else:
                    phase(
                        "C flood",
                        lambda o: flood(
                            abuser, tiny["id"], args.flood, args.flood_seconds, args.flood_submits, o
                        ),
                    )
            if "B" in patterns:
                phase(
                    "B files",
                    lambda o: files_then_stalled(abuser, url, secrets["abuser"], args.stalled, o, args.hold),
                )
        finally:
            with section("stopping warmpod (SIGTERM)"):
                stop_report = server.stop()

    results = {
        "host": facts,
        "settings": {k: v for k, v in vars(args).items() if k != "output"},
        "phases": [
            {**asdict(p), "store_per_byte": p.store_per_byte(), "victim_summary": p.victim.summary()}
            for p in phases
        ],
        "server_stop": stop_report,
    }
    args.output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(table(phases))
    print()
    print(
        f"store: {'PostgreSQL' if args.postgres else 'SQLite'}; RSS: warmpod serve's own VmRSS; "
        "kept: the output of the abuser's runs"
    )
    for measured in phases:
        for line in sorted(set(measured.warnings))[:5]:
            print(f"{measured.name}: {line[:160]}")
    print(f"server stop: {stop_report}")
    print(f"figures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
