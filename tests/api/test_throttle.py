"""Per-key bounds on the real app: a request rate and requests in flight, 429 past either, for
one key only; /health and /metrics never limited; a client that never reads holds its own slots."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import pytest
import uvicorn
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import MAX_BODY, POOL_SIZE, PROBLEMS, assert_problem, bearer, served
from support.fakes import RecordingRunner
from support.live import wait_until

from warmpod import cli, keys
from warmpod.client import Client, ProblemError
from warmpod.host import image
from warmpod.sandbox.protocol import FileChunk
from warmpod.settings import Settings, from_env

BURST = 5
IN_FLIGHT = 2
# Far bigger than what the kernel buffers for a connection whose reader has a 4 KiB window.
BIG_FILE = 8 * 1024 * 1024
NO_RUN = f"/status/{'0' * 32}"


@pytest.fixture
def secrets(tmp_path: Path) -> dict[str, str]:
    """The keys of two tenants, as `warmpod keys add` printed them."""
    key_file = tmp_path / "keys"
    return {"alice": keys.add(key_file, "alice"), "bob": keys.add(key_file, "bob")}


@pytest.fixture
def settings(tmp_path: Path, secrets: dict[str, str]) -> Settings:
    """Keys on, a burst of BURST requests refilled at one a second, IN_FLIGHT requests at once."""
    return from_env(
        {},
        server={
            "max_body_bytes": MAX_BODY,
            "api_keys_file": str(tmp_path / "keys"),
            "key_rate": 1.0,
            "key_burst": BURST,
            "key_in_flight": IN_FLIGHT,
        },
        pool={"size": POOL_SIZE},
    )


@pytest.fixture
def tenants(live: str, secrets: dict[str, str]) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """Clients of alice and bob on the app served by uvicorn."""
    with (
        httpx.Client(base_url=live, headers=bearer(secrets["alice"]), timeout=30) as alice,
        httpx.Client(base_url=live, headers=bearer(secrets["bob"]), timeout=30) as bob,
    ):
        yield alice, bob


def assert_throttled(response: httpx.Response, *words: str) -> None:
    """A 429 throttled problem naming ``words``, with a Retry-After of at least a second."""
    problem = assert_problem(response, 429, *words)
    assert problem["type"] == PROBLEMS + "throttled"
    assert int(response.headers["retry-after"]) >= 1


async def test_a_key_past_its_rate_gets_429_and_another_key_does_not(
    anonymous: AsyncTestClient[Litestar], secrets: dict[str, str]
) -> None:
    """After its burst a key is answered 429 with Retry-After; another key and /health go on."""
    alice, bob = bearer(secrets["alice"]), bearer(secrets["bob"])
    for _ in range(BURST):
        assert (await anonymous.get(NO_RUN, headers=alice)).status_code == 404
    assert_throttled(await anonymous.get(NO_RUN, headers=alice), "alice", "WARMPOD_SERVER__KEY_RATE")
    assert (await anonymous.get(NO_RUN, headers=bob)).status_code == 404
    for _ in range(3 * BURST):
        assert (await anonymous.get("/health")).status_code == 200
        assert (await anonymous.get("/metrics", headers=alice)).status_code == 200


async def test_a_batch_counts_as_one_request_per_run(
    anonymous: AsyncTestClient[Litestar], secrets: dict[str, str]
) -> None:
    """A batch of three spends three of the burst's requests; a batch larger than what is left is
    still taken, and the key then owes the difference: its next request waits longer for it."""
    alice, bob = bearer(secrets["alice"]), bearer(secrets["bob"])
    batch = {"runs": [{"code": "pass"}] * 3}
    assert (await anonymous.post("/runs/batch", json=batch, headers=alice)).status_code == 202
    for _ in range(BURST - 3):
        assert (await anonymous.get(NO_RUN, headers=alice)).status_code == 404
    assert_throttled(await anonymous.get(NO_RUN, headers=alice), "alice", "WARMPOD_SERVER__KEY_RATE")
    assert (await anonymous.get(NO_RUN, headers=bob)).status_code == 404
    owing = {"runs": [{"code": "pass"}] * 20}
    assert (await anonymous.post("/runs/batch", json=owing, headers=bob)).status_code == 202
    refused = await anonymous.get(NO_RUN, headers=bob)
    assert_throttled(refused, "bob")
    # Four requests were left and twenty spent: sixteen owed and one to earn, at one a second
    # (less what the seconds this test took have refilled).
    assert 10 <= int(refused.headers["retry-after"]) <= 17


async def test_the_rate_refills(anonymous: AsyncTestClient[Litestar], secrets: dict[str, str]) -> None:
    """A throttled key may send again once its Retry-After has passed."""
    alice = bearer(secrets["alice"])
    for _ in range(BURST):
        await anonymous.get(NO_RUN, headers=alice)
    refused = await anonymous.get(NO_RUN, headers=alice)
    assert refused.status_code == 429
    # The wait is the test: the key's bucket refills as time passes.
    await anyio.sleep(int(refused.headers["retry-after"]))
    assert (await anonymous.get(NO_RUN, headers=alice)).status_code == 404


def test_a_key_with_its_requests_in_flight_gets_429_and_another_key_does_not(
    tenants: tuple[httpx.Client, httpx.Client], runner: RecordingRunner
) -> None:
    """Two blocking runs of alice hold her slots: her next request is 429 until one is answered,
    while bob and /health are served."""
    alice, bob = tenants
    runner.hold = threading.Event()
    with ThreadPoolExecutor(IN_FLIGHT) as threads:
        waiting = [threads.submit(alice.post, "/run-json/", json={"code": "1"}) for _ in range(IN_FLIGHT)]
        assert wait_until(lambda: len(runner.calls) >= IN_FLIGHT, 10, interval=0.01), "the runs did not start"
        assert_throttled(alice.get(NO_RUN), "alice", "in flight", "WARMPOD_SERVER__KEY_IN_FLIGHT")
        assert bob.get(NO_RUN).status_code == 404
        assert bob.get("/health").status_code == 200
        runner.hold.set()
        assert [future.result().status_code for future in waiting] == [200] * IN_FLIGHT
    assert alice.get(NO_RUN).status_code == 404


def never_read(url: str, path: str, key: str) -> socket.socket:
    """A connection that sends ``GET path`` and never reads the answer (a 4 KiB receive window)."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n\r\n".encode()
    )
    return sock


def test_a_client_that_never_reads_holds_its_own_slots(
    live: str, tenants: tuple[httpx.Client, httpx.Client], runner: RecordingRunner, secrets: dict[str, str]
) -> None:
    """A big answer is handed over as the client reads it: one never read keeps its request in
    flight (alice's next one is 429, bob's is served), and closing the connection frees the slot."""
    alice, bob = tenants
    runner.left = [FileChunk(path="out/big.bin", data=b"x" * BIG_FILE, end=True)]
    result = alice.post("/run-json/", json={"code": "1"}).json()
    (entry,) = result["files"]
    readers = [never_read(live, entry["url"], secrets["alice"]) for _ in range(IN_FLIGHT)]
    try:
        for sock in readers:
            sock.settimeout(10)
            assert sock.recv(1, socket.MSG_PEEK) == b"H"  # its answer has begun: it holds a slot
        assert_throttled(alice.get(NO_RUN), "in flight")
        assert bob.get(NO_RUN).status_code == 404
    finally:
        for sock in readers:
            sock.close()
    assert wait_until(lambda: alice.get(NO_RUN).status_code == 404, 10, interval=0.2), (
        "closed connections kept their slots"
    )
    assert bob.get(entry["url"]).status_code == 404  # another key's file is not bob's


def test_serve_bounds_connections_and_backlog(monkeypatch: pytest.MonkeyPatch) -> None:
    """``warmpod serve`` hands uvicorn the server's connection limit and backlog."""
    seen: list[uvicorn.Config] = []

    def run(self: uvicorn.Server, *args: Any) -> None:
        seen.append(self.config)

    monkeypatch.setattr(image, "build_all", lambda *args: {})
    monkeypatch.setattr(uvicorn.Server, "run", run)
    settings = from_env({}, server={"max_connections": 300, "backlog": 64})
    assert cli.serve(settings) == 0
    (config,) = seen
    assert (config.limit_concurrency, config.backlog) == (300, 64)


@pytest.mark.parametrize(
    ("trusted", "seen_as"),
    [("", "127.0.0.1"), ("127.0.0.1", "203.0.113.9"), ("10.0.0.0/8", "127.0.0.1")],
)
async def test_serve_believes_forwarded_addresses_only_from_the_proxies_named(
    monkeypatch: pytest.MonkeyPatch, trusted: str, seen_as: str
) -> None:
    """Under ``warmpod serve`` a client on loopback that sends ``X-Forwarded-For`` is counted as
    itself unless ``forwarded_allow_ips`` names it: by default no client picks its throttle bucket."""
    configs: list[uvicorn.Config] = []

    def run(self: uvicorn.Server, *args: Any) -> None:
        configs.append(self.config)

    monkeypatch.setattr(image, "build_all", lambda *args: {})
    monkeypatch.setattr(uvicorn.Server, "run", run)
    monkeypatch.delenv("FORWARDED_ALLOW_IPS", raising=False)
    assert cli.serve(from_env({}, server={"forwarded_allow_ips": trusted})) == 0
    (config,) = configs
    clients: list[object] = []

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        clients.append(scope["client"])

    # The app uvicorn would serve, with what it wraps around it, in front of one that notes the client.
    config.app = echo
    config.load()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [(b"x-forwarded-for", b"203.0.113.9")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    await config.loaded_app(scope, None, None)
    assert [client[0] for client in clients] == [seen_as]  # type: ignore[index]


async def test_every_limited_operation_documents_its_429(
    anonymous: AsyncTestClient[Litestar], secrets: dict[str, str]
) -> None:
    """The schema lists 429 for every operation the throttle counts, and not for /health."""
    schema = (await anonymous.get("/schema/openapi.json", headers=bearer(secrets["bob"]))).json()
    operations = {
        f"{method.upper()} {path}": responses["responses"]
        for path, methods in schema["paths"].items()
        for method, responses in methods.items()
    }
    assert "429" not in operations.pop("GET /health")
    assert operations
    for name, responses in operations.items():
        assert "429" in responses, name


def test_the_client_waits_out_a_throttle_within_its_retry_budget(live: str, secrets: dict[str, str]) -> None:
    """warmpod.client answers a throttled request by waiting its Retry-After and sending it again,
    and raises the 429 when the wait would outlast its retry budget."""
    with (
        Client(live, api_key=secrets["alice"]) as patient,
        Client(live, api_key=secrets["alice"], retry_for=0) as impatient,
    ):
        for _ in range(BURST):
            patient.health()  # never counted
            with pytest.raises(ProblemError) as missing:
                patient.status("0" * 32)
            assert missing.value.status == 404
        with pytest.raises(ProblemError) as refused:
            impatient.status("0" * 32)
        assert (refused.value.status, refused.value.type) == (429, PROBLEMS + "throttled")
        started = time.monotonic()
        with pytest.raises(ProblemError) as answered:
            patient.status("0" * 32)
        assert answered.value.status == 404  # after the wait, the real answer
        assert time.monotonic() - started >= 0.5


def test_the_client_retries_uvicorns_own_503_without_retry_after(
    app: Litestar, secrets: dict[str, str]
) -> None:
    """Past ``max_connections`` uvicorn answers a plain-text 503 without Retry-After, which the
    client waits a second on and sends again, rather than raising."""
    with served(app, limit_concurrency=2) as url:
        port = urlsplit(url).port
        # Counting the request's own, this takes the server to its limit.
        holder = socket.create_connection(("127.0.0.1", port))
        with holder:
            refused = httpx.get(url + "/status/" + "0" * 32)
            assert refused.status_code == 503
            assert "retry-after" not in refused.headers
            assert not refused.headers["content-type"].startswith("application/problem+json")
        with Client(url, api_key=secrets["alice"]) as client:
            holder = socket.create_connection(("127.0.0.1", port))
            threading.Timer(0.3, holder.close).start()
            started = time.monotonic()
            with pytest.raises(ProblemError) as answered:
                client.status("0" * 32)
            assert answered.value.status == 404  # after the wait, the real answer
            assert time.monotonic() - started >= 0.9
