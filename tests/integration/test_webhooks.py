"""Completion webhooks from the real service to real receivers on loopback: signed, retried until
accepted, kept across a kill -9, and sent only where the operator's allow-list says."""

from __future__ import annotations

import base64
import functools
import secrets
import signal
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.apitest import assert_problem, bearer
from support.live import SLOWNESS, ServerFactory, WarmpodServer, free_port, run_json, serving, wait_until
from support.receivers import ConnectionCounter, Receiver
from support.webhooks import (
    RELEASED,
    assert_headers,
    assert_payload,
    assert_signed,
    is_delivered,
    is_over,
    until_webhook,
    verified,
    webhook_counts,
    webhook_settings,
)

from warmpod import keys
from warmpod.client.webhooks import new_secret

pytestmark = pytest.mark.integration

SERVER_SECRETS = (new_secret(), new_secret())
"""The server's two signing secrets, as during a rotation: both sign every delivery."""
KEY_SECRET = new_secret()
"""The ``own`` key's signing secret, used for its runs instead of the server's."""
ATTEMPTS = 4
# Tries of 4 with fast retries: a given-up delivery takes 0.2 + 0.4 + 0.8 s, give or take a quarter.
GIVE_UP = 10.0 * SLOWNESS
# A run that ends delivers at once; a retry comes within its backoff and a look at the outbox.
DELIVER = 15.0 * SLOWNESS
# Long enough for any further try the server would make after the last one seen.
QUIET = 2.0
HTTP_TIMEOUT = 120
WRITES_A_FILE = "open('out/a.txt', 'w').write('hello')\nprint('done')\n"
SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"
RECEIVER_PORTS = ("retry", "keyed", "explicit", "down", "redirect", "target", "states")


@dataclass
class Hooks:
    """The module's server, the ports its allow-list names, and the keys of its keys file."""

    live: WarmpodServer
    ports: dict[str, int]
    tokens: dict[str, str]

    def client(self, key: str = "plain") -> httpx.Client:
        """A client of the server that presents ``key``."""
        return httpx.Client(base_url=self.live.url, headers=bearer(self.tokens[key]), timeout=HTTP_TIMEOUT)

    def url(self, port: str, path: str = "/hook") -> str:
        """``path`` at the loopback port named ``port``."""
        return f"http://127.0.0.1:{self.ports[port]}{path}"

    def status(self, run_id: str, key: str = "plain") -> dict[str, Any]:
        """The run's ``GET /status/{id}`` as ``key`` (whose run it must be) asks, answered 200."""
        with self.client(key) as client:
            response = client.get(f"/status/{run_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def counts(self) -> dict[str, float]:
        """The webhook counters of ``/metrics``."""
        with self.client() as client:
            response = client.get("/metrics")
        assert response.status_code == 200, response.text
        return webhook_counts(response.text)


@pytest.fixture(scope="module")
def hooks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hooks]:
    """One server, one worker, whose allow-list names a loopback port per receiver, a path-scoped
    one and a ``localhost`` one; its keys: ``plain``, and ``own`` with a signing secret and a
    default endpoint of its own."""
    directory = tmp_path_factory.mktemp("webhooks")
    ports = {name: free_port() for name in (*RECEIVER_PORTS, "scoped", "local", "unlisted")}
    tokens = {name: secrets.token_urlsafe(keys.KEY_BYTES) for name in ("plain", "own")}
    default = f"http://127.0.0.1:{ports['keyed']}/default"
    # The webhook= option last: its URL holds colons of its own.
    (directory / "keys").write_text(
        f"plain:{keys.digest(tokens['plain'])}\n"
        f"own:{keys.digest(tokens['own'])}:webhook_secret={KEY_SECRET}:webhook={default}\n"
    )
    allow = [
        *(f"http://127.0.0.1:{ports[name]}/" for name in RECEIVER_PORTS),
        f"http://127.0.0.1:{ports['scoped']}/hooks/",
        f"http://localhost:{ports['local']}/",
    ]
    settings = {
        "WARMPOD_POOL__SIZE": "1",
        "WARMPOD_POOL__PRELOAD": "",
        # One run at a time: a second one stays queued while the first runs.
        "WARMPOD_QUEUE__WORKERS": "1",
        "WARMPOD_SERVER__API_KEYS_FILE": str(directory / "keys"),
        **webhook_settings(allow, SERVER_SECRETS, attempts=ATTEMPTS),
    }
    with serving(directory, settings) as live:
        yield Hooks(live, ports, tokens)


def submit(client: httpx.Client, code: str, **fields: object) -> str:
    """POST ``code`` with ``wait`` false; it must answer 202; return the run's id."""
    response = client.post("/run-json/", json={"code": code, "wait": False, **fields})
    assert response.status_code == 202, response.text
    run_id: str = response.json()["id"]
    return run_id


def listed(client: httpx.Client) -> list[str]:
    """The ids of the first page of the caller's runs (``GET /runs``), newest first."""
    response = client.get("/runs")
    assert response.status_code == 200, response.text
    return [run["id"] for run in response.json()["runs"]]


def until_status(hooks: Hooks, run_id: str, wanted: set[str], timeout: float = 60.0) -> dict[str, Any]:
    """Poll the run until its status is one of ``wanted``; return its body then."""
    assert wait_until(lambda: hooks.status(run_id)["status"] in wanted, timeout), hooks.status(run_id)
    return hooks.status(run_id)


def test_a_receiver_that_fails_twice_gets_it_once_accepted_signed_by_both_secrets(hooks: Hooks) -> None:
    """A receiver answering 500, 503, then 204 gets three tries of one webhook, the same id on
    each, the waits between them growing, each signed by both of the server's secrets (and not by
    a key's); the run says delivered after 3 attempts, its files went as metadata only, and
    /metrics counted two rejections and one delivery."""
    before = hooks.counts()
    with Receiver(hooks.ports["retry"], answers=[500, 503], then=204) as receiver, hooks.client() as client:
        result = run_json(client, WRITES_A_FILE, callback_url=receiver.url("/hook?x=1"))
        run_id = result["id"]
        webhook = until_webhook(lambda: hooks.status(run_id), is_delivered, DELIVER, "delivered")
        time.sleep(QUIET)
        got = receiver.received
    assert [request.status for request in got] == [500, 503, 204], receiver.describe()
    assert {request.path for request in got} == {"/hook?x=1"}
    assert got[1].at - got[0].at >= 0.15, receiver.describe()
    assert got[2].at - got[1].at >= 0.3, receiver.describe()
    body = hooks.status(run_id)
    assert body["files"][0]["content"] == base64.b64encode(b"hello").decode(), body["files"]
    payloads = []
    for request in got:
        assert_headers(request, run_id)
        payloads.append(assert_signed(request, SERVER_SECRETS, others=[KEY_SECRET, new_secret()]))
    assert [payload["data"] for payload in payloads] == [payloads[0]["data"]] * 3
    payload = payloads[-1]
    assert_payload(payload, body)
    data = payload["data"]
    assert (data["id"], data["status"], data["stdout"]) == (run_id, "succeeded", "done\n"), data
    assert [(f["path"], f["size"], f["media_type"]) for f in data["files"]] == [
        ("out/a.txt", 5, "text/plain")
    ]
    assert webhook["url"] == receiver.url("/hook?x=1")
    assert (webhook["state"], webhook["attempts"], webhook["last_status"]) == ("delivered", 3, 204), webhook
    assert webhook["delivered_at"] is not None, webhook
    assert webhook["next_attempt_at"] is None, webhook
    after = hooks.counts()
    assert after.get("rejected", 0) - before.get("rejected", 0) == 2, (before, after)
    assert after.get("delivered", 0) - before.get("delivered", 0) == 1, (before, after)


def test_a_key_signs_with_its_own_secret_and_has_a_default_endpoint(hooks: Hooks) -> None:
    """A run of the ``own`` key that names no callback_url goes to the key's default endpoint,
    signed by the key's secret alone; one that names another URL goes there, signed the same way;
    one with callback_url null has no webhook, and nothing is sent for it."""
    with (
        Receiver(hooks.ports["keyed"]) as keyed,
        Receiver(hooks.ports["explicit"]) as explicit,
        hooks.client("own") as client,
    ):
        default_run = run_json(client, "print('default')")["id"]
        named_run = run_json(client, "print('named')", callback_url=explicit.url("/named"))["id"]
        quiet_run = run_json(client, "print('quiet')", callback_url=None)["id"]
        for run_id in (default_run, named_run):
            until_webhook(functools.partial(hooks.status, run_id, "own"), is_delivered, DELIVER, "delivered")
        time.sleep(QUIET)
        to_default, to_named = keyed.received, explicit.received
    assert hooks.status(quiet_run, "own")["webhook"] is None
    assert [(r.path, r.webhook_id, r.status) for r in to_default] == [("/default", default_run, 204)]
    assert [(r.path, r.webhook_id, r.status) for r in to_named] == [("/named", named_run, 204)]
    assert hooks.status(default_run, "own")["webhook"]["url"] == hooks.url("keyed", "/default")
    for request, run_id, stdout in (
        (to_default[0], default_run, "default\n"),
        (to_named[0], named_run, "named\n"),
    ):
        assert_headers(request, run_id)
        payload = assert_signed(request, [KEY_SECRET], others=SERVER_SECRETS)
        assert (payload["data"]["id"], payload["data"]["stdout"]) == (run_id, stdout)


def test_a_callback_url_outside_the_allow_list_is_a_422(hooks: Hooks) -> None:
    """Another port, scheme or host than an entry's, a path outside a scoped entry's, a name where
    the entry has an address: a 422 problem naming WARMPOD_WEBHOOKS__ALLOW; userinfo, a scheme not
    http(s), no URL or one past 2048 characters: a 422 too. In JSON and in a form; nothing runs."""
    port, scoped = hooks.ports["retry"], hooks.ports["scoped"]
    outside = ("WARMPOD_WEBHOOKS__ALLOW",)
    refused = [
        (f"http://127.0.0.1:{hooks.ports['unlisted']}/hook", outside),
        (f"https://127.0.0.1:{port}/hook", outside),
        (f"http://127.0.0.2:{port}/hook", outside),
        (f"http://localhost:{port}/hook", outside),
        (f"http://127.0.0.1:{scoped}/other", outside),
        (f"http://127.0.0.1:{scoped}/hooksx", outside),
        (f"http://127.0.0.1:{scoped}/", outside),
        (f"http://user:pw@127.0.0.1:{port}/hook", ()),
        (f"ftp://127.0.0.1:{port}/hook", ()),
        ("not a url", ()),
        (f"http://127.0.0.1:{port}/" + "a" * 2048, ("2048",)),
    ]
    with hooks.client() as client:
        before = listed(client)
        for url, words in refused:
            response = client.post("/run-json/", json={"code": "print(1)", "callback_url": url})
            assert_problem(response, 422, *words)
            form = client.post(
                "/run-file/", files={"file": ("main.py", b"print(1)")}, data={"callback_url": url}
            )
            assert_problem(form, 422, *words)
        assert listed(client) == before


def test_without_an_allow_list_any_callback_url_is_a_422(client: httpx.Client) -> None:
    """The session server has no WARMPOD_WEBHOOKS__ALLOW: a callback_url, even to loopback, is a
    422 problem naming that setting, in JSON and in a form; null is no webhook, and runs."""
    url = f"http://127.0.0.1:{free_port()}/hook"
    response = client.post("/run-json/", json={"code": "print(1)", "callback_url": url})
    assert_problem(response, 422, "WARMPOD_WEBHOOKS__ALLOW")
    form = client.post("/run-file/", files={"file": ("main.py", b"print(1)")}, data={"callback_url": url})
    assert_problem(form, 422, "WARMPOD_WEBHOOKS__ALLOW")
    result = run_json(client, "print(1)", callback_url=None)
    status = client.get(f"/status/{result['id']}").json()
    assert (status["status"], status["webhook"]) == ("succeeded", None), status


def test_a_name_that_resolves_to_loopback_is_never_contacted(hooks: Hooks) -> None:
    """The allow-list names ``localhost``, not its address: the run is accepted, but at delivery
    the name resolves to a loopback address, which no entry names, so no connection is ever made;
    the run's webhook says why, and /metrics counts refusals."""
    before = hooks.counts()
    with ConnectionCounter(hooks.ports["local"]) as counter, hooks.client() as client:
        url = f"http://localhost:{counter.port}/hook"
        run_id = run_json(client, "print('secret report')", callback_url=url)["id"]

        def refused(webhook: Mapping[str, Any]) -> bool:
            return webhook["state"] == "failed" or (
                webhook["state"] == "pending" and bool(webhook["last_error"])
            )

        until_webhook(lambda: hooks.status(run_id), refused, GIVE_UP, "refused")
        time.sleep(QUIET)
        webhook = hooks.status(run_id)["webhook"]
        assert counter.count == 0, counter.peers
    assert webhook["url"] == url
    assert webhook["state"] in {"failed", "pending"}, webhook
    # localhost's loopback addresses, whichever the resolver gives (a host may list ::1 first).
    assert any(address in (webhook["last_error"] or "") for address in ("127.0.0.1", "::1")), webhook
    assert (webhook["last_status"], webhook["delivered_at"]) == (None, None), webhook
    assert 1 <= webhook["attempts"] <= ATTEMPTS, webhook
    after = hooks.counts()
    assert after.get("refused", 0) > before.get("refused", 0), (before, after)
    assert after.get("delivered", 0) == before.get("delivered", 0), (before, after)
    if webhook["state"] == "failed":
        assert after.get("failed", 0) - before.get("failed", 0) == 1, (before, after)


def test_a_redirect_is_not_followed(hooks: Hooks) -> None:
    """A receiver that answers 307 to another (allowed) receiver: each try counts as a rejection,
    the other receiver gets nothing, and after its attempts the webhook is given up, failed."""
    before = hooks.counts()
    with Receiver(hooks.ports["target"]) as target, hooks.client() as client:
        elsewhere = target.url("/caught")
        with Receiver(hooks.ports["redirect"], then=(307, {"Location": elsewhere})) as redirect:
            run_id = run_json(client, "print('moved')", callback_url=redirect.url())["id"]
            webhook = until_webhook(lambda: hooks.status(run_id), is_over, GIVE_UP, "given up")
            time.sleep(QUIET)
            tried = redirect.received
        assert target.received == []
    assert [request.status for request in tried] == [307] * ATTEMPTS, redirect.describe()
    assert (webhook["state"], webhook["attempts"], webhook["last_status"]) == ("failed", ATTEMPTS, 307), (
        webhook
    )
    assert (webhook["delivered_at"], webhook["next_attempt_at"]) == (None, None), webhook
    after = hooks.counts()
    assert after.get("rejected", 0) - before.get("rejected", 0) == ATTEMPTS, (before, after)
    assert after.get("failed", 0) - before.get("failed", 0) == 1, (before, after)


def test_a_receiver_that_comes_up_late_gets_it(hooks: Hooks) -> None:
    """A receiver that is down (its port refuses connections) when the run ends: the first try
    counts as unreachable, with no status and an error; once it listens, a retry delivers."""
    before = hooks.counts()
    receiver = Receiver(hooks.ports["down"], start=False)
    try:
        with hooks.client() as client:
            run_id = run_json(client, "print('late')", callback_url=receiver.url())["id"]

        def tried(webhook: Mapping[str, Any]) -> bool:
            return int(webhook["attempts"]) >= 1

        failed = until_webhook(lambda: hooks.status(run_id), tried, DELIVER, "tried")
        receiver.start()
        assert (failed["state"], failed["last_status"]) == ("pending", None), failed
        assert failed["last_error"], failed
        assert failed["next_attempt_at"] is not None, failed
        webhook = until_webhook(lambda: hooks.status(run_id), is_delivered, DELIVER, "delivered")
        time.sleep(QUIET)
        got = receiver.received
    finally:
        receiver.stop()
    assert [(r.webhook_id, r.status) for r in got] == [(run_id, 204)], receiver.describe()
    assert 2 <= webhook["attempts"] <= ATTEMPTS, webhook
    assert verified(got[0], SERVER_SECRETS[1])["data"]["stdout"] == "late\n"
    after = hooks.counts()
    assert after.get("unreachable", 0) - before.get("unreachable", 0) == webhook["attempts"] - 1, (
        before,
        after,
    )


def test_every_final_state_sends_one(hooks: Hooks) -> None:
    """A run cancelled while queued, one cancelled while running, one past its timeout and one that
    failed (posted as a form): each sends one webhook whose data has its final status; while a run
    is not over its webhook waits."""
    with Receiver(hooks.ports["states"]) as receiver, hooks.client() as client:
        url = receiver.url("/states")
        busy = submit(client, SLEEPER, callback_url=url)
        assert wait_until(lambda: hooks.status(busy)["stdout"] == "started\n", 60), hooks.status(busy)
        queued = submit(client, "print('never')", callback_url=url)
        for run_id in (busy, queued):
            webhook = hooks.status(run_id)["webhook"]
            assert (webhook["url"], webhook["state"], webhook["attempts"]) == (url, "waiting", 0), webhook
        assert client.delete(f"/status/{queued}").json()["status"] == "cancelled"
        assert client.delete(f"/status/{busy}").json()["status"] == "cancelled"
        late = submit(client, SLEEPER, callback_url=url, timeout=1)
        form = client.post(
            "/run-file/",
            files={"file": ("main.py", b"raise SystemExit(3)\n")},
            data={"callback_url": url, "wait": "false"},
        )
        assert form.status_code == 202, form.text
        failed = form.json()["id"]
        expected = {queued: "cancelled", busy: "cancelled", late: "timeout", failed: "failed"}
        for run_id, status in expected.items():
            assert until_status(hooks, run_id, {status})["status"] == status
            until_webhook(functools.partial(hooks.status, run_id), is_delivered, DELIVER, "delivered")
        time.sleep(QUIET)
        got = receiver.received
    assert Counter(request.webhook_id for request in got) == dict.fromkeys(expected, 1), receiver.describe()
    for request in got:
        payload = assert_signed(request, SERVER_SECRETS)
        assert payload["data"]["status"] == expected[request.webhook_id], payload
        assert_payload(payload, hooks.status(request.webhook_id))


def test_a_receiver_down_across_a_kill_9_gets_it_after_the_restart(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """The receiver is down when the run ends and stays down while tries fail; the server is
    killed -9, the receiver comes up, and a new server on the same store delivers the webhook,
    once, signed, with the run's output."""
    secret = new_secret()
    receiver = Receiver(free_port(), start=False)
    settings = {
        "WARMPOD_QUEUE__STORE_PATH": str(tmp_path / "shared.sqlite3"),
        "WARMPOD_POOL__PRELOAD": "",
        # Tries 0.5, 1, 2, 4... s apart: the restart comes well before the last of 8.
        **webhook_settings(
            [f"http://127.0.0.1:{receiver.port}/"], [secret], attempts=8, WARMPOD_WEBHOOKS__FIRST_RETRY="0.5"
        ),
    }
    first = start_server(**settings)
    first.wait_healthy()
    try:
        with httpx.Client(base_url=first.url, timeout=HTTP_TIMEOUT) as client:
            run_id = run_json(client, "print('before the crash')", callback_url=receiver.url())["id"]

            def status() -> dict[str, Any]:
                body: dict[str, Any] = client.get(f"/status/{run_id}").json()
                return body

            webhook = until_webhook(status, lambda w: int(w["attempts"]) >= 2, DELIVER, "tried twice")
        assert (webhook["state"], webhook["last_status"]) == ("pending", None), webhook
        first.stop(signal.SIGKILL)
        receiver.start()

        second = start_server(**settings)
        second.wait_healthy()
        with httpx.Client(base_url=second.url, timeout=HTTP_TIMEOUT) as client:

            def restarted() -> dict[str, Any]:
                body: dict[str, Any] = client.get(f"/status/{run_id}").json()
                return body

            webhook = until_webhook(
                restarted, is_delivered, RELEASED * SLOWNESS, "delivered after the restart"
            )
            time.sleep(QUIET)
            result = restarted()
        got = receiver.received
    finally:
        receiver.stop()
    assert [(r.webhook_id, r.status) for r in got] == [(run_id, 204)], receiver.describe()
    assert_headers(got[0], run_id)
    payload = assert_signed(got[0], [secret])
    assert_payload(payload, result)
    assert (payload["data"]["status"], payload["data"]["stdout"]) == ("succeeded", "before the crash\n")
    assert webhook["attempts"] >= 3, webhook
    assert webhook["last_status"] == 204, webhook
