"""The throttle's parts: an answer handed over in pieces, and the token bucket's arithmetic."""

from __future__ import annotations

from typing import Any

import pytest
from litestar.types import Message

from warmpod.errors import Throttled
from warmpod.http.throttle import _SWEEP_AT, CHUNK, Throttle, _client_of, _paced
from warmpod.keys import Key
from warmpod.settings import ServerSettings


async def test_a_large_body_goes_in_chunks_and_ends_where_the_original_did() -> None:
    """A body above CHUNK is sent as CHUNK pieces, more_body on all but the last (unless the
    original had more to come); small bodies and other messages pass unchanged."""
    sent: list[dict[str, Any]] = []

    async def send(message: Message) -> None:
        sent.append(dict(message))

    paced = _paced(send)
    body = bytes(range(256)) * (CHUNK // 256 * 2 + 1)
    await paced({"type": "http.response.start", "status": 200, "headers": []})
    await paced({"type": "http.response.body", "body": body, "more_body": False})
    assert [len(m.get("body", b"")) for m in sent] == [0, CHUNK, CHUNK, 256]
    assert [m.get("more_body") for m in sent[1:]] == [True, True, False]
    assert b"".join(m.get("body", b"") for m in sent) == body
    sent.clear()
    await paced({"type": "http.response.body", "body": body, "more_body": True})
    assert all(m.get("more_body") for m in sent)
    sent.clear()
    await paced({"type": "http.response.body", "body": b"small", "more_body": False})
    assert sent == [{"type": "http.response.body", "body": b"small", "more_body": False}]


def test_the_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    """A client spends its burst, is refused with the seconds until a token is back, and gets
    one token per 1/rate seconds, never more than the burst."""
    throttle = Throttle(ServerSettings(key_rate=2.0, key_burst=3, key_in_flight=10))
    for _ in range(3):
        throttle._admit("c", 100.0)
    with pytest.raises(Throttled) as refused:
        throttle._admit("c", 100.0)
    assert refused.value.retry_after == 1
    throttle._admit("c", 100.5)
    with pytest.raises(Throttled):
        throttle._admit("c", 100.5)
    for _ in range(3):
        throttle._admit("c", 1000.0)
    with pytest.raises(Throttled):
        throttle._admit("c", 1000.0)


def test_idle_clients_are_forgotten_and_busy_ones_kept() -> None:
    """Past _SWEEP_AT clients, those with a full bucket and nothing in flight are dropped."""
    throttle = Throttle(ServerSettings(key_rate=1.0, key_burst=2, key_in_flight=10))
    busy = throttle._admit("busy", 0.0)
    busy.in_flight = 1
    for n in range(_SWEEP_AT - 1):
        throttle._admit(f"idle-{n}", 0.0)
    throttle._admit("new", 10.0)
    assert set(throttle._clients) == {"busy", "new"}


def test_a_request_counts_against_its_key_else_its_address() -> None:
    """With keys on a request is its key's, wherever it comes from; with keys off, its address's."""
    alice = Key("alice", "0" * 64)
    keyed: Any = {"user": alice, "client": ("10.0.0.1", 1)}
    same_key: Any = {"user": alice, "client": ("10.0.0.2", 2)}
    anonymous: Any = {"client": ("10.0.0.1", 3)}
    assert _client_of(keyed) == _client_of(same_key) == "the key 'alice'"
    assert _client_of(anonymous) == "the client 10.0.0.1"
