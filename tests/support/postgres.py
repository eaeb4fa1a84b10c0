"""A throwaway PostgreSQL server from Debian's packages, for the store and cluster tests and the bench.

Debian installs the server's programs under ``/usr/lib/postgresql/<major>/bin`` (off PATH), and
``initdb`` refuses to run as root: as root every program runs as the ``postgres`` user through
``runuser``, in a fresh temporary directory that user owns. The server listens on 127.0.0.1 only,
on a free port, with its unix socket inside that directory (never /var/run/postgresql), trusts
every local connection, and is stopped and its directory removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from support.live import free_port

# Tests lose nothing when the machine crashes, so no commit waits for the disk. The bench asks
# for durable=True: PostgreSQL's own defaults, the figures a production server would give.
FAST = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
START_TIMEOUT = 60
# A port taken between free_port() and the server's bind fails the start: try again on another.
START_ATTEMPTS = 3
SUPERUSER = "postgres"


class PostgresMissing(Exception):
    """PostgreSQL's server programs, or the user to run them as, are not on this machine."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` that holds ``initdb`` and ``pg_ctl``.

    Raises:
        PostgresMissing: no such directory (``deploy/setup.sh --test`` installs ``postgresql``), or
            this is root and there is no ``postgres`` user to run them as.
    """
    found = [
        path.parent
        for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if (path.parent / "pg_ctl").exists() and path.parent.parent.name.isdigit()
    ]
    if not found:
        raise PostgresMissing(
            "no /usr/lib/postgresql/*/bin/initdb and pg_ctl (deploy/setup.sh --test installs postgresql)"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise PostgresMissing(f"running as root and there is no {SUPERUSER!r} user for initdb") from None
    return max(found, key=lambda path: int(path.parent.name))


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway server: where it lives and how to reach it."""

    bin_dir: Path
    directory: Path
    port: int

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        """The server's own log (``pg_ctl -l``)."""
        return self.directory / "server.log"

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL of ``database`` over TCP on the loopback address."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh unique name unless given) and return its URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        # CREATE DATABASE cannot run inside a transaction block.
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database ``url`` names, disconnecting whoever still uses it."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def log_tail(self, size: int = 4000) -> str:
        """The end of the server's log, for assertion messages."""
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except FileNotFoundError:
            return "(no server log)"


def _as_owner(argv: list[str]) -> list[str]:
    """``argv`` run as the ``postgres`` user when this is root (initdb and postgres refuse root)."""
    return ["runuser", "-u", SUPERUSER, "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _as_owner(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        # Not the caller's directory: the postgres user may not be allowed into it.
        cwd="/",
        # The server's locale and environment are its own, not the test runner's.
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
    )


def _config(port: int, socket_dir: Path, durable: bool, extra: Mapping[str, str]) -> str:
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(port),
        "unix_socket_directories": f"'{socket_dir}'",
        **({} if durable else FAST),
        **extra,
    }
    return "".join(f"{name} = {value}\n" for name, value in settings.items())


@contextlib.contextmanager
def running(*, durable: bool = False, settings: Mapping[str, str] | None = None) -> Iterator[PostgresServer]:
    """A fresh PostgreSQL server for as long as the block lasts; stopped and deleted after it.

    Args:
        durable: keep PostgreSQL's defaults (fsync, synchronous commits) instead of the fast
            settings tests use, for figures a production server would give.
        settings: more ``postgresql.conf`` lines, name to value as the file spells it.

    Raises:
        PostgresMissing: see :func:`find_bin_dir`.
        RuntimeError: initdb or the start failed (with their output and the server's log).
    """
    bin_dir = find_bin_dir()
    # In the system's temporary directory, not pytest's: that one is private to root (0700) and
    # the postgres user could not enter it.
    directory = Path(tempfile.mkdtemp(prefix="warmpod-pg-"))
    server: PostgresServer | None = None
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, SUPERUSER, SUPERUSER)
        data = directory / "data"
        init = _run(
            [
                str(bin_dir / "initdb"),
                f"--pgdata={data}",
                f"--username={SUPERUSER}",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
                *(["--no-sync"] if not durable else []),
            ]
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        base_conf = (data / "postgresql.conf").read_text()
        for _attempt in range(START_ATTEMPTS):
            candidate = PostgresServer(bin_dir, directory, free_port())
            (data / "postgresql.conf").write_text(
                base_conf + _config(candidate.port, directory, durable, settings or {})
            )
            start = _run(
                [
                    *(str(bin_dir / "pg_ctl"), "start", "-w", f"--timeout={START_TIMEOUT}"),
                    *("-D", str(data), "-l", str(candidate.log_path)),
                ],
                timeout=START_TIMEOUT + 10,
            )
            if start.returncode == 0:
                server = candidate
                break
            if not re.search(r"could not bind|Address already in use", candidate.log_tail()):
                raise RuntimeError(
                    f"pg_ctl start failed ({start.returncode}):\n{start.stdout}\n{start.stderr}\n"
                    f"{candidate.log_tail()}"
                )
        else:
            raise RuntimeError(f"no free port for PostgreSQL in {START_ATTEMPTS} attempts")
        yield server
    finally:
        if server is not None:
            _stop(server)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(server: PostgresServer) -> None:
    """Stop the server, ending its sessions; immediately if a fast stop does not end it."""
    pg_ctl = str(server.bin_dir / "pg_ctl")
    stop = _run([pg_ctl, "stop", "-w", "-m", "fast", "-D", str(server.data_dir)])
    if stop.returncode != 0:
        _run([pg_ctl, "stop", "-w", "-m", "immediate", "-D", str(server.data_dir)])
