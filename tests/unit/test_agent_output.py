"""Unit tests of how the real agent coalesces the program's output into Output frames."""

from __future__ import annotations

import base64
import json
import socket
import struct
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from warmpod.sandbox import protocol


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The server's end and the agent's end of a connected unix socket pair."""
    server_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with server_end, agent_end:
        server_end.setblocking(False)
        yield server_end, agent_end


def frames(server_end: socket.socket) -> list[tuple[str, bytes]]:
    """Every frame the agent has sent so far, as ``(stream, data)``."""
    data = b""
    while True:
        try:
            data += server_end.recv(1 << 20)
        except BlockingIOError:
            break
    received = []
    while data:
        (size,) = struct.unpack(">I", data[:4])
        message: dict[str, Any] = json.loads(data[4 : 4 + size])
        assert message["type"] == "output"
        received.append((message["stream"], base64.b64decode(message["data"])))
        data = data[4 + size :]
    return received


def test_small_writes_wait_and_go_as_one_frame(
    agent: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Bytes of one stream read one at a time are held, then sent as one frame when flushed."""
    server_end, agent_end = pair
    pending = agent.PendingOutput(agent_end)
    for _ in range(100):
        pending.add("stdout", b"x")
    assert frames(server_end) == []
    assert pending.due() is not None
    pending.flush()
    assert frames(server_end) == [("stdout", b"x" * 100)]
    assert pending.due() is None


def test_other_stream_sends_the_waiting_bytes_first(
    agent: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Interleaved stdout and stderr reach the server in the order the agent read them."""
    server_end, agent_end = pair
    pending = agent.PendingOutput(agent_end)
    for stream, data in [("stdout", b"a"), ("stdout", b"b"), ("stderr", b"c"), ("stdout", b"d")]:
        pending.add(stream, data)
    pending.flush()
    assert frames(server_end) == [("stdout", b"ab"), ("stderr", b"c"), ("stdout", b"d")]


def test_a_full_buffer_goes_at_once_in_frames_the_server_accepts(
    agent: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Once OUTPUT_FLUSH_BYTES wait they are sent without waiting, no frame carrying more than AGENT_READ."""
    server_end, agent_end = pair
    pending = agent.PendingOutput(agent_end)
    pending.add("stdout", b"y" * 1000)
    pending.add("stdout", b"z" * agent.CHUNK)
    sent = frames(server_end)
    assert b"".join(data for _, data in sent) == b"y" * 1000 + b"z" * agent.CHUNK
    assert all(len(data) <= protocol.AGENT_READ for _, data in sent)
    assert pending.due() is None


def test_the_flush_deadline_is_a_few_milliseconds_after_the_first_byte(
    agent: ModuleType, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Waiting bytes are due OUTPUT_FLUSH_SECONDS (at most 10 ms) after the first of them was added."""
    _, agent_end = pair
    pending = agent.PendingOutput(agent_end)
    assert 0 < agent.OUTPUT_FLUSH_SECONDS <= 0.01
    pending.add("stderr", b"1")
    first = pending.due()
    pending.add("stderr", b"2")
    assert pending.due() == first
