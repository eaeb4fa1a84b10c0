"""For a webhook's receiver: check a warmpod webhook's signature and read the run it carries."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence

import msgspec
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from warmpod.models import WebhookEvent

__all__ = ["WebhookVerificationError", "new_secret", "verify"]


def verify(secret: str | Sequence[str], body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
    """The event a webhook carries, once its signature matches one of the secrets and its
    timestamp is within five minutes of now (Standard Webhooks), so a replay is refused.

    Args:
        secret: the ``whsec_`` secret (or several, while one replaces another) it is signed with.
        body: the request's body, exactly as received.
        headers: the request's headers (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``).

    Raises:
        WebhookVerificationError: no secret's signature matches, a header is missing, or the
            timestamp is too old or too new.
        msgspec.ValidationError: the body is not a warmpod webhook.
    """
    candidates = [secret] if isinstance(secret, str) else list(secret)
    error = WebhookVerificationError("no secret given")
    for candidate in candidates:
        try:
            Webhook(candidate).verify(body, dict(headers), json_parse=False)
        except WebhookVerificationError as exc:
            error = exc
            continue
        return msgspec.json.decode(body, type=WebhookEvent)
    raise error


def new_secret() -> str:
    """A new signing secret: ``whsec_`` and the base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")
