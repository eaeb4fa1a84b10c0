"""Frozen configuration, read once from ``WARMPOD_SECTION__FIELD`` environment variables."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_type_hints

import msgspec
from msgspec import Meta

from warmpod.errors import SettingsError

ENV_PREFIX = "WARMPOD_"

Port = Annotated[int, Meta(ge=0, le=65535)]
PositiveInt = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(gt=0)]
PoolSize = Annotated[int, Meta(ge=1, le=256)]
ModuleName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")]


class ServerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The HTTP side."""

    host: str = "127.0.0.1"
    """Address to listen on (``WARMPOD_SERVER__HOST``)."""
    port: Port = 8000
    """TCP port to listen on (``WARMPOD_SERVER__PORT``)."""
    max_body_bytes: Annotated[int, Meta(ge=1024, le=64 * 1024 * 1024)] = 32 * 1024 * 1024
    """Largest accepted request body, at most 64 MiB (the agent's job frame limit is 128 MiB
    after base64): room for ``files.in_bytes`` of files in base64; larger ones get 413
    (``WARMPOD_SERVER__MAX_BODY_BYTES``)."""
    startup_timeout: Seconds = 600.0
    """How long start-up waits for the pool's first sandbox before it gives up; the first one,
    preloading numpy and pandas on a slow host, can take far longer than a run waits for a free one
    (``WARMPOD_SERVER__STARTUP_TIMEOUT``)."""
    shutdown_grace: Seconds = 30.0
    """On SIGTERM, how long running runs may take to finish before they are stopped and reported
    ``error``; queued runs stay in the store for the next start (``WARMPOD_SERVER__SHUTDOWN_GRACE``)."""
    api_keys_file: str = ""
    """The keys file (``warmpod keys add``): when set, every request but ``/health`` and the
    playground's page needs ``Authorization: Bearer KEY`` of one of its keys; re-read when it
    changes (``WARMPOD_SERVER__API_KEYS_FILE``)."""
    secrets_file: str = ""
    """The secrets file: one ``NAME=value`` per line, mode 0600, re-read when it changes. A run
    asks for secrets by name (``secrets``) and gets them as environment variables, masked in its
    output and never stored; with a keys file, a key uses only the secrets its ``secrets=`` grants
    (``WARMPOD_SERVER__SECRETS_FILE``)."""
    allow_anonymous: bool = False
    """Serve without keys on an address that is not loopback: only for a trusted network, behind a
    proxy that authenticates (``WARMPOD_SERVER__ALLOW_ANONYMOUS``)."""
    max_connections: PositiveInt = 512
    """Connections served at once (uvicorn's ``limit_concurrency``), below the process's open-files
    limit; a request on a connection past it is answered 503 at once, by uvicorn itself: plain
    text, not a problem, and without ``Retry-After`` (uvicorn has no hook to change it). It is the
    last bound, for every client together: the ``key_*`` ones keep a single client far from it
    (``WARMPOD_SERVER__MAX_CONNECTIONS``)."""
    forwarded_allow_ips: str = ""
    """The reverse proxies whose ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are believed
    (uvicorn's ``forwarded_allow_ips``: addresses or networks separated by commas, ``*`` for any):
    from them the client's address is the one the header names. Empty, the default, believes no
    one, so that no client can pick the address it is counted as where keys are off (the ``key_*``
    bounds) or that the logs show (``WARMPOD_SERVER__FORWARDED_ALLOW_IPS``)."""
    backlog: Annotated[int, Meta(ge=1, le=65535)] = 2048
    """Connections the kernel holds waiting to be accepted (``listen``'s backlog, capped by
    ``net.core.somaxconn``); beyond it new connections are refused (``WARMPOD_SERVER__BACKLOG``)."""
    key_rate: Annotated[float, Meta(gt=0)] = 100.0
    """Requests a second one API key (or, where keys are off, one client address) may send on
    average; past it, and past ``key_burst``, it is answered 429 with ``Retry-After``. ``/health``
    and ``/metrics`` are never counted (``WARMPOD_SERVER__KEY_RATE``)."""
    key_burst: PositiveInt = 200
    """Requests one key may send at once above its ``key_rate``: what its bucket holds when it has
    been quiet (``WARMPOD_SERVER__KEY_BURST``)."""
    key_in_flight: PositiveInt = 32
    """Requests of one key being served at once, blocking runs and open streams included; a request
    holds its slot until the client has read its answer to the last bytes (64 KiB), so one that
    asks and never reads holds its own slots and no more. Past it the key is answered 429. What a
    key's unread answers hold in this process is at most this many answers: a result or status
    (``files.inline_total_bytes`` of files), or a file download, which is read from the store and
    held a 256 KiB piece at a time (``WARMPOD_SERVER__KEY_IN_FLIGHT``)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """The least severe log records the server writes (``WARMPOD_SERVER__LOG_LEVEL``)."""
    log_format: Literal["text", "json"] = "text"
    """How the server logs, on stderr: ``text`` for a terminal, ``json`` one object a line (``time``,
    ``level``, ``logger``, ``event`` and the record's fields) for a log collector; uvicorn's lines
    too (``WARMPOD_SERVER__LOG_FORMAT``)."""


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How warmpod reaches Podman."""

    url: str = ""
    """Podman API socket, e.g. ``unix:///run/user/1000/podman/podman.sock``; empty starts a private
    ``podman system service`` (``WARMPOD_ENGINE__URL``)."""
    podman: str = "podman"
    """The podman binary, for the private service and image builds (``WARMPOD_ENGINE__PODMAN``)."""
    runtime: str = ""
    """OCI runtime for the private service; empty picks one that works on this host
    (``WARMPOD_ENGINE__RUNTIME``)."""
    state_dir: str = ""
    """Where sockets and per-container directories live; empty means a fresh private directory
    under ``$XDG_RUNTIME_DIR`` or ``/tmp`` (``WARMPOD_ENGINE__STATE_DIR``)."""
    api_concurrency: PositiveInt = 8
    """Podman API calls in flight at once (``WARMPOD_ENGINE__API_CONCURRENCY``)."""
    userns: Literal["auto", "host"] = "auto"
    """Rootful Podman: ``auto`` gives every container a user namespace and a uid range of its own
    (container root is not host root; two sandboxes never share a host uid), from the
    ``containers`` entries of /etc/subuid and /etc/subgid that ``deploy/setup.sh`` adds; ``host``
    runs containers with the host's uids. Rootless Podman always maps containers into the user's
    range and ignores it (``WARMPOD_ENGINE__USERNS``)."""


class ImageSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The runner image the pool containers use."""

    name: str = "localhost/warmpod-runner"
    """Repository of the runner image; the tag is a hash of its inputs (``WARMPOD_IMAGE__NAME``)."""
    base: str = ""
    """Base image to build on; empty builds one from Debian packages with debootstrap
    (``WARMPOD_IMAGE__BASE``)."""
    suite: str = "trixie"
    """Debian suite for the locally built base (``WARMPOD_IMAGE__SUITE``)."""
    mirror: str = "http://deb.debian.org/debian"
    """Debian mirror for the locally built base (``WARMPOD_IMAGE__MIRROR``)."""
    context: str = ""
    """Directory holding the runner image's Containerfile; empty uses the bundled one
    (``WARMPOD_IMAGE__CONTEXT``)."""
    cache_dir: str = ""
    """Where downloaded wheels are kept between builds; empty means ``~/.cache/warmpod``
    (``WARMPOD_IMAGE__CACHE_DIR``)."""
    requirements: str = ""
    """The libraries user code can import, one requirement a line (a ``requirements.in``): warmpod
    resolves it for the runner's CPython into a hashed lock beside it (``requirements.lock`` for
    ``requirements.in``) when the lock is missing or older than the file, installs wheels only,
    and tags the image with the lock's hash; empty uses the bundled set, the context's
    ``requirements.in`` (``WARMPOD_IMAGE__REQUIREMENTS``)."""


class PoolSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The warm pool of single-use containers."""

    min_size: PoolSize = 4
    """Containers kept ready when idle; the pool never shrinks below it (``WARMPOD_POOL__MIN_SIZE``)."""
    max_size: PoolSize = 16
    """Most containers alive at once, ready, starting and running together, so the pool's memory is
    at most ``max_size`` x ``limits.memory_mb``; the ready target grows toward it while runs find
    the pool empty (``WARMPOD_POOL__MAX_SIZE``)."""
    size: PoolSize | None = None
    """Another name for ``min_size``, which it overrides when given; ``max_size`` is raised to
    it if lower (``WARMPOD_POOL__SIZE``)."""
    shrink_after: Seconds = 30.0
    """Seconds without a run finding the pool empty before the ready target halves toward
    ``min_size`` (``WARMPOD_POOL__SHRINK_AFTER``)."""
    preload: tuple[ModuleName, ...] = ("numpy", "pandas")
    """Modules each pooled interpreter imports before it is paused, so runs importing them pay
    nothing; comma-separated or a JSON list, empty for none. A module that fails to import is
    reported in ``/health`` and runs go on without it (``WARMPOD_POOL__PRELOAD``)."""
    acquire_timeout: Seconds = 30.0
    """How long a worker waits for a free container before it tries again; the run stays queued
    meanwhile (``WARMPOD_POOL__ACQUIRE_TIMEOUT``)."""
    start_timeout: Seconds = 30.0
    """How long a new container may take to report ready (``WARMPOD_POOL__START_TIMEOUT``)."""
    refill_concurrency: PositiveInt = 4
    """Containers created at once; of those preloading, at most one per CPU the server may use
    (``WARMPOD_POOL__REFILL_CONCURRENCY``)."""
    backoff_max: Seconds = 30.0
    """Longest wait between failed refills (``WARMPOD_POOL__BACKOFF_MAX``)."""
    pause: bool = True
    """Pause idle containers where the engine can (``WARMPOD_POOL__PAUSE``)."""

    @property
    def bounds(self) -> tuple[int, int]:
        """The smallest ready target and the most containers alive, ``size`` standing for ``min_size``."""
        if self.size is not None:
            return self.size, max(self.size, self.max_size)
        return self.min_size, self.max_size


class QueueSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The durable queue and run records."""

    store_url: str = ""
    """``postgresql://USER@HOST/DB``: the queue and results live in PostgreSQL, shared by every
    node given the same URL; empty keeps them in the SQLite file of ``store_path``, for one node
    (``WARMPOD_QUEUE__STORE_URL``)."""
    store_path: str = ""
    """SQLite file holding the queue and the results; empty means
    ``$XDG_STATE_HOME/warmpod/runs.sqlite3`` (``~/.local/state/...``) (``WARMPOD_QUEUE__STORE_PATH``)."""
    max_queued: PositiveInt = 1000
    """Runs waiting for a sandbox at most; past it submissions get 429 (``WARMPOD_QUEUE__MAX_QUEUED``)."""
    max_batch: Annotated[int, Meta(ge=1, le=1000)] = 20
    """Runs one ``POST /runs/batch`` may queue together, at most 1000; a larger batch is a 422
    (``WARMPOD_QUEUE__MAX_BATCH``)."""
    retention: Seconds = 86400.0
    """Seconds a finished run's result is kept, then it expires (``WARMPOD_QUEUE__RETENTION``)."""
    workers: Annotated[int, Meta(ge=0, le=256)] = 0
    """Runs executed at once; 0 means one per pool container (``WARMPOD_QUEUE__WORKERS``)."""
    wait_timeout: Seconds = 300.0
    """How long a blocking request waits for its result before it is answered 202 with the run's
    status URL (``WARMPOD_QUEUE__WAIT_TIMEOUT``)."""


class NodeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """This server as one node of a shared queue."""

    name: str = ""
    """The node's name in results, logs and ``/health``; empty means the host name. Nodes sharing
    a store need distinct names: a node that starts reports its own name's earlier runs as
    stopped (``WARMPOD_NODE__NAME``)."""
    lease: Annotated[float, Meta(ge=1, le=3600)] = 15.0
    """Seconds a claimed run stays this node's without a heartbeat, renewed every third of it by
    the store's clock; past it another node reports the run ``error`` and this one, should it
    wake, stops the run's container (``WARMPOD_NODE__LEASE``)."""


class LimitSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Resource limits of one run."""

    timeout: Seconds = 10.0
    """Default wall-time limit of a run in seconds (``WARMPOD_LIMITS__TIMEOUT``)."""
    max_timeout: Seconds = 60.0
    """Largest wall-time limit a request may ask for (``WARMPOD_LIMITS__MAX_TIMEOUT``)."""
    max_output_bytes: PositiveInt = 1024 * 1024
    """Output kept per stream; past it the program is stopped (``WARMPOD_LIMITS__MAX_OUTPUT_BYTES``)."""
    cpu_time: PositiveInt = 30
    """CPU seconds of the program, by RLIMIT_CPU (``WARMPOD_LIMITS__CPU_TIME``)."""
    memory_mb: PositiveInt = 512
    """Memory of one container, swap included (``WARMPOD_LIMITS__MEMORY_MB``)."""
    pids: PositiveInt = 128
    """Processes and threads of one container (``WARMPOD_LIMITS__PIDS``)."""
    cpus: Annotated[float, Meta(gt=0)] = 1.0
    """CPU share of one container, in cores (``WARMPOD_LIMITS__CPUS``)."""
    tmpfs_mb: PositiveInt = 64
    """Size of each writable tmpfs (``/tmp`` and the working directory) (``WARMPOD_LIMITS__TMPFS_MB``)."""
    allow_unenforced: bool = False
    """Start even when this host cannot enforce some limit (rootless on cgroup v1); the weaker
    limits are reported by ``warmpod doctor`` and ``/health`` (``WARMPOD_LIMITS__ALLOW_UNENFORCED``)."""
    open_files: PositiveInt = 256
    """Open files per process (``WARMPOD_LIMITS__OPEN_FILES``)."""


class FileSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Files a run takes in and gives back."""

    in_count: Annotated[int, Meta(ge=0, le=1000)] = 100
    """Input files one run may take (``WARMPOD_FILES__IN_COUNT``)."""
    in_file_bytes: Annotated[int, Meta(ge=0)] = 16 * 1024 * 1024
    """Largest input file (``WARMPOD_FILES__IN_FILE_BYTES``)."""
    in_bytes: Annotated[int, Meta(ge=0, le=48 * 1024 * 1024)] = 16 * 1024 * 1024
    """All input files of one run together, within the working directory's tmpfs
    (``WARMPOD_FILES__IN_BYTES``)."""
    out_count: Annotated[int, Meta(ge=0, le=1000)] = 100
    """Files collected from ``out/`` at most; past it the rest are dropped and the result says
    ``files_truncated`` (``WARMPOD_FILES__OUT_COUNT``)."""
    out_bytes: Annotated[int, Meta(ge=0, le=256 * 1024 * 1024)] = 16 * 1024 * 1024
    """Bytes collected from ``out/`` at most; a file that would go past it is dropped
    (``WARMPOD_FILES__OUT_BYTES``)."""
    inline_bytes: Annotated[int, Meta(ge=0)] = 1024 * 1024
    """Files up to this size come inline in the result, in base64; larger ones only from
    ``GET /status/{id}/files/{path}`` (``WARMPOD_FILES__INLINE_BYTES``)."""
    inline_total_bytes: Annotated[int, Meta(ge=0)] = 1024 * 1024
    """File content one answer carries inline at most, all its files together (a third more in
    base64): in path order, each file within ``inline_bytes`` comes inline while it fits in what
    is left; the others come with ``content`` null and their ``url``. It bounds what an answer
    about a run weighs however many files the run left (``WARMPOD_FILES__INLINE_TOTAL_BYTES``)."""


class SourceSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Data sources: the upstreams a run may reach through the server's relay, and nothing else."""

    file: str = ""
    """The sources file (TOML), re-read when it changes: one table per source, ``[warehouse]`` with
    ``host`` and ``port`` and, optionally, its limits per run: ``max_connections`` (at once, default
    4), ``max_bytes_in`` and ``max_bytes_out`` (from the upstream to the program and back, default
    256 MiB and 16 MiB), ``idle_timeout`` and ``connect_timeout`` (seconds, default 30 and 5). A run
    asks for sources by name (``sources``); with a keys file, a key uses only the sources its
    ``sources=`` grants; empty, no run may ask for one (``WARMPOD_SOURCES__FILE``)."""


class EnvironmentSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Environments: several locked library sets on one server, each with its own runner image."""

    file: str = ""
    """The environments file (TOML), read at start: one table per environment, ``[finance]`` with
    ``requirements`` (a requirements.in path, relative to the file; its lock is made beside it)
    and, optionally, ``preload`` (modules), ``min_warm`` (sandboxes kept ready, default 1) and
    ``limits`` (a table of ``WARMPOD_LIMITS__*`` defaults for its runs). ``[default]`` may be
    declared too, without ``requirements`` (it keeps ``WARMPOD_IMAGE__REQUIREMENTS``); it exists
    in any case. Empty: the ``default`` environment alone (``WARMPOD_ENVIRONMENTS__FILE``)."""


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Completion webhooks: where they may go, how they are signed, and how long they are retried."""

    allow: tuple[str, ...] = ()
    """URL prefixes a run's ``callback_url`` (or a key's ``webhook=``) must start with: same
    scheme, host and port, and a path under the prefix's. A name is resolved at each delivery, and
    an address that is not public (loopback, private, link-local...) is refused unless an entry
    names that very address as its host. Empty: no webhooks, and a ``callback_url`` is refused
    (``WARMPOD_WEBHOOKS__ALLOW``, comma-separated)."""
    secrets: tuple[str, ...] = ()
    """``whsec_`` secrets (base64, Standard Webhooks) signing every delivery of a key without a
    ``webhook_secret=`` of its own; each one signs, so a receiver can move from an old secret to
    a new one while both are listed (``WARMPOD_WEBHOOKS__SECRETS``, comma-separated)."""
    attempts: Annotated[int, Meta(ge=1, le=30)] = 8
    """Tries of one delivery in all before it is given up (``WARMPOD_WEBHOOKS__ATTEMPTS``)."""
    first_retry: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    """Seconds before the second try; each later wait doubles, give or take a quarter at random,
    so 8 tries span about an hour (``WARMPOD_WEBHOOKS__FIRST_RETRY``)."""
    timeout: Annotated[float, Meta(gt=0, le=60)] = 10.0
    """Seconds one try may take, connecting included (``WARMPOD_WEBHOOKS__TIMEOUT``)."""
    concurrency: Annotated[int, Meta(ge=1, le=256)] = 16
    """Deliveries this node makes at once; at most a quarter of them (at least one) to one key's
    receivers, so a key's slow receiver does not hold back another key's webhooks
    (``WARMPOD_WEBHOOKS__CONCURRENCY``)."""
    poll: Annotated[float, Meta(gt=0, le=60)] = 1.0
    """Seconds between looks for due deliveries when none was found: the store's notice that a
    run's webhook is due wakes every node at once, so this only bounds a missed notice's delay
    and a retry's (``WARMPOD_WEBHOOKS__POLL``)."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """All of warmpod's configuration."""

    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)
    image: ImageSettings = msgspec.field(default_factory=ImageSettings)
    pool: PoolSettings = msgspec.field(default_factory=PoolSettings)
    queue: QueueSettings = msgspec.field(default_factory=QueueSettings)
    node: NodeSettings = msgspec.field(default_factory=NodeSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    files: FileSettings = msgspec.field(default_factory=FileSettings)
    sources: SourceSettings = msgspec.field(default_factory=SourceSettings)
    environments: EnvironmentSettings = msgspec.field(default_factory=EnvironmentSettings)
    webhooks: WebhookSettings = msgspec.field(default_factory=WebhookSettings)


def from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build settings from ``WARMPOD_SECTION__FIELD`` variables, then apply ``section={...}`` overrides.

    Raises:
        SettingsError: a variable names an unknown setting or holds a value of the wrong type;
            the message names the variable to fix.
    """
    environ = os.environ if environ is None else environ
    tree: dict[str, dict[str, Any]] = {}
    origin: dict[tuple[str, str], str] = {}
    sections = _section_types()
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        section, sep, field = key[len(ENV_PREFIX) :].lower().partition("__")
        if not sep or not field:
            continue
        if section not in sections or field not in sections[section].__struct_fields__:
            raise SettingsError(f"{key} is not a warmpod setting (see src/warmpod/settings.py)")
        if field in _sequences(sections[section]):
            try:
                value = _split(value)
            except msgspec.DecodeError as exc:
                raise SettingsError(f"{key} is not a valid JSON list: {exc}") from exc
        tree.setdefault(section, {})[field] = value
        origin[(section, field)] = key
    for section, values in overrides.items():
        tree.setdefault(section, {}).update(values)
    try:
        settings = msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as exc:
        path = re.search(r"\$\.(\w+)\.(\w+)", str(exc))
        name = origin.get((path[1], path[2]), f"{path[1]}.{path[2]}") if path else "a setting"
        raise SettingsError(f"{name} is invalid: {exc}") from exc
    if settings.limits.timeout > settings.limits.max_timeout:
        raise SettingsError(
            "WARMPOD_LIMITS__TIMEOUT (limits.timeout) must not exceed WARMPOD_LIMITS__MAX_TIMEOUT "
            "(limits.max_timeout)"
        )
    if settings.files.in_bytes >= settings.limits.tmpfs_mb * 1024 * 1024:
        raise SettingsError(
            "WARMPOD_FILES__IN_BYTES (files.in_bytes) must be below the working directory's tmpfs, "
            "WARMPOD_LIMITS__TMPFS_MB (limits.tmpfs_mb)"
        )
    low, high = settings.pool.bounds
    if low > high:
        raise SettingsError(
            "WARMPOD_POOL__MIN_SIZE (pool.min_size) must not exceed WARMPOD_POOL__MAX_SIZE (pool.max_size)"
        )
    return settings


def _split(value: str) -> Any:
    # A JSON list as it is, otherwise comma-separated; blanks dropped so "" means none.
    if value.lstrip().startswith("["):
        return msgspec.json.decode(value)
    return [item.strip() for item in value.split(",") if item.strip()]


def _sequences(section: type[msgspec.Struct]) -> set[str]:
    hints = get_type_hints(section, include_extras=False)
    return {name for name, hint in hints.items() if getattr(hint, "__origin__", None) in (tuple, list)}


def _section_types() -> dict[str, type[msgspec.Struct]]:
    hints = get_type_hints(Settings)
    return {name: hints[name] for name in Settings.__struct_fields__}
