"""The webhook suites' own tools: the loopback receiver, the connection counter and the signature checks."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime

import httpx
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from support.receivers import ConnectionCounter, Receiver
from support.webhooks import assert_headers, assert_signed, webhook_counts

from warmpod.client.webhooks import new_secret


def signed_post(url: str, secrets: list[str], body: bytes, msg_id: str = "run-1") -> httpx.Response:
    """POST ``body`` to ``url`` as a Standard Webhooks sender does, one signature per secret."""
    now = datetime.now(UTC)
    signature = " ".join(Webhook(secret).sign(msg_id, now, body) for secret in secrets)
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
    return httpx.post(url, content=body, headers=headers, timeout=5)


def test_a_receiver_answers_its_program_then_its_steady_answer_and_records_each_request() -> None:
    """Answers 500, 503, then 204 for ever; each request is kept with its path, headers and body."""
    with Receiver(answers=[500, 503], then=204) as receiver:
        statuses = [
            httpx.post(receiver.url("/h?q=1"), content=b"%d" % n, timeout=5).status_code for n in range(4)
        ]
        got = receiver.received
    assert statuses == [500, 503, 204, 204]
    assert [(r.method, r.path, r.body, r.status) for r in got] == [
        ("POST", "/h?q=1", b"%d" % n, status) for n, status in enumerate(statuses)
    ]
    assert [r.accepted for r in got] == [False, False, True, True]
    assert all(r.headers["content-length"] == "1" for r in got)
    assert got[0].at <= got[-1].at <= time.time()


def test_a_receiver_can_answer_with_headers_and_be_reprogrammed() -> None:
    """An answer may carry headers (a redirect's Location, not followed here); ``answer`` reprograms it."""
    with Receiver(then=(307, {"Location": "http://127.0.0.1:9/elsewhere"})) as receiver:
        moved = httpx.post(receiver.url(), content=b"{}", timeout=5)
        receiver.answer([202], then=500)
        after = [httpx.post(receiver.url(), timeout=5).status_code for _ in range(2)]
    assert (moved.status_code, moved.headers["location"]) == (307, "http://127.0.0.1:9/elsewhere")
    assert after == [202, 500]


def test_a_stopped_receiver_refuses_connections_and_starts_again_on_its_port() -> None:
    """Stopped, its port refuses; started again, the same port answers and the record goes on."""
    receiver = Receiver()
    try:
        port = receiver.port
        assert httpx.post(receiver.url(), timeout=5).status_code == 204
        receiver.stop()
        assert not receiver.up
        with pytest.raises(httpx.ConnectError):
            httpx.post(receiver.url(), timeout=5)
        receiver.start()
        assert receiver.port == port
        assert httpx.post(receiver.url(), timeout=5).status_code == 204
        assert len(receiver.wait_accepted(2, timeout=5)) == 2
    finally:
        receiver.stop()


def test_a_receiver_created_down_takes_its_port_when_started() -> None:
    """``start=False`` on a given port: nothing listens there until ``start``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = Receiver(port, start=False)
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(receiver.url(), timeout=5)
        receiver.start()
        assert httpx.get(receiver.url(), timeout=5).status_code == 204
    finally:
        receiver.stop()


def test_the_counter_counts_connections_and_reads_nothing() -> None:
    """Every connection is accepted and closed at once, unanswered; a closed counter refuses."""
    with ConnectionCounter() as counter:
        assert "127.0.0.1" in counter.addresses
        for _ in range(2):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{counter.port}/", timeout=5)
        deadline = time.monotonic() + 5
        while counter.count < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert counter.count == 2
        assert {host for host, _ in counter.peers} == {"127.0.0.1"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{counter.port}/", timeout=5)


def test_signature_checks_take_each_rotated_secret_and_refuse_others() -> None:
    """A delivery signed by two secrets verifies with each; a third secret's check fails, as does
    a check that expects one signature fewer."""
    first, second, other = new_secret(), new_secret(), new_secret()
    with Receiver() as receiver:
        signed_post(receiver.url(), [first, second], b'{"type": "run.finished"}')
        (received,) = receiver.received
    assert_headers(received, "run-1")
    assert assert_signed(received, [first, second], others=[other]) == {"type": "run.finished"}
    with pytest.raises(AssertionError):
        assert_signed(received, [first])
    with pytest.raises(WebhookVerificationError):
        assert_signed(received, [first, other])


def test_webhook_counts_reads_both_series() -> None:
    """The attempts counter by outcome and the given-up counter, from Prometheus's text format."""
    text = (
        "# TYPE warmpod_webhook_attempts_total counter\n"
        'warmpod_webhook_attempts_total{outcome="delivered"} 3.0\n'
        'warmpod_webhook_attempts_total{outcome="refused"} 1.0\n'
        "# TYPE warmpod_webhooks_failed_total counter\n"
        "warmpod_webhooks_failed_total 2.0\n"
    )
    assert webhook_counts(text) == {"delivered": 3.0, "refused": 1.0, "failed": 2.0}
