"""Per-client bounds at the HTTP edge: a request rate and a number of requests in flight per API
key (per client address where keys are off), so that no client takes the whole server.

A request counts as in flight until the last byte of its answer is handed to the connection, and
answers are handed over in pieces that wait for the client to read (uvicorn's flow control): a
client that asks and never reads holds its own slots, and its answers wait in this process's
memory only that many at a time. A batch of runs counts as one request per run. ``/health`` and
``/metrics`` are never limited.

Litestar's ``RateLimitMiddleware`` is not used: it counts in fixed windows (twice the rate passes
across a window's edge), rewrites a JSON list of every request's time on each request under one
lock, sends no ``Retry-After``, and has no bound on requests in flight, which this needs anyway.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, HTTPResponseBodyEvent, Message, Receive, Scope, Send

from warmpod.errors import Throttled
from warmpod.keys import Key
from warmpod.settings import ServerSettings

EXEMPT = frozenset({"/health", "/metrics"})
"""What is never limited: a load balancer's health check and the metrics scraper."""
CHUNK = 64 * 1024
"""The pieces an answer is handed to the connection in; uvicorn waits between them while the
client has not read the ones before (its write buffer's high-water mark is the same 64 KiB)."""
# Past this many clients remembered, those whose bucket has refilled and who have nothing in
# flight are forgotten: where keys are off, every address would otherwise stay for good.
_SWEEP_AT = 4096


@dataclass
class _Client:
    """One client's token bucket and requests in flight."""

    tokens: float
    at: float = field(default_factory=time.monotonic)
    in_flight: int = 0


class Throttle(ASGIMiddleware):
    """Answers 429 (``Retry-After``) to a client past its rate or its requests in flight; one
    instance serves every route, so a client's counts are the same whichever it calls."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: ServerSettings) -> None:
        self.should_bypass_for_scope = _exempt
        self._rate = settings.key_rate
        self._burst = float(settings.key_burst)
        self._max_in_flight = settings.key_in_flight
        self._clients: dict[str, _Client] = {}

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Admit the request within its client's bounds, and hold its slot until it is answered."""
        client = self._admit(_client_of(scope), time.monotonic())
        client.in_flight += 1
        try:
            await next_app(scope, receive, _paced(send))
        finally:
            client.in_flight -= 1

    def charge(self, scope: Scope, requests: int) -> None:
        """Count ``requests`` more against the client of the request in ``scope``, one being
        served: a batch of runs costs what as many submits would. Its bucket may go below empty,
        so that a batch is never refused for its size alone; the client's next requests then wait
        until it has refilled, and its rate holds on average."""
        client = self._clients.get(_client_of(scope))
        # There while its request is in flight: only a client with nothing in flight is swept.
        if client is not None:
            client.tokens -= requests

    def _admit(self, name: str, now: float) -> _Client:
        client = self._clients.get(name)
        if client is None:
            if len(self._clients) >= _SWEEP_AT:
                self._sweep(now)
            client = self._clients[name] = _Client(self._burst, now)
        client.tokens = min(self._burst, client.tokens + (now - client.at) * self._rate)
        client.at = now
        if client.in_flight >= self._max_in_flight:
            raise Throttled(
                f"{name} has {client.in_flight} requests in flight, as many as it may "
                "(WARMPOD_SERVER__KEY_IN_FLIGHT): retry once one is answered",
                retry_after=1,
            )
        if client.tokens < 1:
            raise Throttled(
                f"{name} sends more than {self._rate:g} requests a second (WARMPOD_SERVER__KEY_RATE)",
                retry_after=math.ceil((1 - client.tokens) / self._rate),
            )
        client.tokens -= 1
        return client

    def _sweep(self, now: float) -> None:
        for name, client in list(self._clients.items()):
            if not client.in_flight and client.tokens + (now - client.at) * self._rate >= self._burst:
                del self._clients[name]


def _exempt(scope: Scope) -> bool:
    return scope["path"].rstrip("/") in EXEMPT


def _client_of(scope: Scope) -> str:
    """Who a request is counted against: its key, or its address where keys are off."""
    user: Any = scope.get("user")
    if isinstance(user, Key):
        return f"the key {user.name!r}"
    address = scope.get("client")
    return f"the client {address[0] if address else 'unknown'}"


def _paced(send: Send) -> Send:
    """``send`` with a large body handed over in CHUNK pieces, each after the client read enough."""

    async def paced(message: Message) -> None:
        body: bytes = message.get("body", b"") if message["type"] == "http.response.body" else b""
        if len(body) <= CHUNK:
            await send(message)
            return
        more = bool(message.get("more_body", False))
        for start in range(0, len(body), CHUNK):
            piece: HTTPResponseBodyEvent = {
                "type": "http.response.body",
                "body": body[start : start + CHUNK],
                "more_body": more or start + CHUNK < len(body),
            }
            await send(piece)

    return paced
