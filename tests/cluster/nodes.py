"""Two real ``warmpod serve`` nodes on one PostgreSQL queue, and what their HTTP, logs and tables say.

Each node is a :class:`support.live.WarmpodServer` of its own: its own private Podman service,
pool of one sandbox, port and JSON log; both share one database. The tests read the ``runs`` and
``output`` tables directly (psycopg) to see what the HTTP answers cannot: how many times a run was
claimed and whether its output still grows.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row
from support.live import SLOWNESS, WarmpodServer, containers, podman, process_alive, wait_until

from warmpod.queue.store.codec import unpacked
from warmpod.sandbox.pool import LABEL_PID

NAMES = ("node-a", "node-b")
# Short, so a dead node's runs are reaped in seconds; heartbeats come every second.
LEASE = 3.0
MAX_TIMEOUT = 120
FINAL = {"succeeded", "failed", "timeout", "error", "cancelled"}
# The limit of the long runs that occupy a node's sandbox: past every test's end.
LONG = {"timeout": 110}
# How long past the lease a dead node's run may stay "running" before the survivor reports it:
# one reaper pass (a third of the lease) and a store round trip, on a machine perhaps 2x slower.
REAP_MARGIN = 6.0 * SLOWNESS
# Answers that need no container: status, cancel, a node's health.
PROMPT = 5.0 * SLOWNESS
HTTP_TIMEOUT = MAX_TIMEOUT + 60
# The earliest a run may be reaped after its node stopped: the lease runs from the node's last
# heartbeat, which may have come a third of the lease before it stopped (less a little clock slack).
EARLIEST_REAP = LEASE * 2 / 3 - 0.25


def node_settings(store_url: str, name: str, lease: float = LEASE) -> dict[str, str]:
    """The environment of one node: the shared store, its own name, one sandbox, JSON logs."""
    return {
        "WARMPOD_QUEUE__STORE_URL": store_url,
        "WARMPOD_NODE__NAME": name,
        "WARMPOD_NODE__LEASE": str(lease),
        # One sandbox and so one worker per node: which node is busy is known exactly.
        "WARMPOD_POOL__MIN_SIZE": "1",
        "WARMPOD_POOL__MAX_SIZE": "1",
        # No numpy and pandas imports before each run: refills in about a second, not three.
        "WARMPOD_POOL__PRELOAD": "",
        "WARMPOD_LIMITS__MAX_TIMEOUT": str(MAX_TIMEOUT),
        "WARMPOD_SERVER__LOG_FORMAT": "json",
    }


def submit(node: WarmpodServer, code: str, **fields: object) -> str:
    """POST ``code`` to ``node`` with ``wait`` false; it must answer 202; return the run's id."""
    response = httpx.post(
        f"{node.url}/run-json/", json={"code": code, "wait": False, **fields}, timeout=HTTP_TIMEOUT
    )
    assert response.status_code == 202, response.text
    run_id: str = response.json()["id"]
    return run_id


def run(node: WarmpodServer, code: str, **fields: object) -> dict[str, Any]:
    """POST ``code`` to ``node`` and wait for its RunResult, which must come with a 200."""
    response = httpx.post(f"{node.url}/run-json/", json={"code": code, **fields}, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def status(node: WarmpodServer, run_id: str) -> dict[str, Any]:
    """One ``GET /status/{id}`` on ``node``, which must answer 200."""
    response = httpx.get(f"{node.url}/status/{run_id}", timeout=PROMPT * 2)
    assert response.status_code == 200, f"{node.env['WARMPOD_NODE__NAME']}: {response.text}"
    body: dict[str, Any] = response.json()
    return body


def cancel(node: WarmpodServer, run_id: str) -> httpx.Response:
    """One ``DELETE /status/{id}`` on ``node``."""
    return httpx.delete(f"{node.url}/status/{run_id}", timeout=PROMPT * 2)


def until(
    node: WarmpodServer, run_id: str, done: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    """Poll ``node``'s status of the run until ``done`` holds for it; return that body."""
    deadline = time.monotonic() + timeout
    while True:
        body = status(node, run_id)
        if done(body):
            return body
        assert time.monotonic() < deadline, f"run {run_id} not {what} after {timeout:.0f} s: {body}"
        time.sleep(0.05)


def until_running(node: WarmpodServer, run_id: str, timeout: float = 60.0 * SLOWNESS) -> dict[str, Any]:
    """Wait until the run executes and has printed something; it must not end first."""

    def running(body: dict[str, Any]) -> bool:
        assert body["status"] not in FINAL, f"run {run_id} ended before it ran for long: {body}"
        return body["status"] == "running" and bool(body["stdout"])

    return until(node, run_id, running, timeout, "running")


def final(node: WarmpodServer, run_id: str, timeout: float = 60.0 * SLOWNESS) -> dict[str, Any]:
    """Wait until the run has ended; return its RunResult."""
    return until(node, run_id, lambda body: body["status"] in FINAL, timeout, "over")


def occupy(cluster: Cluster, code: str, targets: set[str]) -> dict[str, str]:
    """Start ``code`` executing on each node of ``targets`` (and on no other); return node -> run id.

    Which node claims a run is up to the nodes, not to where it was submitted: runs are submitted
    until each target holds one, and any that landed on another node are cancelled.
    """
    held: dict[str, str] = {}
    while not targets <= held.keys():
        wanted = sorted(targets - held.keys())[0]
        run_id = submit(cluster[wanted], code, **LONG)
        body = until_running(cluster[wanted], run_id)
        node = body["node"]
        assert node in NAMES, body
        assert node not in held, f"{node} runs two runs with one sandbox: {held[node]} and {run_id}"
        held[node] = run_id
    for node, run_id in held.items():
        if node not in targets:
            assert cancel(cluster[node], run_id).status_code == 200
            final(cluster[node], run_id)
            cluster.wait_pool_full(node)
    return {node: held[node] for node in targets}


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a node's log (anything else it printed, such as an image build, skipped)."""
    lines = []
    for text in path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def node_names(health: dict[str, Any]) -> set[str]:
    """The names of the nodes a /health body lists as alive."""
    return {node["name"] for node in health.get("nodes", [])}


class Cluster:
    """Nodes ``node-a`` and ``node-b`` on one database, restarted as tests kill them."""

    def __init__(
        self,
        directory: Path,
        store_url: str,
        lease: float = LEASE,
        via: Mapping[str, str] | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """Nothing starts until :meth:`ensure` or :meth:`start`; ``via`` gives a node another URL
        of the same database (through a :class:`Link`); ``settings`` are more ``WARMPOD_*`` of
        every node."""
        self.directory = directory
        self.store_url = store_url
        self.lease = lease
        self.via = dict(via or {})
        self.settings = dict(settings or {})
        self.nodes: dict[str, WarmpodServer] = {}
        # Every server ever started, killed ones included: their logs and their containers.
        self.started: list[WarmpodServer] = []
        self.stopped: set[str] = set()
        self.db = psycopg.connect(store_url, autocommit=True, row_factory=dict_row)

    def __getitem__(self, name: str) -> WarmpodServer:
        """The server now running as node ``name``."""
        return self.nodes[name]

    def launch(self, name: str) -> WarmpodServer:
        """Start node ``name`` (a new incarnation if it ran before), not waiting for it."""
        live = WarmpodServer(
            self.directory,
            {**node_settings(self.via.get(name, self.store_url), name, self.lease), **self.settings},
        )
        self.nodes[name] = live
        self.started.append(live)
        return live

    def start(self, name: str) -> WarmpodServer:
        """Start node ``name`` and wait for its health; fail if it exits first."""
        live = self.launch(name)
        live.wait_healthy()
        return live

    def ensure(self) -> None:
        """Both nodes up, each with its sandbox ready and the other in its /health, nothing in the
        queue: what every test starts from, whatever the last one killed or stopped."""
        for name in NAMES:
            self.resume(name)
            live = self.nodes.get(name)
            if live is None or live.proc.poll() is not None:
                # One at a time: the first start of a session may build the runner image.
                self.start(name)
        self.drain()
        for name in NAMES:
            self.wait_pool_full(name)
        for name in NAMES:
            self.wait_lists_both(name)

    def wait_lists_both(self, name: str) -> None:
        """Wait until node ``name``'s /health lists both nodes as alive."""
        live = self.nodes[name]

        def both() -> bool:
            return node_names(live.health().json()) >= set(NAMES)

        assert wait_until(both, 10 * SLOWNESS), (
            f"{name} does not list both nodes: {live.health().json()}\n{live.log_tail()}"
        )

    def wait_pool_full(self, name: str) -> dict[str, Any]:
        """Wait until node ``name`` holds a ready sandbox."""
        return self.nodes[name].wait_pool_full()

    def drain(self) -> None:
        """Cancel whatever an earlier test left queued or running, and wait until it has ended."""
        rows = self.db.execute("SELECT id FROM runs WHERE status IN ('queued', 'running')").fetchall()
        node = self.nodes[NAMES[0]]
        for row in rows:
            response = cancel(node, row["id"])
            assert response.status_code in {200, 409}, response.text
        for row in rows:
            final(node, row["id"], timeout=REAP_MARGIN + self.lease)

    def kill(self, name: str) -> int:
        """kill -9 node ``name``; return its pid (the label of the containers it leaves)."""
        live = self.nodes[name]
        live.proc.kill()
        live.proc.wait(timeout=10)
        live.close()  # only its log file is left to close
        return live.pid

    def pause(self, name: str) -> None:
        """SIGSTOP node ``name`` (its Podman service and containers go on)."""
        self.nodes[name].proc.send_signal(signal.SIGSTOP)
        self.stopped.add(name)

    def resume(self, name: str) -> None:
        """SIGCONT node ``name`` if it was stopped."""
        if name in self.stopped:
            self.stopped.discard(name)
            live = self.nodes[name]
            if live.proc.poll() is None:
                live.proc.send_signal(signal.SIGCONT)

    def row(self, run_id: str) -> dict[str, Any]:
        """The run's row in ``runs``: status, node, incarnation, attempt, lease_until."""
        found = self.db.execute(
            "SELECT id, status, node, incarnation, attempt, lease_until FROM runs WHERE id = %s", (run_id,)
        ).fetchone()
        assert found is not None, f"run {run_id} is not in the runs table"
        return found

    def rows(self, run_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The ``runs`` rows of many runs, by id."""
        found = self.db.execute(
            "SELECT id, status, node, attempt FROM runs WHERE id = ANY(%s)", (list(run_ids),)
        ).fetchall()
        return {row["id"]: row for row in found}

    def drop_connections(self) -> int:
        """End every other session of the database, as a failover or an operator would; return how many."""
        found = self.db.execute(
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
        assert found is not None
        count: int = found["n"]
        return count

    def output_rows(self, run_id: str) -> int:
        """How many chunks of output the store holds for the run."""
        found = self.db.execute("SELECT count(*) AS n FROM output WHERE run_id = %s", (run_id,)).fetchone()
        assert found is not None
        count: int = found["n"]
        return count

    def output_text(self, run_id: str, stream: str) -> str:
        """The run's stored output on ``stream``, in order, as text."""
        rows = self.db.execute(
            "SELECT seq, stream, data FROM output WHERE run_id = %s ORDER BY seq", (run_id,)
        ).fetchall()
        # A row may pack several chunks of both streams: the store's own reader unpacks it.
        chunks = (chunk for row in rows for chunk in unpacked(row["seq"], row["stream"], bytes(row["data"])))
        return b"".join(chunk.data for chunk in chunks if chunk.stream == stream).decode(errors="replace")

    def finished_lines(self) -> list[dict[str, Any]]:
        """Every ``run finished`` log line of every node this session started."""
        lines = []
        for live in self.started:
            lines += [line for line in log_lines(live.log_path) if line.get("event") == "run finished"]
        return lines

    def close(self) -> None:
        """Stop every node (gracefully, so each removes its containers) and remove what killed ones left."""
        for name in list(self.stopped):
            self.resume(name)
        for live in self.nodes.values():
            live.close()
        for live in self.started:
            left = [c["Id"] for c in containers(f"{LABEL_PID}={live.pid}")]
            if left and not process_alive(live.pid, "serve"):
                podman("rm", "--force", "--time", "0", *left)
        self.db.close()


class Link:
    """A TCP relay on 127.0.0.1 in front of PostgreSQL that a test can cut, as a network partition
    does: nothing is refused or reset, bytes just stop arriving both ways (and new connections
    are accepted but never answered) until it is mended, when the held bytes flow on."""

    def __init__(self, target_port: int) -> None:
        """Listen on a free port at once; relay to ``target_port``."""
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        """``database_url`` (a 127.0.0.1 URL) through this link."""
        host, _, rest = database_url.partition("@127.0.0.1:")
        return f"{host}@127.0.0.1:{self.port}/{rest.split('/', 1)[1]}"

    def cut(self) -> None:
        """Stop every byte, both ways, on every connection, old and new."""
        self._flowing.clear()

    def mend(self) -> None:
        """Let the held bytes, and everything after them, through again."""
        self._flowing.set()

    def close(self) -> None:
        """Close the listener and every relayed connection."""
        self._closed = True
        self._flowing.set()
        with self._lock:
            for sock in [self._listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        self._flowing.wait()
        try:
            upstream = socket.create_connection(("127.0.0.1", self._target), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets += [client, upstream]
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
