"""Tenants: one key's chatty output or stalled readers cost the store and the server little, and
another key's runs stay prompt (bench/abuse.py measures the same patterns at full size)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.hostile import FILE_COUNT, POOL_SIZE, chatty_program, file_heavy_program
from support.live import SLOWNESS, PeakResident, WarmpodServer, serving, stalled_requests, stored_bytes

from warmpod import keys

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
# 100 of them: enough that answers built whole in the server would hold another key's run for seconds.
STALLED_FOR_LATENCY = 100
# Replays of the chatty run's events, each of them some 30 000 events.
REPLAYS = 50
VICTIM_RUNS = 5
# A trivial run takes well under a second; a pool refill beside the abuse may add one.
VICTIM_SECONDS = 2.0 * SLOWNESS
# How long a victim's run is waited for: past VICTIM_SECONDS already, it only bounds the test.
VICTIM_WAIT = 15.0 * SLOWNESS


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


@dataclass(frozen=True)
class Chatty:
    """The abuser's chatty run: its id, the output it kept and what it cost the store."""

    run_id: str
    kept: int
    growth: int


@pytest.fixture(scope="module")
def chatty(tenants: Tenants) -> Chatty:
    """One run of the chatty program by the abuser, the store measured around it."""
    before = stored_bytes(tenants.store)
    result = result_of(tenants.abuser, chatty_program(CHATTY_SECONDS), CHATTY_SECONDS + 20)
    growth = stored_bytes(tenants.store) - before
    assert len(result["stdout"]) > 1000, result
    return Chatty(str(result["id"]), len(result["stdout"]), growth)


@pytest.fixture(scope="module")
def file_heavy(tenants: Tenants) -> str:
    """The id of the abuser's run that left 16 files of 1 MB in out/ (its result holds them inline)."""
    result = result_of(tenants.abuser, file_heavy_program(), 30)
    assert len(result["files"]) == FILE_COUNT, result
    return str(result["id"])


def victim_runs(victim: httpx.Client) -> list[tuple[float, str]]:
    """The seconds and the outcome of each of the victim's trivial runs, one after the other:
    VICTIM_RUNS of them, or fewer once one was slower than VICTIM_SECONDS or did not succeed."""
    took: list[tuple[float, str]] = []
    for _ in range(VICTIM_RUNS):
        started = time.monotonic()
        try:
            response = victim.post("/run-json/", json={"code": "print(1)", "timeout": 5}, timeout=VICTIM_WAIT)
        except httpx.TimeoutException:
            took.append((VICTIM_WAIT, "no answer"))
            break
        seconds = round(time.monotonic() - started, 2)
        ok = response.status_code == 200 and response.json()["stdout"] == "1\n"
        took.append((seconds, "succeeded" if ok else f"{response.status_code} {response.text[:200]}"))
        if not ok or seconds > VICTIM_SECONDS:
            break
    return took


def stalled_readers(tenants: Tenants, path: str, count: int) -> list[tuple[float, str]]:
    """Hold ``count`` unread ``GET path`` of the abuser for HOLD_SECONDS at least; the victim's runs
    meanwhile (its first run starts as the first connection opens)."""
    took: list[tuple[float, str]] = []
    victim = threading.Thread(target=lambda: took.extend(victim_runs(tenants.victim)), daemon=True)
    until = time.monotonic() + HOLD_SECONDS
    victim.start()
    sockets = stalled_requests(
        tenants.server.url, path, {"Authorization": f"Bearer {tenants.abuser_key}"}, count
    )
    try:
        victim.join(timeout=VICTIM_RUNS * VICTIM_WAIT)
    finally:
        time.sleep(max(0.0, until - time.monotonic()))
        for sock in sockets:
            sock.close()
    return took


def assert_prompt(took: list[tuple[float, str]]) -> None:
    """Every one of the victim's VICTIM_RUNS runs succeeded within VICTIM_SECONDS."""
    slow = [
        (seconds, outcome) for seconds, outcome in took if seconds > VICTIM_SECONDS or outcome != "succeeded"
    ]
    assert not slow, f"the victim's runs (seconds, outcome): {took}"
    assert len(took) == VICTIM_RUNS, f"the victim's runs did not all end in time: {took}"


def test_a_chatty_program_costs_the_store_a_few_bytes_per_byte_kept(chatty: Chatty) -> None:
    """One byte per write(2) for seconds grows the store by a small multiple of the output kept."""
    assert chatty.growth <= STORE_BYTES_PER_BYTE * chatty.kept + STORE_FIXED_BYTES, (
        f"the store grew {chatty.growth} bytes ({chatty.growth / chatty.kept:.0f} per byte) "
        f"for {chatty.kept} bytes kept"
    )


def test_slow_readers_of_a_chatty_run_do_not_slow_another_key(tenants: Tenants, chatty: Chatty) -> None:
    """Another key's trivial runs stay prompt while one key's 50 replays of a chatty run wait unread."""
    tenants.server.wait_pool_full()
    assert_prompt(stalled_readers(tenants, f"/status/{chatty.run_id}/stream", REPLAYS))


def test_slow_readers_of_a_file_heavy_result_cost_the_server_little_memory(
    tenants: Tenants, file_heavy: str
) -> None:
    """40 unread answers of a result with 16 MB of files do not each take their size in the server."""
    tenants.server.wait_pool_full()
    with PeakResident(tenants.server.pid) as memory:
        stalled_readers(tenants, f"/status/{file_heavy}", STALLED_FOR_MEMORY)
    growth = (memory.peak - memory.start) / MIB
    assert growth <= RSS_GROWTH_MIB, f"the server's RSS rose {growth:.0f} MiB, to {memory.peak / MIB:.0f} MiB"


def test_slow_readers_of_a_file_heavy_result_do_not_slow_another_key(
    tenants: Tenants, file_heavy: str
) -> None:
    """Another key's trivial runs stay prompt while one key's 100 answers of 16 MB wait unread."""
    tenants.server.wait_pool_full()
    assert_prompt(stalled_readers(tenants, f"/status/{file_heavy}", STALLED_FOR_LATENCY))
