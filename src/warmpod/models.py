"""The API's request and response bodies."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

RunStatus = Literal["queued", "running", "succeeded", "failed", "timeout", "error", "cancelled"]

LimitName = Literal["wall_time", "cpu_time", "memory", "pids", "output", "disk"]
"""The limits a run can hit (``RunResult.limits_hit``)."""


class InputFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A file written under the program's working directory before it starts."""

    path: str
    """A relative POSIX path such as ``data/sales.csv``; parent directories are created."""
    content: str
    """The file's bytes in base64."""


class OutputFile(msgspec.Struct, kw_only=True):
    """A file the program left under ``out/``, collected after it ended."""

    path: str
    """Its path from the working directory, ``out/...``."""
    size: int
    media_type: str
    """Guessed from the name; ``application/octet-stream`` when unknown."""
    content: str | None = None
    """The bytes in base64, or null when the file is above the server's inline cap or past what
    one answer carries inline (``files.inline_bytes``, ``files.inline_total_bytes``): then
    download it from ``url``."""
    url: str | None = None
    """Where its bytes download from, inline or not: ``/status/{id}/files/{path}`` with the path
    percent-encoded, under the server's URL."""


class RunRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A program to run, posted as JSON to ``/run-json/``."""

    code: str | msgspec.UnsetType = msgspec.UNSET
    """The Python source, written as the entrypoint (``main.py`` unless named) and run as
    ``__main__`` in a fresh interpreter; absent when the entrypoint is one of ``files``."""
    stdin: str = ""
    """What the program reads from standard input."""
    files: list[InputFile] = []
    """The project's files (modules, packages, data), written under the working directory
    ``/work`` before the program starts."""
    entrypoint: str | None = None
    """The path the program runs as, ``python3 ENTRYPOINT ARGS`` from ``/work`` would: its
    directory first on ``sys.path``, then ``/work``. One of ``files`` when ``code`` is absent;
    ``main.py`` by default."""
    args: list[str] = []
    """``sys.argv[1:]``."""
    env: dict[str, str] = {}
    """Environment variables added for this run: plain names, not one warmpod sets itself."""
    secrets: list[str] = []
    """Names of the operator's secrets to hand the program as environment variables; their
    values are masked (``***``) in its output and never stored."""
    sources: list[str] = []
    """Names of the operator's data sources the program may reach: each is relayed from
    ``WARMPOD_SOURCE_<NAME>`` (``127.0.0.1:PORT``, with ``_HOST`` and ``_PORT``) inside the sandbox
    to its upstream, within the source's limits, until the run ends."""
    environment: str = "default"
    """The library set the program runs with, one of those ``GET /environments`` lists."""
    labels: dict[str, str] = {}
    """Names and values kept with the run, returned with it and filterable in ``GET /runs``: at
    most 16, names 1-63 characters of ``a-z 0-9 _ . -`` starting with a letter or digit, values
    at most 256 printable characters."""
    callback_url: str | msgspec.UnsetType | None = msgspec.UNSET
    """Where the run's result is posted, signed (Standard Webhooks), once it is final: an
    ``http(s)`` URL under one of the server's ``WARMPOD_WEBHOOKS__ALLOW`` prefixes. Absent: the
    key's own endpoint, if it has one; null: no webhook."""
    timeout: Annotated[float, Meta(gt=0)] | None = None
    """Wall-time limit in seconds; the server's default when absent, at most its maximum."""
    cpu_time: Annotated[int, Meta(gt=0)] | None = None
    """CPU seconds of the whole run; at most the server's ``limits.cpu_time``."""
    memory_mb: Annotated[int, Meta(gt=0)] | None = None
    """Memory in MiB, swap included; at most the server's ``limits.memory_mb``."""
    max_output_bytes: Annotated[int, Meta(gt=0)] | None = None
    """Output kept per stream; at most the server's ``limits.max_output_bytes``."""
    wait: bool = True
    """Answer with the result when the run ends (200); false answers 202 at once with the run's
    ``status_url`` to poll."""


class Accepted(msgspec.Struct, kw_only=True):
    """A run taken into the queue, answered at once (202) to a request with ``wait`` false."""

    id: str
    status: RunStatus
    status_url: str
    """``GET`` it for the RunResult; ``DELETE`` it to cancel the run."""
    stream_url: str
    """Server-Sent Events of the run's output as it is printed, then its RunResult."""


class BatchRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Runs to queue together, posted as JSON to ``/runs/batch``: all of them, or none."""

    runs: list[RunRequest]
    """Each as ``/run-json/`` takes it, ``wait`` absent or false (a batch is never waited for):
    1 to the server's ``queue.max_batch`` of them."""


class BatchAccepted(msgspec.Struct, kw_only=True):
    """The runs of a batch, taken into the queue together (202), in the order they were sent."""

    runs: list[Accepted]


class RunSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A run as accepted (internal): the program and its limits, every one resolved."""

    code: bytes
    stdin: bytes
    timeout: float
    cpu_time: int
    memory_mb: int
    max_output_bytes: int
    files: tuple[tuple[str, bytes], ...] = ()
    """``(path, content)`` of each input file, paths checked."""
    entrypoint: str = "main.py"
    """The path the program runs as; ``code`` is written there unless it is one of the files."""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    secrets: tuple[str, ...] = ()
    """The names of the secrets it asked for: the node that runs it resolves their values."""
    sources: tuple[str, ...] = ()
    """The names of the data sources it asked for: the node that runs it resolves their addresses."""
    warm: bool = False
    """It imports libraries: a sandbox whose interpreter preloaded them serves it best."""
    environment: str = "default"
    """The environment whose sandboxes alone may run it."""
    labels: tuple[tuple[str, str], ...] = ()
    """``(name, value)`` of its labels, sorted by name, checked (``labels.checked_labels``)."""
    callback_url: str | None = None
    """Where its webhook goes (its own ``callback_url`` or its key's endpoint), checked against the
    allow-list; None for none."""


class SourceUse(msgspec.Struct, kw_only=True):
    """What a run did with one of its data sources, as the server's relay counted it."""

    connections: int = 0
    """Connections relayed to the upstream."""
    refused: int = 0
    """Connections closed at once: past the source's ``max_connections`` or its byte caps, or the
    upstream could not be reached."""
    bytes_in: int = 0
    """Bytes from the upstream to the program."""
    bytes_out: int = 0
    """Bytes from the program to the upstream."""


WebhookStatus = Literal["waiting", "pending", "delivered", "failed"]


class WebhookState(msgspec.Struct, kw_only=True):
    """Where a run's webhook stands: every try's outcome is kept on the run."""

    url: str
    state: WebhookStatus
    """``waiting`` for the run to end; ``pending``, due or being retried; ``delivered`` (a 2xx
    answer); ``failed``, given up after ``WARMPOD_WEBHOOKS__ATTEMPTS`` tries."""
    attempts: int
    """Tries so far."""
    last_status: int | None
    """The HTTP status of the latest try's answer; null when it got none."""
    last_error: str | None
    """Why the latest try did not deliver: the answer's status, no answer, or a refused address."""
    delivered_at: float | None
    """When a try was answered 2xx, in seconds since the epoch (the store's clock)."""
    next_attempt_at: float | None
    """When it is tried next, while ``pending``."""


class RunResult(msgspec.Struct, kw_only=True):
    """How a run ended and what it printed."""

    id: str
    status: RunStatus
    """``queued`` or ``running`` while it is not over; then ``succeeded`` (exit 0), ``failed``
    (non-zero exit or killed by a signal), ``timeout`` (wall time exceeded), ``error`` (warmpod
    could not run it, or the server stopped while it ran) or ``cancelled`` (``DELETE`` stopped it)."""
    exit_code: int | None
    """The exit status; ``-N`` when killed by signal N; null when it never ran to an end."""
    stdout: str
    """What the program printed (so far, while it runs)."""
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    limits_hit: list[str]
    """Which limits stopped the run: ``wall_time``, ``cpu_time``, ``memory``, ``pids``, ``output``,
    ``disk``."""
    duration_ms: float
    """Wall time of the program itself (0 until it ends)."""
    error: str | None = None
    """What went wrong, when ``status`` is ``error``."""
    files: list[OutputFile] = []
    """What the program left under ``out/`` (regular files only, in path order)."""
    files_truncated: bool = False
    """Files were dropped, or left uncollected, because of the server's count or size caps, or
    because their names are not UTF-8."""
    node: str | None = None
    """The node that ran it (``WARMPOD_NODE__NAME``); null while it is queued."""
    sources: dict[str, SourceUse] = {}
    """What the program did with each data source it asked for, by name (empty when it asked for none)."""
    environment: str = "default"
    """The environment it ran in (or was to run in)."""
    labels: dict[str, str] = {}
    """The labels it was submitted with."""
    webhook: WebhookState | None = None
    """Its webhook's deliveries; null when it has none."""

    @classmethod
    def from_server(
        cls,
        run_id: str,
        status: RunStatus,
        *,
        stdout: str = "",
        stderr: str = "",
        exit_code: int | None = None,
        limits_hit: Sequence[str] = (),
        duration_ms: float = 0.0,
        error: str | None = None,
        node: str | None = None,
        environment: str = "default",
        labels: dict[str, str] | None = None,
    ) -> RunResult:
        """A result the server states itself, with no result from the agent: nothing marked truncated."""
        return cls(
            id=run_id,
            status=status,
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            stdout_truncated=False,
            stderr_truncated=False,
            limits_hit=list(limits_hit),
            duration_ms=duration_ms,
            error=error,
            node=node,
            environment=environment,
            labels=labels or {},
        )


class WebhookEvent(msgspec.Struct, kw_only=True):
    """What a webhook posts: the run's result once it is final, files as metadata only."""

    type: Literal["run.finished"]
    timestamp: str
    """When this try was sent (RFC 3339, UTC)."""
    data: RunResult
    """The run as ``GET /status/{id}`` answers it, with each file's ``content`` null (its ``url``
    downloads it) and ``webhook`` null."""


class RunSummary(msgspec.Struct, kw_only=True):
    """One run as ``GET /runs`` lists it: its state and labels, never its output or files."""

    id: str
    status: RunStatus
    created: float
    """When it was submitted, in seconds since the epoch (the store's clock)."""
    started: float | None
    """When a node took it; null while it waits (or if it never ran)."""
    finished: float | None
    """When it ended; null until then."""
    environment: str
    labels: dict[str, str]
    exit_code: int | None = None
    """The program's exit status, once it ran to an end."""
    duration_ms: float | None = None
    """Wall time of the program itself, once it ended."""
    node: str | None = None
    """The node that took it."""


class RunPage(msgspec.Struct, kw_only=True):
    """A page of ``GET /runs``: the caller's runs, newest first, and where the next page starts."""

    runs: list[RunSummary]
    next: str | None
    """Send it as ``cursor`` for the next page; null on the last page."""


class PoolCounts(msgspec.Struct, kw_only=True):
    """How many pool containers are in each state."""

    ready: int
    busy: int
    starting: int
    closing: int = 0
    """Being removed after their run: still alive, so counted toward the pool's maximum."""
    target: int
    environments: dict[str, EnvironmentPoolCounts] = {}
    """The same counts for each environment's sandboxes."""


class EnvironmentPoolCounts(msgspec.Struct, kw_only=True):
    """How many of one environment's sandboxes are in each state, and how many it keeps ready."""

    ready: int
    busy: int
    starting: int
    target: int
    """Ready ones it aims for now: its ``min_warm``, plus its share of the runs' demand."""
    min_warm: int
    waiting: int = 0
    """Runs of it on this node waiting for one of its sandboxes."""


class QueueCounts(msgspec.Struct, kw_only=True):
    """Runs waiting in the queue (every node's, which all share it) and executing on this node."""

    queued: int
    running: int
    max_queued: int
    unserved: dict[str, int] = {}
    """Queued runs by environment, of the environments no live node serves: they wait until one does."""


class NodeInfo(msgspec.Struct, kw_only=True):
    """This warmpod node: its name and the id of this start of it."""

    name: str
    incarnation: str


class NodeSeen(msgspec.Struct, kw_only=True):
    """A node of the same queue whose heartbeat the store holds within the lease."""

    name: str
    incarnation: str
    seen_ago: float
    """Seconds since its last heartbeat, by the store's clock."""
    running: int
    """Runs it holds now."""
    environments: list[str] = []
    """The environments it holds ready sandboxes of, and so takes runs of."""


class LimitEnforcement(msgspec.Struct, kw_only=True):
    """Which layer enforces one limit on this host; ``layer`` is null when nothing does."""

    limit: str
    layer: str | None
    mechanism: str


class Health(msgspec.Struct, kw_only=True):
    """The service's state, from ``GET /health``."""

    status: Literal["ok", "starting", "stopping", "unavailable"]
    image: str
    podman_version: str
    pool: PoolCounts
    queue: QueueCounts
    rootless: bool
    cgroup_version: int
    paused_idle: bool
    landlock_abi: int
    """Landlock ABI confining the program's writes (0: not available on this host)."""
    limits: list[LimitEnforcement]
    last_error: str | None = None
    preload: list[str] = []
    """Modules every pooled interpreter imports before its run (``WARMPOD_POOL__PRELOAD``)."""
    preload_failed: list[str] = []
    """Of those, the ones that failed to import: runs work, but pay for them themselves."""
    node: NodeInfo | None = None
    """This node."""
    nodes: list[NodeSeen] = []
    """Every node seen alive on the same queue, this one included (one with SQLite)."""


class Problem(msgspec.Struct, kw_only=True):
    """An RFC 9457 problem (``application/problem+json``): the body of every error answer."""

    status: int
    title: str
    detail: str
    type: str = "about:blank"
    """A URI naming the kind of problem (``https://warmpod.dev/problems/...``); absent for HTTP's own."""


class Environment(msgspec.Struct, frozen=True, kw_only=True):
    """What user code runs with: pin a script to these versions to get what it was written for."""

    python: str
    """The runner's CPython version, e.g. ``3.13.5``."""
    packages: dict[str, str]
    """Every installed distribution (its normalised name, PEP 503) and its version."""

    @classmethod
    def from_report(cls, value: object) -> Environment | None:
        """The environment the start-up probe read from the image, or None if it found none."""
        try:
            return msgspec.convert(value, cls)
        except msgspec.ValidationError:
            return None


class EnvironmentInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One environment a run may name, from ``GET /environments``."""

    name: str
    python: str | None
    """Its CPython version, as its image recorded it; null if the image holds no record."""
    packages: dict[str, str]
    """Every distribution its image installed, by normalised name, with its version."""
    preload: list[str]
    """Modules its warm interpreters import before their run."""
    min_warm: int
    """Sandboxes of it kept ready whatever the demand."""
    image: str
    """Its runner image: the tag hashes its lock, so the same libraries give the same tag."""


class StatusEvent(msgspec.Struct, kw_only=True):
    """The ``data`` of a stream's ``status`` event: the run's state changed before it ended."""

    status: RunStatus


class OutputEvent(msgspec.Struct, kw_only=True):
    """The ``data`` of a stream's ``stdout`` or ``stderr`` event: text in print order."""

    stream: Literal["stdout", "stderr"]
    text: str
    """UTF-8 decoded as it arrives (invalid bytes replaced), so a character split between two
    chunks arrives whole in the second."""
    seq: int
    """Its sequence number, also the event's ``id``: send the last one seen as ``Last-Event-ID`` to
    resume after it."""


class FileEvent(msgspec.Struct, kw_only=True):
    """The ``data`` of a stream's ``file`` event: a file the run left under ``out/``."""

    path: str
    size: int
    media_type: str


StreamEvent = StatusEvent | OutputEvent | FileEvent | RunResult
"""What a run's stream tells, in order: statuses, output, files, then the RunResult."""

Stream = Literal["stdout", "stderr"]


class Chunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a run's output, in the order the program printed it."""

    seq: int
    stream: Stream
    data: bytes


CHUNK_BYTES = 65536
"""The most output one chunk holds once merged (``runner.RunOutput`` merges adjacent chunks of a
stream up to it; one of the agent's frames carries at most as much)."""
