"""The warm pool: single-use containers created ahead of demand, paused, leased once, destroyed."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

from warmpod import metrics, protocol
from warmpod.errors import EngineError, InvalidRun, PoolUnavailable, ProtocolError, WarmpodError
from warmpod.image import context_dir
from warmpod.protocol import Channel, Hello
from warmpod.sandbox import SOCKET_NAME, container_spec
from warmpod.settings import Settings
from warmpod.unix_stream import UnixStream

log = logging.getLogger(__name__)

LABEL_INSTANCE = "io.warmpod.instance"
LABEL_HOST = "io.warmpod.host"
LABEL_PID = "io.warmpod.pid"
DESTROY_TIMEOUT = 30.0
SOCKET_POLL = 0.005
# Seconds since a run last found the pool empty before new containers are preloaded again.
PRELOAD_CALM = 5.0
# Room above a sandbox's memory at rest for writing main.py and starting the program.
MEMORY_HEADROOM = 4 * 1024 * 1024


class Engine(Protocol):
    """The container calls the pool needs (``runtime.Runtime`` in production, fakes in tests)."""

    async def create(self, spec: dict[str, object]) -> str: ...
    async def start(self, container_id: str) -> None: ...
    async def pause(self, container_id: str) -> None: ...
    async def unpause(self, container_id: str) -> None: ...
    async def destroy(self, container_id: str) -> None: ...
    async def oom_killed(self, container_id: str) -> bool: ...
    async def update_memory(self, container_id: str, limit_bytes: int) -> None: ...
    async def list_labelled(self, label: str) -> list[tuple[str, dict[str, str]]]: ...


@dataclass(eq=False)
class Sandbox:
    """One pool container and the server's end of its agent connection."""

    container_id: str
    name: str
    directory: Path
    channel: Channel
    paused: bool
    memory: int = 0
    """Bytes the container held before its run, as its agent reported."""
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    idle: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    """Scope of the task watching it while it waits in the pool; cancelled once it is leased."""

    async def thaw(self, engine: Engine) -> None:
        """Unpause, once, however many tasks ask."""
        async with self.lock:
            if self.paused:
                await engine.unpause(self.container_id)
                self.paused = False


@dataclass
class PoolStats:
    """Counts for /health and /metrics."""

    ready: int
    paused: int
    """Of the ready ones, those paused."""
    busy: int
    starting: int
    target: int
    created: int
    failures: int
    failing: bool
    """The latest attempt to make a container failed."""
    last_error: str | None
    preload_failed: list[str]


class Pool:
    """Keeps containers ready, between the pool's min and max size; each serves one run, then goes.

    The ready target starts at ``min_size``. A run that finds no container ready doubles it (at
    most ``max_size``); each ``shrink_after`` seconds without such a run halves it (at least
    ``min_size``). Ready, starting and running containers together never exceed ``max_size``.
    Runs get containers in the order they asked.
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        image: str,
        state_dir: Path,
        instance: str,
        can_pause: bool,
        can_limit: bool,
        userns: bool = False,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._image = image
        self._state_dir = state_dir
        self.instance = instance
        self.can_pause = can_pause and settings.pool.pause
        self._can_limit = can_limit
        self._userns = userns
        # The engine reads the profile by path on its own host: from inside a container (the server
        # image against the host's socket) the package's path is not there, the state directory
        # is (the agents' directories are bind-mounted from it at the same path).
        self._seccomp_source = context_dir(settings) / "seccomp.json"
        self._seccomp_profile = state_dir / "seccomp.json"
        self._ready: deque[Sandbox] = deque()
        self._busy: set[Sandbox] = set()
        self._starting = 0
        self._queue: deque[object] = deque()
        self._floor, self._ceiling = settings.pool.bounds
        self._target = self._floor
        self._last_shortage = self._resized = -math.inf
        self.preload_failed: list[str] = []
        self._created = 0
        self._failures = 0
        self._consecutive_failures = 0
        self._last_error: str | None = None
        self._serial = itertools.count(1)
        self._changed = anyio.Condition()
        self._tg: anyio.abc.TaskGroup | None = None
        self.serving = False
        self.landlock_abi = 0
        # The most memory a sandbox held at rest (plus headroom), where cgroups limit memory:
        # requests below it are refused up front, the same way whichever sandbox they would get.
        self.memory_floor = 0

    @property
    def target(self) -> int:
        """How many containers the pool keeps ready now."""
        return self._target

    def stats(self) -> PoolStats:
        """The pool's counts now."""
        return PoolStats(
            ready=len(self._ready),
            paused=sum(sandbox.paused for sandbox in self._ready),
            busy=len(self._busy),
            starting=self._starting,
            target=self.target,
            created=self._created,
            failures=self._failures,
            failing=self._consecutive_failures > 0,
            last_error=self._last_error,
            preload_failed=self.preload_failed,
        )

    def labels(self) -> dict[str, str]:
        """The labels that mark a container as this server instance's."""
        return {
            LABEL_INSTANCE: self.instance,
            LABEL_HOST: socket.gethostname(),
            LABEL_PID: str(os.getpid()),
        }

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Remove leftovers of dead instances, then keep the pool full until cancelled."""
        await self.remove_leftovers()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await self._maintain(tg)
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(DESTROY_TIMEOUT):
                await self._destroy_all()
            self._seccomp_profile.unlink(missing_ok=True)

    async def remove_leftovers(self) -> int:
        """Destroy containers whose server on this host is no longer alive; return how many."""
        host = socket.gethostname()
        removed = 0
        for container_id, labels in await self._engine.list_labelled(LABEL_INSTANCE):
            if labels.get(LABEL_INSTANCE) == self.instance or labels.get(LABEL_HOST) != host:
                continue
            if _alive(labels.get(LABEL_PID, "")):
                continue
            log.warning("removing container %s left by a dead warmpod", container_id[:12])
            try:
                await self._engine.destroy(container_id)
            except WarmpodError as exc:
                log.error("could not remove leftover %s: %s", container_id[:12], exc)
                continue
            removed += 1
        return removed

    async def _maintain(self, tg: anyio.abc.TaskGroup) -> None:
        limit = self._settings.pool.refill_concurrency
        shrink_after = self._settings.pool.shrink_after
        while True:
            async with self._changed:
                while (
                    len(self._ready) + self._starting < self._target
                    and len(self._ready) + self._starting + len(self._busy) < self._ceiling
                    and self._starting < limit
                ):
                    self._starting += 1
                    tg.start_soon(self._fill_one)
                with anyio.move_on_after(shrink_after if self._target > self._floor else math.inf):
                    await self._changed.wait()
            if anyio.current_time() - self._resized >= shrink_after and self._target > self._floor:
                self._shrink(tg)

    def _shrink(self, tg: anyio.abc.TaskGroup) -> None:
        self._target = max(self._target // 2, self._floor)
        self._resized = anyio.current_time()
        while len(self._ready) > self._target:
            # The newest first: the head may already be thawed for the next run.
            tg.start_soon(self._retire, self._ready.pop())

    async def _retire(self, sandbox: Sandbox) -> None:
        with anyio.CancelScope(shield=True):
            await sandbox.channel.aclose()
        await self._discard(sandbox.container_id, sandbox.directory)

    def _grow(self) -> None:
        self._target = min(self._target * 2, self._ceiling)
        self._last_shortage = self._resized = anyio.current_time()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _fill_one(self) -> None:
        started = time.perf_counter()
        try:
            sandbox = await self._make()
        except (WarmpodError, OSError) as exc:
            metrics.REFILL_FAILURES.inc()
            self._failures += 1
            self._consecutive_failures += 1
            self._last_error = str(exc)
            delay = min(0.5 * 2 ** (self._consecutive_failures - 1), self._settings.pool.backoff_max)
            log.error("could not make a pool container (retrying in %.1f s): %s", delay, exc)
            # The slot stays taken while backing off, so failures never loop hot.
            await anyio.sleep(delay)
            self._starting -= 1
            await self._notify()
            return
        metrics.CONTAINER_START.observe(time.perf_counter() - started)
        self._consecutive_failures = 0
        self._created += 1
        self._starting -= 1
        self._ready.append(sandbox)
        if self._tg is not None:
            self._tg.start_soon(self._watch_idle, sandbox)
        self.serving = True
        await self._notify()
        self._warm_next()

    async def _watch_idle(self, sandbox: Sandbox) -> None:
        # A container that dies while it waits (killed, removed with its image, agent crashed)
        # must not be handed to a run, nor leave the pool a container short.
        with sandbox.idle:
            await sandbox.channel.wait_hangup()
            if sandbox not in self._ready:
                return  # retired or destroyed: its channel was closed on purpose
            self._ready.remove(sandbox)
            self._last_error = f"{sandbox.name} died while idle"
            log.warning("%s died while idle: replacing it", sandbox.name)
            await self._retire(sandbox)
            await self._notify()

    async def _make(self) -> Sandbox:
        name = f"warmpod-{self.instance[:8]}-{next(self._serial)}"
        directory = self._state_dir / name
        directory.mkdir(mode=0o700)
        if not self._seccomp_profile.exists():  # written once, again if the directory was emptied
            shutil.copyfile(self._seccomp_source, self._seccomp_profile)
        # Preloading costs about 300 ms of CPU per container: worth it while the pool keeps up.
        # Once runs find it empty, CPU is the limit and a bare container serves them sooner.
        # After a failed start the next one is bare too, so a preload that crashes or hangs the
        # interpreter cannot keep the pool empty.
        calm = anyio.current_time() - self._last_shortage > PRELOAD_CALM
        usable = calm and not self._queue and not self._consecutive_failures
        preload = self._settings.pool.preload if usable else ()
        spec = container_spec(
            image=self._image,
            seccomp_profile=self._seccomp_profile,
            name=name,
            labels=self.labels(),
            agent_dir=directory,
            limits=self._settings.limits,
            cgroup_limits=self._can_limit,
            userns=self._userns,
            preload=preload,
        )
        container_id = ""
        try:
            container_id = await self._engine.create(spec)
            await self._engine.start(container_id)
            with anyio.fail_after(self._settings.pool.start_timeout):
                channel = await _connect(directory / SOCKET_NAME, protocol.MAX_FRAME)
            try:
                with anyio.fail_after(self._settings.pool.start_timeout):
                    hello = await channel.receive()
                if not isinstance(hello, Hello) or hello.version != protocol.PROTOCOL_VERSION:
                    raise ProtocolError(f"agent greeted with {hello!r}")
                self.landlock_abi = hello.landlock
                if preload and hello.preload_failed != self.preload_failed:
                    log.warning("preload modules failed to import: %s", ", ".join(hello.preload_failed))
                    self.preload_failed = hello.preload_failed
                # A run already waits for it: pausing would only add two engine calls to its path.
                paused = self.can_pause and not self._queue
                if paused:
                    try:
                        await self._engine.pause(container_id)
                    except EngineError as exc:
                        # runc thaws what it could not freeze (cgroup v1's freezer gives up on
                        # a busy host: seen with 16 containers starting at once): a running
                        # container serves as well, only idling costs a little CPU.
                        log.warning("could not pause %s, keeping it running: %s", name, exc)
                        paused = False
                        with contextlib.suppress(EngineError):
                            await self._engine.unpause(container_id)  # in case it stayed half frozen
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await channel.aclose()
                raise
        except TimeoutError as exc:
            await self._discard(container_id, directory)
            raise ProtocolError(f"agent of {name} did not answer in time") from exc
        except BaseException:
            await self._discard(container_id, directory)
            raise
        if self._can_limit:
            self.memory_floor = max(self.memory_floor, hello.memory + MEMORY_HEADROOM)
        return Sandbox(container_id, name, directory, channel, paused=paused, memory=hello.memory)

    def _warm_next(self) -> None:
        # Thaw the container the next run will take, off that run's critical path.
        if self._tg is not None and self._ready and self._ready[0].paused:
            self._tg.start_soon(self._thaw_quietly, self._ready[0])

    async def _thaw_quietly(self, sandbox: Sandbox) -> None:
        try:
            await sandbox.thaw(self._engine)
        except WarmpodError as exc:
            log.warning("could not unpause %s ahead of demand: %s", sandbox.name, exc)

    async def wait_serving(self, timeout: float, progress_every: float = 10.0) -> None:
        """Wait until the pool has made its first sandbox, logging progress while it takes long.

        Raises:
            PoolUnavailable: none was made within ``timeout`` seconds; the message has the last error.
        """
        started = anyio.current_time()
        with anyio.move_on_after(timeout):
            while not self.serving:
                with anyio.move_on_after(progress_every):
                    async with self._changed:
                        while not self.serving:
                            await self._changed.wait()
                if not self.serving:
                    log.info(
                        "waiting for the first sandbox: %.0f s so far, %d starting, %d failed%s",
                        anyio.current_time() - started,
                        self._starting,
                        self._failures,
                        f" (last: {self._last_error})" if self._last_error else "",
                    )
        if not self.serving:
            raise PoolUnavailable(
                f"no sandbox was made within {timeout:.0f} s of start-up (WARMPOD_SERVER__STARTUP_TIMEOUT)"
                + (f"; last error: {self._last_error}" if self._last_error else "")
            )

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[Sandbox]:
        """Take a ready container for one run; it is destroyed when the block exits.

        Raises:
            PoolUnavailable: none became ready within the acquire timeout.
        """
        try:
            with anyio.fail_after(self._settings.pool.acquire_timeout):
                async with self._changed:
                    if (self._queue or not self._ready) and self.serving:
                        self._grow()
                        self._changed.notify_all()
                    # First come, first served: otherwise an unlucky run can lose every race.
                    ticket = object()
                    self._queue.append(ticket)
                    try:
                        while not self._ready or self._queue[0] is not ticket:
                            await self._changed.wait()
                    finally:
                        self._queue.remove(ticket)
                        self._changed.notify_all()
                    sandbox = self._ready.popleft()
                    sandbox.idle.cancel()
                    self._busy.add(sandbox)
                    self._changed.notify_all()
        except TimeoutError as exc:
            raise PoolUnavailable(
                f"no sandbox became free within {self._settings.pool.acquire_timeout:.0f} s"
            ) from exc
        try:
            self._warm_next()
            await sandbox.thaw(self._engine)
            yield sandbox
        finally:
            self._busy.discard(sandbox)
            with anyio.CancelScope(shield=True):
                await self._notify()
                await sandbox.channel.aclose()
                if self._tg is not None:
                    self._tg.start_soon(self._discard, sandbox.container_id, sandbox.directory)
                else:
                    await self._discard(sandbox.container_id, sandbox.directory)

    async def oom_killed(self, sandbox: Sandbox) -> bool:
        """Whether the OOM killer ended ``sandbox``'s container (its agent, PID 1)."""
        try:
            return await self._engine.oom_killed(sandbox.container_id)
        except WarmpodError as exc:
            log.warning("could not inspect %s: %s", sandbox.name, exc)
            return False

    async def limit_memory(self, sandbox: Sandbox, limit_bytes: int) -> bool:
        """Lower ``sandbox``'s memory cgroup limit (swap included); False where there is none.

        Raises:
            InvalidRun: the limit is below what the sandbox holds before the program starts
                (preloaded modules), which the kernel would refuse or answer with an OOM kill.
        """
        if not self._can_limit:
            return False
        self.check_memory(limit_bytes, sandbox.memory + MEMORY_HEADROOM)
        await self._engine.update_memory(sandbox.container_id, limit_bytes)
        return True

    def check_memory(self, limit_bytes: int, floor: int | None = None) -> None:
        """Refuse a memory limit below what a sandbox holds at rest (by default the largest seen).

        Raises:
            InvalidRun: the limit is below the floor; the message names the minimum.
        """
        floor = self.memory_floor if floor is None else floor
        if limit_bytes < floor:
            mib = 1024 * 1024
            preloaded = ", ".join(self._settings.pool.preload) or "nothing"
            raise InvalidRun(
                f"memory_mb must be at least {-(-floor // mib)} MiB here: a sandbox holds "
                f"{(floor - MEMORY_HEADROOM) / mib:.0f} MiB before the program starts (preloaded: "
                f"{preloaded}; WARMPOD_POOL__PRELOAD)"
            )

    async def _discard(self, container_id: str, directory: Path) -> None:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(DESTROY_TIMEOUT) as scope:
                delay = 0.2
                while container_id:
                    try:
                        await self._engine.destroy(container_id)
                        break
                    except WarmpodError as exc:
                        # E.g. while the engine's service restarts: a container given up on
                        # would hold its memory until the server stops.
                        log.warning("could not remove container %s (retrying): %s", container_id[:12], exc)
                        await anyio.sleep(delay)
                        delay = min(delay * 2, 5.0)
            if scope.cancelled_caught:
                log.error("gave up removing container %s after %.0f s", container_id[:12], DESTROY_TIMEOUT)
            shutil.rmtree(directory, ignore_errors=True)

    async def _destroy_all(self) -> None:
        sandboxes = [*self._ready, *self._busy]
        self._ready.clear()
        async with anyio.create_task_group() as tg:
            for sandbox in sandboxes:
                await sandbox.channel.aclose()
                tg.start_soon(self._discard, sandbox.container_id, sandbox.directory)
        # Containers still being created when cancelled carry our label: sweep them too.
        for container_id, labels in await self._engine.list_labelled(LABEL_INSTANCE):
            if labels.get(LABEL_INSTANCE) == self.instance:
                await self._engine.destroy(container_id)


async def _connect(path: Path, max_frame: int) -> Channel:
    # Polling a stat is cheaper than a thread hop, and runs off any request's critical path.
    while True:
        if os.path.exists(path):  # noqa: ASYNC240  (a stat, as the comment above says)
            try:
                stream = await UnixStream.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                pass  # an older agent may still be between bind and listen
            else:
                _shield_from_oom(stream.peer_pid())
                return Channel(stream, max_frame=max_frame)
        await anyio.sleep(SOCKET_POLL)


def _shield_from_oom(pid: int) -> None:
    # The OOM killer must never pick the agent: its death would turn the program's memory kill
    # into a lost result. Lowering a score takes CAP_SYS_RESOURCE on the host, which the agent
    # never has in a user namespace and the server has when it is root. Without it (rootless, or
    # a root that lacks it) the program's own score of 1000 still makes it the first pick.
    # The pid is the listening agent's, read before any program code ran; 0 if it is not visible.
    if pid <= 0:
        return
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
