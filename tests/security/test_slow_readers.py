"""Clients that never read their answers: they pin neither the server's memory nor another key's runs."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent
from urllib.parse import urlsplit

import httpx
import pytest
from support.hostile import SETTINGS
from support.live import SLOWNESS, WarmpodServer, run_json, wait_until

from warmpod import keys

pytestmark = pytest.mark.security

# A run that leaves 16 files of 1 MB: an answer inlining all of them would be 21 MiB of base64
# JSON, pinned per connection by a client that asks for it and never reads.
FILES = 16
FILE_BYTES = 1_000_000
READERS = 300
# What the readers may add to the server's RSS at most: the answers their key may have in flight
# (32 of some 1.4 MiB each, files.inline_total_bytes in base64) and 128 KiB of buffer for each
# connection, some 85 MiB; 14 MiB measured on loopback, whose kernel buffers take most of it, and
# 5.4 GiB with answers unbounded. Not scaled: memory does not depend on the machine's speed.
RSS_BOUND = 160 * 1024 * 1024
# The readers are stopped once the server holds this much more, so a regression fails fast
# instead of taking the machine's memory.
RSS_ABORT = 2 * RSS_BOUND
TRIVIAL_RUNS = 10
# The other key's trivial runs under attack, against the same runs before it: generous, as the
# readers' requests cost CPU on a 2-core host, and never under a floor that scales with it.
SLOWDOWN = 3.0
SLOWDOWN_FLOOR = 1.0 * SLOWNESS
# Long enough for the server to take every reader's request and answer what it will.
SETTLE = 3.0 * SLOWNESS
SAMPLE_INTERVAL = 0.05


def rss(pid: int) -> int:
    """The resident memory of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class Sampler:
    """The server's peak RSS, sampled in a thread; past ``abort`` above ``base`` it closes the
    connections in ``readers`` at once (a regression must fail, not take the machine's memory)."""

    def __init__(self, pid: int, base: int, abort: int) -> None:
        self.pid = pid
        self.base = base
        self.abort = abort
        self.peak = base
        self.readers: list[socket.socket] = []
        self.tripped = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def add(self, sock: socket.socket) -> None:
        """Watch ``sock``, or close it at once if the bound was already passed."""
        with self._lock:
            if self.tripped.is_set():
                sock.close()
            else:
                self.readers.append(sock)

    def close(self) -> None:
        """Close every reader."""
        with self._lock:
            for sock in self.readers:
                sock.close()
            self.readers.clear()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.peak = max(self.peak, rss(self.pid))
            if self.peak - self.base > self.abort and not self.tripped.is_set():
                with self._lock:
                    self.tripped.set()
                self.close()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.close()


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WarmpodServer, str, str]]:
    """A server with a keys file, and the keys of two tenants: mallory (who never reads) and alice."""
    directory = tmp_path_factory.mktemp("slow-readers")
    key_file = directory / "keys"
    mallory, alice = keys.add(key_file, "mallory"), keys.add(key_file, "alice")
    # No preload: what is measured is the server process, and the refills cost less CPU without it.
    settings = {**SETTINGS, "WARMPOD_SERVER__API_KEYS_FILE": str(key_file), "WARMPOD_POOL__PRELOAD": ""}
    live = WarmpodServer(directory, settings)
    try:
        live.wait_healthy()
        yield live, mallory, alice
    finally:
        live.close()


def trivial_seconds(client: httpx.Client) -> list[float]:
    """The wall time of each of TRIVIAL_RUNS trivial runs, one after another."""
    seconds = []
    for _ in range(TRIVIAL_RUNS):
        started = time.monotonic()
        result = run_json(client, "print(1)", timeout=10)
        seconds.append(time.monotonic() - started)
        assert result["status"] == "succeeded", result
    return seconds


def never_read(url: str, path: str, key: str, count: int, sampler: Sampler) -> None:
    """``count`` connections that each send ``GET path`` and never read a byte of the answer,
    with a receive buffer as small as the kernel allows so that the answer stays on the server."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, port))
        sock.sendall(request)
        sampler.add(sock)


def test_slow_readers_pin_no_memory_and_starve_no_other_key(
    tenants: tuple[WarmpodServer, str, str],
) -> None:
    """300 connections asking for a file-heavy run's status and never reading add less than
    RSS_BOUND to the server's memory, and another key's trivial runs stay prompt meanwhile."""
    live, mallory, alice = tenants
    live.wait_pool_full()
    code = dedent(
        f"""
        import os
        os.makedirs("out", exist_ok=True)
        for i in range({FILES}):
            with open(f"out/{{i:02}}.bin", "wb") as f:
                f.write(os.urandom({FILE_BYTES}))
        """
    )
    mine = {"Authorization": f"Bearer {mallory}"}
    theirs = {"Authorization": f"Bearer {alice}"}
    with (
        httpx.Client(base_url=live.url, headers=mine, timeout=60) as attacker,
        httpx.Client(base_url=live.url, headers=theirs, timeout=60) as other,
    ):
        heavy = run_json(attacker, code, timeout=20)
        assert heavy["status"] == "succeeded", heavy["stderr"]
        assert len(heavy["files"]) == FILES, heavy["files"]
        status_path = f"/status/{heavy['id']}"
        # Read once, whole, so that what answering it loads and keeps is in the idle figure.
        assert attacker.get(status_path).status_code == 200
        idle = statistics.median(trivial_seconds(other))
        base = rss(live.pid)
        with Sampler(live.pid, base, RSS_ABORT) as sampler:
            never_read(live.url, status_path, mallory, READERS, sampler)
            sampler.tripped.wait(SETTLE)
            busy = [] if sampler.tripped.is_set() else trivial_seconds(other)
        grown = sampler.peak - base
        figures = (
            f"RSS {base / 2**20:.0f} MiB idle, +{grown / 2**20:.0f} MiB at the peak with {READERS} readers; "
            f"trivial runs' p50 {idle:.2f} s idle"
            + (f", {statistics.median(busy):.2f} s under the readers" if busy else "")
        )
        print(figures)
        assert grown < RSS_BOUND, figures + "\n" + live.log_tail()
        assert statistics.median(busy) < max(SLOWDOWN * idle, SLOWDOWN_FLOOR), figures
        # Once its readers are gone their key gets its slots back, and the service is unhurt.
        assert wait_until(lambda: attacker.get(status_path).status_code == 200, 10 * SLOWNESS)
        assert live.health().status_code == 200


# A file near the out/ cap (files.out_bytes, 16 MiB): each download of it used to hold it whole.
DOWNLOAD_BYTES = 15_000_000
DOWNLOADERS = 200
# What the stalled downloads may add to the server's RSS at most: the key's 32 requests in flight,
# each holding a piece being sent (results.FILE_PIECE, 256 KiB), the 64 KiB slice of it handed
# to the connection and uvicorn's 64 KiB write buffer, some 12 MiB, and the store's page cache
# (2 MiB); 10 MiB measured on loopback, and 475 MiB (32 whole files) before downloads were streamed.
# Not scaled: memory does not depend on the machine's speed.
DOWNLOAD_RSS_BOUND = 48 * 1024 * 1024


def test_stalled_downloads_hold_a_piece_of_the_file_not_all_of_it(
    tenants: tuple[WarmpodServer, str, str],
) -> None:
    """200 connections downloading a 15 MB file and never reading add less than DOWNLOAD_RSS_BOUND
    to the server's memory, and the file still downloads whole once they are gone."""
    live, mallory, _ = tenants
    code = dedent(
        f"""
        import os
        os.makedirs("out", exist_ok=True)
        with open("out/big.bin", "wb") as f:
            f.write(os.urandom({DOWNLOAD_BYTES}))
        """
    )
    with httpx.Client(
        base_url=live.url, headers={"Authorization": f"Bearer {mallory}"}, timeout=60
    ) as attacker:
        done = run_json(attacker, code, timeout=20)
        assert done["status"] == "succeeded", done["stderr"]
        path = f"/status/{done['id']}/files/out/big.bin"
        # Downloaded once, whole, so that what serving it loads and keeps is in the idle figure.
        first = attacker.get(path)
        assert first.status_code == 200
        assert len(first.content) == DOWNLOAD_BYTES
        assert first.headers["content-length"] == str(DOWNLOAD_BYTES)
        base = rss(live.pid)
        with Sampler(live.pid, base, 2 * DOWNLOAD_RSS_BOUND) as sampler:
            never_read(live.url, path, mallory, DOWNLOADERS, sampler)
            sampler.tripped.wait(SETTLE)
        grown = sampler.peak - base
        figures = f"RSS {base / 2**20:.0f} MiB idle, +{grown / 2**20:.1f} MiB with {DOWNLOADERS} downloads"
        print(figures)
        assert grown < DOWNLOAD_RSS_BOUND, figures + "\n" + live.log_tail()
        # Once its downloaders are gone their key gets its slots back, and the file is whole.
        assert wait_until(lambda: attacker.get(path).status_code == 200, 10 * SLOWNESS)
        assert attacker.get(path).content == first.content
