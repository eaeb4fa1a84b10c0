"""What a run store offers (the ``Store`` protocol) and the records it answers, shared by its two kinds."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol

import anyio
import msgspec
from anyio.abc import TaskStatus

from warmpod.environments import DEFAULT
from warmpod.models import (
    Chunk,
    NodeSeen,
    RunResult,
    RunSpec,
    RunStatus,
    RunSummary,
    WebhookState,
)
from warmpod.queue.store import outbox
from warmpod.queue.store.codec import (
    decode_blob,
)
from warmpod.queue.store.outbox import Delivery, Tried

log = logging.getLogger(__name__)
CancelOutcome = Literal["cancelled", "requested", "finished", "unknown"]
OUTPUT_PAGE = 32
"""The most chunks one ``Store.output`` call returns: readers page through a run's output, each
page at most ``OUTPUT_PAGE * CHUNK_BYTES`` (2 MiB) however many chunks the run printed."""


Added = Literal["added", "queue-full", "key-busy"]
"""What ``Store.add`` did with a run, or ``Store.add_batch`` with all of its runs."""


class Idempotency(msgspec.Struct, frozen=True, kw_only=True):
    """A submission's ``Idempotency-Key`` and the hash of what it asked to run: stored with the run
    (and purged with it), unique per API key name, so a retried submit finds its run again."""

    key: str
    request_hash: str


class Replay(msgspec.Struct, frozen=True, kw_only=True):
    """What ``Store.add`` answers when a run of the same API key already has the idempotency key."""

    run_id: str
    status: RunStatus
    same_request: bool
    """Whether that run was asked for with the same request hash (else the key was reused)."""


class BatchReplay(msgspec.Struct, frozen=True, kw_only=True):
    """What ``Store.add_batch`` answers when runs of the same API key already have the batch's
    idempotency key (``batch_keys``)."""

    runs: tuple[tuple[str, RunStatus], ...]
    """``(id, status)`` of those runs, in the batch's order: fewer than the batch once some expired."""
    same_request: bool
    """Whether they were all asked for with the same request hash (else the key was reused)."""


def batch_keys(idempotency_key: str, count: int) -> list[str]:
    """The idempotency keys the runs of a batch keyed ``idempotency_key`` are stored under, in
    order: the batch's key and the run's place, joined by a space. A client's key has no space, so
    a batch's runs never take the key of a single run, nor a single run the key of a batch's."""
    return [f"{idempotency_key} {index}" for index in range(count)]


def replayed(
    rows: Iterable[tuple[str, str, RunStatus, str | None]], keys: Sequence[str], request_hash: str | None
) -> BatchReplay | None:
    """The replay ``add_batch`` answers from the rows ``(idempotency_key, id, status,
    request_hash)`` its look-up of ``keys`` found; None, when none, for the runs to be added."""
    found = {key: (run_id, status, stored) for key, run_id, status, stored in rows}
    if not found:
        return None
    return BatchReplay(
        runs=tuple((found[key][0], found[key][1]) for key in keys if key in found),
        same_request=all(stored == request_hash for _, _, stored in found.values()),
    )


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """What the store knows of one run."""

    id: str
    status: RunStatus
    """``queued``, ``running`` or a final status of ``RunResult``."""
    key: str | None = None
    """The name of the API key that submitted it; None where keys are off."""
    created: float
    started: float | None
    finished: float | None
    result: RunResult | None
    """Set once the run is final."""
    node: str | None = None
    """The node that claimed it; None while it waits."""
    environment: str = DEFAULT
    """The environment it runs in."""
    labels: dict[str, str] = {}
    """The labels it was submitted with."""
    webhook: WebhookState | None = None
    """Its webhook's deliveries, if it has one."""


class Owner(msgspec.Struct, frozen=True, kw_only=True):
    """A node as the store knows it: its name and the id of this start of it."""

    node: str
    incarnation: str


class Fence(msgspec.Struct, frozen=True, kw_only=True):
    """The proof a claim gives: every later write of the run carries it, and one that no longer
    matches the run's owner and attempt changes nothing, so a node that lost the run finds out."""

    run_id: str
    incarnation: str
    attempt: int


class Claim(msgspec.Struct, frozen=True, kw_only=True):
    """A queued run this node now holds, under a lease."""

    fence: Fence
    spec: RunSpec


class Beat(msgspec.Struct, frozen=True, kw_only=True):
    """What a heartbeat learns: which of the node's runs it still holds, how many runs wait (in
    all and in each environment), and the nodes seen alive."""

    held: frozenset[str]
    queued: int
    nodes: list[NodeSeen]
    queued_by_environment: dict[str, int] = {}
    """Runs waiting, by the environment they name; only environments with a waiting run appear."""


Notice = Literal["queued", "changed", "cancel", "webhook", "reconnected"]
"""What ``listen`` reports, with a run id: a run was queued; a run changed (claimed, output,
final), which a queued run does only by leaving the queue; a running run was asked to stop; a
final run's webhook may be due; or, with no id, notices may have been missed."""


class RunFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which of a key's runs ``Store.list_runs`` answers: all that match every field given."""

    statuses: tuple[RunStatus, ...] = ()
    """Any of these statuses; every status when empty."""
    labels: tuple[tuple[str, str], ...] = ()
    """``(name, value)`` pairs the run's labels must all hold."""
    environment: str | None = None
    since: float | None = None
    """Created at or after it (seconds since the epoch)."""
    until: float | None = None
    """Created before it."""


class Position(msgspec.Struct, frozen=True, array_like=True):
    """Where a run stands in a key's history, newest first: its ``created``, then its row number
    on a tie. ``list_runs`` goes on after one; the HTTP cursor carries it."""

    created: float
    n: int


class Listed(msgspec.Struct, frozen=True, kw_only=True):
    """One run ``list_runs`` found, and its position (to go on after it)."""

    summary: RunSummary
    position: Position


class Store(Protocol):
    """Where runs wait and results stay; everything several warmpod nodes share lives here.

    Implementations must make ``claim`` hand each queued run to exactly one caller, accept a
    fenced write only from the run's current owner and attempt, and make ``finish`` final
    exactly once: the first final status written wins. Times are the store's clock.

    Output is kept as the chunks ``add_output`` and ``finish`` are given, and a stored chunk
    never changes: a reader that has seen up to ``seq`` N and asks for what comes after N
    (``/status/{id}/stream`` resumed with ``Last-Event-ID``) gets every later byte exactly once.
    How many chunks a run has is up to its writer: ``runner.RunOutput`` merges adjacent chunks of
    one stream up to ``CHUNK_BYTES`` until a worker takes them, at most once per
    ``workers.FLUSH_INTERVAL``, so a run keeps at most one chunk per stream switch, per
    ``CHUNK_BYTES`` and per interval, whatever the size of the program's writes. A write's chunks
    are stored packed, a row per ``ROW_SEGMENTS`` chunks or ``CHUNK_BYTES`` of data
    (``output_rows``), so a program switching streams at every byte costs the store a few bytes
    per byte, not a row per byte.

    A run's writer gives its chunks in rising seq order, each write carrying every chunk of the
    writes before it that failed, ahead of newer ones (``workers.Workers._tend`` gives them back to
    ``RunOutput`` for the next write). So a write's chunks at or below the highest seq already
    kept were kept, by an earlier write that committed though its caller saw an error: they are
    skipped, changing nothing, and only the chunks above are kept.
    """

    shared: bool
    """Whether several nodes share the store: only then may a run this node holds be reported
    by another once its lease runs out, so only then must the node stop it unrenewed."""

    async def join(self, owner: Owner, lease: float, message: str) -> list[str]:
        """At start: register ``owner``, and make runs its node's earlier starts held ``error``
        with ``message`` (``{node}`` filled in) and their output; return their ids.

        Raises:
            StoreError: another start of a node of the same name is alive.
        """
        ...

    async def leave(self, owner: Owner) -> None:
        """At a clean stop: drop ``owner`` from the nodes seen alive."""
        ...

    async def add(
        self,
        run_id: str,
        spec: RunSpec,
        *,
        max_queued: int,
        key: str | None = None,
        max_active: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Added | Replay:
        """Queue a run of ``key`` (a key's name); nothing is stored unless it is ``added``: not when
        ``max_queued`` runs already wait, nor when ``max_active`` runs of the key are queued or running,
        nor when a run of ``key`` already has ``idempotency.key`` (that run is answered, before any bound)."""
        ...

    async def add_batch(
        self,
        items: Sequence[tuple[str, RunSpec]],
        *,
        max_queued: int,
        key: str | None = None,
        max_active: int | None = None,
        idempotency: Idempotency | None = None,
    ) -> Added | BatchReplay:
        """Queue the runs ``items`` (``(run_id, spec)``) of ``key`` in one transaction, all or none:
        all are ``added`` only if the queue then holds at most ``max_queued`` runs and the key at
        most ``max_active`` queued or running, under the same guard as ``add`` (concurrent adds and
        batches never pass a bound together). With ``idempotency``, each run is stored under its
        ``batch_keys`` key with the batch's request hash, and runs of ``key`` already holding any of
        those keys are answered instead, before any bound. Every added run is notified ``queued``."""
        ...

    async def queued(self) -> list[str]:
        """The ids of the runs that wait."""
        ...

    async def claim(
        self, owner: Owner, lease: float, *, environment: str = DEFAULT, warm: bool = False
    ) -> Claim | None:
        """Give the oldest queued run of ``environment`` to ``owner`` for ``lease`` seconds; None
        when none of it waits. A run of another environment is never handed out: its sandbox could
        not run it. Within the environment:

        The oldest of those whose ``warm`` is the sandbox's (``RunSpec.warm``) comes first, unless
        another has waited ``PREFERRED_WAIT`` seconds: every run is taken within that of a free
        sandbox, whatever kind the pool makes. Among the runs that rule lets go first, a run of the
        key (NULL with keys off counts as one key) with the fewest runs ``running`` comes first,
        the oldest of them on a tie: a key that queued many runs does not make another key's run
        wait behind all of them, and with a single key the order is submission order."""
        ...

    async def next_environment(self, environments: Sequence[str], ready: Sequence[str] = ()) -> str | None:
        """The environment, among ``environments``, of the queued run to claim next; None when no
        run of them waits. It claims nothing.

        A run of the ``ready`` environments (a sandbox of it is free now) comes first, unless
        another has waited ``PREFERRED_WAIT`` seconds: a cheap run is not held behind the runs of
        an environment whose sandboxes are all busy, and every run is taken within that wait. Then
        ``claim``'s order without the warm rule: the run of the key with the fewest runs
        ``running`` first, the oldest of them on a tie, so a key flooding one environment does not
        hold back another key's run of another. A worker asks it, leases a sandbox of the answer,
        then claims with that ``environment`` (another node may have taken the run meanwhile)."""
        ...

    async def heartbeat(
        self, owner: Owner, lease: float, fences: Sequence[Fence], environments: Sequence[str] = (DEFAULT,)
    ) -> Beat:
        """Renew the leases of the runs ``owner`` holds by ``fences`` for ``lease`` seconds and
        record that it is alive, serving ``environments`` (``NodeSeen.environments``)."""
        ...

    async def reap(self, message: str) -> list[str]:
        """Make runs whose lease ran out ``error`` with ``message`` (``{node}``: their node's name)
        and the output they had printed; return their ids. They are never queued again."""
        ...

    async def add_output(self, fence: Fence, chunks: Sequence[Chunk]) -> bool:
        """Keep more of a running run's output; False, keeping nothing, if ``fence`` lost the run."""
        ...

    async def finish(
        self,
        run_id: str,
        result: RunResult,
        chunks: Sequence[Chunk] = (),
        files: Sequence[tuple[str, bytes]] = (),
        *,
        fence: Fence | None = None,
    ) -> bool:
        """Record the run's last output, final result and ``(path, content)`` of the files it
        left (those ``result.files`` lists); False, keeping nothing, if it was already final or
        ``fence`` lost it. Without a fence (a run that never started) any owner's run is ended.

        True, changing nothing, when this very result is already recorded under ``fence``: a
        retry of a write that took effect though its answer was lost learns that it did."""
        ...

    async def file_size(self, run_id: str, path: str) -> int | None:
        """The size in bytes of a file the run left, or None; its content is not read."""
        ...

    async def file_piece(self, run_id: str, path: str, offset: int, size: int) -> bytes | None:
        """At most ``size`` bytes of a file the run left from ``offset`` on (none past its end), or
        None: a download reads a file in such pieces, never holding it whole."""
        ...

    async def small_files(self, run_id: str, max_bytes: int, total_bytes: int) -> dict[str, bytes]:
        """The content of the files ``inlined`` picks among those the run left, by path: no other
        file's bytes are read."""
        ...

    async def get(self, run_id: str) -> Record | None:
        """The run's record, or None for an id never stored (or purged)."""
        ...

    async def list_runs(
        self, key: str | None, where: RunFilter, after: Position | None, limit: int
    ) -> list[Listed]:
        """At most ``limit`` of the runs of ``key`` (None: those submitted with keys off) that
        ``where`` picks, newest first (by ``created``, then the row number), after ``after``.
        Another key's runs are never answered, whatever ``after`` says. An index serves every
        filter: a key's runs by time, by status and time, and by label and time."""
        ...

    async def claim_webhook(self, lease: float, skip: Sequence[str | None] = ()) -> Delivery | None:
        """Take the webhook due the longest, not of the keys in ``skip``, for one try of at most
        ``lease`` seconds: its row is not due again before then, so no other node tries it
        meanwhile, and a node lost in the try leaves it to the next. None when none is due."""
        ...

    async def record_webhook(self, delivery: Delivery, tried: Tried) -> bool:
        """Keep how ``delivery``'s try went; False, changing nothing, when the webhook was
        claimed again since (the try outlived its lease)."""
        ...

    async def output(self, run_id: str, after: int = -1, limit: int = OUTPUT_PAGE) -> list[Chunk]:
        """The first ``limit`` of the run's output chunks with ``seq`` above ``after``, in order:
        fewer than ``limit`` when those are all there are. A page may end inside a stored row; the
        next call, after the last seq returned, goes on from there."""
        ...

    async def cancel(self, run_id: str, result: RunResult) -> CancelOutcome:
        """Cancel a queued run (it becomes ``result``) or flag a running one to be stopped."""
        ...

    async def cancel_requested(self, run_id: str) -> bool:
        """Whether ``cancel`` flagged this running run."""
        ...

    async def purge(self, retention: float) -> int:
        """Delete runs that ended more than ``retention`` seconds ago; return how many."""
        ...

    async def listen(
        self,
        notice: Callable[[Notice, str], None],
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Call ``notice`` for every change any node makes, until cancelled."""
        ...

    async def aclose(self) -> None:
        """Release the store."""
        ...


def lost_result(run_id: str, node: str | None, message: str, printed: tuple[str, str]) -> RunResult:
    """The ``error`` result of a run its node stopped holding, with what it printed: ``(stdout, stderr)``."""
    stdout, stderr = printed
    return RunResult.from_server(
        run_id,
        "error",
        stdout=stdout,
        stderr=stderr,
        error=message.format(node=node or "?"),
        node=node,
    )


GET = (
    "SELECT status, key, created, started, finished, result, node, environment, labels, "  # noqa: S608  (constants only)
    f"{outbox.COLUMNS} FROM runs LEFT JOIN webhooks w ON w.run_id = runs.id WHERE runs.id = ?"
)
"""``Store.get``'s statement (``?`` placeholder): ``record``'s arguments after the run id."""

PREFERRED_WAIT = 1.0
"""Seconds a queued run waits for a sandbox of its kind before any sandbox takes it (``claim``)."""


async def unreadable(store: Store, fence: Fence, exc: msgspec.DecodeError) -> None:
    """End a claimed run whose spec this version cannot read: queued runs outlive restarts and
    upgrades, and one such row must not stop every start; the rest of the queue goes on."""
    log.error("queued run %s cannot be read from the store: %s", fence.run_id, exc)
    message = f"the queued run could not be read from the run store: {exc}"
    await store.finish(fence.run_id, RunResult.from_server(fence.run_id, "error", error=message), fence=fence)


def record(
    run_id: str,
    status: RunStatus,
    key: str | None,
    created: float,
    started: float | None,
    finished: float | None,
    blob: bytes | None,
    node: str | None,
    environment: str,
    labels: str | None = None,
    *webhook: object,
) -> Record:
    """A run's record from its stored row, then its webhook's ``outbox.COLUMNS``; its result
    names the run's environment, labels and webhook, whoever wrote it (a cancel while queued, a
    reaper)."""
    result = None if blob is None else decode_blob(bytes(blob), RunResult)
    kept = stored_labels(labels)
    state = outbox.state(webhook) if webhook else None
    if result is not None:
        result.environment = environment
        result.labels = kept
        result.webhook = state
    return Record(
        id=run_id,
        status=status,
        key=key,
        created=created,
        started=started,
        finished=finished,
        result=result,
        node=node,
        environment=environment,
        labels=kept,
        webhook=state,
    )


def labels_column(spec: RunSpec) -> str | None:
    """A run's labels as its row keeps them: a JSON object, or NULL for none."""
    return msgspec.json.encode(dict(spec.labels)).decode() if spec.labels else None


def stored_labels(column: str | None) -> dict[str, str]:
    """The labels ``labels_column`` stored."""
    return {} if not column else msgspec.json.decode(column, type=dict[str, str])


def summary(
    run_id: str,
    status: RunStatus,
    created: float,
    started: float | None,
    finished: float | None,
    environment: str,
    labels: str | None,
    exit_code: int | None,
    duration_ms: float | None,
    node: str | None,
    n: int,
) -> Listed:
    """A listed run from the columns ``history.COLUMNS`` names, in that order."""
    return Listed(
        summary=RunSummary(
            id=run_id,
            status=status,
            created=created,
            started=started,
            finished=finished,
            environment=environment,
            labels=stored_labels(labels),
            exit_code=exit_code,
            duration_ms=duration_ms,
            node=node,
        ),
        position=Position(created, n),
    )


def inlined(sizes: Iterable[tuple[str, int]], max_bytes: int, total_bytes: int) -> list[str]:
    """Of a run's files, given as ``(path, size)``, those an answer carries inline: in path order,
    each of at most ``max_bytes`` that still fits in what is left of ``total_bytes``."""
    paths, left = [], total_bytes
    for path, size in sorted(sizes):
        if size <= min(max_bytes, left):
            paths.append(path)
            left -= size
    return paths
