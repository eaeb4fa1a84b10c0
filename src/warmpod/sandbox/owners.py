"""Whether the server that made a container still runs: one lock file per server start.

A server's pid and hostname say nothing once it runs in a container: restarted, it is PID 2 in
its new container again (compose) or has a new hostname (Quadlet). What survives a restart is
the state directory, so each start holds ``<state>/owners/<token>.lock`` with ``flock`` for its
whole life, and labels its containers with the token. The kernel drops the lock when the process
dies, however it dies: a later start on the same state directory that can lock the file knows
the owner is gone and its containers are leftovers; a lock held by someone else means alive.
A token with no lock file here is another state directory's (another server sharing the Podman
storage, or a server of the default fresh private directory) and this module cannot judge it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from enum import Enum
from pathlib import Path

OWNERS = "owners"
SUFFIX = ".lock"
# Tokens come from container labels, which whoever shares the Podman storage can set: only a
# plain name can become a file name here.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Owner(Enum):
    """What a container's owner token says about its server."""

    ALIVE = "alive"
    GONE = "gone"
    UNKNOWN = "unknown"
    """No lock file of that token in this state directory."""


class OwnerLock:
    """This server's own lock file, held from ``acquire`` until ``release``."""

    def __init__(self, state_dir: Path, token: str) -> None:
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"owner token {token!r} is not a plain name")
        self.directory = state_dir / OWNERS
        self.token = token
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create and lock the file; a second holder of the same token would be a bug.

        Raises:
            OSError: the state directory is not writable, or the lock is held.
        """
        self.directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.directory / f"{self.token}{SUFFIX}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the file and drop the lock (a clean stop leaves nothing to judge)."""
        if self._fd is None:
            return
        (self.directory / f"{self.token}{SUFFIX}").unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        with contextlib.suppress(OSError):  # the lock files of other starts, if any, stay
            self.directory.rmdir()

    def owner(self, token: str) -> Owner:
        """What the lock file of ``token`` in this state directory says of its server."""
        if not _TOKEN.fullmatch(token):
            return Owner.UNKNOWN
        try:
            fd = os.open(self.directory / f"{token}{SUFFIX}", os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return Owner.UNKNOWN
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return Owner.ALIVE
        finally:
            # Closing drops a lock taken here: a gone owner's file stays until ``discard``.
            os.close(fd)
        return Owner.GONE

    def gone_tokens(self) -> list[str]:
        """Tokens whose lock file is here and no longer held, this server's aside."""
        with contextlib.suppress(FileNotFoundError):
            names = [path.name.removesuffix(SUFFIX) for path in self.directory.glob(f"*{SUFFIX}")]
            return [name for name in names if name != self.token and self.owner(name) is Owner.GONE]
        return []

    def discard(self, token: str) -> None:
        """Remove the lock file of a gone owner whose containers are all removed."""
        if _TOKEN.fullmatch(token) and self.owner(token) is Owner.GONE:
            (self.directory / f"{token}{SUFFIX}").unlink(missing_ok=True)
