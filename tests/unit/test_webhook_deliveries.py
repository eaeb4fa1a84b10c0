"""A node's deliveries against a receiver on loopback that never answers: it holds only its own
key's share of the slots, each of its tries ends at the time-out, another key's webhooks go
meanwhile, and a node that stops mid-try hands its webhook back at once."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import msgspec
import pytest
from support.receivers import Receiver

from warmpod.client.webhooks import new_secret
from warmpod.keys import Key
from warmpod.models import RunResult, RunSpec, WebhookState
from warmpod.queue.deliveries import Deliveries
from warmpod.queue.store.base import Owner
from warmpod.queue.store.sqlite import SqliteStore
from warmpod.settings import WebhookSettings
from warmpod.webhooks.destinations import Destinations

SPEC = RunSpec(code=b"print(1)", stdin=b"", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99)
NODE = Owner(node="a", incarnation="a-1")


class Tarpit:
    """A listener on 127.0.0.1 that takes connections and their requests and never answers."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def connections(self) -> int:
        """Connections taken so far."""
        with self._lock:
            return len(self._held)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._held.append(conn)

    def close(self) -> None:
        """Stop listening and drop every connection held."""
        self._listener.close()
        with self._lock:
            for conn in self._held:
                conn.close()


@pytest.fixture
def tarpit() -> Iterator[Tarpit]:
    pit = Tarpit()
    yield pit
    pit.close()


async def final_runs(store: SqliteStore, url: str, key: str, count: int) -> list[str]:
    """``count`` runs of ``key`` with their webhook to ``url``, each ended succeeded."""
    ids: list[str] = []
    for _ in range(count):
        run_id = f"{key}-{len(ids)}-{time.monotonic_ns()}"
        spec = msgspec.structs.replace(SPEC, callback_url=url)
        assert await store.add(run_id, spec, max_queued=100, key=key) == "added"
        claim = await store.claim(NODE, 30.0)
        assert claim is not None
        result = RunResult.from_server(run_id, "succeeded", exit_code=0)
        assert await store.finish(run_id, result, fence=claim.fence)
        ids.append(run_id)
    return ids


async def webhook(store: SqliteStore, run_id: str) -> WebhookState:
    """The run's webhook as the store keeps it."""
    record = await store.get(run_id)
    assert record is not None
    assert record.webhook is not None
    return record.webhook


async def test_a_key_whose_receiver_never_answers_does_not_hold_back_another_keys(
    tmp_path: Path, tarpit: Tarpit
) -> None:
    """Mallory's 12 webhooks, due first, go to a receiver that never answers; Alice's 3 still
    arrive at once, while Mallory holds at most a quarter of the 8 slots, and each of Mallory's
    tries ends at the 3 s time-out as ``unreachable``, to be tried again."""
    store = await SqliteStore.open(tmp_path / "runs.sqlite3")
    with Receiver() as fast:
        settings = WebhookSettings(
            allow=(f"http://127.0.0.1:{tarpit.port}/", fast.url("/")),
            secrets=(new_secret(),),
            timeout=3.0,
            concurrency=8,
            poll=0.1,
            first_retry=60.0,
        )
        mallory = await final_runs(store, f"http://127.0.0.1:{tarpit.port}/hook", "mallory", 12)
        alice = await final_runs(store, fast.url(), "alice", 3)
        keys = {name: Key(name, "0" * 64) for name in ("mallory", "alice")}
        deliveries = Deliveries(store, settings, Destinations(settings.allow), keys.get)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(deliveries.serve)
                with anyio.fail_after(2.0):
                    while len(fast.accepted()) < 3:
                        await anyio.sleep(0.02)
                assert sorted(r.webhook_id for r in fast.accepted()) == sorted(alice)
                assert tarpit.connections <= 2
                with anyio.fail_after(8.0):
                    state = await webhook(store, mallory[0])
                    while state.last_error is None:
                        await anyio.sleep(0.1)
                        state = await webhook(store, mallory[0])
                tg.cancel_scope.cancel()
        finally:
            await store.aclose()
    assert (state.state, state.attempts, state.last_status) == ("pending", 1, None)
    assert "no answer within 3 s" in (state.last_error or "")


async def test_a_stopping_node_hands_back_the_webhooks_it_was_trying(tmp_path: Path, tarpit: Tarpit) -> None:
    """Deliveries cancelled mid-try (the node stops) leave the webhook due at once, not only
    when the claim's lease is over: the next claim takes it as its second try."""
    store = await SqliteStore.open(tmp_path / "runs.sqlite3")
    try:
        settings = WebhookSettings(
            allow=(f"http://127.0.0.1:{tarpit.port}/",), secrets=(new_secret(),), timeout=30.0, poll=0.1
        )
        (run_id,) = await final_runs(store, f"http://127.0.0.1:{tarpit.port}/hook", "mallory", 1)
        deliveries = Deliveries(store, settings, Destinations(settings.allow))
        async with anyio.create_task_group() as tg:
            tg.start_soon(deliveries.serve)
            with anyio.fail_after(5.0):
                while tarpit.connections < 1:
                    await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
        state = await webhook(store, run_id)
        assert (state.state, state.attempts, state.last_error) == (
            "pending",
            1,
            "the node stopped during the try",
        )
        again = await store.claim_webhook(30.0)
        assert again is not None
        assert (again.run_id, again.attempt) == (run_id, 2)
    finally:
        await store.aclose()
