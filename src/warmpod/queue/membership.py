"""This node among those sharing the run store: it joins, renews its leases, reaps lost runs, leaves."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable, Sequence

import anyio

from warmpod.environments import DEFAULT
from warmpod.errors import StoreError
from warmpod.models import NodeSeen
from warmpod.queue.store.base import Owner, Store
from warmpod.queue.workers import Workers, report
from warmpod.settings import NodeSettings

log = logging.getLogger(__name__)

STOPPED_MESSAGE = "node {node} stopped while this run was executing; it was not retried"
# How long a stopping node may take to tell the store it left.
LEAVE_TIMEOUT = 5.0


def this_node(settings: NodeSettings) -> Owner:
    """This node, by its name (the host's where none is set), and this start of it."""
    return Owner(node=settings.name or socket.gethostname(), incarnation=uuid.uuid4().hex)


class Membership:
    """Keeps this node's place in the store: each node holds the runs it claimed by a lease it
    renews, and reports the runs of nodes that stopped renewing."""

    def __init__(
        self,
        store: Store,
        owner: Owner,
        lease: float,
        workers: Workers,
        *,
        environments: Callable[[], Sequence[str]] = lambda: (DEFAULT,),
    ) -> None:
        self._store = store
        self.owner = owner
        """This node, and this start of it."""
        self._lease = lease
        self._workers = workers
        # Asked at every beat: which environments the node serves may change while it runs.
        self._environments = environments
        self.nodes: list[NodeSeen] = [
            NodeSeen(
                name=owner.node,
                incarnation=owner.incarnation,
                seen_ago=0.0,
                running=0,
                environments=list(environments()),
            )
        ]
        """The nodes seen alive at the last heartbeat."""
        self.queued_by_environment: dict[str, int] = {}
        """The runs queued at the last heartbeat, by environment (every node's)."""

    async def join(self) -> None:
        """Register this start of the node, and report what its last start left running.

        Raises:
            StoreError: the store cannot be reached, or another node of this name is alive.
        """
        lost = await self._store.join(self.owner, self._lease, STOPPED_MESSAGE)
        if lost:
            log.warning("%d run(s) were executing when this node last stopped: reported error", len(lost))
        for run_id in lost:
            await report(self._store, run_id, None, executed=False)

    async def leave(self) -> None:
        """Tell the store this node left, within LEAVE_TIMEOUT, even while being cancelled."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(LEAVE_TIMEOUT):
            try:
                await self._store.leave(self.owner)
            except StoreError as exc:
                log.warning("could not tell the store this node left: %s", exc)

    async def heartbeat(self) -> None:
        """Renew this node's leases every third of a lease and stop the runs it lost, until cancelled."""
        renewed = time.monotonic()
        while True:
            held = self._workers.held()
            began = time.monotonic()
            try:
                # Bounded by the next beat's time: a store that hangs counts as one out of reach.
                with anyio.fail_after(self._lease / 3):
                    beat = await self._store.heartbeat(
                        self.owner, self._lease, list(held.values()), self._environments()
                    )
            except (StoreError, TimeoutError) as exc:
                log.warning("could not renew this node's leases: %s", exc or "no answer in time")
                # Past the lease another node may report these runs; they must not go on unseen.
                # A store no other node shares reports none of them: they go on.
                if self._store.shared and time.monotonic() - renewed >= self._lease:
                    self._workers.unrenewed(
                        f"the run store was out of reach for its lease of {self._lease:g} s"
                    )
            else:
                renewed = began
                self.nodes = beat.nodes
                self.queued_by_environment = beat.queued_by_environment
                self._workers.renewed(held, beat.held)
                # Only the runs this node could take: another environment's would send a worker
                # to the store for nothing at every beat.
                served = self._environments()
                self._workers.top_up(sum(beat.queued_by_environment.get(name, 0) for name in served))
            # A third of a lease from this beat's start, not its end: a slow beat (a loaded store)
            # then a failed one still leave a third beat within the lease.
            await anyio.sleep(max(0.0, began + self._lease / 3 - time.monotonic()))

    async def reap(self) -> None:
        """Report other nodes' runs whose lease ran out, until cancelled. A task of its own: a
        store that hangs here (each call may wait its full timeout) must not hold back this
        node's next renewal."""
        while True:
            try:
                for run_id in await self._store.reap(STOPPED_MESSAGE):
                    log.warning("run %s lost its node (its lease ran out): reported error", run_id)
                    await report(self._store, run_id, None, executed=False)
            except StoreError as exc:
                log.warning("could not look for runs whose node stopped: %s", exc)
            await anyio.sleep(self._lease / 3)
