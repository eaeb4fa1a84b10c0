"""This node's share of the queue: admission, results, workers and membership on one store, served as one."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import TaskGroup, TaskStatus

from warmpod.errors import StoreError
from warmpod.queue.admission import Admission, Shutdown
from warmpod.queue.deliveries import Deliveries
from warmpod.queue.membership import Membership, this_node
from warmpod.queue.results import Results
from warmpod.queue.store.base import Notice, Store
from warmpod.queue.workers import Workers
from warmpod.sandbox.runner import Leaser, Runner
from warmpod.settings import FileSettings, NodeSettings, QueueSettings

log = logging.getLogger(__name__)


class QueueNode:
    """The parts of the queue on this node, made over one store: each owns its operations (the
    HTTP routes call them directly); this starts them together and routes the store's notices."""

    def __init__(
        self,
        store: Store,
        leaser: Leaser,
        runner: Runner,
        settings: QueueSettings,
        workers: int,
        files: FileSettings | None = None,
        node: NodeSettings | None = None,
        deliveries: Deliveries | None = None,
    ) -> None:
        node = node or NodeSettings()
        owner = this_node(node)
        self.store = store
        self.shutdown = Shutdown()
        """Whether the server is stopping: no new runs are taken or started."""
        self.admission = Admission(store, settings, self.shutdown)
        self.results = Results(store, settings, files or FileSettings(), self.shutdown)
        self.workers = Workers(
            store,
            leaser,
            runner,
            self.results,
            self.shutdown,
            owner,
            node.lease,
            workers,
            self.admission.backlog,
        )
        self.membership = Membership(store, owner, node.lease, self.workers, environments=leaser.served)
        self.deliveries = deliveries
        """Webhooks this node delivers; None where the server sends none."""
        self._tg: TaskGroup | None = None

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Join the store, report what this node's last start left running, then run queued runs
        until cancelled, and leave.

        Raises:
            StoreError: the store cannot be reached, or another node of this name is alive.
        """
        await self.membership.join()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self.store.listen, self._on_notice)
                queued = await self.admission.backlog.read(self.store)
                if queued:
                    log.info("%d queued run(s) wait in the store and will run now", queued)
                self.workers.top_up(queued)
                tg.start_soon(self.workers.serve)
                tg.start_soon(self.membership.heartbeat)
                tg.start_soon(self.membership.reap)
                tg.start_soon(self.results.purge_expired)
                if self.deliveries is not None:
                    tg.start_soon(self.deliveries.serve)
                task_status.started()
        finally:
            self._tg = None
            await self.membership.leave()

    def _on_notice(self, notice: Notice, run_id: str) -> None:
        """What the store reports any node did (called on the event loop, so it must not block)."""
        if notice == "queued":
            self.admission.backlog.heard("queued", run_id)
            self.workers.announce()
        elif notice == "changed":
            self.admission.backlog.heard("changed", run_id)
            self.results.notify(run_id)
        elif notice == "cancel":
            self.workers.stop(run_id)
        elif notice == "webhook":
            if self.deliveries is not None:
                self.deliveries.wake()
        elif self._tg is not None:  # reconnected: look for what was missed meanwhile
            self._tg.start_soon(self._resync)

    async def _resync(self) -> None:
        """After notices may have been missed: wake every waiter, look for cancels, work and webhooks."""
        self.results.notify_all()
        if self.deliveries is not None:
            self.deliveries.wake()
        try:
            await self.workers.recheck_cancels()
            self.workers.top_up(await self.admission.backlog.read(self.store))
        except StoreError as exc:
            log.warning("could not look for missed changes in the store: %s", exc)
