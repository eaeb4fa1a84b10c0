"""Tenants: one key's chatty output or stalled readers cost the store and the server little, and
another key's runs stay prompt (bench/abuse.py measures the same patterns at full size)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from warmpod_live import SLOWNESS, PeakResident, WarmpodServer, serving, stalled_requests

from warmpod import keys

from .hostile import FILE_COUNT, POOL_SIZE, chatty_program, file_heavy_program

pytestmark = pytest.mark.security

MIB = 1024 * 1024
CHATTY_SECONDS = 4
# A well-behaved store keeps a byte of output in a few bytes, whatever the size of the writes that
# made it; the fixed part is a run's own rows.
STORE_BYTES_PER_BYTE = 4
STORE_FIXED_BYTES = 64 * 1024
# Held long enough for the server to have started every answer.
HOLD_SECONDS = 5.0
# 40 slow readers of a 21 MB answer must not cost the server their answers' size (800 MiB).
STALLED_FOR_MEMORY = 40
RSS_GROWTH_MIB = 200
# 100 of them took the server seconds to answer, in which another key's run waited.
STALLED_FOR_LATENCY = 100
VICTIM_RUNS = 5
# A trivial run takes well under a second; a pool refill beside the abuse may add one.
VICTIM_SECONDS = 2.0 * SLOWNESS


@dataclass(frozen=True)
class Tenants:
    """The module's server and a client for each of its two keys."""

    server: WarmpodServer
    store: Path
    abuser: httpx.Client
    victim: httpx.Client
    abuser_key: str


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    """A server of its own (its store and memory are measured) with the keys ``abuser`` and ``victim``."""
    directory = tmp_path_factory.mktemp("warmpod-tenants")
    secrets = {name: keys.add(directory / "keys", name) for name in ("abuser", "victim")}
    store = directory / "runs.sqlite3"
    settings = {
        "WARMPOD_POOL__SIZE": str(POOL_SIZE),
        "WARMPOD_SERVER__API_KEYS_FILE": str(directory / "keys"),
        "WARMPOD_QUEUE__STORE_PATH": str(store),
    }
    with serving(directory, settings) as server:
        clients = {
            name: httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": f"Bearer {key}"})
            for name, key in secrets.items()
        }
        try:
            yield Tenants(server, store, clients["abuser"], clients["victim"], secrets["abuser"])
        finally:
            for client in clients.values():
                client.close()


def result_of(client: httpx.Client, code: str, timeout: float) -> dict[str, Any]:
    """The RunResult of ``code``, which must succeed."""
    response = client.post("/run-json/", json={"code": code, "timeout": timeout})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "succeeded", body
    return body


def stored_bytes(store: Path) -> int:
    """The store's size as SQLite sees it through its write-ahead log (pages in use and free),
    so that a log not yet checkpointed counts once."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        pages: int = db.execute("PRAGMA page_count").fetchone()[0]
        size: int = db.execute("PRAGMA page_size").fetchone()[0]
    return pages * size


def victim_seconds(victim: httpx.Client) -> list[float]:
    """How long each of the victim's VICTIM_RUNS trivial runs took, one after the other."""
    took = []
    for _ in range(VICTIM_RUNS):
        started = time.monotonic()
        result_of(victim, "print(1)", 5)
        took.append(round(time.monotonic() - started, 2))
    return took


def test_a_chatty_program_costs_the_store_a_few_bytes_per_byte_kept(tenants: Tenants) -> None:
    """One byte per write(2) for seconds grows the store by a small multiple of the output kept."""
    before = stored_bytes(tenants.store)
    result = result_of(tenants.abuser, chatty_program(CHATTY_SECONDS), CHATTY_SECONDS + 20)
    kept = len(result["stdout"])
    growth = stored_bytes(tenants.store) - before
    assert kept > 1000, result
    assert growth <= STORE_BYTES_PER_BYTE * kept + STORE_FIXED_BYTES, (
        f"the store grew {growth} bytes ({growth / kept:.0f} per byte) for {kept} bytes kept"
    )


@pytest.fixture(scope="module")
def file_heavy(tenants: Tenants) -> str:
    """The id of the abuser's run that left 16 files of 1 MB in out/ (its result holds them inline)."""
    result = result_of(tenants.abuser, file_heavy_program(), 30)
    assert len(result["files"]) == FILE_COUNT, result
    return str(result["id"])


def stalled_readers(tenants: Tenants, run_id: str, count: int) -> list[float]:
    """Hold ``count`` unread ``GET /status/{run_id}`` for HOLD_SECONDS at least; the victim's run
    times meanwhile (its first run starts as the first connection opens)."""
    took: list[float] = []
    victim = threading.Thread(target=lambda: took.extend(victim_seconds(tenants.victim)), daemon=True)
    until = time.monotonic() + HOLD_SECONDS
    victim.start()
    sockets = stalled_requests(
        tenants.server.url, f"/status/{run_id}", {"Authorization": f"Bearer {tenants.abuser_key}"}, count
    )
    try:
        victim.join(timeout=60)
    finally:
        time.sleep(max(0.0, until - time.monotonic()))
        for sock in sockets:
            sock.close()
    assert len(took) == VICTIM_RUNS, f"the victim's runs failed or hung: {took}"
    return took


def test_slow_readers_of_a_file_heavy_result_cost_the_server_little_memory(
    tenants: Tenants, file_heavy: str
) -> None:
    """40 unread answers of a result with 16 MB of files do not each take their size in the server."""
    tenants.server.wait_pool_full()
    with PeakResident(tenants.server.pid) as memory:
        stalled_readers(tenants, file_heavy, STALLED_FOR_MEMORY)
    growth = (memory.peak - memory.start) / MIB
    assert growth <= RSS_GROWTH_MIB, f"the server's RSS rose {growth:.0f} MiB, to {memory.peak / MIB:.0f} MiB"


def test_slow_readers_of_a_file_heavy_result_do_not_slow_another_key(
    tenants: Tenants, file_heavy: str
) -> None:
    """Another key's trivial runs stay prompt while one key's 100 answers of 16 MB wait unread."""
    tenants.server.wait_pool_full()
    took = stalled_readers(tenants, file_heavy, STALLED_FOR_LATENCY)
    assert max(took) <= VICTIM_SECONDS, f"the victim's runs took {took} s"
