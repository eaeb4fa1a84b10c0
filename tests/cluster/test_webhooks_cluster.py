"""Webhooks of two nodes on one PostgreSQL queue: every final run's delivered once, by either node,
and a dead node's pending delivery finished by the other."""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from support.live import SLOWNESS, free_port
from support.postgres import PostgresServer
from support.receivers import Receiver
from support.webhooks import (
    RELEASED,
    assert_headers,
    assert_payload,
    assert_signed,
    is_delivered,
    until_webhook,
    webhook_settings,
)

from warmpod.client.webhooks import new_secret

from .nodes import NAMES, REAP_MARGIN, Cluster, cancel, final, occupy, run, status, submit

pytestmark = pytest.mark.integration

RUNS = 20
# Ample: the node-loss test must not see its delivery given up (0.2 s doubling ten times).
ATTEMPTS = 10
# Longer than several looks at the outbox by each node: a second delivery would have come by then.
QUIET = 3.0
SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep(100)\n"


@dataclass
class Hooked:
    """Two nodes that send webhooks to two loopback ports, signed by one secret."""

    cluster: Cluster
    ports: dict[str, int]
    secret: str


@pytest.fixture(scope="module")
def _hooked(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer) -> Iterator[Hooked]:
    """The module's two nodes on a database of their own; every node stopped at the end."""
    ports = {"many": free_port(), "flaky": free_port()}
    secret = new_secret()
    allow = [f"http://127.0.0.1:{port}/" for port in ports.values()]
    cluster = Cluster(
        tmp_path_factory.mktemp("webhook-cluster"),
        postgres_server.create_database("webhooks"),
        settings=webhook_settings(allow, [secret], attempts=ATTEMPTS),
    )
    try:
        yield Hooked(cluster, ports, secret)
    finally:
        cluster.close()


@pytest.fixture
def hooked(_hooked: Hooked) -> Hooked:
    """Both nodes up with a ready sandbox each and an empty queue."""
    _hooked.cluster.ensure()
    return _hooked


def test_each_run_s_webhook_is_delivered_once_whichever_node_ran_it(hooked: Hooked) -> None:
    """Runs submitted to both nodes in turn, each naming a path of one receiver that accepts at
    once: each run's webhook arrives exactly once (counted by webhook-id), at its own path,
    signed, with its output; both nodes say it was delivered at the first attempt."""
    cluster = hooked.cluster
    with Receiver(hooked.ports["many"]) as receiver:
        runs = {
            submit(cluster[NAMES[i % 2]], f"print({i})", callback_url=receiver.url(f"/runs/{i}")): i
            for i in range(RUNS)
        }
        results = {run_id: final(cluster[NAMES[0]], run_id, timeout=180 * SLOWNESS) for run_id in runs}
        receiver.wait_for(
            lambda got: {r.webhook_id for r in got} >= runs.keys(), 30 * SLOWNESS, "every run's"
        )
        time.sleep(QUIET)
        got = receiver.received
    counted = Counter(request.webhook_id for request in got)
    assert counted == dict.fromkeys(runs, 1), receiver.describe()
    for request in got:
        run_id = request.webhook_id
        index = runs[run_id]
        assert request.path == f"/runs/{index}", request
        assert request.status == 204
        assert_headers(request, run_id)
        payload = assert_signed(request, [hooked.secret], others=[new_secret()])
        assert_payload(payload, results[run_id])
        assert (payload["data"]["status"], payload["data"]["stdout"]) == ("succeeded", f"{index}\n")
    for run_id in runs:
        for name in NAMES:
            webhook = status(cluster[name], run_id)["webhook"]
            assert (webhook["state"], webhook["attempts"], webhook["last_status"]) == ("delivered", 1, 204), (
                name,
                webhook,
            )


def test_a_pending_webhook_of_a_killed_node_is_delivered_by_the_other(hooked: Hooked) -> None:
    """A run ends on node A while its receiver answers 500; A is killed -9 with the webhook still
    pending; once the receiver accepts, node B delivers it, once."""
    cluster = hooked.cluster
    busy = occupy(cluster, SLEEPER, {"node-b"})["node-b"]
    a, b = cluster["node-a"], cluster["node-b"]
    with Receiver(hooked.ports["flaky"], then=500) as receiver:
        result = run(a, "print('ran on a')", callback_url=receiver.url("/flaky"))
        run_id = result["id"]
        assert result["node"] == "node-a", result
        tried = until_webhook(
            functools.partial(status, b, run_id), lambda w: int(w["attempts"]) >= 2, 30 * SLOWNESS, "tried"
        )
        assert (tried["state"], tried["last_status"]) == ("pending", 500), tried
        cluster.kill("node-a")
        killed = time.time()
        receiver.answer(then=204)
        webhook = until_webhook(
            functools.partial(status, b, run_id),
            is_delivered,
            RELEASED * SLOWNESS + REAP_MARGIN,
            "delivered",
        )
        time.sleep(QUIET)
        got = receiver.received
    accepted = [request for request in got if request.accepted]
    assert len(accepted) == 1, receiver.describe()
    assert {request.webhook_id for request in got} == {run_id}
    assert all(request.status == 500 for request in got if request.at < killed), receiver.describe()
    # Node A was dead by then: node B sent it.
    assert accepted[0].at > killed, receiver.describe()
    assert got[-1] == accepted[0], receiver.describe()
    assert_headers(accepted[0], run_id)
    payload = assert_signed(accepted[0], [hooked.secret])
    assert_payload(payload, status(b, run_id))
    assert (payload["data"]["node"], payload["data"]["stdout"]) == ("node-a", "ran on a\n")
    assert (webhook["state"], webhook["last_status"]) == ("delivered", 204), webhook
    # A try A was making when it died may have reached the receiver without being counted, or
    # been counted without reaching it.
    assert abs(webhook["attempts"] - len(got)) <= 1, (webhook, receiver.describe())
    assert cancel(b, busy).status_code == 200
