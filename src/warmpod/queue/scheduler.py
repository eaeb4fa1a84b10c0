"""The queue in front of the pool: takes runs into the store, runs them in order, and tells who waits."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal

import anyio
import msgspec
from anyio.abc import TaskStatus

from warmpod import metrics
from warmpod.backoff import Backoff
from warmpod.errors import (
    KeyBusy,
    KeyReused,
    NoSuchFile,
    PoolUnavailable,
    QueueFull,
    RunFinished,
    RunNotFound,
    ShuttingDown,
    StoreError,
)
from warmpod.keys import Key
from warmpod.models import Chunk, NodeSeen, OutputFile, RunResult, RunSpec, RunStatus
from warmpod.queue.store.base import (
    OUTPUT_PAGE,
    Claim,
    Fence,
    Idempotency,
    Notice,
    Owner,
    Record,
    Replay,
    Store,
)
from warmpod.queue.store.codec import Printed, encode_blob
from warmpod.sandbox.files import with_content, with_url
from warmpod.sandbox.runner import SANDBOX_FAILURES, Leaser, Runner, RunOutput
from warmpod.sandbox.sandbox import Sandbox
from warmpod.settings import FileSettings, NodeSettings, QueueSettings

log = logging.getLogger(__name__)

# Output reaches the store (and so `/status/{id}/stream`) at most this long (and the agent's few
# ms) after it was printed: one write per running run per interval, however much it printed, of
# chunks RunOutput merged (one per stream switch and per 64 KiB).
FLUSH_INTERVAL = 0.1
# Waiters and streams re-read the store this often even without a local signal.
RECHECK = 1.0
# A stream sends a comment this often when nothing else happens, so proxies keep it open.
KEEPALIVE = 15.0
# A download reads its file from the store in pieces of this size: each piece is what a reader
# that stops reading can hold in memory (with the connection's own 64 KiB buffer), and each is one
# short store call. Smaller costs more CPU: SQLite finds a piece by walking the file's pages from
# its start, so a 16 MiB file read in these pieces takes some 6 times the CPU of reading it whole.
FILE_PIECE = 256 * 1024
# How long DELETE waits for a running run to be stopped before it answers.
CANCEL_WAIT = 10.0
RETRY_MAX = 30.0
STOPPED_MESSAGE = "node {node} stopped while this run was executing; it was not retried"
# How long a stopping node may take to tell the store it left.
LEAVE_TIMEOUT = 5.0


@dataclass
class _LiveRun:
    """A run executing here: its claim, its output so far and the scope that cancels it."""

    fence: Fence
    output: RunOutput
    started: float = field(default_factory=time.perf_counter)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    lost: str | None = None
    """Why this node no longer holds the run (its lease ran out): nothing more of it is written."""
    result: RunResult | None = None
    """What to record once its sandbox is gone: set when the run ended, or the server stopped it."""
    finishing: bool = False
    """Its result is being written: a heartbeat renews it, and the result's write learns whether
    it was lost (a heartbeat racing that write would take the written run for a lost one)."""

    def ended(self, run_id: str, status: Literal["cancelled", "error"], error: str | None) -> RunResult:
        return RunResult.from_server(
            run_id,
            status,
            stdout=self.output.stdout,
            stderr=self.output.stderr,
            duration_ms=(time.perf_counter() - self.started) * 1000,
            error=error,
        )


@dataclass(frozen=True)
class Update:
    """One step of a run as ``follow`` sees it: a status, a chunk of output, a file it left, the
    result, or nothing new."""

    kind: Literal["status", "output", "file", "result", "keepalive"]
    status: RunStatus = "queued"
    chunk: Chunk | None = None
    file: OutputFile | None = None
    result: RunResult | None = None


class Scheduler:
    """Accepts runs into the store and runs them, oldest first, as sandboxes become free here.

    Several nodes may share the store: each claims a queued run only once it holds a ready
    sandbox, keeps the run by a lease it renews, and reports runs whose node stopped renewing.
    """

    def __init__(
        self,
        store: Store,
        leaser: Leaser,
        runner: Runner,
        settings: QueueSettings,
        workers: int,
        files: FileSettings | None = None,
        node: NodeSettings | None = None,
    ) -> None:
        self._store = store
        self._leaser = leaser
        self._runner = runner
        self._settings = settings
        self._files = files or FileSettings()
        self._workers = workers
        node = node or NodeSettings()
        self.owner = Owner(node=node.name or socket.gethostname(), incarnation=uuid.uuid4().hex)
        """This node, and this start of it."""
        self._lease = node.lease
        self.nodes: list[NodeSeen] = [
            NodeSeen(name=self.owner.node, incarnation=self.owner.incarnation, seen_ago=0.0, running=0)
        ]
        """The nodes seen alive at the last heartbeat."""
        # One token per run the store announced queued: a worker takes a sandbox only for a token.
        self._work = anyio.Semaphore(0)
        # Workers that took a token and have not yet claimed (they may wait for a sandbox).
        self._seeking = 0
        # Runs waiting in the shared queue: counted on notices here, read back at every heartbeat.
        self._queued = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._changed: dict[str, anyio.Event] = {}
        self._watchers: dict[str, int] = {}
        self._live: dict[str, _LiveRun] = {}
        self._drain_deadline: float | None = None
        self._quiet = anyio.Event()

    @property
    def draining(self) -> bool:
        """Whether the server is stopping: no new runs are taken or started."""
        return self._drain_deadline is not None

    @property
    def queued(self) -> int:
        """Runs waiting for a sandbox, on any node."""
        return max(0, self._queued)

    @property
    def running(self) -> int:
        """Runs executing on this node."""
        return len(self._live)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Join the store, report what this node's last start left running, then run queued runs
        until cancelled.

        Raises:
            StoreError: the store cannot be reached, or another node of this name is alive.
        """
        lost = await self._store.join(self.owner, self._lease, STOPPED_MESSAGE)
        if lost:
            log.warning("%d run(s) were executing when this node last stopped: reported error", len(lost))
        for run_id in lost:
            await self._report(run_id, None, executed=False)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self._store.listen, self._on_notice)
                queued = self._queued = await self._store.queued()
                if queued:
                    log.info("%d queued run(s) wait in the store and will run now", queued)
                self._top_up(queued)
                for _ in range(self._workers):
                    tg.start_soon(self._worker)
                tg.start_soon(self._heartbeat)
                tg.start_soon(self._reaper)
                tg.start_soon(self._purge)
                task_status.started()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True), anyio.move_on_after(LEAVE_TIMEOUT):
                try:
                    await self._store.leave(self.owner)
                except StoreError as exc:
                    log.warning("could not tell the store this node left: %s", exc)

    def begin_drain(self, grace: float) -> None:
        """Stop taking and starting runs; running ones get ``grace`` seconds (safe in a signal handler)."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + grace

    async def drain(self, grace: float) -> None:
        """Stop taking runs and wait, up to the grace since ``begin_drain``, for running ones to end."""
        self.begin_drain(grace)
        assert self._drain_deadline is not None
        with anyio.move_on_after(max(0.0, self._drain_deadline - time.monotonic())):
            while self._live:
                self._quiet = anyio.Event()
                await self._quiet.wait()
        if self._live:
            log.warning("stopping %d run(s) still executing after the grace period", len(self._live))

    async def submit(self, spec: RunSpec, key: Key | None = None) -> str:
        """Queue a run of ``key`` (None where keys are off) and return its id.

        Raises:
            ShuttingDown: the server is stopping.
            KeyBusy: the key has its ``max_active`` runs queued or running.
            QueueFull: ``max_queued`` runs already wait.
        """
        run_id, _ = await self.take(spec, key)
        return run_id

    async def take(
        self, spec: RunSpec, key: Key | None = None, idempotency_key: str | None = None
    ) -> tuple[str, RunStatus]:
        """Queue a run of ``key`` and return its id and status; with ``idempotency_key``, a run of
        ``key`` submitted before with it is answered instead, never run again.

        Raises:
            KeyReused: ``idempotency_key`` names a run of ``key`` asked for with another spec.
            ShuttingDown: the server is stopping (a retry of a stored run is still answered).
            KeyBusy: the key has its ``max_active`` runs queued or running.
            QueueFull: ``max_queued`` runs already wait.
        """
        idempotency = None
        if idempotency_key is not None:
            request_hash = hashlib.sha256(encode_blob(spec)).hexdigest()
            idempotency = Idempotency(key=idempotency_key, request_hash=request_hash)
        elif self.draining:
            raise ShuttingDown(
                "warmpod is shutting down and takes no new runs; retry on another server or later"
            )
        run_id = uuid.uuid4().hex
        try:
            added = await self._store.add(
                run_id,
                spec,
                # A stopping server still answers a retry of a run it stored, and stores no new one.
                max_queued=0 if self.draining else self._settings.max_queued,
                key=None if key is None else key.name,
                max_active=None if key is None else key.max_active,
                idempotency=idempotency,
            )
        except StoreError as exc:
            # The add's COMMIT may have gone through with only its answer lost: a stored run is
            # answered with its id, or a client would submit it again.
            try:
                stored = await self._store.get(run_id)
            except StoreError:
                raise exc from None
            if stored is None:
                raise
            log.warning("run %s was stored though the store's answer was lost: %s", run_id, exc)
            added = "added"
        if isinstance(added, Replay):
            if not added.same_request:
                raise KeyReused(
                    f"the Idempotency-Key {idempotency_key!r} was used for another request (run "
                    f"{added.run_id}): send a new key for a new run"
                )
            return added.run_id, added.status
        if self.draining:
            raise ShuttingDown(
                "warmpod is shutting down and takes no new runs; retry on another server or later"
            )
        if added == "key-busy":
            assert key is not None
            raise KeyBusy(
                f"the key {key.name!r} has {key.max_active} runs queued or running, its max_active: "
                "retry when one has ended"
            )
        if added == "queue-full":
            raise QueueFull(
                f"the queue is full: {self._settings.max_queued} runs are waiting (WARMPOD_QUEUE__MAX_QUEUED)"
            )
        return run_id, "queued"

    async def check_owner(self, run_id: str, key: Key | None) -> None:
        """Check the run was submitted with ``key`` (None: with keys off).

        Raises:
            RunNotFound: no such run, or another key's: the answer is the same, so a key cannot
                learn which ids exist.
        """
        if (await self._record(run_id)).key != (None if key is None else key.name):
            raise self._not_found(run_id)

    async def wait(self, run_id: str, timeout: float) -> RunResult | None:
        """The run's result once it is final; None if it is not within ``timeout`` seconds.

        Raises:
            RunNotFound: no such run.
            ShuttingDown: the server is stopping and the run has not started (it stays queued).
        """
        with self._watching(run_id), anyio.move_on_after(timeout):
            while True:
                changed = self._watch(run_id)
                record = await self._record(run_id)
                if record.result is not None:
                    return await self._with_files(record.result)
                if self.draining and record.status == "queued":
                    raise ShuttingDown(
                        f"warmpod is shutting down before run {run_id} started: it stays queued and runs "
                        "when the server starts again"
                    )
                with anyio.move_on_after(RECHECK):
                    await changed.wait()
        return None

    async def status(self, run_id: str) -> RunResult:
        """The run's result, or what it printed so far while it is queued or running.

        Raises:
            RunNotFound: no such run, or its result has expired.
        """
        record = await self._record(run_id)
        if record.result is not None:
            return await self._with_files(record.result)
        # From the store, not this node's buffers: what is shown is what a crash would keep.
        printed = Printed()
        async for chunk in self._chunks(run_id, -1):
            printed.add(chunk.stream, chunk.data)
        stdout, stderr = printed.text()
        status: RunStatus = "running" if record.status == "running" else "queued"
        return RunResult.from_server(run_id, status, stdout=stdout, stderr=stderr, node=record.node)

    async def cancel(self, run_id: str) -> RunResult:
        """Stop a queued or running run; it ends ``cancelled`` with the output it had printed.

        Raises:
            RunNotFound: no such run.
            RunFinished: the run had already ended otherwise.
        """
        await self._record(run_id)
        outcome = await self._store.cancel(run_id, RunResult.from_server(run_id, "cancelled"))
        if outcome == "unknown":
            raise RunNotFound(f"no run has the id {run_id}")
        if outcome == "cancelled":
            self._queued -= 1
            # Its token would otherwise send a worker to lease a sandbox for nothing.
            with contextlib.suppress(anyio.WouldBlock):
                self._work.acquire_nowait()
            await self._report(run_id, None, executed=False)
        elif outcome == "requested":
            # The run's node (this one or another) stops it on the store's notice.
            await self.wait(run_id, CANCEL_WAIT)
        record = await self._record(run_id)
        if record.result is not None and record.result.status != "cancelled":
            raise RunFinished(f"run {run_id} had already ended ({record.result.status}); nothing to cancel")
        return await self.status(run_id)

    async def follow(self, run_id: str, after: int = -1) -> AsyncIterator[Update]:
        """The run's status changes, its output chunks after ``after``, then its result; live.

        Raises:
            RunNotFound: no such run, or its result has expired.
        """
        with self._watching(run_id):
            async for update in self._follow(run_id, after):
                yield update

    async def _chunks(self, run_id: str, after: int) -> AsyncGenerator[Chunk, None]:
        """The run's output chunks after ``after`` as the store has them now, a page at a time."""
        while True:
            page = await self._store.output(run_id, after, OUTPUT_PAGE)
            for chunk in page:
                yield chunk
            if len(page) < OUTPUT_PAGE:
                return
            after = page[-1].seq

    async def _follow(self, run_id: str, after: int) -> AsyncIterator[Update]:
        status: RunStatus | None = None
        quiet_since = time.monotonic()
        while True:
            changed = self._watch(run_id)
            # Before the output: a final record's output is all stored (``finish`` writes both).
            record = await self._record(run_id)
            if record.result is None and record.status != status:
                status = record.status
                yield Update("status", status=status)
            printed = False
            # A page is sent before the next is read: a slow reader holds one page, not the run.
            async with contextlib.aclosing(self._chunks(run_id, after)) as chunks:
                async for chunk in chunks:
                    after = chunk.seq
                    printed = True
                    yield Update("output", chunk=chunk)
            if record.result is not None:
                for file in record.result.files:
                    yield Update("file", file=file)
                yield Update("result", result=await self._with_files(record.result))
                return
            if printed:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE:
                quiet_since = time.monotonic()
                yield Update("keepalive")
            with anyio.move_on_after(RECHECK):
                await changed.wait()

    async def file(self, run_id: str, path: str) -> tuple[OutputFile, int]:
        """A file the run left in ``out/``: its entry in the result and its stored size, for
        ``file_pieces`` to read it by.

        Raises:
            RunNotFound: no such run, or its result has expired.
            NoSuchFile: the run has not ended, or left no file at ``path``.
        """
        record = await self._record(run_id)
        entry = next((f for f in record.result.files if f.path == path), None) if record.result else None
        size = None if entry is None else await self._store.file_size(run_id, path)
        if entry is None or size is None:
            listed = ", ".join(f.path for f in record.result.files[:20]) if record.result else ""
            raise NoSuchFile(
                f"run {run_id} left no file {path[:1024]!r}"
                + (f"; it left {listed}" if listed else " (files are listed once the run has ended)")
            )
        return entry, size

    async def file_pieces(self, run_id: str, path: str, size: int) -> AsyncIterator[bytes]:
        """The first ``size`` bytes of a file the run left, in pieces of at most FILE_PIECE: a
        download holds one piece at a time, however large the file or slow its reader. It ends
        early if the file goes meanwhile (its run expired), short of the length announced."""
        offset = 0
        while offset < size:
            piece = await self._store.file_piece(run_id, path, offset, min(FILE_PIECE, size - offset))
            if not piece:
                return
            yield piece
            offset += len(piece)

    async def _with_files(self, result: RunResult) -> RunResult:
        """The result with each file's URL, and the content of small ones inline up to the answer's
        budget: however many files a run left, an answer about it weighs at most that."""
        if not result.files:
            return result
        limits = self._files
        small = await self._store.small_files(result.id, limits.inline_bytes, limits.inline_total_bytes)
        entries = (with_url(result.id, f) for f in result.files)
        files = [
            with_content(f, small[f.path], limits.inline_bytes) if f.path in small else f for f in entries
        ]
        return msgspec.structs.replace(result, files=files)

    async def _record(self, run_id: str) -> Record:
        record = await self._store.get(run_id)
        if record is None or (
            record.finished is not None and record.finished + self._settings.retention < time.time()
        ):
            raise self._not_found(run_id)
        return record

    def _not_found(self, run_id: str) -> RunNotFound:
        return RunNotFound(
            f"no run has the id {run_id} (results are kept {self._settings.retention:g} s after the run ends)"
        )

    @contextlib.contextmanager
    def _watching(self, run_id: str) -> Iterator[None]:
        # The run's event lives while anyone waits on it: a run waited on and then forgotten
        # must not leave one behind (else every blocking request would leak one).
        self._watchers[run_id] = self._watchers.get(run_id, 0) + 1
        try:
            yield
        finally:
            self._watchers[run_id] -= 1
            if not self._watchers[run_id]:
                del self._watchers[run_id]
                self._changed.pop(run_id, None)

    def _watch(self, run_id: str) -> anyio.Event:
        return self._changed.setdefault(run_id, anyio.Event())

    def _notify(self, run_id: str) -> None:
        event = self._changed.pop(run_id, None)
        if event is not None:
            event.set()

    def _on_notice(self, notice: Notice, run_id: str) -> None:
        """What the store reports any node did (called on the event loop, so it must not block)."""
        if notice == "queued":
            self._queued += 1
            self._work.release()
        elif notice == "changed":
            self._notify(run_id)
        elif notice == "cancel":
            live = self._live.get(run_id)
            if live is not None:
                live.scope.cancel()
        elif self._tg is not None:  # reconnected: look for what was missed meanwhile
            self._tg.start_soon(self._resync)

    async def _resync(self) -> None:
        """After notices may have been missed: wake every waiter, look for cancels and work."""
        for run_id in list(self._changed):
            self._notify(run_id)
        try:
            for run_id, live in list(self._live.items()):
                if await self._store.cancel_requested(run_id):
                    live.scope.cancel()
            self._top_up(await self._store.queued())
        except StoreError as exc:
            log.warning("could not look for missed changes in the store: %s", exc)

    def _top_up(self, queued: int) -> None:
        """Give workers a token for each run the store holds queued that no token stands for."""
        for _ in range(min(queued, self._workers) - self._work.value - self._seeking):
            self._work.release()

    def _lose(self, run_id: str, live: _LiveRun, why: str) -> None:
        """Stop a run this node no longer holds: its container goes at once, nothing more is written."""
        if live.lost is None:
            live.lost = why
            log.warning("lost run %s (%s): stopping its container", run_id, why)
            live.scope.cancel()

    async def _heartbeat(self) -> None:
        """Renew this node's leases every third of a lease and stop the runs it lost."""
        renewed = time.monotonic()
        while True:
            held = dict(self._live)
            began = time.monotonic()
            try:
                # Bounded by the next beat's time: a store that hangs counts as one out of reach.
                with anyio.fail_after(self._lease / 3):
                    beat = await self._store.heartbeat(
                        self.owner, self._lease, [live.fence for live in held.values()]
                    )
            except (StoreError, TimeoutError) as exc:
                log.warning("could not renew this node's leases: %s", exc or "no answer in time")
                # Past the lease another node may report these runs; they must not go on unseen.
                # A store no other node shares reports none of them: they go on.
                if self._store.shared and time.monotonic() - renewed >= self._lease:
                    why = f"the run store was out of reach for its lease of {self._lease:g} s"
                    for run_id, live in list(self._live.items()):
                        self._lose(run_id, live, why)
            else:
                renewed = began
                self.nodes = beat.nodes
                self._queued = beat.queued
                for run_id, live in held.items():
                    # One whose result is being written finds out from that write.
                    if not live.finishing and run_id not in beat.held:
                        self._lose(run_id, live, "its lease ran out and another node reported it ended")
                self._top_up(beat.queued)
            # A third of a lease from this beat's start, not its end: a slow beat (a loaded store)
            # then a failed one still leave a third beat within the lease.
            await anyio.sleep(max(0.0, began + self._lease / 3 - time.monotonic()))

    async def _reaper(self) -> None:
        """Report other nodes' runs whose lease ran out. A task of its own: a store that hangs
        here (each call may wait its full timeout) must not hold back this node's next renewal."""
        while True:
            try:
                for run_id in await self._store.reap(STOPPED_MESSAGE):
                    log.warning("run %s lost its node (its lease ran out): reported error", run_id)
                    await self._report(run_id, None, executed=False)
            except StoreError as exc:
                log.warning("could not look for runs whose node stopped: %s", exc)
            await anyio.sleep(self._lease / 3)

    async def _worker(self) -> None:
        backoff = Backoff(0.5, RETRY_MAX)
        while True:
            await self._work.acquire()
            if self.draining:
                self._work.release()
                return
            self._seeking += 1
            seeking = True
            live: _LiveRun | None = None
            try:
                # The sandbox first: a node claims a run only when it can start it at once, so
                # runs go to the nodes with a free sandbox. One left unused goes back to the pool.
                async with self._leaser.lease() as sandbox:
                    if self.draining:
                        self._work.release()
                        return
                    claimed = await self._store.claim(self.owner, self._lease, warm=sandbox.warm)
                    self._seeking -= 1
                    seeking = False
                    if claimed is not None:
                        self._queued -= 1
                        self._leaser.note_demand(claimed.spec.warm)
                        # The run stays in ``_live`` until its result is written, so heartbeats
                        # renew its lease while a result waits for room in the store (or this
                        # node's own reaper would end it).
                        live = self._live[claimed.fence.run_id] = _LiveRun(
                            claimed.fence, self._runner.output(claimed.spec)
                        )
                        await self._execute(claimed, sandbox, live)
                backoff.reset()
            except (PoolUnavailable, StoreError, *SANDBOX_FAILURES) as exc:
                # The run (if any was claimed, it was finished) stays queued for the next try.
                self._work.release()
                log.warning("no sandbox for the next queued run (retrying in %.1f s): %s", backoff.delay, exc)
                await backoff.sleep()
            finally:
                if seeking:
                    self._seeking -= 1
                # Only now, the lease over and its container on the way out, is the result written:
                # a store that fails for a while (retried) must not keep a cancelled or timed-out
                # program's container running.
                if live is not None:
                    with anyio.CancelScope(shield=True):
                        await self._conclude(live)

    async def _execute(self, claim: Claim, sandbox: Sandbox, live: _LiveRun) -> None:
        """Run the claimed run in ``sandbox``, leaving what to record of it in ``live.result``:
        ``_conclude`` writes it once the sandbox is gone, even if this was cancelled."""
        run_id, spec = claim.fence.run_id, claim.spec
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._tend, run_id, live)
                with live.scope:
                    try:
                        result = await self._runner.execute(run_id, spec, sandbox, live.output)
                    except Exception:
                        log.exception("run %s failed inside warmpod", run_id)
                        result = live.ended(run_id, "error", "internal error; see the server log")
                tg.cancel_scope.cancel()
            if live.scope.cancelled_caught and live.lost is None:
                result = live.ended(run_id, "cancelled", None)
        except anyio.get_cancelled_exc_class():
            live.result = live.ended(run_id, "error", "the server stopped before the run ended")
            raise
        if live.lost is None:  # else another node reported it: nothing of it is written
            live.result = result

    async def _conclude(self, live: _LiveRun) -> None:
        """Write the result of a run whose sandbox is gone, then forget the run."""
        run_id = live.fence.run_id
        try:
            # A lost run was reported by another node: nothing more of it is written.
            if live.lost is None and live.result is not None:
                await self._finish(run_id, live.result, live)
        finally:
            del self._live[run_id]
            if not self._live:
                self._quiet.set()

    async def _finish(self, run_id: str, result: RunResult, live: _LiveRun) -> None:
        # A result that cannot be written (the store's disk is full) is kept and tried again
        # until it is, holding this worker: no further run starts while none could be recorded.
        # Only a stopping server gives up on it; the next start reports the run as interrupted.
        live.finishing = True
        chunks = live.output.take()
        listed = {f.path for f in result.files}
        files = [(f.path, bytes(f.data)) for f in live.output.files.complete if f.path in listed]
        result = msgspec.structs.replace(result, node=self.owner.node)
        backoff = Backoff(0.5, RETRY_MAX)
        while True:
            try:
                recorded = await self._store.finish(run_id, result, chunks, files, fence=live.fence)
                break
            except StoreError as exc:
                if self.draining:
                    # Not reported here: the next start reports it, as it records it.
                    log.error("could not record the result of run %s before stopping: %s", run_id, exc)
                    return
                log.warning(
                    "could not record the result of run %s (retrying in %.1f s): %s",
                    run_id,
                    backoff.delay,
                    exc,
                )
                await backoff.sleep()
        if recorded:
            await self._report(run_id, result, executed=True)
        else:
            log.warning(
                "lost run %s: its lease ran out before its result was written; another node reported it",
                run_id,
            )

    async def _report(self, run_id: str, result: RunResult | None, *, executed: bool) -> None:
        """Count and log a run the store has just made final (once per run, however it ended):
        ``result`` as it was recorded, None to read it back; ``executed`` on this server."""
        try:
            record = await self._store.get(run_id)
        except StoreError as exc:
            log.warning("could not read run %s back for its report: %s", run_id, exc)
            record = None
        if result is None and record is not None:
            result = record.result
        if result is None:
            return
        queue_wait = None
        if record is not None:
            queue_wait = (record.started or record.finished or time.time()) - record.created
        metrics.count_run(result, queue_wait=queue_wait, executed=executed)
        # Never the code, its input or output, nor a key: only the key's name.
        log.info(
            "run finished",
            extra={
                "run_id": run_id,
                "status": result.status,
                "duration_ms": result.duration_ms,
                "queue_ms": None if queue_wait is None else round(queue_wait * 1000, 1),
                "limits_hit": list(result.limits_hit),
                "key": None if record is None else record.key,
                "node": result.node,
            },
        )

    async def _tend(self, run_id: str, live: _LiveRun) -> None:
        """While a run executes: move its output to the store, as long as this node holds the run."""
        while True:
            chunks = live.output.take()
            if chunks:
                # Shielded: chunks taken from ``live`` must reach the store even if the run ends now.
                with anyio.CancelScope(shield=True):
                    try:
                        held = await self._store.add_output(live.fence, chunks)
                    except StoreError as exc:
                        # The run goes on, and so does the service; the chunks are written with
                        # the next ones (rewriting one already kept changes nothing).
                        live.output.untake(chunks)
                        log.warning("could not keep the output of run %s (trying again): %s", run_id, exc)
                    else:
                        if not held:
                            self._lose(run_id, live, "another node reported it ended: its lease ran out")
            await anyio.sleep(FLUSH_INTERVAL)

    async def _purge(self) -> None:
        retention = self._settings.retention
        while True:
            try:
                purged = await self._store.purge(retention)
            except StoreError:
                log.exception("could not purge expired runs")
            else:
                if purged:
                    log.info("purged %d expired run(s)", purged)
            await anyio.sleep(min(retention, 300.0))
