"""Unit tests of the data-source relay: a real upstream on loopback, the test playing the agent on
the relay's Unix sockets; bytes both ways, each limit cutting its case, and everything cut at the end."""

from __future__ import annotations

import contextlib
import logging
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute, SocketStream
from prometheus_client import REGISTRY

from warmpod.models import SourceUse
from warmpod.sandbox.relay import REFUSE_PAUSE, Relay, socket_name
from warmpod.sandbox.unix_stream import UnixStream
from warmpod.sources import Source

Handler = Callable[[SocketStream], Awaitable[object]]


class Upstream:
    """A TCP server on 127.0.0.1 whose connections ``handler`` serves; it counts them."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.port = 0
        self.open = 0
        self.most_open = 0
        self.ended = 0
        """Connections whose handler returned (its peer closed, or it gave up)."""
        self.received = bytearray()

    async def _serve(self, stream: SocketStream) -> None:
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            async with stream:
                await self._handler(stream)
        finally:
            self.open -= 1
            self.ended += 1

    async def read_all(self, stream: ByteStream) -> bytes:
        """Everything ``stream`` sends until it closes or breaks (kept in ``received`` too)."""
        data = bytearray()
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                chunk = await stream.receive()
                data += chunk
                self.received += chunk
        return bytes(data)


@contextlib.asynccontextmanager
async def upstream(handler: Handler | None = None) -> AsyncIterator[Upstream]:
    """An Upstream listening on a free loopback port while the block runs; an echo by default."""

    async def echo(stream: SocketStream) -> None:
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            while True:
                await stream.send(await stream.receive())

    server = Upstream(handler or echo)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    server.port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server._serve)
        yield server
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def relayed(directory: Path, **sources: Source) -> AsyncIterator[Relay]:
    """A Relay of ``sources`` listening in ``directory`` (made here, as the pool makes it) while the
    block runs."""
    directory.mkdir(mode=0o700)
    relay = Relay(list(sources.items()))
    await anyio.to_thread.run_sync(relay.listen, directory)
    async with relay.running():
        yield relay


async def agent(directory: Path, index: int = 0) -> UnixStream:
    """A connection to the ``index``-th source, as the agent makes one for the program."""
    return await UnixStream.connect(directory / socket_name(index))


async def read_all(stream: ByteStream) -> bytes:
    """What ``stream`` sends until it is closed (or breaks)."""
    data = bytearray()
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
        while True:
            data += await stream.receive()
    return bytes(data)


async def roundtrip(stream: ByteStream, data: bytes = b"ping") -> None:
    """Send ``data`` through an echo and get it back: the connection is relayed end to end."""
    await stream.send(data)
    got = b""
    with anyio.fail_after(5):
        while len(got) < len(data):
            got += await stream.receive()
    assert got == data


def counted(name: str, series: str, **labels: str) -> float:
    """The value of one of ``warmpod.metrics``' source series for source ``name``."""
    return REGISTRY.get_sample_value(series, {"source": name, **labels}) or 0.0


def local(port: int, **limits: Any) -> Source:
    """A source on 127.0.0.1:port with ``limits``."""
    return Source(host="127.0.0.1", port=port, **limits)


@contextlib.asynccontextmanager
async def lag_meter() -> AsyncIterator[list[float]]:
    """The event loop's worst lag while the block runs (its only item): a 10 ms ticker's overshoot."""
    worst = [0.0]

    async def tick() -> None:
        while True:
            before = time.monotonic()
            await anyio.sleep(0.01)
            worst[0] = max(worst[0], time.monotonic() - before - 0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        yield worst
        tg.cancel_scope.cancel()


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# Bytes both ways --------------------------------------------------------------------------------


async def test_bytes_go_both_ways_and_a_half_close_is_passed_on(tmp_path: Path) -> None:
    """The agent's bytes reach the upstream and its answer comes back; each side's end of stream is
    passed on as a half-close, and both directions are counted in the result and in /metrics."""

    async def answer_after_eof(stream: SocketStream) -> None:
        request = await server.read_all(stream)  # until the agent's half-close arrives
        await stream.send(b"got " + str(len(request)).encode())

    before = {d: counted("hc", "warmpod_source_bytes_total", direction=d) for d in ("in", "out")}
    connections = counted("hc", "warmpod_source_connections_total")
    async with upstream(answer_after_eof) as server, relayed(tmp_path / "s", hc=local(server.port)) as relay:
        conn = await agent(tmp_path / "s")
        await conn.send(b"x" * 100_000)
        await conn.send_eof()
        with anyio.fail_after(5):
            assert await read_all(conn) == b"got 100000"
        await conn.aclose()
        usage = relay.usage()
    assert usage == {"hc": SourceUse(connections=1, refused=0, bytes_in=10, bytes_out=100_000)}
    assert counted("hc", "warmpod_source_bytes_total", direction="out") - before["out"] == 100_000
    assert counted("hc", "warmpod_source_bytes_total", direction="in") - before["in"] == 10
    assert counted("hc", "warmpod_source_connections_total") - connections == 1


async def test_megabytes_pass_whole_with_the_server_holding_a_chunk_at_a_time(tmp_path: Path) -> None:
    """Eight MiB from the upstream arrive byte for byte while the event loop stays responsive."""
    payload = bytes(range(256)) * (8 * 4096)

    async def send_payload(stream: SocketStream) -> None:
        await stream.send(payload)

    async with upstream(send_payload) as server, relayed(tmp_path / "s", big=local(server.port)) as relay:
        async with lag_meter() as lag:
            conn = await agent(tmp_path / "s")
            with anyio.fail_after(30):
                assert await read_all(conn) == payload
            await conn.aclose()
        assert relay.usage()["big"].bytes_in == len(payload)
    assert lag[0] < 0.5


async def test_each_source_leads_to_its_own_upstream_only(tmp_path: Path) -> None:
    """Two sources, two sockets: each connection reaches the upstream its socket was declared for."""

    async def name_a(stream: SocketStream) -> None:
        await stream.send(b"a")

    async def name_b(stream: SocketStream) -> None:
        await stream.send(b"b")

    async with (
        upstream(name_a) as a,
        upstream(name_b) as b,
        relayed(tmp_path / "s", first=local(a.port), second=local(b.port)) as relay,
    ):
        assert relay.job_sources == [
            ("first", "/run/warmpod/source-0.sock"),
            ("second", "/run/warmpod/source-1.sock"),
        ]
        for index, expected in ((0, b"a"), (1, b"b")):
            conn = await agent(tmp_path / "s", index)
            with anyio.fail_after(5):
                assert await read_all(conn) == expected
            await conn.aclose()


# Limits -----------------------------------------------------------------------------------------


async def test_max_bytes_in_cuts_at_the_cap_and_refuses_later_connections(tmp_path: Path) -> None:
    """The program gets exactly max_bytes_in from the upstream, then the connection is cut (the
    upstream sees it close); a connection after that is refused, the budget being spent."""

    async def flood(stream: SocketStream) -> None:
        with contextlib.suppress(anyio.BrokenResourceError):
            while True:
                await stream.send(b"y" * 65536)

    async with (
        upstream(flood) as server,
        relayed(tmp_path / "s", capped=local(server.port, max_bytes_in=100_000)) as relay,
    ):
        conn = await agent(tmp_path / "s")
        with anyio.fail_after(5):
            assert await read_all(conn) == b"y" * 100_000
            while server.ended < 1:
                await anyio.sleep(0.01)
        await conn.aclose()
        later = await agent(tmp_path / "s")
        with anyio.fail_after(5):
            assert await read_all(later) == b""
        await later.aclose()
        assert relay.usage()["capped"] == SourceUse(connections=1, refused=1, bytes_in=100_000, bytes_out=0)


async def test_max_bytes_out_cuts_at_the_cap(tmp_path: Path) -> None:
    """The upstream gets exactly max_bytes_out from the program, then the connection is cut."""
    async with (
        upstream(lambda stream: server.read_all(stream)) as server,
        relayed(tmp_path / "s", capped=local(server.port, max_bytes_out=50_000)) as relay,
    ):
        conn = await agent(tmp_path / "s")
        with contextlib.suppress(anyio.BrokenResourceError), anyio.fail_after(5):
            for _ in range(100):
                await conn.send(b"z" * 10_000)
        with anyio.fail_after(5):
            assert await read_all(conn) == b""
            while server.ended < 1:
                await anyio.sleep(0.01)
        await conn.aclose()
        assert bytes(server.received) == b"z" * 50_000
        assert relay.usage()["capped"].bytes_out == 50_000


async def test_an_idle_connection_is_cut_and_traffic_keeps_it_open(tmp_path: Path) -> None:
    """A connection that moves bytes stays open past the idle timeout; once nothing moves either
    way for that long it is cut, on both sides."""
    async with upstream() as server, relayed(tmp_path / "s", idle=local(server.port, idle_timeout=0.3)):
        conn = await agent(tmp_path / "s")
        for _ in range(6):  # 0.6 s of traffic, a message every 0.1 s
            await anyio.sleep(0.1)
            await roundtrip(conn, b"k")
        quiet = time.monotonic()
        with anyio.fail_after(5):
            assert await read_all(conn) == b""
            while server.ended < 1:
                await anyio.sleep(0.01)
        assert 0.25 < time.monotonic() - quiet < 3
        await conn.aclose()


async def test_an_agent_that_never_reads_is_cut_with_the_server_holding_little(tmp_path: Path) -> None:
    """An upstream streaming without end to an agent that never reads moves only what the sockets'
    buffers hold, the event loop stays responsive, and the idle timeout cuts it."""

    async def flood(stream: SocketStream) -> None:
        with contextlib.suppress(anyio.BrokenResourceError):
            while True:
                await stream.send(b"w" * 65536)

    async with (
        upstream(flood) as server,
        relayed(tmp_path / "s", stuck=local(server.port, idle_timeout=0.5)) as relay,
        lag_meter() as lag,
    ):
        conn = await agent(tmp_path / "s")
        with anyio.fail_after(5):
            while server.ended < 1:
                await anyio.sleep(0.05)
        # Past the cut, what is left to read is only what the relay had sent into the socket.
        moved = relay.usage()["stuck"].bytes_in
        assert 0 < moved < 16 * 1024 * 1024
        with anyio.fail_after(5):
            assert len(await read_all(conn)) == moved
        await conn.aclose()
    assert lag[0] < 0.2


async def test_past_max_connections_a_connection_is_refused_at_once(tmp_path: Path) -> None:
    """With max_connections open, one more is closed as soon as it is accepted and counted refused;
    once one closes, a new one is relayed again."""
    refused = counted("two", "warmpod_source_refused_total")
    async with (
        upstream() as server,
        relayed(tmp_path / "s", two=local(server.port, max_connections=2)) as relay,
    ):
        held = [await agent(tmp_path / "s") for _ in range(2)]
        for conn in held:
            await roundtrip(conn)
        extra = await agent(tmp_path / "s")
        with anyio.fail_after(2):
            assert await read_all(extra) == b""
        await extra.aclose()
        await held.pop().aclose()
        with anyio.fail_after(5):
            while server.open > 1:
                await anyio.sleep(0.01)
        again = await agent(tmp_path / "s")
        await roundtrip(again)
        for conn in (*held, again):
            await conn.aclose()
        assert relay.usage()["two"] == SourceUse(connections=3, refused=1, bytes_in=12, bytes_out=12)
        assert server.most_open == 2
    assert counted("two", "warmpod_source_refused_total") - refused == 1


async def test_an_agent_connecting_without_end_is_refused_and_paced(tmp_path: Path) -> None:
    """Hundreds of connections past the limit are all refused, never more than max_connections
    reach the upstream, the refusals are paced, and the event loop stays responsive."""
    flood = 200
    async with (
        upstream() as server,
        relayed(tmp_path / "s", flood=local(server.port, max_connections=2)) as relay,
        lag_meter() as lag,
    ):
        held = [await agent(tmp_path / "s") for _ in range(2)]
        for conn in held:
            await roundtrip(conn)
        started = time.monotonic()

        async def hammer(count: int) -> None:
            for _ in range(count):
                conn = await agent(tmp_path / "s")
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    await conn.receive()
                await conn.aclose()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(hammer, flood // 4)
        elapsed = time.monotonic() - started
        for conn in held:
            await roundtrip(conn)  # the relayed ones were never disturbed
            await conn.aclose()
        assert relay.usage()["flood"].refused == flood
        assert relay.usage()["flood"].connections == 2
        assert server.most_open == 2
    assert elapsed >= flood * REFUSE_PAUSE * 0.9
    assert lag[0] < 0.2


# Ends -------------------------------------------------------------------------------------------


async def test_the_end_of_the_run_cuts_every_connection_and_closes_the_listeners(tmp_path: Path) -> None:
    """Leaving ``running`` closes every relayed connection (the agent and the upstream both see it)
    and the listeners: a connection after it is refused by the kernel."""
    directory = tmp_path / "s"
    async with upstream() as server:
        async with relayed(directory, ends=local(server.port)):
            held = [await agent(directory) for _ in range(3)]
            for conn in held:
                await roundtrip(conn)
        with anyio.fail_after(5):
            for conn in held:
                assert await read_all(conn) == b""
                await conn.aclose()
            while server.ended < 3:
                await anyio.sleep(0.01)
    with pytest.raises(ConnectionRefusedError):
        await agent(directory)


async def test_an_upstream_that_is_down_is_a_clean_close_counted_refused(tmp_path: Path) -> None:
    """Nothing listening on the upstream's port: the agent's connection is closed cleanly, counted
    refused, never relayed."""
    refused = counted("down", "warmpod_source_refused_total")
    async with relayed(tmp_path / "s", down=local(closed_port())) as relay:
        conn = await agent(tmp_path / "s")
        with anyio.fail_after(5):
            assert await read_all(conn) == b""
        await conn.aclose()
        assert relay.usage()["down"] == SourceUse(connections=0, refused=1, bytes_in=0, bytes_out=0)
    assert counted("down", "warmpod_source_refused_total") - refused == 1


async def test_a_failure_a_program_repeats_is_logged_once_a_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An upstream that is down is a warning naming it the first time, then debug lines: a program
    connecting again and again cannot flood the server's log."""
    caplog.set_level(logging.DEBUG, logger="warmpod.sandbox.relay")
    port = closed_port()
    async with relayed(tmp_path / "s", down=local(port)) as relay:
        for _ in range(5):
            conn = await agent(tmp_path / "s")
            with anyio.fail_after(5):
                assert await read_all(conn) == b""
            await conn.aclose()
        with anyio.fail_after(5):
            while relay.usage()["down"].refused < 5:
                await anyio.sleep(0.01)
    told = [r for r in caplog.records if f"cannot connect to 127.0.0.1:{port}" in r.getMessage()]
    assert [r.levelno for r in told] == [logging.WARNING] + [logging.DEBUG] * 4
    assert told[0].getMessage().startswith("data source down: ")


async def test_an_upstream_that_does_not_answer_is_given_up_after_the_connect_timeout(tmp_path: Path) -> None:
    """An upstream whose backlog is full never takes the connection: after connect_timeout the
    agent's connection is closed and counted refused."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        with socket.create_connection(full.getsockname()):  # fills the backlog of one
            source = local(full.getsockname()[1], connect_timeout=0.3)
            async with relayed(tmp_path / "s", slow=source) as relay:
                started = time.monotonic()
                conn = await agent(tmp_path / "s")
                with anyio.fail_after(5):
                    assert await read_all(conn) == b""
                assert 0.25 < time.monotonic() - started < 3
                await conn.aclose()
                assert relay.usage()["slow"].refused == 1


# Listeners --------------------------------------------------------------------------------------


async def test_listeners_are_sockets_anyone_may_connect_to_in_the_sandbox_directory(tmp_path: Path) -> None:
    """Each source's socket is ``source-<index>.sock`` in the sandbox's directory, mode 0666 (the
    container's root is another uid); nothing is left beside the directory."""
    directory = tmp_path / "s"
    async with relayed(directory, a=local(1), b=local(2)):
        for index in range(2):
            mode = (directory / socket_name(index)).lstat().st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o666
        assert sorted(path.name for path in tmp_path.iterdir()) == ["s"]


async def test_a_name_planted_in_the_directory_is_replaced_never_followed(tmp_path: Path) -> None:
    """A symlink where a socket goes (the container's root can write the directory) is replaced by
    the socket; the file it pointed to keeps its mode."""
    directory = tmp_path / "s"
    directory.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_text("x")
    target.chmod(0o600)
    (directory / socket_name(0)).symlink_to(target)
    relay = Relay([("a", local(1))])
    await anyio.to_thread.run_sync(relay.listen, directory)
    relay.close()
    assert stat.S_ISSOCK((directory / socket_name(0)).lstat().st_mode)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


async def test_a_listener_that_cannot_be_made_leaves_nothing_open(tmp_path: Path) -> None:
    """Listening in a directory that is gone raises OSError, with no socket left behind."""
    relay = Relay([("a", local(1)), ("b", local(2))])
    with pytest.raises(OSError, match="No such file"):
        await anyio.to_thread.run_sync(relay.listen, tmp_path / "gone")
    assert list(tmp_path.iterdir()) == []
    relay.close()


async def test_a_relay_without_sources_listens_nowhere(tmp_path: Path) -> None:
    """No sources: no socket, no task, an empty job list and an empty usage."""
    relay = Relay([])
    relay.listen(tmp_path)
    async with relay.running():
        assert relay.job_sources == []
    assert relay.usage() == {}
    assert list(tmp_path.iterdir()) == []
