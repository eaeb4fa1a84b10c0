"""The warm pool: sizes the set of sandboxes made ahead of demand, and leases each to one run."""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from warmpod import metrics
from warmpod.environments import DEFAULT, EnvironmentSpec
from warmpod.errors import PoolUnavailable, WarmpodError
from warmpod.host import facts
from warmpod.host.image import context_dir
from warmpod.models import EnvironmentPoolCounts
from warmpod.sandbox.capacity import Capacity, Kind
from warmpod.sandbox.owners import Owner, OwnerLock
from warmpod.sandbox.sandbox import DESTROY_TIMEOUT, Engine, Sandbox, check_memory_floor
from warmpod.settings import Settings

log = logging.getLogger(__name__)

LABEL_INSTANCE = "io.warmpod.instance"
LABEL_HOST = "io.warmpod.host"
LABEL_PID = "io.warmpod.pid"
# How long a run leased from a full pool, with no other run, holds back the pool's own work
# (making its replacement, thawing the next container) while ready ones remain: on 2 CPUs that
# work competes with the lone run it was leased for (idle p50 of print(1), 30 runs taking turns:
# 33.1 and 18.3 ms with it, 13.5 and 16.7 without).
RUN_FIRST = 0.2
# Imports are looked for in this much of a program: where they are, and a bound on the event loop.
IMPORTS_SCANNED = 64 * 1024
_IMPORT = re.compile(rb"^[ \t]*(?:from[ \t]+([A-Za-z_]\w*)|import[ \t]+([^\n#;]+))", re.MULTILINE)


def imports_libraries(code: bytes) -> bool:
    """Whether ``code`` imports a module from outside the standard library (its import statements
    at the start of a line, in its first ``IMPORTS_SCANNED`` bytes): a cheap hint, never a check."""
    for match in _IMPORT.finditer(code, 0, IMPORTS_SCANNED):
        statement = (
            [match[1]] if match[1] else [part.split()[0] for part in match[2].split(b",") if part.strip()]
        )
        for name in statement:
            if name.split(b".")[0].decode("ascii", "replace") not in sys.stdlib_module_names:
                return True
    return False


@dataclass
class PoolStats:
    """Counts for /health and /metrics."""

    ready: int
    paused: int
    """Of the ready ones, those paused."""
    busy: int
    starting: int
    closing: int
    """Being removed: their containers may still run, and count toward ``max_size``."""
    target: int
    created: int
    failures: int
    failing: bool
    """The latest attempt to make a container failed."""
    last_error: str | None
    preload_failed: list[str]
    environments: dict[str, EnvironmentPoolCounts] = field(default_factory=dict)


class Pool:
    """Keeps containers of each environment ready; each serves one run of its environment, then goes.

    The ready target starts at the pool's floor (``min_size``, or the environments' ``min_warm``
    together if more). A run that finds no container of its environment ready doubles it (at most
    ``max_size``); each ``shrink_after`` seconds without such a run halves it. Ready, starting,
    running and closing containers together never exceed ``max_size``.

    Each environment keeps its ``min_warm`` ready; the rest of the target goes to the environments
    in step with their share of the runs claimed (``note_demand``). A run waits only for a sandbox
    of its environment, in the order its environment's runs asked; when the pool is full and none
    of its kind is ready or coming, an idle one of another environment above its ``min_warm``
    makes room. A container leased and given back with nothing done to it (no job: another node
    claimed the run) goes back to the head of its environment's ready queue.

    Preloading (an environment's ``preload``) costs a container some 300 ms of CPU, which only runs
    that import libraries (``wants_preload``) gain from. While the pool keeps up, every container
    is preloaded; once runs find it empty, the share of preloaded containers of an environment
    follows the share of such runs among those of it claimed, and a sandbox claims a run of its own
    kind first (``Store.claim``).
    """

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        *,
        environments: Sequence[tuple[EnvironmentSpec, str]],
        state_dir: Path,
        instance: str,
        can_pause: bool,
        can_limit: bool,
        userns: bool = False,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._state_dir = state_dir
        self.instance = instance
        # The instance is the owner token: unique to this start, it labels every container.
        self._owner = OwnerLock(state_dir, instance)
        self.can_pause = can_pause and settings.pool.pause
        self._can_limit = can_limit
        self._userns = userns
        # The engine reads the profile by path on its own host: from inside a container (the server
        # image against the host's socket) the package's path is not there, the state directory
        # is (the agents' directories are bind-mounted from it at the same path).
        self._seccomp_source = context_dir(settings) / "seccomp.json"
        self._seccomp_profile = state_dir / "seccomp.json"
        self._capacity = Capacity(settings.pool, environments)
        self._kinds = self._capacity.kinds
        # Preloading containers made at once: one import per CPU. More only take turns on the
        # same CPUs and each costs more (c8 numpy+pandas on 2 CPUs: 502 ms of CPU per run with
        # 4 at once, 469 with 2).
        self._import_slots = min(settings.pool.refill_concurrency, len(os.sched_getaffinity(0)))
        self._run_first_until = -math.inf
        self._created = 0
        self._failures = 0
        self._last_error: str | None = None
        self._serial = itertools.count(1)
        self._changed = anyio.Condition()
        self._tg: anyio.abc.TaskGroup | None = None
        self.landlock_abi = 0

    @property
    def target(self) -> int:
        """How many containers the pool keeps ready now."""
        return self._capacity.target

    @property
    def serving(self) -> bool:
        """Every environment has made its first sandbox."""
        return all(kind.serving for kind in self._kinds.values())

    def served(self) -> list[str]:
        """The environments whose runs this node takes: it made one of their sandboxes, and the
        latest attempt to make one did not fail (or one is ready still)."""
        return [
            name for name, kind in self._kinds.items() if kind.serving and (kind.ready or not kind.failing)
        ]

    def ready(self) -> list[str]:
        """The environments with a ready sandbox no waiting run is promised."""
        return [name for name, kind in self._kinds.items() if len(kind.ready) > len(kind.queue)]

    @property
    def memory_floor(self) -> int:
        """The most memory a sandbox of any environment held at rest, plus headroom."""
        return max(kind.memory_floor for kind in self._kinds.values())

    @property
    def preload_failed(self) -> list[str]:
        """The default environment's preloads that failed to import."""
        return self._kinds[DEFAULT].preload_failed

    def stats(self) -> PoolStats:
        """The pool's counts now."""
        kinds = self._kinds.values()
        return PoolStats(
            ready=sum(len(kind.ready) for kind in kinds),
            paused=sum(sandbox.paused for kind in kinds for sandbox in kind.ready),
            busy=sum(len(kind.busy) for kind in kinds),
            starting=sum(kind.starting for kind in kinds),
            closing=self._capacity.closing,
            target=self.target,
            created=self._created,
            failures=self._failures,
            failing=any(kind.failing for kind in kinds),
            last_error=self._last_error,
            preload_failed=self.preload_failed,
            environments={kind.name: kind.counts(self._capacity.of(kind)) for kind in kinds},
        )

    def labels(self) -> dict[str, str]:
        """The labels that mark a container as this server instance's (host and pid only judge
        the containers of servers with another state directory: see ``remove_leftovers``)."""
        return {
            LABEL_INSTANCE: self.instance,
            LABEL_HOST: socket.gethostname(),
            LABEL_PID: str(os.getpid()),
        }

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Remove leftovers of dead instances, then keep the pool full until cancelled."""
        try:
            self._owner.acquire()
        except OSError as exc:
            # As a missing state directory fails fills but not the pool (a tmp cleaner may have
            # run): without the lock a later start judges this one's containers by host and pid.
            log.warning("cannot lock this server's owner file in %s: %s", self._owner.directory, exc)
        try:
            await self.remove_leftovers()
        except BaseException:
            self._owner.release()
            raise
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
            self._owner.release()

    async def remove_leftovers(self) -> int:
        """Destroy containers whose server is gone; return how many.

        A container's instance label is its server's owner token: when that token's lock file is
        in this state directory, the lock alone decides (held: alive; free: gone, even if a
        process of the labelled pid runs, as a restarted server in a container always has the
        same one). With no lock file here the server used another state directory (the default
        fresh private one, or an older warmpod): it counts as gone only if it ran on this host
        and its pid is dead. Lock files of gone servers go once none of their containers is left.
        """
        hostname = socket.gethostname()
        removed = 0
        kept: set[str] = set()
        for container_id, labels in await self._engine.list_labelled(LABEL_INSTANCE):
            token = labels.get(LABEL_INSTANCE, "")
            if token == self.instance:
                continue
            owner = self._owner.owner(token)
            if owner is Owner.ALIVE:
                continue
            if owner is Owner.UNKNOWN and (
                labels.get(LABEL_HOST) != hostname or facts.process_alive(labels.get(LABEL_PID, ""))
            ):
                continue
            log.warning("removing container %s left by a dead warmpod", container_id[:12])
            try:
                await self._engine.destroy(container_id)
            except WarmpodError as exc:
                log.error("could not remove leftover %s: %s", container_id[:12], exc)
                kept.add(token)
                continue
            removed += 1
        for token in self._owner.gone_tokens():
            if token not in kept:
                await anyio.to_thread.run_sync(self._remove_directories, token)
                self._owner.discard(token)
        return removed

    def _remove_directories(self, token: str) -> None:
        # The agents' directories of a gone server's containers (named by ``_make``), which only
        # its own stop would have removed: a state directory kept across crashes gathers them.
        if token[:8] == self.instance[:8]:
            return
        for path in self._state_dir.glob(f"warmpod-{token[:8]}-*"):
            shutil.rmtree(path, ignore_errors=True)

    async def _maintain(self, tg: anyio.abc.TaskGroup) -> None:
        limit = self._settings.pool.refill_concurrency
        shrink_after = self._settings.pool.shrink_after
        kinds = self._kinds.values()
        capacity = self._capacity
        while True:
            async with self._changed:
                # The one place the pool's own work starts: every lease, return and new container
                # notifies this loop.
                held = self._holding_back()
                if not held:
                    self._warm_next()
                    spare = capacity.spare()
                    if spare is not None:
                        self._close_soon(spare.ready.pop(), tg)
                while (
                    not held
                    and sum(kind.starting for kind in kinds) < limit
                    and capacity.live() < capacity.ceiling
                ):
                    kind = capacity.neediest()
                    if kind is None:
                        break
                    preload = capacity.preload_next(kind)
                    if preload and sum(kind.starting_warm for kind in kinds) >= self._import_slots:
                        break  # the next one is made once an import ends (_fill_one notifies)
                    kind.starting += 1
                    kind.starting_warm += preload
                    tg.start_soon(self._fill_one, kind, preload)
                wait = shrink_after if capacity.target > capacity.floor else math.inf
                if held:
                    wait = min(wait, self._run_first_until - anyio.current_time())
                with anyio.move_on_after(wait):
                    await self._changed.wait()
            if anyio.current_time() - capacity.resized >= shrink_after and capacity.target > capacity.floor:
                capacity.shrink()
                for kind in kinds:
                    while len(kind.ready) > capacity.of(kind):
                        # The newest first: the head may already be thawed for the next run.
                        self._close_soon(kind.ready.pop(), tg)

    def _holding_back(self) -> bool:
        """Whether the pool's own work waits for a lone run to go first (``RUN_FIRST``)."""
        kinds = self._kinds.values()
        return (
            anyio.current_time() < self._run_first_until
            and sum(len(kind.busy) for kind in kinds) <= 1
            and any(kind.ready for kind in kinds)
            and not any(kind.queue for kind in kinds)
        )

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def note_demand(self, environment: str, warm: bool) -> None:
        """A run of ``environment`` was claimed: ``warm``, whether it wanted a preloaded sandbox
        (``wants_preload``)."""
        # A share that moved a target moves containers: the pool's loop must look again.
        if self._capacity.note_demand(environment, warm) and self._tg is not None:
            self._tg.start_soon(self._notify)

    def wants_preload(self, environment: str, code: bytes) -> bool:
        """Whether a run of ``code`` in ``environment`` gains from a preloaded sandbox: it imports
        libraries, and the environment preloads some."""
        return bool(self._kinds[environment].spec.preload) and imports_libraries(code)

    async def _fill_one(self, kind: Kind, preload: bool) -> None:
        started = time.perf_counter()
        try:
            sandbox = await self._make(kind, preload)
        except (WarmpodError, OSError) as exc:
            metrics.REFILL_FAILURES.inc()
            self._failures += 1
            kind.failing += 1
            self._last_error = f"environment {kind.name!r}: {exc}" if len(self._kinds) > 1 else str(exc)
            log.error(
                "could not make a pool container of %r (retrying in %.1f s): %s",
                kind.name,
                kind.retry.delay,
                exc,
            )
            # The slot stays taken while backing off, so failures never loop hot.
            await kind.retry.sleep()
            kind.starting -= 1
            kind.starting_warm -= preload
            await self._notify()
            return
        metrics.CONTAINER_START.observe(time.perf_counter() - started)
        kind.failing = 0
        kind.retry.reset()
        self._created += 1
        kind.starting -= 1
        kind.starting_warm -= preload
        kind.ready.append(sandbox)
        if self._tg is not None:
            self._tg.start_soon(self._watch_idle, kind, sandbox)
        kind.serving = True
        await self._notify()

    async def _watch_idle(self, kind: Kind, sandbox: Sandbox) -> None:
        # A container that dies while it waits (killed, removed with its image, agent crashed)
        # must not be handed to a run, nor leave the pool a container short.
        if not await sandbox.watch():
            return  # leased
        if sandbox not in kind.ready:
            return  # retired or destroyed: its channel was closed on purpose
        kind.ready.remove(sandbox)
        self._last_error = f"{sandbox.name} died while idle"
        log.warning("%s died while idle: replacing it", sandbox.name)
        self._capacity.closing += 1
        await self._close(sandbox)

    async def _make(self, kind: Kind, preload: bool) -> Sandbox:
        name = f"warmpod-{self.instance[:8]}-{next(self._serial)}"
        directory = self._state_dir / name
        directory.mkdir(mode=0o700)
        if not self._seccomp_profile.exists():  # written once, again if the directory was emptied
            shutil.copyfile(self._seccomp_source, self._seccomp_profile)
        sandbox = await Sandbox.start(
            self._engine,
            image=kind.image,
            seccomp_profile=self._seccomp_profile,
            name=name,
            labels=self.labels(),
            directory=directory,
            limits=kind.spec.limits,
            can_limit=self._can_limit,
            userns=self._userns,
            preload=kind.spec.preload if preload else (),
            timeout=self._settings.pool.start_timeout,
        )
        self.landlock_abi = sandbox.landlock
        if sandbox.warm and sandbox.preload_failed != kind.preload_failed:
            log.warning(
                "preload modules of %r failed to import: %s", kind.name, ", ".join(sandbox.preload_failed)
            )
            kind.preload_failed = sandbox.preload_failed
        try:
            # A run already waits for it: pausing would only add two engine calls to its path.
            if self.can_pause and not kind.queue:
                await sandbox.pause()
        except BaseException:
            await sandbox.aclose()
            raise
        kind.memory_floor = max(kind.memory_floor, sandbox.memory_floor)
        return sandbox

    def _warm_next(self) -> None:
        # Thaw the container the next run of each environment will take, off that run's critical path.
        for kind in self._kinds.values():
            head = kind.ready[0] if kind.ready else None
            # Not twice: a thaw may be under way already.
            if self._tg is not None and head is not None and head.paused and not head.thawing:
                self._tg.start_soon(self._thaw_quietly, head)

    async def _thaw_quietly(self, sandbox: Sandbox) -> None:
        try:
            await sandbox.thaw()
        except WarmpodError as exc:
            log.warning("could not unpause %s ahead of demand: %s", sandbox.name, exc)

    async def wait_serving(self, timeout: float, progress_every: float = 10.0) -> None:
        """Wait until the pool has made the first sandbox of every environment, logging progress
        while it takes long.

        Raises:
            PoolUnavailable: that did not happen within ``timeout`` seconds; the message names the
                environments without one and has the last error.
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
                        "waiting for the first sandbox of %s: %.0f s so far, %d failed%s",
                        ", ".join(self._unserved()),
                        anyio.current_time() - started,
                        self._failures,
                        f" (last: {self._last_error})" if self._last_error else "",
                    )
        if not self.serving:
            raise PoolUnavailable(
                f"no sandbox of the environment(s) {', '.join(self._unserved())} was made within "
                f"{timeout:.0f} s of start-up (WARMPOD_SERVER__STARTUP_TIMEOUT)"
                + (f"; last error: {self._last_error}" if self._last_error else "")
            )

    def _unserved(self) -> list[str]:
        return [name for name, kind in self._kinds.items() if not kind.serving]

    @asynccontextmanager
    async def lease(self, environment: str = DEFAULT) -> AsyncIterator[Sandbox]:
        """Take a ready container of ``environment`` for one run; it is destroyed when the block exits.

        Unless the block ended normally while the pool runs and left the sandbox unused (see
        ``Sandbox.used``): then it is given back, first in line for the next lease.

        Raises:
            PoolUnavailable: none became ready within the acquire timeout.
        """
        kind = self._kinds[environment]
        try:
            with anyio.fail_after(self._settings.pool.acquire_timeout):
                async with self._changed:
                    if (kind.queue or not kind.ready) and kind.serving:
                        self._capacity.grow()
                        self._changed.notify_all()
                    # First come, first served: otherwise an unlucky run can lose every race.
                    ticket = object()
                    kind.queue.append(ticket)
                    try:
                        while not kind.ready or kind.queue[0] is not ticket:
                            await self._changed.wait()
                    finally:
                        kind.queue.remove(ticket)
                        self._changed.notify_all()
                    # Only the lone run: under load, runs and refills share the CPUs.
                    kinds = self._kinds.values()
                    full = kind.coming >= self._capacity.of(kind)
                    if full and not any(k.busy for k in kinds) and not any(k.queue for k in kinds):
                        self._run_first_until = anyio.current_time() + RUN_FIRST
                    sandbox = kind.ready.popleft()
                    sandbox.take()
                    kind.busy.add(sandbox)
                    self._changed.notify_all()
        except TimeoutError as exc:
            raise PoolUnavailable(
                f"no sandbox of the environment {environment!r} became free within "
                f"{self._settings.pool.acquire_timeout:.0f} s"
            ) from exc
        unused = False
        try:
            await sandbox.thaw()
            yield sandbox
            unused = not sandbox.used
        finally:
            kind.busy.discard(sandbox)
            with anyio.CancelScope(shield=True):
                # A block that raised may have left the sandbox in any state; a stopping pool
                # (no task group) destroys what it holds.
                if unused and self._tg is not None:
                    self._give_back(kind, sandbox, self._tg)
                elif self._tg is not None:
                    self._close_soon(sandbox, self._tg)
                else:
                    await sandbox.aclose()
                await self._notify()

    def _close_soon(self, sandbox: Sandbox, tg: anyio.abc.TaskGroup) -> None:
        # Counted from now, not from when the task starts: the container lives until removed (an
        # agent may still be exiting, or be killed by the removal), and the pool must
        # not make another in its place before then.
        self._capacity.closing += 1
        tg.start_soon(self._close, sandbox)

    async def _close(self, sandbox: Sandbox) -> None:
        try:
            await sandbox.aclose()
        finally:
            self._capacity.closing -= 1
            with anyio.CancelScope(shield=True):
                await self._notify()

    def _give_back(self, kind: Kind, sandbox: Sandbox, tg: anyio.abc.TaskGroup) -> None:
        # At the head, where the next lease takes it: it is thawed already, as _warm_next leaves
        # the head. Its old watch was ended by the lease (and has returned: the lease passed
        # checkpoints since); it rests again before its new watch starts, so a lease before
        # then ends that one too.
        kind.ready.appendleft(sandbox)
        sandbox.rest()
        tg.start_soon(self._watch_idle, kind, sandbox)

    def check_memory(self, environment: str, limit_bytes: int) -> None:
        """Refuse a memory limit below what the largest sandbox of ``environment`` seen holds at
        rest (plus headroom).

        Raises:
            InvalidRun: the limit is below that floor; the message names the minimum.
        """
        kind = self._kinds[environment]
        check_memory_floor(limit_bytes, kind.memory_floor, kind.spec.preload)

    async def _destroy_all(self) -> None:
        sandboxes = [sandbox for kind in self._kinds.values() for sandbox in (*kind.ready, *kind.busy)]
        for kind in self._kinds.values():
            kind.ready.clear()
        async with anyio.create_task_group() as tg:
            for sandbox in sandboxes:
                tg.start_soon(sandbox.aclose)
        # Containers still being created when cancelled carry our label: sweep them too.
        for container_id, labels in await self._engine.list_labelled(LABEL_INSTANCE):
            if labels.get(LABEL_INSTANCE) == self.instance:
                await self._engine.destroy(container_id)
