"""Taking runs into the queue: its bound, retried submits, how many runs wait, and its closing at a stop."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from typing import Literal

import anyio

from warmpod.errors import KeyBusy, KeyReused, QueueFull, ShuttingDown, StoreError
from warmpod.keys import Key
from warmpod.models import RunSpec, RunStatus
from warmpod.queue.store.base import Idempotency, Replay, Store
from warmpod.queue.store.codec import encode_blob
from warmpod.settings import QueueSettings

log = logging.getLogger(__name__)

_Heard = tuple[Literal["queued", "changed"], str]


class Shutdown:
    """Whether the server is stopping: from then no run is taken nor started, and running ones
    have until a deadline to end."""

    def __init__(self) -> None:
        self._deadline: float | None = None

    @property
    def begun(self) -> bool:
        """Whether the server is stopping."""
        return self._deadline is not None

    def begin(self, grace: float) -> None:
        """Stop taking and starting runs; running ones get ``grace`` seconds (safe in a signal handler)."""
        if self._deadline is None:
            self._deadline = time.monotonic() + grace

    def grace_left(self) -> float:
        """Seconds left for running runs to end (none before ``begin``)."""
        return 0.0 if self._deadline is None else max(0.0, self._deadline - time.monotonic())


class Backlog:
    """The runs waiting in the shared queue, on any node, by id: the store's notices add and remove
    them, and a reading of the store (at start, and after notices may have been missed) sets them.

    Kept by id rather than counted up and down: a run is in the queue or not, however often and in
    whatever order this node hears of it, so the count never drifts nor drops below zero.
    """

    def __init__(self) -> None:
        self._ids: set[str] = set()
        # The environment of each run this node queued, until it is no longer queued.
        self._environments: dict[str, str] = {}
        # While the store is read, what was heard meanwhile: it goes over the reading, which may
        # predate it (the notices of a PostgreSQL store come on a connection of their own).
        self._heard: list[_Heard] | None = None
        self._reading = anyio.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def heard(self, notice: Literal["queued", "changed"], run_id: str) -> None:
        """A notice of the store: ``queued`` adds the run; ``changed`` means it is no longer queued
        (it was claimed, cancelled or ended), if it ever was."""
        if notice == "queued":
            self._ids.add(run_id)
        else:
            self._ids.discard(run_id)
            self._environments.pop(run_id, None)
        if self._heard is not None:
            self._heard.append((notice, run_id))

    async def read(self, store: Store) -> int:
        """Take the runs the store holds queued now, and what was heard while it was read; return
        how many wait.

        Raises:
            StoreError: the store cannot be read.
        """
        async with self._reading:
            self._heard = heard = list[_Heard]()
            try:
                queued = await store.queued()
            finally:
                self._heard = None
            self._ids = set(queued)
            for notice, run_id in heard:
                self.heard(notice, run_id)
            self._environments = {i: e for i, e in self._environments.items() if i in self._ids}
        return len(self._ids)

    def expect(self, run_id: str, environment: str) -> None:
        """This node is queueing ``run_id`` of ``environment`` (``forget`` it if it was not added)."""
        self._environments[run_id] = environment

    def forget(self, run_id: str) -> None:
        """A run ``expect`` announced was not queued after all."""
        self._environments.pop(run_id, None)

    def only_environment(self) -> str | None:
        """The environment of every waiting run, when this node queued them all and they share one;
        else None (the store knows)."""
        if not self._ids or len(self._environments) < len(self._ids):
            return None
        environments = {self._environments.get(run_id) for run_id in self._ids}
        return next(iter(environments)) if len(environments) == 1 else None


class Admission:
    """Stores submitted runs in the queue, within its bound and each key's, once per idempotency key."""

    def __init__(self, store: Store, settings: QueueSettings, shutdown: Shutdown) -> None:
        self._store = store
        self._settings = settings
        self._shutdown = shutdown
        self.backlog = Backlog()
        """The runs waiting, on any node, as this node has heard of them."""

    @property
    def queued(self) -> int:
        """Runs waiting for a sandbox, on any node."""
        return len(self.backlog)

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
        elif self._shutdown.begun:
            raise _shutting_down()
        run_id = uuid.uuid4().hex
        # Before the add: the store's notice of it may reach a worker before the add returns.
        self.backlog.expect(run_id, spec.environment)
        try:
            added = await self._store.add(
                run_id,
                spec,
                # A stopping server still answers a retry of a run it stored, and stores no new one.
                max_queued=0 if self._shutdown.begun else self._settings.max_queued,
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
                self.backlog.forget(run_id)
                raise exc from None
            if stored is None:
                self.backlog.forget(run_id)
                raise
            log.warning("run %s was stored though the store's answer was lost: %s", run_id, exc)
            added = "added"
        if added != "added":
            self.backlog.forget(run_id)
        if isinstance(added, Replay):
            if not added.same_request:
                raise KeyReused(
                    f"the Idempotency-Key {idempotency_key!r} was used for another request (run "
                    f"{added.run_id}): send a new key for a new run"
                )
            return added.run_id, added.status
        if self._shutdown.begun:
            raise _shutting_down()
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


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("warmpod is shutting down and takes no new runs; retry on another server or later")
