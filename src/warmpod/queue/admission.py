"""Taking runs into the queue, one or a batch: its bound, retried submits, how many wait, the stop."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

import anyio

from warmpod.errors import InvalidBatch, KeyBusy, KeyReused, QueueFull, ShuttingDown, StoreError
from warmpod.keys import Key
from warmpod.models import RunSpec, RunStatus
from warmpod.queue.store.base import Added, BatchReplay, Idempotency, Replay, Store
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

        async def add(run_ids: list[str], max_queued: int) -> Added | BatchReplay:
            added = await self._store.add(
                run_ids[0],
                spec,
                max_queued=max_queued,
                key=None if key is None else key.name,
                max_active=None if key is None else key.max_active,
                idempotency=idempotency,
            )
            if isinstance(added, Replay):
                return BatchReplay(runs=((added.run_id, added.status),), same_request=added.same_request)
            return added

        (taken,) = await self._take([spec], key, idempotency_key, add)
        return taken

    async def take_batch(
        self, specs: Sequence[RunSpec], key: Key | None = None, idempotency_key: str | None = None
    ) -> list[tuple[str, RunStatus]]:
        """Queue the runs ``specs`` of ``key`` together, all or none, and return their ids and
        statuses in order; with ``idempotency_key``, the runs of a batch of ``key`` submitted
        before with it are answered instead, never run again.

        Raises:
            InvalidBatch: more runs than the queue or the key's quota could ever hold at once.
            KeyReused: ``idempotency_key`` names runs of ``key`` asked for with another batch, or
                some of the batch's runs expired.
            ShuttingDown: the server is stopping (a retry of a stored batch is still answered).
            KeyBusy: the key's ``max_active`` has no room for all of them.
            QueueFull: the queue has no room for all of them.
        """
        self.check_batch(len(specs), key)
        idempotency = None
        if idempotency_key is not None:
            digests = b"".join(hashlib.sha256(encode_blob(spec)).digest() for spec in specs)
            idempotency = Idempotency(key=idempotency_key, request_hash=hashlib.sha256(digests).hexdigest())

        async def add(run_ids: list[str], max_queued: int) -> Added | BatchReplay:
            return await self._store.add_batch(
                list(zip(run_ids, specs, strict=True)),
                max_queued=max_queued,
                key=None if key is None else key.name,
                max_active=None if key is None else key.max_active,
                idempotency=idempotency,
            )

        return await self._take(specs, key, idempotency_key, add)

    def check_batch(self, count: int, key: Key | None = None) -> None:
        """Refuse a batch of ``count`` runs of ``key`` that holds none, more than ``max_batch``, or
        more than the queue or the key's quota could ever hold at once: a 429 would have it retried
        in vain.

        Raises:
            InvalidBatch: it does; the message names the bound.
        """
        if not 1 <= count <= self._settings.max_batch:
            raise InvalidBatch(
                f"a batch holds 1 to {self._settings.max_batch} runs (WARMPOD_QUEUE__MAX_BATCH), not {count}"
            )
        if count > self._settings.max_queued:
            raise InvalidBatch(
                f"a batch of {count} runs can never fit a queue of {self._settings.max_queued} "
                "(WARMPOD_QUEUE__MAX_QUEUED): send fewer at once"
            )
        if key is not None and key.max_active is not None and count > key.max_active:
            raise InvalidBatch(
                f"a batch of {count} runs can never fit the key {key.name!r}'s max_active of "
                f"{key.max_active}: send fewer at once"
            )

    async def _take(
        self, specs: Sequence[RunSpec], key: Key | None, idempotency_key: str | None, add: _Add
    ) -> list[tuple[str, RunStatus]]:
        """Store ``specs`` by ``add`` under fresh ids, within the bounds, and answer them (or the
        runs a retry names), raising what a refusal means."""
        if idempotency_key is None and self._shutdown.begun:
            raise _shutting_down()
        run_ids = [uuid.uuid4().hex for _ in specs]
        # Before the add: the store's notice of it may reach a worker before the add returns.
        for run_id, spec in zip(run_ids, specs, strict=True):
            self.backlog.expect(run_id, spec.environment)
        try:
            # A stopping server still answers a retry of runs it stored, and stores no new one.
            added = await self._stored(run_ids, add, 0 if self._shutdown.begun else self._settings.max_queued)
        except BaseException:
            for run_id in run_ids:
                self.backlog.forget(run_id)
            raise
        if added != "added":
            for run_id in run_ids:
                self.backlog.forget(run_id)
        if isinstance(added, BatchReplay):
            return _replayed(added, len(specs), idempotency_key)
        if self._shutdown.begun:
            raise _shutting_down()
        if added == "key-busy":
            assert key is not None
            raise KeyBusy(
                f"the key {key.name!r} has {key.max_active} runs queued or running, its max_active: "
                "retry when one has ended"
                if len(specs) == 1
                else f"the key {key.name!r} has no room for {len(specs)} more runs within its "
                f"max_active of {key.max_active} queued or running: retry when some have ended"
            )
        if added == "queue-full":
            raise QueueFull(
                f"the queue is full: {self._settings.max_queued} runs are waiting (WARMPOD_QUEUE__MAX_QUEUED)"
                if len(specs) == 1
                else f"the queue has no room for {len(specs)} more runs: it holds at most "
                f"{self._settings.max_queued} waiting (WARMPOD_QUEUE__MAX_QUEUED)"
            )
        return [(run_id, "queued") for run_id in run_ids]

    async def _stored(self, run_ids: list[str], add: _Add, max_queued: int) -> Added | BatchReplay:
        """What ``add`` did with ``run_ids``; "added" when it failed though they are stored."""
        try:
            return await add(run_ids, max_queued)
        except StoreError as exc:
            # The add's COMMIT may have gone through with only its answer lost: stored runs are
            # answered with their ids, or a client would submit them again. A batch is stored
            # whole or not at all, so its first run tells.
            try:
                stored = await self._store.get(run_ids[0])
            except StoreError:
                raise exc from None
            if stored is None:
                raise
            log.warning("run %s was stored though the store's answer was lost: %s", run_ids[0], exc)
            return "added"


_Add = Callable[[list[str], int], Awaitable[Added | BatchReplay]]
"""A store's add of runs under the given ids, within the given queue bound."""


def _replayed(replay: BatchReplay, count: int, idempotency_key: str | None) -> list[tuple[str, RunStatus]]:
    """The runs a retried submit names, once they are all there and were asked for alike."""
    if not replay.same_request:
        raise KeyReused(
            f"the Idempotency-Key {idempotency_key!r} was used for another request (run "
            f"{replay.runs[0][0]}): send a new key for a new run"
        )
    if len(replay.runs) < count:
        raise KeyReused(
            f"the Idempotency-Key {idempotency_key!r} names a batch of which only {len(replay.runs)} "
            f"of {count} runs are still kept (the others expired): send a new key"
        )
    return list(replay.runs)


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("warmpod is shutting down and takes no new runs; retry on another server or later")
