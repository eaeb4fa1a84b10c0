"""Data sources: 10 MB from a loopback HTTP upstream through the relay against straight from the host,
and what a sources file costs a trivial run that asks for none.

Usage::

    .venv/bin/python bench/sources.py [--runs N] [--fetches N] [--size BYTES] [--rounds N]
                                      [--output PATH]

In one run, against one HTTP server this script starts on 127.0.0.1 (``/blob``: SIZE bytes;
``/hello``: a few), each fetch a fresh connection and a raw ``GET ... HTTP/1.0`` read to its end:

direct      the fetches made by this process straight to the upstream: the baseline.
server      the same through warmpod's relay alone, in this process: a Unix connection to a
            ``Relay`` as the agent makes one, without a container: the server's half.
relay       the same made by a run's program to ``WARMPOD_SOURCE_BLOB``, timed inside the sandbox:
            the whole path, the agent's half included (it needs the agent's relay; without it
            the series reports failures).

Each gives the throughput of ``/blob`` and the latency of ``/hello``, side by side. Then the
latency of an idle ``print(1)`` (p50, as ``bench/latency.py`` measures it) through three servers
in turns, ``--rounds`` times, each fresh:

none        no sources file.
declared    a sources file, the run asking for no source: the cost of having one.
asked       a sources file, the run asking for a source it never uses: the relay's set-up.

It prints one table and writes every sample to a JSON file. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from anyio.from_thread import start_blocking_portal
from latency import (
    EXPECTED,
    PROGRAM,
    ROOT,
    Series,
    Server,
    free_port,
    repeat,
    section,
    setup,
    table,
    wait_pool_full,
)

from warmpod.sandbox.relay import Relay, socket_name
from warmpod.sources import Source

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "sources.json"
MIB = 1024 * 1024
HELLO = b"hello\n"
# The fetch a run's program makes; ``fetch`` below makes it the same way on the host.
FETCH = """
import json, os, socket, time

def fetch(address, path):
    started = time.perf_counter()
    sock = socket.create_connection(address)
    sock.sendall(b"GET " + path + b" HTTP/1.0\\r\\n\\r\\n")
    size = 0
    while chunk := sock.recv(262144):
        size += len(chunk)
    sock.close()
    return time.perf_counter() - started, size
"""
RUN = (
    FETCH
    + """
address = (os.environ["WARMPOD_SOURCE_BLOB_HOST"], int(os.environ["WARMPOD_SOURCE_BLOB_PORT"]))
small = [fetch(address, b"/hello") for _ in range({fetches})]
big = [fetch(address, b"/blob") for _ in range({fetches})]
print(json.dumps({{"small": small, "big": big}}))
"""
)


def upstream(size: int) -> ThreadingHTTPServer:
    """An HTTP server on a free loopback port, serving in a thread of its own."""
    blob = b"x" * size

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = blob if self.path == "/blob" else HELLO
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def fetch(connect: Callable[[], socket.socket], path: bytes) -> tuple[float, int]:
    """Seconds to GET ``path`` on a fresh connection and read it to its end, and the bytes read:
    FETCH's ``fetch``, the connection made by ``connect``."""
    started = time.perf_counter()
    sock = connect()
    sock.sendall(b"GET " + path + b" HTTP/1.0\r\n\r\n")
    size = 0
    while chunk := sock.recv(262144):
        size += len(chunk)
    sock.close()
    return time.perf_counter() - started, size


def record(
    series: Series, small: Sequence[tuple[float, int]], big: Sequence[tuple[float, int]], size: int
) -> None:
    """Keep the latency of each small fetch and the throughput of each big one in ``series``."""
    for seconds, _ in small:
        series.samples_ms.append(seconds * 1000)
    for seconds, got in big:
        if got < size:
            series.failures.append(f"/blob: {got} bytes of {size}")
            continue
        series.extra.setdefault("mb_per_s", []).append(got / MIB / seconds)
        series.extra.setdefault("blob_ms", []).append(seconds * 1000)


def host_series(
    name: str, description: str, connect: Callable[[], socket.socket], args: argparse.Namespace
) -> Series:
    """The fetches made from this process through ``connect``."""
    series = Series(name, description)
    small = [fetch(connect, b"/hello") for _ in range(args.fetches * args.runs)]
    big = [fetch(connect, b"/blob") for _ in range(args.fetches * args.runs)]
    record(series, small, big, args.size)
    return series


@contextmanager
def relay_alone(port: int) -> Iterator[Path]:
    """A Relay of the upstream on ``port``, served by an event loop in a thread: its socket's path."""
    with (
        tempfile.TemporaryDirectory(prefix="warmpod-bench-relay-") as tmp,
        start_blocking_portal() as portal,
    ):
        directory = Path(tmp) / "sandbox"
        directory.mkdir(mode=0o700)
        relay = Relay([("blob", Source(host="127.0.0.1", port=port, max_bytes_in=1 << 40))])
        relay.listen(directory)
        with portal.wrap_async_context_manager(relay.running()):
            yield directory / socket_name(0)


def relay_series(client: httpx.Client, args: argparse.Namespace) -> Series:
    """The fetches made by ``args.runs`` runs' programs through their sandboxes' relays."""
    series = Series("relay", "GET through WARMPOD_SOURCE_BLOB from inside a run (agent and server)")
    code = RUN.format(fetches=args.fetches)
    for _ in range(args.runs):
        wait_pool_full(client)
        response = client.post("/run-json/", json={"code": code, "sources": ["blob"], "timeout": 60})
        body = response.json()
        if response.status_code != 200 or body.get("status") != "succeeded":
            series.failures.append(f"{response.status_code} {body.get('status')}: {body.get('stderr')}"[:300])
            continue
        fetched = json.loads(body["stdout"])
        record(series, fetched["small"], fetched["big"], args.size)
        series.extra.setdefault("sources", []).append(body["sources"])
    return series


def idle_runs(series: Series, client: httpx.Client, count: int, fields: dict[str, Any]) -> None:
    """``count`` idle ``print(1)`` runs, each once the pool is full, with request ``fields``."""

    def step() -> None:
        wait_pool_full(client)
        started = time.perf_counter()
        response = client.post("/run-json/", json={"code": PROGRAM, **fields})
        elapsed = (time.perf_counter() - started) * 1000
        body = response.json()
        if response.status_code != 200 or body.get("stdout") != EXPECTED:
            series.failures.append(f"{response.status_code} {body.get('status')}: {body.get('error')}"[:300])
            return
        series.samples_ms.append(elapsed)

    repeat(count, series.name, step)


@contextmanager
def serving(args: argparse.Namespace, name: str, env: dict[str, str]) -> Iterator[httpx.Client]:
    """A fresh ``warmpod serve`` with ``env``, healthy, its pool full, warmed up: a client of it."""
    server = Server(2, free_port(), args.output.with_suffix(f".{name}.log"), env)
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            with section(f"{name}: starting warmpod serve"):
                server.wait_healthy(client)
                wait_pool_full(client)
            for _ in range(3):
                client.post("/run-json/", json={"code": PROGRAM})
            yield client
    finally:
        server.stop()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs fetching through the relay (default 5)")
    parser.add_argument("--fetches", type=int, default=3, help="fetches of each page per run (default 3)")
    parser.add_argument("--size", type=int, default=10 * 10**6, help="bytes of /blob (default 10 MB)")
    parser.add_argument(
        "--idle-runs", type=int, default=60, help="print(1) runs per idle series (default 60)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="turns of the idle servers (default 3)")
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
    _, _, facts = ready
    http = upstream(args.size)
    port = http.server_address[1]
    with tempfile.TemporaryDirectory(prefix="warmpod-bench-sources-") as tmp:
        sources_file = Path(tmp) / "sources.toml"
        sources_file.write_text(f'[blob]\nhost = "127.0.0.1"\nport = {port}\nmax_bytes_in = {1 << 40}\n')
        declared_env = {"WARMPOD_SOURCES__FILE": str(sources_file)}

        with section("direct: the fetches from this process"):
            direct = host_series(
                "direct",
                "GET from this process to the upstream",
                lambda: socket.create_connection(("127.0.0.1", port)),
                args,
            )
        with section("server: the fetches through a Relay in this process"), relay_alone(port) as path:

            def unix() -> socket.socket:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(str(path))
                return sock

            server = host_series("server", "GET through the server's relay alone (no container)", unix, args)
        with serving(args, "relay", declared_env) as client, section(f"relay: {args.runs} runs"):
            relay = relay_series(client, args)

        none = Series("none", "print(1), idle, no sources file")
        declared = Series("declared", "print(1), idle, a sources file, no source asked for")
        asked = Series("asked", "print(1), idle, a source asked for and never used")
        per_round = max(1, args.idle_runs // args.rounds)
        # In turns, so that whatever else the host does falls on each alike.
        for _ in range(args.rounds):
            with serving(args, "none", {}) as client:
                idle_runs(none, client, per_round, {})
            with serving(args, "declared", declared_env) as client:
                idle_runs(declared, client, per_round, {})
                idle_runs(asked, client, per_round, {"sources": ["blob"]})
    http.shutdown()

    fetches = [direct, server, relay]
    idle = [none, declared, asked]
    results = {
        "host": facts,
        "settings": {
            "runs": args.runs,
            "fetches": args.fetches,
            "size": args.size,
            "idle_runs": args.idle_runs,
        },
        "series": {item.name: {**asdict(item), "summary": item.summary()} for item in [*fetches, *idle]},
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(f"/hello latency, /blob ({args.size} bytes) throughput and time:")
    print(table(fetches))
    for item in fetches:
        mb = item.extra.get("mb_per_s") or []
        ms = item.extra.get("blob_ms") or []
        if mb:
            print(
                f"  {item.name:<9} /blob p50 {statistics.median(ms):7.1f} ms, "
                f"{statistics.median(mb):7.1f} MiB/s (n={len(mb)}, failures {len(item.failures)})"
            )
        else:
            print(f"  {item.name:<9} no /blob fetched: {item.failures[:1]}")
    print()
    print("print(1), idle:")
    print(table(idle))
    p50 = {item.name: item.summary()["p50"] for item in idle}
    if p50["none"] and p50["declared"] and p50["asked"]:
        print(
            f"sources file, none asked: {p50['declared'] - p50['none']:+.1f} ms p50; "
            f"one asked, unused: {p50['asked'] - p50['none']:+.1f} ms p50"
        )
    print(f"figures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
