"""Unit tests of the agent connection's socket stream, above all cancelling it as data arrives."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from support.fakes import WatchedSocket, watched_pair

from warmpod.sandbox.unix_stream import UnixStream

Pair = tuple[UnixStream, socket.socket, WatchedSocket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """Our stream on one end of a socket pair, a blocking socket on the other, and our end's socket."""
    ours, theirs = watched_pair()
    with ours, theirs:
        yield UnixStream(ours), theirs, ours


async def test_sends_and_receives_both_ways(pair: Pair) -> None:
    stream, peer, _ = pair
    await stream.send(b"ping")
    assert peer.recv(4) == b"ping"
    peer.sendall(b"pong")
    assert await stream.receive() == b"pong"


async def test_a_large_send_waits_for_the_peer_to_read(pair: Pair) -> None:
    stream, peer, _ = pair
    payload = bytes(range(256)) * 8192  # 2 MiB: far over the socket buffer
    received = bytearray()

    def drain() -> None:
        while len(received) < len(payload):
            received.extend(peer.recv(65536))

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, drain)
        await stream.send(payload)
    assert bytes(received) == payload


async def test_peer_hang_up_is_end_of_stream(pair: Pair) -> None:
    stream, peer, _ = pair
    peer.shutdown(socket.SHUT_WR)
    with pytest.raises(anyio.EndOfStream):
        await stream.receive()


async def test_closing_wakes_a_pending_receive(pair: Pair) -> None:
    stream, _, ours = pair
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def receive() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    await stream.receive()

            tg.start_soon(receive)
            await ours.read_in_vain(0)
            await stream.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await stream.send(b"late")


async def test_connect_refused_and_missing_paths_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await UnixStream.connect(tmp_path / "absent.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with stale:
        stale.bind(str(tmp_path / "bound.sock"))  # bound, never listening
        with pytest.raises(ConnectionRefusedError):
            await UnixStream.connect(tmp_path / "bound.sock")


async def test_connects_to_a_listener(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    async with await anyio.create_unix_listener(path) as listener, anyio.create_task_group() as tg:

        async def answer() -> None:
            async with await listener.accept() as conn:
                await conn.send(await conn.receive())

        tg.start_soon(answer)
        stream = await UnixStream.connect(path)
        async with stream:
            await stream.send(b"echo")
            assert await stream.receive() == b"echo"


async def test_cancelling_a_receive_as_data_arrives_raises_nothing_in_the_loop(
    pair: Pair,
) -> None:
    """The race anyio's own unix stream loses: a cancel and a readable socket in one loop pass.

    The cancel is queued with ``call_soon`` before the data is written, so the next pass runs it
    and then the socket's reader callback, which must not touch the cancelled wait.
    """
    stream, peer, ours = pair
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        for _ in range(20):
            scope = anyio.CancelScope()

            async def receive(scope: anyio.CancelScope = scope) -> None:
                with scope:
                    await stream.receive()

            async with anyio.create_task_group() as tg:
                since = ours.empty_reads
                tg.start_soon(receive)
                await ours.read_in_vain(since)
                peer.sendall(b"x")
                loop.call_soon(scope.cancel)
                # Leaving the task group yields to the loop: its next pass runs the cancel, then
                # the socket's reader callback.
            assert scope.cancelled_caught
            assert await stream.receive() == b"x"  # the byte is still there for the next read
    finally:
        loop.set_exception_handler(previous)
    assert errors == []
