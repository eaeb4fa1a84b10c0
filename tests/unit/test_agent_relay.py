"""Unit tests of the agent's data-source relays: a program's TCP connections carried to Unix sockets."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from support.fakes import pool_module
from support.sources import Serve, SourceServer, echo


@pytest.fixture(scope="module")
def agent() -> ModuleType:
    """The real in-container agent, imported as a module."""
    return pool_module("agent")


class Loop:
    """A run's relays served by a poll loop in a thread of its own, as ``Run.watch`` serves them."""

    def __init__(self, agent: ModuleType, sources: list[list[str]]) -> None:
        self.poller = select.poll()
        self.relays: Any = agent.Relays(sources, self.poller)
        self.running = False
        self.thread = threading.Thread()
        self.resume()

    def _serve(self) -> None:
        while self.running:
            for fd, _event in self.poller.poll(20):
                self.relays.handle(fd)

    def port(self, index: int = 0) -> int:
        """The port of source ``index``'s listener."""
        port: int = self.relays.ports[index]
        return port

    def stop(self) -> None:
        """Stop serving (the relays stay as they are, to be looked at or closed)."""
        self.running = False
        self.thread.join(5)

    def resume(self) -> None:
        """Serve the relays (again)."""
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()


Start = Callable[..., tuple[Loop, list[SourceServer]]]


@pytest.fixture
def start(agent: ModuleType, tmp_path: Path) -> Iterator[Start]:
    """Start relays for sources served by ``SourceServer``s (``serve`` for each, echo unless told);
    at the end the loop stops, the relays close, the servers too."""
    started: list[tuple[Loop, list[SourceServer]]] = []

    def begin(*serves: Serve, names: tuple[str, ...] = ("warehouse",)) -> tuple[Loop, list[SourceServer]]:
        servers = [
            SourceServer(tmp_path / f"source-{index}.sock", serve)
            for index, serve in enumerate(serves or (echo,) * len(names))
        ]
        loop = Loop(agent, [[name, str(server.path)] for name, server in zip(names, servers, strict=True)])
        started.append((loop, servers))
        return loop, servers

    yield begin
    for loop, servers in started:
        loop.stop()
        loop.relays.close()
        for server in servers:
            server.close()


def connect(port: int) -> socket.socket:
    """The program's connection to a relay's listener."""
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything ``sock`` receives until its peer's end."""
    data = b""
    while chunk := sock.recv(1 << 20):
        data += chunk
    return data


def test_each_source_gets_a_loopback_listener_named_in_the_environment(
    agent: ModuleType, start: Start
) -> None:
    """Each source's name, upper-cased, gives the program its address, host and port."""
    loop, _ = start(names=("warehouse", "api_2"))
    env = loop.relays.env
    assert dict(zip(env[::2], env[1::2], strict=True)) == {
        "WARMPOD_SOURCE_WAREHOUSE": f"127.0.0.1:{loop.port(0)}",
        "WARMPOD_SOURCE_WAREHOUSE_HOST": "127.0.0.1",
        "WARMPOD_SOURCE_WAREHOUSE_PORT": str(loop.port(0)),
        "WARMPOD_SOURCE_API_2": f"127.0.0.1:{loop.port(1)}",
        "WARMPOD_SOURCE_API_2_HOST": "127.0.0.1",
        "WARMPOD_SOURCE_API_2_PORT": str(loop.port(1)),
    }
    assert loop.port(0) != loop.port(1)


def test_each_listener_reaches_its_own_sources_socket(start: Start) -> None:
    """A connection to one source's port reaches that source's Unix socket, and no other's."""

    def tag(name: bytes) -> Serve:
        def serve(conn: socket.socket) -> None:
            conn.sendall(name)

        return serve

    loop, servers = start(tag(b"first"), tag(b"second"), names=("a", "b"))
    with connect(loop.port(1)) as second, connect(loop.port(0)) as first:
        assert read_to_end(second) == b"second"
        assert read_to_end(first) == b"first"
    assert [len(server.connections) for server in servers] == [1, 1]


def test_bytes_go_both_ways_unchanged_and_unframed(start: Start) -> None:
    """Megabytes of any bytes, sent while the echo comes back, arrive whole and in order, nothing added."""
    loop, servers = start()
    payload = os.urandom(3 << 20) + b"\x00\x00\x00\x10" + b'{"type":"result"}'
    with connect(loop.port()) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        assert read_to_end(sock) == payload
        sender.join(5)
    assert len(servers[0].connections) == 1


def test_half_close_is_passed_on_both_ways(start: Start) -> None:
    """The program's end of sending reaches the source as EOF while the answer still flows back,
    and the source's end reaches the program as EOF."""

    def answer(conn: socket.socket) -> None:
        request = read_to_end(conn)
        conn.sendall(b"answer to " + request)
        conn.shutdown(socket.SHUT_WR)

    loop, _ = start(answer)
    with connect(loop.port()) as sock:
        sock.sendall(b"the request")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_end(sock) == b"answer to the request"


def test_a_program_that_never_reads_stalls_its_source_not_the_agent(agent: ModuleType, start: Start) -> None:
    """A source streaming to a program that never reads is held back: the agent keeps at most
    RELAY_BUFFER bytes of it, and other connections are still served."""
    sent = [0]

    def flood(conn: socket.socket) -> None:
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):
            while sent[0] < 256 << 20:
                sent[0] += conn.send(chunk)

    loop, _ = start(flood)
    with connect(loop.port()) as idle:
        time.sleep(1.0)
        stalled = sent[0]
        time.sleep(0.5)
        assert sent[0] == stalled < 64 << 20
        with connect(loop.port()) as other:
            other.settimeout(5)
            assert other.recv(10)
        loop.stop()
        held = [len(relay.held[1]) for relay, side in loop.relays.relays.values() if side == 0]
        assert held
        assert max(held) <= agent.RELAY_BUFFER
        assert idle.fileno() >= 0  # held open, unread, all along


def test_a_source_that_never_reads_stalls_the_program(agent: ModuleType, start: Start) -> None:
    """A program streaming to a source that never reads is held back the same way."""
    release = threading.Event()
    loop, _ = start(lambda conn: release.wait(30))
    with connect(loop.port()) as sock:
        sock.settimeout(0.5)
        sent = 0
        with contextlib.suppress(TimeoutError):
            while sent < 256 << 20:
                sent += sock.send(b"y" * 65536)
        assert sent < 64 << 20
        loop.stop()
        held = [len(relay.held[0]) for relay, side in loop.relays.relays.values() if side == 0]
        release.set()
        assert held
        assert max(held) <= agent.RELAY_BUFFER


def test_connections_past_the_cap_are_closed_at_once(agent: ModuleType, start: Start) -> None:
    """With MAX_RELAYS connections relayed, the program's next ones are closed at once; once one
    of the relayed ends, a new one is relayed again."""
    loop, servers = start()
    extra = 5
    socks = [connect(loop.port()) for _ in range(agent.MAX_RELAYS + extra)]
    try:
        answers = []
        for sock in socks:
            try:
                sock.sendall(b"?")
                answers.append(sock.recv(1))
            except (ConnectionResetError, BrokenPipeError):
                answers.append(b"")
        assert answers.count(b"?") == agent.MAX_RELAYS
        assert answers.count(b"") == extra
        assert len(servers[0].connections) == agent.MAX_RELAYS
        socks[answers.index(b"?")].close()
        servers[0].ended[0].wait(5)
        with connect(loop.port()) as again:
            again.sendall(b"!")
            assert again.recv(1) == b"!"
    finally:
        for sock in socks:
            sock.close()


def test_the_cap_leaves_room_below_the_open_files_limit(
    agent: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where RLIMIT_NOFILE is low, fewer connections are relayed at once, so accepting never hits EMFILE."""
    monkeypatch.setattr(agent.resource, "getrlimit", lambda _which: (100, 100))
    relays = agent.Relays([["a", str(tmp_path / "a.sock")]], select.poll())
    try:
        assert 2 * relays.max_relays + agent.AGENT_FDS + 1 <= 100
        assert relays.max_relays > 0
    finally:
        relays.close()


def test_a_source_without_its_socket_closes_the_programs_connection(
    agent: ModuleType, tmp_path: Path
) -> None:
    """Where the server's socket cannot be reached, the program's connection is closed at once."""
    poller = select.poll()
    relays = agent.Relays([["gone", str(tmp_path / "missing.sock")]], poller)
    try:
        with connect(relays.ports[0]) as sock:
            for fd, _event in poller.poll(5000):
                relays.handle(fd)
            assert sock.recv(1) == b""
        assert relays.relays == {}
    finally:
        relays.close()


def test_close_cuts_every_connection_and_refuses_new_ones(start: Start) -> None:
    """Closing the relays (the run's end) ends every program connection and every source
    connection, and the listener is gone."""
    loop, servers = start()
    socks = [connect(loop.port()) for _ in range(3)]
    try:
        for sock in socks:
            sock.sendall(b"?")
            assert sock.recv(1) == b"?"
        loop.stop()
        loop.relays.close()
        assert loop.relays.relays == {}
        for sock in socks:
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        assert all(ended.wait(5) for ended in servers[0].ended)
        with pytest.raises(ConnectionRefusedError):
            connect(loop.port())
    finally:
        for sock in socks:
            sock.close()


def test_what_the_program_sent_before_the_end_still_reaches_its_source(start: Start) -> None:
    """Bytes the program sent just before the run ended, not yet read by the agent, are passed on at close."""
    received: list[bytes] = []
    loop, servers = start(lambda conn: received.append(read_to_end(conn)))
    with connect(loop.port()) as sock:
        servers[0].wait_accepted(1)
        loop.stop()
        sock.sendall(b"last words")
    loop.relays.close()
    assert servers[0].ended[0].wait(5)
    assert received == [b"last words"]


def test_shut_refuses_new_connections_and_keeps_the_relayed_ones(start: Start) -> None:
    """Once stopped (``shut``), the listener refuses; connections already relayed still carry bytes."""
    loop, _ = start()
    with connect(loop.port()) as sock:
        sock.sendall(b"1")
        assert sock.recv(1) == b"1"
        loop.stop()
        loop.relays.shut()
        with pytest.raises(ConnectionRefusedError):
            connect(loop.port())
        loop.resume()
        sock.sendall(b"2")
        assert sock.recv(1) == b"2"
