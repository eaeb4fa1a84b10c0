"""A run's data sources: a Unix listener per source in its sandbox's directory, and each connection
the agent makes there carried by TCP to the source's upstream, within the source's limits, until the
run ends.

Everything that arrives on these sockets comes from inside the container, so it is hostile: the
program never names a destination (each socket leads to one declared upstream), each direction holds
at most one chunk in the server, a peer that stops reading stalls only its own connection until the
idle timeout cuts it, and an agent that connects without end is refused, paced, at its own cost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio
from anyio.abc import ByteStream, TaskGroup

from warmpod import metrics
from warmpod.metrics import SourceDirection
from warmpod.models import SourceUse
from warmpod.sandbox.sandbox import AGENT_DIR
from warmpod.sandbox.unix_stream import UnixStream
from warmpod.sources import Source

log = logging.getLogger(__name__)

CHUNK = 65536
"""Bytes carried at once each way: what one connection holds in the server per direction."""
REFUSE_PAUSE = 0.005
"""Seconds a listener rests after refusing a connection: an agent that connects without end gets
at most 200 refusals a second per source, and the server spends next to nothing on it."""
BACKLOG = 8
"""Connections the kernel holds for a listener before it accepts them; past it the agent waits."""
_STREAM_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def socket_name(index: int) -> str:
    """The file name of the ``index``-th source's socket in the sandbox's directory."""
    return f"source-{index}.sock"


class _Lane:
    """One source of one run: its limits, its connections open now, what they moved so far."""

    def __init__(self, name: str, source: Source) -> None:
        self.name = name
        self.source = source
        self.use = SourceUse()
        self.active = 0
        self._left: dict[SourceDirection, int] = {"in": source.max_bytes_in, "out": source.max_bytes_out}
        self._connections = metrics.SOURCE_CONNECTIONS.labels(source=name)
        self._refused = metrics.SOURCE_REFUSED.labels(source=name)
        self._bytes = {d: metrics.SOURCE_BYTES.labels(source=name, direction=d) for d in ("in", "out")}
        self._told: set[str] = set()

    def tell(self, level: int, kind: str, message: str, *args: object) -> None:
        """Log ``message`` about this source at ``level`` the first time this run meets ``kind``,
        at debug level after: a program can make it happen as often as it likes."""
        first = kind not in self._told
        self._told.add(kind)
        log.log(level if first else logging.DEBUG, f"data source %s: {message}", self.name, *args)

    def admits(self) -> bool:
        """Whether one more connection may open: below ``max_connections``, bytes left both ways."""
        return self.active < self.source.max_connections and all(self._left.values())

    def refuse(self) -> None:
        self.use.refused += 1
        self._refused.inc()

    def connected(self) -> None:
        self.use.connections += 1
        self._connections.inc()

    def reserve(self, direction: SourceDirection, size: int) -> int:
        """How many of ``size`` bytes may still go ``direction``, taken from what is left."""
        allowed = min(size, self._left[direction])
        self._left[direction] -= allowed
        return allowed

    def moved(self, direction: SourceDirection, size: int) -> None:
        if direction == "in":
            self.use.bytes_in += size
        else:
            self.use.bytes_out += size
        self._bytes[direction].inc(size)


class Relay:
    """The data sources of one run: their listeners, where the agent finds them, and what it did
    with them. ``listen`` makes the listeners, ``running`` serves them for the run's length, and
    ``close`` (or the end of ``running``) closes them."""

    def __init__(self, sources: Sequence[tuple[str, Source]]) -> None:
        self._lanes = [_Lane(name, source) for name, source in sources]
        self._listeners: list[socket.socket] = []

    def listen(self, directory: Path) -> None:
        """Make one listener per source in the sandbox's host ``directory``, for the agent to find
        before it has its job. File work: call it in a worker thread.

        Raises:
            OSError: one could not be made (none is left open).
        """
        try:
            for index in range(len(self._lanes)):
                self._listeners.append(_listen(directory / socket_name(index)))
        except OSError:
            self.close()
            raise

    @property
    def job_sources(self) -> list[tuple[str, str]]:
        """``(name, socket path inside the container)`` of each source, for the agent's job."""
        return [(lane.name, f"{AGENT_DIR}/{socket_name(i)}") for i, lane in enumerate(self._lanes)]

    def usage(self) -> dict[str, SourceUse]:
        """What the run did with each source so far, by name (a copy)."""
        return {
            lane.name: SourceUse(
                connections=lane.use.connections,
                refused=lane.use.refused,
                bytes_in=lane.use.bytes_in,
                bytes_out=lane.use.bytes_out,
            )
            for lane in self._lanes
        }

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Relay the agent's connections while the block runs; on leaving it, however, every
        listener and every connection is closed (the socket files go with the sandbox's directory)."""
        try:
            if not self._listeners:
                yield
                return
            async with anyio.create_task_group() as tg:
                for lane, listener in zip(self._lanes, self._listeners, strict=True):
                    tg.start_soon(_accept, lane, listener, tg)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self.close()

    def close(self) -> None:
        """Close the listeners (again: it does nothing the second time); the agent's connections
        to them are refused from now on."""
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()


def _listen(path: Path) -> socket.socket:
    """A non-blocking Unix listener at ``path`` that the container's root may connect to.

    Made under a private name beside the sandbox's directory, where the container cannot reach,
    then renamed into it: a mode set on a name the container can replace could be set on whatever
    that name was replaced with (rename replaces a name, it never follows one).
    """
    temporary = path.parent.parent / f".relay-{uuid.uuid4().hex[:12]}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(os.fspath(temporary))
        try:
            # The agent, the container's root, is another uid under a user namespace.
            temporary.chmod(0o666)
            sock.listen(BACKLOG)
            temporary.rename(path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    except BaseException:
        sock.close()
        raise
    return sock


async def _accept(lane: _Lane, listener: socket.socket, tg: TaskGroup) -> None:
    """Take the agent's connections to one source, each relayed in a task of ``tg`` while the lane
    admits it, every other closed at once."""
    while True:
        await anyio.wait_readable(listener)
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            continue
        except OSError as exc:
            # Out of files (EMFILE, ENFILE): the connection waits in the backlog meanwhile.
            lane.tell(logging.WARNING, "accept", "cannot accept a connection: %s", exc)
            await anyio.sleep(REFUSE_PAUSE)
            continue
        if not lane.admits():
            conn.close()
            lane.refuse()
            await anyio.sleep(REFUSE_PAUSE)
            continue
        lane.active += 1
        tg.start_soon(_connection, lane, UnixStream(conn))


async def _connection(lane: _Lane, agent: UnixStream) -> None:
    """Relay one accepted connection (counted in ``lane.active`` by the caller) to the upstream."""
    try:
        upstream = await _open_upstream(lane)
        if upstream is None:
            lane.refuse()
            return
        try:
            lane.connected()
            await _carry(lane, agent, upstream)
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()
    finally:
        lane.active -= 1
        with anyio.CancelScope(shield=True):
            await agent.aclose()


async def _open_upstream(lane: _Lane) -> ByteStream | None:
    """A TCP connection to the lane's upstream, or None (logged) if it is down or too slow."""
    source = lane.source
    try:
        with anyio.fail_after(source.connect_timeout):
            return await anyio.connect_tcp(source.host, source.port)
    except OSError as exc:  # TimeoutError among them
        reason = str(exc) or f"no answer in {source.connect_timeout:g} s"
        lane.tell(logging.WARNING, "connect", "cannot connect to %s:%d: %s", source.host, source.port, reason)
        return None


async def _carry(lane: _Lane, agent: ByteStream, upstream: ByteStream) -> None:
    """Carry bytes both ways until both ends closed theirs, a cap is reached, an end breaks, or no
    byte moved either way for the idle timeout."""
    idle = lane.source.idle_timeout
    with anyio.CancelScope(deadline=anyio.current_time() + idle) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pipe, lane, "out", agent, upstream, scope)
            tg.start_soon(_pipe, lane, "in", upstream, agent, scope)
    if scope.cancelled_caught and anyio.current_time() >= scope.deadline:
        lane.tell(logging.INFO, "idle", "a connection idle for %g s was cut", idle)


async def _pipe(
    lane: _Lane, direction: SourceDirection, source: ByteStream, sink: ByteStream, scope: anyio.CancelScope
) -> None:
    """One direction: each chunk received is sent on before the next is read (the backpressure),
    and an end of stream is passed on as a half-close."""
    while True:
        try:
            data = await source.receive(CHUNK)
        except anyio.EndOfStream:
            try:
                await sink.send_eof()
            except _STREAM_ERRORS:
                scope.cancel()
            return
        except _STREAM_ERRORS:
            scope.cancel()
            return
        allowed = lane.reserve(direction, len(data))
        if allowed:
            try:
                await sink.send(data if allowed == len(data) else data[:allowed])
            except _STREAM_ERRORS:
                scope.cancel()
                return
            lane.moved(direction, allowed)
            scope.deadline = anyio.current_time() + lane.source.idle_timeout
        if allowed < len(data):
            lane.tell(logging.INFO, direction, "a connection reached max_bytes_%s and was cut", direction)
            scope.cancel()
            return
