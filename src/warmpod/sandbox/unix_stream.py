"""A byte stream over a connected unix socket that can be cancelled at any point.

anyio's own unix stream (4.16) wakes a pending read by calling ``set_result`` from the event
loop's reader callback. When the read is cancelled in the same loop iteration in which the socket
becomes readable, that callback hits a cancelled future and asyncio reports ``InvalidStateError``
from the loop. A run cancelled just as its agent answers is exactly that case, so the server's
end of every agent connection waits with ``anyio.wait_readable``, which tolerates it.

Upstream: https://github.com/agronholm/anyio/issues/1267 reports the same futures' race in
``aclose``, and its fix covers only that call. tests/unit/test_upstream.py runs this race on
anyio's stream as a strict xfail: once it passes, anyio is fixed and this class can go.
"""

from __future__ import annotations

import os
import socket
import struct

import anyio
from anyio.abc import ByteStream
from anyio.lowlevel import checkpoint


class UnixStream(ByteStream):
    """Owns ``sock``, a connected ``AF_UNIX`` stream socket, and closes it on ``aclose``."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._closed = False

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> UnixStream:
        """Connect to the unix socket at ``path``.

        Raises:
            OSError: nothing listens there (``ConnectionRefusedError``, ``FileNotFoundError``).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                sock.connect(os.fspath(path))
            except BlockingIOError:
                # The listener's backlog is full: wait until it takes us, then learn the outcome.
                await anyio.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error)) from None
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def peer_pid(self) -> int:
        """The pid, in this process's PID namespace, of the process that made the listening socket."""
        creds = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", creds)[0]
        return pid

    async def receive(self, max_bytes: int = 65536) -> bytes:
        await checkpoint()
        while True:
            self._check_open()
            try:
                data = self._sock.recv(max_bytes)
            except BlockingIOError:
                await anyio.wait_readable(self._sock)
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            else:
                if not data:
                    raise anyio.EndOfStream
                return data

    async def send(self, item: bytes) -> None:
        await checkpoint()
        view = memoryview(item)
        while view:
            self._check_open()
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            else:
                view = view[sent:]

    async def send_eof(self) -> None:
        self._check_open()
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise anyio.BrokenResourceError from exc

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Wakes any task waiting on the socket with ClosedResourceError before the fd goes.
            anyio.notify_closing(self._sock)
            self._sock.close()
        await checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
