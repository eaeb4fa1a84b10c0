"""Data sources through the real service: a run reads an HTTP upstream and PostgreSQL through the
relay, reaches nothing else, and is held to each source's caps; every connection ends with the run.

The upstreams are servers this test starts on the host's loopback (and the session's PostgreSQL);
nothing leaves the machine.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from textwrap import dedent
from typing import Any

import httpx
import psycopg
import pytest
from support.apitest import write_secrets
from support.fakes import POOL_DIR
from support.live import (
    MAX_TIMEOUT,
    WarmpodServer,
    containers,
    free_port,
    podman,
    run_json,
    serving,
    wait_until,
)
from support.postgres import PostgresServer

from warmpod import keys
from warmpod.sandbox.pool import LABEL_PID

pytestmark = pytest.mark.integration

# The agent's half of the relay (pool/agent.py) listens inside the container and hands the program
# its address; without it a run's sources are named in its job and counted, never reached.
needs_agent_relay = pytest.mark.skipif(
    "WARMPOD_SOURCE_" not in (POOL_DIR / "agent.py").read_text(), reason="needs the agent relay"
)
BIG = 4 * 1024 * 1024
"""Bytes of the HTTP upstream's /big."""
TINY_CAP = 1000


class _Pages(BaseHTTPRequestHandler):
    """``/hello`` a greeting, ``/big`` BIG bytes."""

    def do_GET(self) -> None:
        body = b"hello from the warehouse API\n" if self.path == "/hello" else b"b" * BIG
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test's output is the server's log."""


class Holder:
    """A TCP server that accepts connections and keeps them until their peer closes, noting when."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self.closed: list[float] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted += 1
                threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
        self.closed.append(time.monotonic())


class Sources:
    """A server with a sources file and a keys file, and the upstreams the file declares."""

    def __init__(self, live: WarmpodServer, tokens: dict[str, str], holder: Holder, pg_port: int) -> None:
        self.live = live
        self.tokens = tokens
        self.holder = holder
        self.pg_port = pg_port

    def client(self, key: str = "finance") -> httpx.Client:
        """A client that presents ``key``."""
        headers = {"Authorization": f"Bearer {self.tokens[key]}"}
        return httpx.Client(base_url=self.live.url, headers=headers, timeout=MAX_TIMEOUT + 60)


@pytest.fixture(scope="module")
def web() -> Iterator[int]:
    """An HTTP upstream on the host's loopback: its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, web: int, postgres_server: PostgresServer
) -> Iterator[Sources]:
    """A server whose ``finance`` key may reach every declared source and ``intern`` none."""
    directory = tmp_path_factory.mktemp("sources")
    holder = Holder()
    declared = {
        "web": (web, ""),
        "warehouse": (postgres_server.port, ""),
        "tiny": (web, f"max_bytes_in = {TINY_CAP}\n"),
        "hold": (holder.port, "max_connections = 2\n"),
        "down": (free_port(), "connect_timeout = 1\n"),
    }
    sources = directory / "sources.toml"
    sources.write_text(
        "".join(
            f'[{name}]\nhost = "127.0.0.1"\nport = {port}\n{extra}\n'
            for name, (port, extra) in declared.items()
        )
    )
    key_file = directory / "keys"
    tokens = {
        "finance": keys.add(
            key_file, "finance", granted=frozenset({"WAREHOUSE_PASSWORD"}), sources=frozenset(declared)
        ),
        "intern": keys.add(key_file, "intern"),
    }
    secrets = write_secrets(directory / "secrets", {"WAREHOUSE_PASSWORD": WAREHOUSE_PASSWORD})
    settings = {
        "WARMPOD_POOL__SIZE": "2",
        "WARMPOD_SERVER__API_KEYS_FILE": str(key_file),
        "WARMPOD_SERVER__SECRETS_FILE": str(secrets),
        "WARMPOD_SOURCES__FILE": str(sources),
    }
    with serving(directory, settings) as live:
        yield Sources(live, tokens, holder, postgres_server.port)
    holder.sock.close()


def run(served: Sources, code: str, sources: list[str], **fields: Any) -> dict[str, Any]:
    """The result of ``code`` run with ``sources`` by the finance key."""
    with served.client() as client:
        return run_json(client, dedent(code), sources=sources, **fields)


# Asking for sources: no agent relay needed -------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "source", "words"),
    [
        ("intern", "web", ["may not use the data source 'web'"]),
        ("finance", "ledger", ["no data source named 'ledger'"]),
    ],
)
def test_a_source_not_granted_or_unknown_is_a_403_naming_it(
    served: Sources, key: str, source: str, words: list[str]
) -> None:
    """A key without the right, or a source the file does not declare, is a 403 ``source-denied``
    problem naming it, through JSON and the form alike; nothing runs."""
    with served.client(key) as client:
        response = client.post("/run-json/", json={"code": "print(1)", "sources": [source]})
        form = client.post("/run-file/", files=[("file", ("m.py", b"print(1)"))], data={"sources": source})
    for answer in (response, form):
        assert answer.status_code == 403, answer.text
        problem = answer.json()
        assert problem["type"].endswith("/source-denied")
        for word in words:
            assert word in problem["detail"]


def test_a_malformed_source_name_is_a_422(served: Sources) -> None:
    """A name that is not a source's is refused before any lookup."""
    with served.client() as client:
        response = client.post("/run-json/", json={"code": "print(1)", "sources": ["Web"]})
    assert response.status_code == 422, response.text
    assert "'Web'" in response.json()["detail"]


def test_a_run_that_leaves_its_sources_unused_counts_nothing(served: Sources) -> None:
    """A run granted sources it never connects to succeeds, with each source counted at zero."""
    result = run(served, "print('no data today')", ["web", "warehouse"])
    assert result["status"] == "succeeded", result
    zero = {"connections": 0, "refused": 0, "bytes_in": 0, "bytes_out": 0}
    assert result["sources"] == {"web": zero, "warehouse": zero}


def test_a_run_without_sources_has_an_empty_map(served: Sources) -> None:
    """No source asked for: the result's ``sources`` is empty."""
    result = run(served, "print(1)", [])
    assert result["sources"] == {}


# The sockets: the sandbox's root reaches them, the program does not ---------------------------

# What the agent does with a source's socket, done by hand as the container's root (podman exec);
# then it tells the program, which waits for it, that it may end.
_AS_AGENT = (
    "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/warmpod/source-0.sock'); "
    "s.sendall(b'hi'); s.shutdown(socket.SHUT_WR); open('/tmp/relayed', 'w').close()"
)


def test_only_the_sandboxs_root_reaches_the_relay_socket(served: Sources) -> None:
    """The program (an unprivileged user) cannot open its sandbox's source socket; the container's
    root, as the agent is, connects and is relayed to the declared upstream."""
    before = served.holder.accepted
    with served.client() as client:
        submitted = client.post(
            "/run-json/",
            json={
                "code": dedent(
                    """
                    import os, socket, time
                    try:
                        socket.socket(socket.AF_UNIX).connect("/run/warmpod/source-0.sock")
                        print("connected")
                    except OSError as exc:
                        print(type(exc).__name__)
                    deadline = time.monotonic() + 40
                    while not os.path.exists("/tmp/relayed") and time.monotonic() < deadline:
                        time.sleep(0.05)
                    """
                ),
                "sources": ["hold"],
                "wait": False,
                "timeout": MAX_TIMEOUT,
            },
        )
        assert submitted.status_code == 202, submitted.text

        def relayed_as_root() -> bool:
            # The exec may connect, be relayed and let the program end, then fail itself as its
            # container is removed: the upstream's count says it got through (the program's own
            # try is refused, as the result shows below).
            if served.holder.accepted > before:
                return True
            # Only running containers: an exec into a paused one (the pool's ready sandboxes)
            # waits until it is thawed, longer than this test does.
            for found in containers(f"{LABEL_PID}={served.live.pid}"):
                if found["State"] != "running":
                    continue
                with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                    podman("exec", found["Names"][0], "python3", "-I", "-c", _AS_AGENT)
                    return True
            return False

        if not wait_until(relayed_as_root, timeout=40):
            run_status = client.get(submitted.json()["status_url"]).text[:600]
            states = [(c["Names"][0], c["State"]) for c in containers(f"{LABEL_PID}={served.live.pid}")]
            raise AssertionError(
                f"no running sandbox had the source socket in 40 s; the run: {run_status}\n"
                f"containers: {states}\n{served.live.log_tail(3000)}"
            )
        assert wait_until(lambda: served.holder.accepted > before, timeout=10)
        assert wait_until(
            lambda: client.get(submitted.headers["location"]).json()["status"] not in ("queued", "running"),
            timeout=MAX_TIMEOUT,
        )
        result = client.get(submitted.headers["location"]).json()
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "PermissionError\n"
    assert result["sources"]["hold"]["connections"] == 1
    assert result["sources"]["hold"]["bytes_out"] == 2


# Through the relay -------------------------------------------------------------------------------


@needs_agent_relay
def test_the_program_gets_each_sources_address_and_reads_http_through_it(served: Sources) -> None:
    """``WARMPOD_SOURCE_WEB`` (with ``_HOST`` and ``_PORT``) is an address on the container's own
    loopback, and an HTTP request to it is answered by the upstream on the host."""
    result = run(
        served,
        """
        import os, urllib.request
        address = os.environ["WARMPOD_SOURCE_WEB"]
        host, port = os.environ["WARMPOD_SOURCE_WEB_HOST"], os.environ["WARMPOD_SOURCE_WEB_PORT"]
        assert address == f"{host}:{port}" and host == "127.0.0.1", address
        print(urllib.request.urlopen(f"http://{address}/hello", timeout=10).read().decode(), end="")
        """,
        ["web"],
    )
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "hello from the warehouse API\n"
    use = result["sources"]["web"]
    assert (use["connections"], use["refused"]) == (1, 0)
    assert use["bytes_in"] > len("hello from the warehouse API\n")
    assert use["bytes_out"] > len("GET /hello HTTP/1.1\r\n")


POSTGRES_ROWS = """
    import os, socket, struct

    def exact(sock, size):
        data = b""
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            if not chunk:
                raise EOFError("the server closed the connection")
            data += chunk
        return data

    def message(sock):
        kind = exact(sock, 1)
        (size,) = struct.unpack("!I", exact(sock, 4))
        return kind, exact(sock, size - 4)

    address = (os.environ["WARMPOD_SOURCE_WAREHOUSE_HOST"], int(os.environ["WARMPOD_SOURCE_WAREHOUSE_PORT"]))
    sock = socket.create_connection(address, timeout=10)
    # PostgreSQL's startup message, protocol 3.0; the test server trusts its loopback.
    params = b"user\\0postgres\\0database\\0postgres\\0\\0"
    sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
    while (answer := message(sock))[0] != b"Z":
        assert answer[0] != b"E", answer
    query = b"select n, n * n from generate_series(1, 3) n\\0"
    sock.sendall(b"Q" + struct.pack("!I", 4 + len(query)) + query)
    rows = []
    while (answer := message(sock))[0] != b"Z":
        kind, body = answer
        assert kind != b"E", body
        if kind == b"D":
            (count,) = struct.unpack("!H", body[:2])
            at, row = 2, []
            for _ in range(count):
                (size,) = struct.unpack("!i", body[at : at + 4])
                row.append(body[at + 4 : at + 4 + size].decode())
                at += 4 + size
            rows.append(row)
    sock.sendall(b"X" + struct.pack("!I", 4))
    print(rows)
"""


@needs_agent_relay
def test_a_run_reads_rows_from_postgresql_through_the_relay(served: Sources) -> None:
    """The program speaks PostgreSQL's wire protocol to its relay address and gets the rows of a
    query on the host's server: the relay carries bytes, whatever the protocol."""
    result = run(served, POSTGRES_ROWS, ["warehouse"])
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "[['1', '1'], ['2', '4'], ['3', '9']]\n"
    assert result["sources"]["warehouse"]["connections"] == 1


WAREHOUSE_PASSWORD = "pg-Reporter-Password-5e8a"
# The README's report: rows from PostgreSQL through the relay, with pg8000 (in the runner image)
# and a password from a secret, summed with pandas and charted with matplotlib.
README_REPORT = """
import os
import matplotlib.pyplot as plt
import pandas as pd
import pg8000.native

db = pg8000.native.Connection(
    user="postgres",
    password=os.environ["WAREHOUSE_PASSWORD"],
    database=os.environ["DATABASE"],
    host=os.environ["WARMPOD_SOURCE_WAREHOUSE_HOST"],
    port=int(os.environ["WARMPOD_SOURCE_WAREHOUSE_PORT"]),
)
sales = pd.DataFrame(db.run("SELECT region, amount::float8 FROM sales"), columns=["region", "amount"])
summary = sales.groupby("region")["amount"].sum()
summary.plot.bar(title="Sales by region").figure.savefig("out/sales.png")
print(summary.to_string(), "password:", os.environ["WAREHOUSE_PASSWORD"])
"""


@needs_agent_relay
def test_the_readme_report_charts_a_postgresql_table_with_a_secret(
    served: Sources, postgres_server: PostgresServer
) -> None:
    """A report reads a table through its PostgreSQL source with a driver and a password from a
    secret, and charts it: the chart comes back, the password is masked in what it printed."""
    url = postgres_server.create_database("reports")
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE TABLE sales (region text, amount numeric)")
        db.execute("INSERT INTO sales VALUES ('north', 12.5), ('south', 7.25), ('north', 3)")
    database = url.rsplit("/", 1)[1]
    result = run(
        served,
        README_REPORT,
        ["warehouse"],
        secrets=["WAREHOUSE_PASSWORD"],
        env={"DATABASE": database},
    )
    assert result["status"] == "succeeded", result["stderr"]
    assert result["stdout"].split() == ["region", "north", "15.50", "south", "7.25", "password:", "***"]
    (chart,) = result["files"]
    assert chart["path"] == "out/sales.png"
    assert base64.b64decode(chart["content"]).startswith(b"\x89PNG")
    assert result["sources"]["warehouse"]["connections"] == 1


@needs_agent_relay
def test_the_program_reaches_no_other_port_or_host(served: Sources) -> None:
    """The PostgreSQL port the relay reaches is not reachable by the program itself, nor any other
    loopback port or address: the relay's ports are its only way out (the container has no other
    interface, so only loopback addresses are tried: nothing here may leave the machine)."""
    result = run(
        served,
        f"""
        import socket
        for address in [("127.0.0.1", {served.pg_port}), ("127.0.0.1", 22), ("127.0.0.2", {served.pg_port})]:
            try:
                socket.create_connection(address, timeout=2).close()
                print(address, "connected")
            except OSError as exc:
                print(address, type(exc).__name__)
        """,
        ["warehouse"],
    )
    assert result["status"] == "succeeded", result
    assert "connected" not in result["stdout"], result["stdout"]
    assert result["sources"]["warehouse"]["connections"] == 0


@needs_agent_relay
def test_max_bytes_in_cuts_a_download_at_the_cap(served: Sources) -> None:
    """A download bigger than the source's max_bytes_in is cut: the program gets at most the cap,
    the result says exactly the cap came in."""
    result = run(
        served,
        """
        import os, socket
        sock = socket.create_connection(tuple(os.environ["WARMPOD_SOURCE_TINY"].rsplit(":", 1)), timeout=10)
        sock.sendall(b"GET /big HTTP/1.0\\r\\n\\r\\n")
        got = 0
        try:
            while chunk := sock.recv(65536):
                got += len(chunk)
        except ConnectionResetError:
            pass  # a cut may come as a reset rather than an end of stream
        print(got)
        """,
        ["tiny"],
    )
    assert result["status"] == "succeeded", result
    assert int(result["stdout"]) <= TINY_CAP
    assert result["sources"]["tiny"]["bytes_in"] == TINY_CAP


@needs_agent_relay
def test_an_upstream_that_is_down_is_a_closed_connection_counted_refused(served: Sources) -> None:
    """Nothing listens where the source points: the program's connection ends with no byte, and the
    result counts it refused."""
    result = run(
        served,
        """
        import os, socket
        sock = socket.create_connection(tuple(os.environ["WARMPOD_SOURCE_DOWN"].rsplit(":", 1)), timeout=10)
        try:
            print(repr(sock.recv(10)))
        except ConnectionResetError:
            print("reset")
        """,
        ["down"],
    )
    assert result["status"] == "succeeded", result
    assert result["stdout"] in ("b''\n", "reset\n")
    assert result["sources"]["down"]["refused"] == 1


@needs_agent_relay
def test_connections_past_the_limit_are_refused_and_all_end_with_the_run(served: Sources) -> None:
    """Of many connections held open at once only max_connections reach the upstream; the rest
    are refused; when the run ends the upstream sees every relayed one close."""
    before, closed = served.holder.accepted, len(served.holder.closed)
    result = run(
        served,
        """
        import os, socket, time
        address = tuple(os.environ["WARMPOD_SOURCE_HOLD"].rsplit(":", 1))
        held = []
        for _ in range(50):
            try:
                sock = socket.create_connection(address, timeout=5)
                sock.sendall(b"hi")
                held.append(sock)
            except OSError:
                pass
        time.sleep(1)
        print(len(held))
        """,
        ["hold"],
    )
    assert result["status"] == "succeeded", result
    use = result["sources"]["hold"]
    assert use["connections"] == 2
    assert use["refused"] >= 1
    assert served.holder.accepted - before == 2
    ended = time.monotonic()
    assert wait_until(lambda: len(served.holder.closed) >= closed + 2, timeout=10)
    assert max(served.holder.closed) - ended < 10
    assert served.live.health().status_code == 200


@needs_agent_relay
def test_a_flood_of_connections_leaves_the_server_responsive(served: Sources) -> None:
    """A program connecting thousands of times as fast as it can gets refusals, while the server
    keeps answering other requests promptly."""
    with served.client() as client:
        submitted = client.post(
            "/run-json/",
            json={
                "code": dedent(
                    """
                    import os, socket, time
                    address = tuple(os.environ["WARMPOD_SOURCE_HOLD"].rsplit(":", 1))
                    end = time.monotonic() + 5
                    tries = 0
                    while time.monotonic() < end:
                        tries += 1
                        try:
                            socket.create_connection(address, timeout=1).close()
                        except OSError:
                            pass
                    print(tries)
                    """
                ),
                "sources": ["hold"],
                "wait": False,
            },
        )
        assert submitted.status_code == 202, submitted.text
        slowest = 0.0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert served.live.health().status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.1)
        assert wait_until(
            lambda: client.get(submitted.headers["location"]).json()["status"] not in ("queued", "running"),
            timeout=MAX_TIMEOUT,
        )
        result = client.get(submitted.headers["location"]).json()
    assert result["status"] == "succeeded", result
    assert result["sources"]["hold"]["refused"] > 0
    assert slowest < 1.0
