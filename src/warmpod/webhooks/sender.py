"""One try of one webhook: signed as Standard Webhooks says, posted to the address the allow-list
checked, never redirected, its answer's status read and its body left unread."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import anyio
import httpx
import msgspec
from standardwebhooks.webhooks import Webhook

from warmpod.errors import InvalidCallback, SettingsError
from warmpod.models import RunResult, WebhookEvent
from warmpod.webhooks.destinations import Destinations, Target

Outcome = Literal["delivered", "rejected", "unreachable", "refused"]
"""How a try went: a 2xx answer; another answer; no answer (connection, TLS or time-out); or not
tried, the destination not allowed."""


@dataclass(frozen=True)
class Sent:
    """What one try learned."""

    outcome: Outcome
    status: int | None = None
    """The receiver's HTTP status, when it answered."""
    error: str | None = None
    """Why it was not delivered."""


def signers(secrets: tuple[str, ...], where: str) -> tuple[Webhook, ...]:
    """The signers of ``whsec_`` secrets.

    Raises:
        SettingsError: one is not base64 of at least 16 bytes (``where`` names the setting).
    """
    found = []
    for secret in secrets:
        try:
            raw = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except binascii.Error:
            raw = b""
        if len(raw) < 16:
            raise SettingsError(
                f"{where}: a webhook secret must be whsec_ and the base64 of 16 or more random bytes"
            )
        found.append(Webhook(raw))
    return tuple(found)


def body(result: RunResult) -> bytes:
    """The JSON a webhook carries: the event of ``result``, stamped now."""
    sent = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return msgspec.json.encode(WebhookEvent(type="run.finished", timestamp=sent, data=result))


def headers(message_id: str, payload: bytes, signing: tuple[Webhook, ...]) -> dict[str, str]:
    """The Standard Webhooks headers of one try: a signature per secret, space-separated."""
    now = datetime.fromtimestamp(int(time.time()), UTC)
    signatures = " ".join(webhook.sign(message_id, now, payload) for webhook in signing)
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
        "user-agent": "warmpod-webhooks",
    }


async def send(
    client: httpx.AsyncClient,
    destinations: Destinations,
    url: str,
    sent_headers: dict[str, str],
    payload: bytes,
    timeout: float,
) -> Sent:
    """Post ``payload`` to ``url`` once, within ``timeout`` seconds in all (resolving the name
    included), connecting to the address ``destinations`` checks now."""
    # httpx's timeout bounds each read, not the try: a receiver trickling its headers is cut here.
    with anyio.move_on_after(timeout):
        try:
            target = await destinations.target(url)
        except InvalidCallback as exc:
            return Sent("refused", error=str(exc))
        try:
            response = await client.send(_request(client, target, sent_headers, payload), stream=True)
        except httpx.HTTPError as exc:
            return Sent("unreachable", error=f"{type(exc).__name__}: {exc}"[:500])
        # The body is never read: a receiver's answer is its status alone, whatever it sends.
        await response.aclose()
        status = response.status_code
        if 200 <= status < 300:
            return Sent("delivered", status=status)
        return Sent("rejected", status=status, error=f"the receiver answered {status}")
    return Sent("unreachable", error=f"no answer within {timeout:g} s (WARMPOD_WEBHOOKS__TIMEOUT)")


def _request(
    client: httpx.AsyncClient, target: Target, sent_headers: dict[str, str], payload: bytes
) -> httpx.Request:
    """The request of a try, to the checked address, with the URL's own host and TLS name."""
    pinned = httpx.URL(target.url).copy_with(host=str(target.address))
    default_port = {"http": 80, "https": 443}[pinned.scheme]
    netloc = target.host if target.port == default_port else f"{target.host}:{target.port}"
    return client.build_request(
        "POST",
        pinned,
        content=payload,
        headers={**sent_headers, "host": netloc},
        # The TLS name (and the certificate checked against it) is the URL's, not the address's.
        extensions={"sni_hostname": target.host},
    )


def client(timeout: float) -> httpx.AsyncClient:
    """The HTTP client every delivery of a node shares: no proxy from the environment (it would
    take the request past the address check), no redirects, ``timeout`` for the whole try."""
    return httpx.AsyncClient(
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=0),
    )
