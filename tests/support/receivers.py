"""Webhook receivers on loopback: an HTTP server that records and answers as told, a listener that counts.

:class:`Receiver` serves HTTP on ``127.0.0.1`` in a thread of its own. It records every request
(method, path, headers, body bytes, when) and answers each from a programmable sequence, then a
steady answer (``Receiver(answers=[500, 500], then=204)`` fails twice, then accepts for ever). It
can be stopped and started again on the same port: while it is stopped the port refuses
connections, as a receiver that is down does.

:class:`ConnectionCounter` accepts connections on one port and closes them at once, counting
them: what a test needs to show that something was never contacted at all.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from support.live import wait_until

HOST = "127.0.0.1"
Answer = int | tuple[int, Mapping[str, str]]
"""How a receiver answers one request: a status, or a status and headers (``(307, {"location": ...})``)."""


@dataclass(frozen=True)
class Received:
    """One request a :class:`Receiver` took, and how it answered it."""

    method: str
    path: str
    headers: dict[str, str]
    """Every header, its name lower-cased (as Standard Webhooks' verifier reads them)."""
    body: bytes
    """The body exactly as sent: what the signature covers."""
    at: float
    """``time.time()`` when the body had been read."""
    status: int
    """The status it was answered with."""

    @property
    def accepted(self) -> bool:
        """Whether it was answered with a 2xx, which a sender counts as delivered."""
        return 200 <= self.status < 300

    @property
    def webhook_id(self) -> str:
        """Its ``webhook-id`` header (empty when it had none)."""
        return self.headers.get("webhook-id", "")

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


@dataclass
class _Program:
    answers: list[Answer] = field(default_factory=list)
    then: Answer = 204


class Receiver:
    """An HTTP server on ``127.0.0.1`` that records every request and answers from a program."""

    def __init__(
        self, port: int = 0, answers: Sequence[Answer] = (), then: Answer = 204, *, start: bool = True
    ) -> None:
        """Listen on ``port`` (a free one when 0) unless ``start`` is false; the first requests are
        answered with ``answers`` in turn, every later one with ``then``."""
        self.port = port
        self._program = _Program(list(answers), then)
        self._received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    def url(self, path: str = "/hook") -> str:
        """The URL of ``path`` on this receiver."""
        return f"http://{HOST}:{self.port}{path}"

    @property
    def up(self) -> bool:
        """Whether it listens now."""
        return self._server is not None

    def start(self) -> None:
        """Listen (again) on its port; requests are recorded from now on."""
        assert self._server is None, "the receiver is already up"
        server = ThreadingHTTPServer((HOST, self.port), self._handler())
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"receiver-{self.port}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: the port refuses connections until :meth:`start`."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(10)

    close = stop

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, answers: Sequence[Answer] = (), then: Answer = 204) -> None:
        """Answer the next requests with ``answers`` in turn, then every later one with ``then``."""
        with self._lock:
            self._program = _Program(list(answers), then)

    @property
    def received(self) -> list[Received]:
        """Every request taken so far, in the order they were taken."""
        with self._lock:
            return list(self._received)

    def accepted(self) -> list[Received]:
        """The requests answered with a 2xx."""
        return [request for request in self.received if request.accepted]

    def wait_for(
        self, predicate: Callable[[list[Received]], bool], timeout: float, what: str = "the requests"
    ) -> list[Received]:
        """Wait until ``predicate`` holds of the requests taken; return them then."""
        assert wait_until(lambda: predicate(self.received), timeout, interval=0.05), (
            f"{what} did not arrive at {self.url('')} in {timeout:.0f} s; got {self.describe()}"
        )
        return self.received

    def wait_accepted(self, count: int, timeout: float) -> list[Received]:
        """Wait until at least ``count`` requests were answered with a 2xx; return those."""
        self.wait_for(lambda got: sum(r.accepted for r in got) >= count, timeout, f"{count} accepted")
        return self.accepted()

    def describe(self) -> str:
        """The requests taken, briefly, for assertion messages."""
        return repr([(r.method, r.path, r.status, r.webhook_id, round(r.at, 2)) for r in self.received])

    def _next_answer(self) -> Answer:
        with self._lock:
            if self._program.answers:
                return self._program.answers.pop(0)
            return self._program.then

    def _record(self, request: Received) -> None:
        with self._lock:
            self._received.append(request)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request a connection, so a stopped receiver holds no connection open.
            protocol_version = "HTTP/1.0"

            def do_POST(self) -> None:
                body = _read_body(self)
                answer = receiver._next_answer()
                status, headers = (answer, {}) if isinstance(answer, int) else answer
                receiver._record(
                    Received(
                        method=self.command,
                        path=self.path,
                        headers={name.lower(): value for name, value in self.headers.items()},
                        body=body,
                        at=time.time(),
                        status=status,
                    )
                )
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads :attr:`Receiver.received`, not a log."""

        return Handler


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request's body, by its Content-Length or its chunks."""
    if handler.headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                # The trailer section ends with an empty line.
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            parts.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("content-length") or 0)
    return handler.rfile.read(length) if length else b""


class ConnectionCounter:
    """Accepts every connection to one port on ``127.0.0.1`` (and ``::1`` where the host has it),
    closes it at once and counts it: nothing is ever read or answered."""

    def __init__(self, port: int = 0) -> None:
        """Listen on ``port`` (a free one when 0) of both loopback addresses."""
        self._listeners = [socket.create_server((HOST, port))]
        self.port: int = self._listeners[0].getsockname()[1]
        with contextlib.suppress(OSError):
            self._listeners.append(
                socket.create_server(("::1", self.port), family=socket.AF_INET6, dualstack_ipv6=False)
            )
        self._lock = threading.Lock()
        self._peers: list[tuple[str, int]] = []
        self._closed = False
        self._threads = [
            threading.Thread(target=self._accept, args=(listener,), daemon=True)
            for listener in self._listeners
        ]
        for thread in self._threads:
            thread.start()

    @property
    def addresses(self) -> list[str]:
        """The addresses it listens on."""
        return [str(listener.getsockname()[0]) for listener in self._listeners]

    @property
    def count(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self._peers)

    @property
    def peers(self) -> list[tuple[str, int]]:
        """Where each accepted connection came from."""
        with self._lock:
            return list(self._peers)

    def close(self) -> None:
        """Stop listening."""
        self._closed = True
        for thread in self._threads:
            thread.join(5)
        for listener in self._listeners:
            listener.close()

    def __enter__(self) -> ConnectionCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self, listener: socket.socket) -> None:
        # A close from another thread does not wake a blocked accept(): look at _closed often.
        listener.settimeout(0.1)
        while not self._closed:
            try:
                connection, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._peers.append((str(peer[0]), int(peer[1])))
            connection.close()
