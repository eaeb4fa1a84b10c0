"""A real ``warmpod serve`` process for the integration tests, and what Podman and /proc say about it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from warmpod.sandbox.pool import LABEL_INSTANCE, LABEL_PID

# The session server's settings: small numbers, so limits are cheap to reach on a 2-core machine.
POOL_SIZE = 2
# 45 s: the report script of test_libraries took over 20 under UML (tests/cgv2).
MAX_TIMEOUT = 45
MAX_OUTPUT_BYTES = 65536
MAX_BODY_BYTES = 262144

# How many times slower than real hardware this platform starts and fills containers; the bounds
# on waiting for them scale with it (job.sh sets 4 in the User-Mode Linux guest of tests/cgv2).
SLOWNESS = float(os.environ.get("WARMPOD_TEST_SLOWNESS", "1"))
# The first start may build the runner image; later ones take a few seconds.
HEALTH_TIMEOUT = 180.0
# uvicorn is given 30 s of graceful shutdown by `warmpod serve`.
STOP_TIMEOUT = 35.0
# How a server may end after a graceful stop: uvicorn re-raises the signal it handled, so SIGTERM
# ends the process with -15 and SIGINT turns into KeyboardInterrupt, which `warmpod` maps to 130.
GRACEFUL_EXIT = {
    signal.SIGTERM: {0, -signal.SIGTERM},
    signal.SIGINT: {0, 130, -signal.SIGINT},
}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def podman(*args: str) -> str:
    """The output of one podman CLI call on the host's (rootful) storage."""
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def containers(label: str) -> list[dict[str, Any]]:
    """Every container, running or not, that carries ``label`` (``key`` or ``key=value``)."""
    listed: list[dict[str, Any]] = json.loads(
        podman("ps", "-a", "--filter", f"label={label}", "--format", "json") or "[]"
    )
    return listed


def container_names(label: str) -> set[str]:
    """The names of every container that carries ``label``."""
    return {name for container in containers(label) for name in container["Names"]}


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    state, ppid = text[text.rindex(")") + 2 :].split()[:2]
    return state, int(ppid)


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def process_alive(pid: int, argv_marker: str) -> bool:
    """Whether ``pid`` runs (not a zombie) with ``argv_marker`` among its arguments."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and argv_marker in _cmdline(pid)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval)
    return True


class WarmpodServer:
    """One ``python -m warmpod serve`` subprocess on a free port, its log in a file."""

    def __init__(
        self,
        directory: Path,
        settings: Mapping[str, str],
        *,
        python: Sequence[str] = (sys.executable,),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Start the server; ``python`` may put a wrapper first (``setpriv`` to run as another user),
        and ``environ`` replaces this process's environment as the base of the server's.
        """
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = dict(os.environ if environ is None else environ)
        # A private Podman service in a fresh state directory, whatever the caller's environment says.
        self.env.update({"WARMPOD_ENGINE__URL": "", "WARMPOD_ENGINE__STATE_DIR": "", "PYTHONUNBUFFERED": "1"})
        # A container's start-up is a wall time that grows with the platform's slowness: four
        # preloading refills at once took over the default 30 s on UML 7.2.
        self.env["WARMPOD_POOL__START_TIMEOUT"] = str(30.0 * SLOWNESS)
        # Its own run store, unless the test hands one over (to restart a server on it).
        self.env["WARMPOD_QUEUE__STORE_PATH"] = str(directory / f"runs-{port}.sqlite3")
        self.env.update(settings)
        self.log_path = directory / f"warmpod-{port}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self._service: tuple[int, Path] | None = None
        self.proc = subprocess.Popen(
            [*python, "-m", "warmpod", "serve", "--port", str(port)],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        """The server's process id, also the ``io.warmpod.pid`` label of its containers."""
        return self.proc.pid

    def log_tail(self, size: int = 4000) -> str:
        """The end of the server's output, for assertion messages."""
        if not self._log.closed:
            self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines(keepends=True)
        # Health polls would crowd out whatever explains a failure.
        return "".join(line for line in lines if '"GET /health ' not in line)[-size:]

    def health(self) -> httpx.Response:
        """One ``GET /health``."""
        return httpx.get(f"{self.url}/health", timeout=10)

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> dict[str, Any]:
        """Wait until ``/health`` answers 200 and return its body; fail if the server dies first."""

        def exited() -> str | None:
            if self.proc.poll() is None:
                return None
            return f"warmpod exited with {self.proc.returncode} before it was healthy:\n{self.log_tail()}"

        return wait_for_health(self.url, timeout, self.log_tail, exited)

    def wait_pool_full(self, timeout: float = 30.0 * SLOWNESS) -> dict[str, Any]:
        """Wait until every pool slot holds a ready container and return the health body.

        The adaptive pool may hold one more than its target for a while (a refill that was under
        way when the target shrank), so "full" is at least the target.
        """
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.health().json()
            if body["pool"]["ready"] >= body["pool"]["target"]:
                return body
            time.sleep(0.1)
        raise AssertionError(f"pool not refilled in {timeout:.0f} s: {body}\n{self.log_tail()}")

    def instance(self) -> str:
        """The server's instance id, read from the labels of the containers it made."""
        instances = {str(c["Labels"][LABEL_INSTANCE]) for c in containers(f"{LABEL_PID}={self.pid}")}
        assert len(instances) == 1, f"containers of pid {self.pid} name instances {instances}"
        return instances.pop()

    def podman_service(self, fresh: bool = False) -> tuple[int, Path]:
        """The pid and state directory of the private ``podman system service`` this server started.

        Found among the server's children on the first call and remembered, so that later calls
        still name it after it died or was orphaned; ``fresh`` looks again (for the one the server
        started after that).
        """
        if self._service is None or fresh:
            found = [
                int(entry.name)
                for entry in Path("/proc").iterdir()
                if entry.name.isdigit()
                and (_stat(int(entry.name)) or ("", 0))[1] == self.pid
                and "service" in _cmdline(int(entry.name))
            ]
            assert len(found) == 1, f"server {self.pid} has podman services {found}"
            (socket_url,) = [arg for arg in _cmdline(found[0]) if arg.startswith("unix://")]
            self._service = found[0], Path(socket_url.removeprefix("unix://")).parent
        return self._service

    def podman_service_alive(self) -> bool:
        """Whether the private ``podman system service`` still runs."""
        pid, _ = self.podman_service()
        return process_alive(pid, "service")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send ``sig`` and return the exit status; fail if the server outlives ``timeout``."""
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"warmpod ignored {sig.name} for {timeout:.0f} s:\n{self.log_tail()}"
            ) from None
        finally:
            self._log.close()

    def close(self) -> None:
        """Stop the server if it still runs (gracefully first, so it removes its containers)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


ServerFactory = Callable[..., WarmpodServer]
"""Starts a server with extra ``WARMPOD_*`` settings (the ``start_server`` fixture)."""


def run_json(client: httpx.Client, code: str, **fields: object) -> dict[str, Any]:
    """POST one program to /run-json/ and return the RunResult, which must come with a 200."""
    response = client.post("/run-json/", json={"code": code, **fields})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def wait_for_health(
    url: str,
    timeout: float,
    explain: Callable[[], str],
    stopped: Callable[[], str | None] = lambda: None,
    interval: float = 0.2,
) -> dict[str, Any]:
    """Poll ``url``/health until it answers 200 and return its body; ``explain`` says why it did
    not (a log's end), ``stopped`` why waiting is pointless (a server that exited), if it is."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        reason = stopped()
        if reason is not None:
            raise AssertionError(reason)
        try:
            response = httpx.get(f"{url}/health", timeout=10)
        except httpx.TransportError as exc:
            last = repr(exc)
        else:
            if response.status_code == 200:
                body: dict[str, Any] = response.json()
                return body
            last = f"{response.status_code} {response.text[:500]}"
        time.sleep(interval)
    raise AssertionError(f"not healthy after {timeout:.0f} s ({last}):\n{explain()}")


@contextlib.contextmanager
def serving(directory: Path, settings: Mapping[str, str]) -> Iterator[WarmpodServer]:
    """A healthy server for a suite; at the end it must stop on SIGTERM and leave nothing (it is
    only killed if the suite's set-up or body failed)."""
    live = WarmpodServer(directory, settings)
    try:
        live.wait_healthy()
        instance = live.instance()
        yield live
    except BaseException:
        live.close()
        raise
    stop_and_check_clean(live, instance)


def stop_and_check_clean(live: WarmpodServer, instance: str) -> None:
    """SIGTERM ``live``; it must exit gracefully and leave none of its containers behind."""
    status = live.stop(signal.SIGTERM)
    assert status in GRACEFUL_EXIT[signal.SIGTERM], f"exit status {status}:\n{live.log_tail()}"
    left = containers(f"{LABEL_INSTANCE}={instance}")
    assert not left, f"containers left behind: {[c['Names'] for c in left]}\n{live.log_tail()}"


def stalled_requests(url: str, path: str, headers: Mapping[str, str], count: int) -> list[socket.socket]:
    """``count`` connections to ``url`` that each send ``GET path`` and then never read the answer,
    as slow clients do; the caller closes them. One that cannot connect is left out."""
    host, _, port = url.removeprefix("http://").partition(":")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    opened = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window, as a slow client on a slow link has: the answer waits on the
        # server's side, not in this kernel's buffers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        try:
            sock.connect((host, int(port)))
            sock.sendall(request)
        except OSError:
            sock.close()
            continue
        opened.append(sock)
    return opened


def resident(pid: int) -> int:
    """The VmRSS of ``pid`` in bytes; 0 once it is gone (or a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found[1]) * 1024 if found else 0


class PeakResident:
    """The peak VmRSS of one process, sampled every 20 ms by a thread while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = resident(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakResident:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, resident(self.pid))


def stored_bytes(store: Path) -> int:
    """The store's size as SQLite sees it through its write-ahead log (pages in use and free),
    so that a log not yet checkpointed counts once."""
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        pages: int = db.execute("PRAGMA page_count").fetchone()[0]
        size: int = db.execute("PRAGMA page_size").fetchone()[0]
    return pages * size
