"""The private ``podman system service`` warmpod starts, keeps alive and stops, and its state directory."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from warmpod.backoff import Backoff
from warmpod.errors import EngineError
from warmpod.host.facts import containers_conf, podman_command, process_alive
from warmpod.settings import EngineSettings

_PR_SET_PDEATHSIG = 1
# How often the private service is checked, and the longest wait between failed restarts.
SERVICE_POLL = 0.5
SERVICE_RETRY_MAX = 10.0
STATE_PREFIX = "warmpod-"
log = logging.getLogger(__name__)
OWNER_FILE = "owner.pid"
CONMON = Path(__file__).with_name("conmon-without-exit-command")
# What only the private service's containers.conf says, on top of warmpod's (image builds and the
# podman CLI keep that one as it is). Measured per container (bench/lifecycle.py): conmon's exit
# command, a `podman container cleanup` process that finds its work done by the API's removal,
# cost about 50 ms of CPU; the events nobody reads of a private service about 10 ms.
SERVICE_ENGINE = {"conmon_path": f"[{json.dumps(str(CONMON))}]", "events_logger": '"none"'}


def service_conf(directory: Path) -> Path:
    """Write the private service's containers.conf into ``directory``: warmpod's (or that of
    ``CONTAINERS_CONF``) with ``SERVICE_ENGINE`` in its ``[engine]`` table."""
    base = Path(os.environ.get("CONTAINERS_CONF") or containers_conf())
    lines = base.read_text().splitlines()
    lines = [line for line in lines if line.split("=")[0].strip() not in SERVICE_ENGINE]
    if "[engine]" not in lines:
        lines.append("[engine]")
    at = lines.index("[engine]") + 1
    lines[at:at] = [f"{key} = {value}" for key, value in SERVICE_ENGINE.items()]
    path = directory / "containers.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def state_dir(settings: EngineSettings) -> Path:
    """A private directory for sockets, made fresh unless the settings name one."""
    if settings.state_dir:
        path = Path(settings.state_dir)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    base = runtime_dir if runtime_dir and os.access(runtime_dir, os.W_OK) else tempfile.gettempdir()
    _remove_dead_state_dirs(Path(base))
    path = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir=base))
    (path / OWNER_FILE).write_text(str(os.getpid()))
    return path


def _remove_dead_state_dirs(base: Path) -> None:
    # A server killed with SIGKILL cannot remove its directory; the next one does.
    for path in base.glob(f"{STATE_PREFIX}*"):
        try:
            pid = int((path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _die_with_parent() -> None:
    # The private service must not outlive a server killed with SIGKILL. The signal fires when
    # the *thread* that forked it ends, hence `running` must be entered on the event loop's thread.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _PrivateService:
    """One ``podman system service`` on a private socket, started again whenever it exits."""

    def __init__(self, settings: EngineSettings, directory: Path, timeout: float) -> None:
        self.sock = directory / "podman.sock"
        self.url = f"unix://{self.sock}"
        self._directory = directory
        self._log_path = directory / "podman-service.log"
        self._argv, self._env = podman_command(
            settings, "system", "service", "--time=0", f"unix://{self.sock}", conf=service_conf(directory)
        )
        self._timeout = timeout
        self._proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        """Start the service and wait for its socket.

        Raises:
            EngineError: it exited or did not create its socket in time.
        """
        timeout = self._timeout
        self.sock.unlink(missing_ok=True)
        with self._log_path.open("ab") as log:
            self._proc = proc = subprocess.Popen(  # noqa: ASYNC220  (on this thread, for PDEATHSIG)
                self._argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
                # conmon writes an empty file named "oom" into its working directory when a
                # container is OOM-killed: the private directory, not wherever warmpod started.
                cwd=self._directory,
                # Its own session: a Ctrl-C to the terminal must not kill it before the pool is removed.
                start_new_session=True,
            )
        try:
            with anyio.fail_after(timeout):
                while not self.sock.exists():
                    if proc.poll() is not None:
                        text = self._log_path.read_text(errors="replace")[-2000:]
                        raise EngineError(f"podman system service exited with {proc.returncode}: {text}")
                    await anyio.sleep(0.02)
        except TimeoutError:
            raise EngineError(
                f"podman system service did not create {self.sock} in {timeout:.0f} s"
            ) from None

    async def keep_alive(self) -> None:
        """Start the service again each time it exits (killed, crashed), until cancelled.

        Runs on the event loop's thread, like the first start, for PDEATHSIG. The containers and
        their agent connections do not depend on it: runs go on, and only the engine calls made
        while it is down fail (the pool retries them).
        """
        retry = Backoff(SERVICE_POLL, SERVICE_RETRY_MAX)
        while True:
            await anyio.sleep(SERVICE_POLL)
            if self._proc is None or self._proc.poll() is None:
                continue
            log.error("podman system service exited with %s: starting it again", self._proc.returncode)
            while True:
                try:
                    await self.start()
                    break
                except EngineError as exc:
                    log.error("%s (next try in %.1f s)", exc, retry.delay)
                    await retry.sleep()
            retry.reset()
            log.info("podman system service is back on %s", self.sock)

    async def stop(self) -> None:
        """Terminate the service, killing it if it does not exit within 10 s."""
        proc = self._proc
        if proc is not None:
            proc.terminate()
            try:
                await anyio.to_thread.run_sync(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await anyio.to_thread.run_sync(proc.wait)
        self.sock.unlink(missing_ok=True)


class ExternalService:
    """A Podman service warmpod did not start (``settings.url``): its owner keeps it running."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def keep_alive(self) -> None:
        """Nothing to do."""


@contextlib.asynccontextmanager
async def running(
    settings: EngineSettings, directory: Path, timeout: float = 30.0
) -> AsyncIterator[_PrivateService | ExternalService]:
    """Run ``podman system service`` on a private socket for the duration of the block.

    Yields the service: its ``url``, and ``keep_alive`` to run in a task for as long as it is
    used. Uses ``settings.url`` instead when one is configured. Call it from the thread that lives
    as long as the service (the event loop's): the service is told to die with the thread that
    started it, so it never outlives a killed server.

    Raises:
        EngineError: podman is missing or the service did not come up in time.
    """
    if settings.url:
        yield ExternalService(settings.url)
        return
    if shutil.which(settings.podman) is None:
        raise EngineError(f"{settings.podman!r} not found: install Podman (apt-get install podman)")
    service = _PrivateService(settings, directory, timeout)
    try:
        await service.start()
        yield service
    finally:
        with anyio.CancelScope(shield=True):
            await service.stop()
