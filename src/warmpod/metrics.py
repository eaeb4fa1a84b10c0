"""warmpod's Prometheus series, the one place that owns them (``warmpod.http.metrics`` exposes them)."""

from __future__ import annotations

from typing import Literal, get_args

from prometheus_client import Counter, Histogram

from warmpod.models import LimitName, RunResult, RunStatus

# The counters and histograms live in prometheus_client's default registry, made once per process
# on import (so the many apps a test session builds never register a name twice), beside Litestar's
# request series, which its middleware can only put there. Only the pool and queue gauges belong to
# one app's service: they are read from it at scrape time (``metrics_http``), never registered.
FINAL_STATUSES: tuple[str, ...] = tuple(s for s in get_args(RunStatus) if s not in ("queued", "running"))
LIMITS: tuple[str, ...] = get_args(LimitName)
POOL_STATES = ("ready", "busy", "starting", "closing", "paused")
PodmanCall = Literal[
    "info", "image_exists", "create", "start", "pause", "unpause", "update", "inspect", "remove", "list"
]
"""``host.podman_api.PodmanApi``'s calls, each timed under its name: never an id or a path."""
PODMAN_CALLS: tuple[str, ...] = get_args(PodmanCall)
# Seconds: a queue wait can last as long as the blocking wait timeout; a run at most its max timeout.
_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

RUNS = Counter("warmpod_runs_total", "Runs that reached a final status, by that status", ["status"])
LIMITS_HIT = Counter("warmpod_limits_hit_total", "Limits that stopped a run, by limit", ["limit"])
QUEUE_WAIT = Histogram(
    "warmpod_queue_wait_seconds",
    "Seconds a run waited in the queue, from submission to execution",
    buckets=_WAIT_BUCKETS,
)
RUN_DURATION = Histogram(
    "warmpod_run_duration_seconds",
    "Wall time of the program itself (RunResult.duration_ms)",
    buckets=_RUN_BUCKETS,
)
CONTAINER_START = Histogram(
    "warmpod_container_start_seconds",
    "Seconds from creating a pool container to its agent ready (and the container paused)",
    buckets=_START_BUCKETS,
)
REFILL_FAILURES = Counter("warmpod_refill_failures_total", "Pool containers that could not be made")
PODMAN_CALL = Histogram(
    "warmpod_podman_call_seconds", "Seconds of each Podman API call, by call", ["call"], buckets=_CALL_BUCKETS
)
SourceDirection = Literal["in", "out"]
"""Bytes ``in`` from a data source's upstream to the program, ``out`` from the program to it."""
SOURCE_CONNECTIONS = Counter(
    "warmpod_source_connections_total",
    "Connections relayed to a data source's upstream, by source",
    ["source"],
)
SOURCE_REFUSED = Counter(
    "warmpod_source_refused_total",
    "Connections to a data source closed at once (past its limits, or its upstream unreachable), by source",
    ["source"],
)
SOURCE_BYTES = Counter(
    "warmpod_source_bytes_total",
    "Bytes relayed between programs and a data source, by source and direction (in: to the program)",
    ["source", "direction"],
)
WEBHOOK_OUTCOMES = ("delivered", "rejected", "unreachable", "refused")
WEBHOOK_ATTEMPTS = Counter(
    "warmpod_webhook_attempts_total",
    "Webhook tries made by this node, by outcome (delivered: a 2xx answer; rejected: another answer; "
    "unreachable: no answer; refused: the destination not allowed, never contacted)",
    ["outcome"],
)
WEBHOOKS_FAILED = Counter("warmpod_webhooks_failed_total", "Webhooks given up after their last try")
WEBHOOK_SECONDS = Histogram(
    "warmpod_webhook_attempt_seconds",
    "Seconds of one webhook try, resolution included",
    buckets=_CALL_BUCKETS,
)
for _outcome in WEBHOOK_OUTCOMES:
    WEBHOOK_ATTEMPTS.labels(outcome=_outcome)
for _status in FINAL_STATUSES:
    RUNS.labels(status=_status)
for _limit in LIMITS:
    LIMITS_HIT.labels(limit=_limit)
for _call in PODMAN_CALLS:
    PODMAN_CALL.labels(call=_call)


def count_run(result: RunResult, *, queue_wait: float | None, executed: bool) -> None:
    """Count a run that reached its final status; call it once per run.

    Args:
        result: its final result.
        queue_wait: seconds from its submission to its execution, where it was executed here.
        executed: whether it ran on this server (not cancelled while queued, nor recovered after a
            crash): only then are its queue wait and the program's wall time observed.
    """
    if result.status in FINAL_STATUSES:
        RUNS.labels(status=result.status).inc()
    for limit in set(result.limits_hit) & set(LIMITS):
        LIMITS_HIT.labels(limit=limit).inc()
    if executed:
        if queue_wait is not None:
            QUEUE_WAIT.observe(max(queue_wait, 0.0))
        RUN_DURATION.observe(result.duration_ms / 1000)
