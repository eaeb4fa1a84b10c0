"""The server's end of a data source as the agent meets it: a Unix listener that serves each connection."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

Serve = Callable[[socket.socket], None]
"""What a source does with one connection the agent opened (its thread closes it afterwards)."""


def echo(conn: socket.socket) -> None:
    """Send back every byte as it comes; at the agent's end of its stream, end this side too."""
    try:
        while data := conn.recv(65536):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:
        return


class SourceServer:
    """A Unix stream listener at ``path`` (mode 0o666, as the server makes it), each of whose
    connections ``serve`` handles in a thread of its own."""

    def __init__(self, path: Path, serve: Serve = echo) -> None:
        self.path = path
        self._serve = serve
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        os.chmod(path, 0o666)
        self.listener.listen(128)
        self.connections: list[socket.socket] = []
        self.ended: list[threading.Event] = []
        """Set once the connection of the same index was served and closed."""
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # the listener was shut down
                return
            ended = threading.Event()
            self.connections.append(conn)
            self.ended.append(ended)
            thread = threading.Thread(target=self._handle, args=(conn, ended), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket, ended: threading.Event) -> None:
        with conn:
            self._serve(conn)
        ended.set()

    def wait_accepted(self, count: int, timeout: float = 5.0) -> None:
        """Wait until ``count`` connections were accepted in all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.connections) >= count:
                return
            time.sleep(0.01)
        raise AssertionError(f"{len(self.connections)} connections accepted, not {count}")

    def close(self) -> None:
        """Stop listening (shutdown wakes the blocked accept), close what is still open, remove the socket."""
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepting.join(5)
        for conn in self.connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
