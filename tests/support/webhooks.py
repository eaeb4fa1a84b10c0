"""What the webhook suites check of a delivery: its Standard Webhooks signature, its payload, the run's
``webhook`` state, the ``/metrics`` counters; and the settings that make retries fast."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from support.receivers import Received

EVENT = "run.finished"
WEBHOOK_FIELDS = {"url", "state", "attempts", "last_status", "last_error", "delivered_at", "next_attempt_at"}
"""The keys of a run's ``webhook`` object in ``GET /status/{id}``."""
STATES = {"waiting", "pending", "delivered", "failed"}
OUTCOMES = {"delivered", "rejected", "unreachable", "refused"}
"""The ``outcome`` label values of ``warmpod_webhook_attempts_total``."""
ATTEMPTS_SERIES = "warmpod_webhook_attempts_total"
FAILED_SERIES = "warmpod_webhooks_failed_total"
# Fast retries: 0.2 s before the second try, 0.4 before the third (each give or take a quarter).
FIRST_RETRY = 0.2
POLL = 0.2
# One try's bound: the receivers here answer at once.
TRY_TIMEOUT = 2.0
RELEASED = TRY_TIMEOUT + 30.0 + 15.0
"""How long a try that a killed server had claimed may hold its webhook before another server or
node takes it: the claim's lease (the try's timeout and a margin of 30 s), and some slack."""
# The result fields a payload's ``data`` carries as /status answers them (files apart).
RESULT_FIELDS = (
    "id",
    "status",
    "exit_code",
    "stdout",
    "stderr",
    "stdout_truncated",
    "stderr_truncated",
    "limits_hit",
    "duration_ms",
    "error",
    "files_truncated",
    "node",
    "environment",
    "labels",
)


def webhook_settings(
    allow: Sequence[str], secrets: Sequence[str] = (), attempts: int = 3, **more: str
) -> dict[str, str]:
    """The ``WARMPOD_WEBHOOKS__*`` environment of a server that sends webhooks to ``allow`` only,
    signed with ``secrets``, tried ``attempts`` times in all, with the fast retries and short tries
    above; ``more`` adds or overrides variables."""
    settings = {
        "WARMPOD_WEBHOOKS__ALLOW": ",".join(allow),
        "WARMPOD_WEBHOOKS__ATTEMPTS": str(attempts),
        "WARMPOD_WEBHOOKS__FIRST_RETRY": str(FIRST_RETRY),
        "WARMPOD_WEBHOOKS__POLL": str(POLL),
        "WARMPOD_WEBHOOKS__TIMEOUT": str(TRY_TIMEOUT),
    }
    if secrets:
        settings["WARMPOD_WEBHOOKS__SECRETS"] = ",".join(secrets)
    settings.update(more)
    return settings


def verified(received: Received, secret: str) -> dict[str, Any]:
    """The payload of ``received`` once ``standardwebhooks`` verified its signature with ``secret``."""
    payload: dict[str, Any] = Webhook(secret).verify(received.body, received.headers)
    return payload


def assert_signed(received: Received, signers: Sequence[str], others: Sequence[str] = ()) -> dict[str, Any]:
    """Check ``received`` carries one ``v1`` signature per secret of ``signers``, each verifying
    alone, and that none of ``others`` verifies it; return its payload."""
    signatures = received.headers["webhook-signature"].split(" ")
    assert len(signatures) == len(signers), signatures
    assert all(signature.startswith("v1,") for signature in signatures), signatures
    payloads = [verified(received, secret) for secret in signers]
    for secret in others:
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(received.body, received.headers)
    return payloads[0]


def assert_headers(received: Received, run_id: str) -> None:
    """A delivery is a JSON POST whose ``webhook-id`` is the run's id and whose
    ``webhook-timestamp`` is the unix second it was sent (this machine's clock)."""
    assert received.method == "POST", received
    assert received.headers["content-type"].split(";")[0].strip() == "application/json", received.headers
    assert received.webhook_id == run_id, received.headers
    stamp = received.headers["webhook-timestamp"]
    assert stamp.isdigit(), stamp
    assert abs(int(stamp) - received.at) < 5, (stamp, received.at)


def assert_payload(payload: Mapping[str, Any], result: Mapping[str, Any]) -> None:
    """``payload`` is a ``run.finished`` event whose data is ``result`` (as /status answers it)
    with every file as metadata only: path, size and media type, its content null."""
    assert payload["type"] == EVENT, payload
    stamp = datetime.fromisoformat(payload["timestamp"])
    assert stamp.utcoffset() is not None, payload["timestamp"]
    assert abs(stamp.timestamp() - time.time()) < timedelta(minutes=5).total_seconds(), payload["timestamp"]
    data = payload["data"]
    for name in RESULT_FIELDS:
        assert data[name] == result[name], (name, data, result)
    assert len(data["files"]) == len(result["files"]), (data["files"], result["files"])
    for sent, kept in zip(data["files"], result["files"], strict=True):
        assert (sent["path"], sent["size"], sent["media_type"]) == (
            kept["path"],
            kept["size"],
            kept["media_type"],
        ), (sent, kept)
        assert sent["content"] is None, sent


def until_webhook(
    status: Callable[[], Mapping[str, Any]],
    done: Callable[[Mapping[str, Any]], bool],
    timeout: float,
    what: str,
) -> dict[str, Any]:
    """Poll ``status()`` (a run's /status body) until its ``webhook`` satisfies ``done``; return
    that webhook object."""
    deadline = time.monotonic() + timeout
    while True:
        body = status()
        webhook = body["webhook"]
        assert webhook is not None, body
        assert set(webhook) == WEBHOOK_FIELDS, webhook
        assert webhook["state"] in STATES, webhook
        if done(webhook):
            return dict(webhook)
        assert time.monotonic() < deadline, (
            f"webhook of run {body['id']} not {what} after {timeout:.0f} s: {body}"
        )
        time.sleep(0.05)


def is_delivered(webhook: Mapping[str, Any]) -> bool:
    """Whether the webhook was delivered."""
    return bool(webhook["state"] == "delivered")


def is_over(webhook: Mapping[str, Any]) -> bool:
    """Whether the webhook was delivered or given up."""
    return webhook["state"] in {"delivered", "failed"}


def webhook_counts(metrics_text: str) -> dict[str, float]:
    """``warmpod_webhook_attempts_total`` by outcome, and ``warmpod_webhooks_failed_total`` under
    the key ``"failed"``, from a ``/metrics`` answer."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == ATTEMPTS_SERIES:
                outcome = sample.labels["outcome"]
                counts[outcome] = counts.get(outcome, 0.0) + sample.value
            elif sample.name == FAILED_SERIES:
                counts["failed"] = counts.get("failed", 0.0) + sample.value
    return counts
