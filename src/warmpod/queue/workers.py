"""Running queued runs on sandboxes leased here: claiming them, keeping their output, stopping, recording."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import anyio
import msgspec

from warmpod import metrics
from warmpod.backoff import Backoff
from warmpod.errors import PoolUnavailable, RunFinished, RunNotFound, StoreError
from warmpod.models import RunResult
from warmpod.queue.admission import Backlog, Shutdown
from warmpod.queue.results import Results
from warmpod.queue.store.base import Claim, Fence, Owner, Store
from warmpod.sandbox.runner import SANDBOX_FAILURES, Leaser, Runner, RunOutput
from warmpod.sandbox.sandbox import Sandbox

log = logging.getLogger(__name__)

# Output reaches the store (and so `/status/{id}/stream`) at most this long (and the agent's few
# ms) after it was printed: one write per running run per interval, however much it printed, of
# chunks RunOutput merged (one per stream switch and per 64 KiB).
FLUSH_INTERVAL = 0.1
# How long DELETE waits for a running run to be stopped before it answers.
CANCEL_WAIT = 10.0
RETRY_MAX = 30.0


@dataclass
class _LiveRun:
    """A run executing here: its claim, its output so far and the scope that cancels it."""

    fence: Fence
    output: RunOutput
    environment: str
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
            environment=self.environment,
        )


class Workers:
    """Run queued runs, oldest first, as sandboxes become free here: a worker claims a run only
    once it holds a ready sandbox, so runs go to the nodes that can start them at once."""

    def __init__(
        self,
        store: Store,
        leaser: Leaser,
        runner: Runner,
        results: Results,
        shutdown: Shutdown,
        owner: Owner,
        lease: float,
        count: int,
        backlog: Backlog | None = None,
    ) -> None:
        self._store = store
        self._backlog = backlog or Backlog()
        self._leaser = leaser
        self._runner = runner
        self._results = results
        self._shutdown = shutdown
        self._owner = owner
        self._lease = lease
        self._count = count
        # One token per run the store announced queued: a worker takes a sandbox only for a token.
        self._work = anyio.Semaphore(0)
        # Workers that took a token and have not yet claimed (they may wait for a sandbox).
        self._seeking = 0
        self._live: dict[str, _LiveRun] = {}
        self._quiet = anyio.Event()

    @property
    def running(self) -> int:
        """Runs executing on this node."""
        return len(self._live)

    async def serve(self) -> None:
        """Run queued runs, ``count`` at a time, until cancelled or the server stops."""
        async with anyio.create_task_group() as tg:
            for _ in range(self._count):
                tg.start_soon(self._worker)

    async def drain(self, grace: float) -> None:
        """Stop taking runs and wait, up to the grace since the shutdown began, for running ones to end."""
        self._shutdown.begin(grace)
        with anyio.move_on_after(self._shutdown.grace_left()):
            while self._live:
                self._quiet = anyio.Event()
                await self._quiet.wait()
        if self._live:
            log.warning("stopping %d run(s) still executing after the grace period", len(self._live))

    async def cancel(self, run_id: str) -> RunResult:
        """Stop a queued or running run; it ends ``cancelled`` with the output it had printed.

        Raises:
            RunNotFound: no such run.
            RunFinished: the run had already ended otherwise.
        """
        await self._results.record(run_id)
        outcome = await self._store.cancel(run_id, RunResult.from_server(run_id, "cancelled"))
        if outcome == "unknown":
            raise RunNotFound(f"no run has the id {run_id}")
        if outcome == "cancelled":
            # Its token would otherwise send a worker to lease a sandbox for nothing.
            with contextlib.suppress(anyio.WouldBlock):
                self._work.acquire_nowait()
            await report(self._store, run_id, None, executed=False)
        elif outcome == "requested":
            # The run's node (this one or another) stops it on the store's notice.
            await self._results.wait(run_id, CANCEL_WAIT)
        record = await self._results.record(run_id)
        if record.result is not None and record.result.status != "cancelled":
            raise RunFinished(f"run {run_id} had already ended ({record.result.status}); nothing to cancel")
        return await self._results.status(run_id)

    def announce(self) -> None:
        """A run was queued: one more worker may lease a sandbox for it."""
        self._work.release()

    def top_up(self, queued: int) -> None:
        """Give workers a token for each run the store holds queued that no token stands for."""
        for _ in range(min(queued, self._count) - self._work.value - self._seeking):
            self._work.release()

    def stop(self, run_id: str) -> None:
        """Stop the run if it executes here: someone cancelled it (called on the event loop)."""
        live = self._live.get(run_id)
        if live is not None:
            live.scope.cancel()

    async def recheck_cancels(self) -> None:
        """Stop the runs executing here that were cancelled while notices may have been missed.

        Raises:
            StoreError: the store cannot be read.
        """
        for run_id, live in list(self._live.items()):
            if await self._store.cancel_requested(run_id):
                live.scope.cancel()

    def held(self) -> dict[str, Fence]:
        """The runs executing here, by id, with the fences that renew their leases."""
        return {run_id: live.fence for run_id, live in self._live.items()}

    def renewed(self, held: Iterable[str], still: frozenset[str]) -> None:
        """A heartbeat renewed the leases of ``still`` among the runs ``held`` when it began: stop
        the others, which another node has reported ended since their lease ran out."""
        for run_id in held:
            live = self._live.get(run_id)
            # One whose result is being written finds out from that write.
            if live is not None and not live.finishing and run_id not in still:
                self._lose(run_id, live, "its lease ran out and another node reported it ended")

    def unrenewed(self, why: str) -> None:
        """Stop every run executing here: their leases ran out unrenewed, so another node may
        report them ended, and they must not go on unseen."""
        for run_id, live in list(self._live.items()):
            self._lose(run_id, live, why)

    def _lose(self, run_id: str, live: _LiveRun, why: str) -> None:
        """Stop a run this node no longer holds: its container goes at once, nothing more is written."""
        if live.lost is None:
            live.lost = why
            log.warning("lost run %s (%s): stopping its container", run_id, why)
            live.scope.cancel()

    async def _worker(self) -> None:
        backoff = Backoff(0.5, RETRY_MAX)
        while True:
            await self._work.acquire()
            if self._shutdown.begun:
                self._work.release()
                return
            self._seeking += 1
            seeking = True
            live: _LiveRun | None = None
            try:
                environment = await self._next_environment()
                if environment is None:
                    continue  # its run was taken, or is of an environment this node does not serve
                # The sandbox first: a node claims a run only when it can start it at once, so
                # runs go to the nodes with a free sandbox. One left unused goes back to the pool.
                async with self._leaser.lease(environment) as sandbox:
                    if self._shutdown.begun:
                        self._work.release()
                        return
                    claimed = await self._store.claim(
                        self._owner, self._lease, environment=environment, warm=sandbox.warm
                    )
                    self._seeking -= 1
                    seeking = False
                    if claimed is not None:
                        self._leaser.note_demand(environment, claimed.spec.warm)
                        # The run stays in ``_live`` until its result is written, so heartbeats
                        # renew its lease while a result waits for room in the store (or this
                        # node's own reaper would end it).
                        live = self._live[claimed.fence.run_id] = _LiveRun(
                            claimed.fence, self._runner.output(claimed.spec), environment
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

    async def _next_environment(self) -> str | None:
        """The environment of the run to claim next: the one this node serves, or of several,
        the one of the run the store would hand out first."""
        served = self._leaser.served()
        if len(served) == 1:
            return served[0]  # the common case costs no query
        if not served:
            return None
        ready = self._leaser.ready()
        # Every waiting run is of one environment with a sandbox free (an idle node's case): the
        # store could only answer that one.
        only = self._backlog.only_environment()
        if only is not None and only in ready:
            return only
        return await self._store.next_environment(served, ready)

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
        result = msgspec.structs.replace(result, node=self._owner.node)
        backoff = Backoff(0.5, RETRY_MAX)
        while True:
            try:
                recorded = await self._store.finish(run_id, result, chunks, files, fence=live.fence)
                break
            except StoreError as exc:
                if self._shutdown.begun:
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
            await report(self._store, run_id, result, executed=True)
        else:
            log.warning(
                "lost run %s: its lease ran out before its result was written; another node reported it",
                run_id,
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


async def report(store: Store, run_id: str, result: RunResult | None, *, executed: bool) -> None:
    """Count and log a run the store has just made final (once per run, however it ended):
    ``result`` as it was recorded, None to read it back; ``executed`` on this server."""
    try:
        record = await store.get(run_id)
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
            "environment": result.environment,
        },
    )
