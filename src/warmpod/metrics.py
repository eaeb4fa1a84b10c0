"""warmpod's Prometheus series, the one place that owns them, and ``GET /metrics`` that exposes them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal, get_args

from litestar import Request, Response, get
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from warmpod.models import RunResult, RunStatus
from warmpod.protocol import LimitName

if TYPE_CHECKING:
    from warmpod.service import Service

# The counters and histograms live in prometheus_client's default registry, made once per process
# on import (so the many apps a test session builds never register a name twice), beside Litestar's
# request series, which its middleware can only put there. Only the pool and queue gauges belong to
# one app's service: they are read from it at scrape time (``_Scrape``), never registered.
FINAL_STATUSES: tuple[str, ...] = tuple(s for s in get_args(RunStatus) if s not in ("queued", "running"))
LIMITS: tuple[str, ...] = get_args(LimitName)
POOL_STATES = ("ready", "busy", "starting", "closing", "paused")
PodmanCall = Literal[
    "info", "image_exists", "create", "start", "pause", "unpause", "update", "inspect", "remove", "list"
]
"""``runtime.Runtime``'s calls, each timed under its name: never an id or a path."""
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
for _status in FINAL_STATUSES:
    RUNS.labels(status=_status)
for _limit in LIMITS:
    LIMITS_HIT.labels(limit=_limit)
for _call in PODMAN_CALLS:
    PODMAN_CALL.labels(call=_call)

PROMETHEUS = PrometheusConfig(
    app_name="warmpod",
    prefix="warmpod_http",
    group_path=True,  # the route's template, never a run id
    # A stream lasts as long as its run, or longer: its "duration" would swamp the request timings.
    exclude=[r"^/status/[^/]+/stream$"],
)
"""Litestar's request series (``warmpod_http_requests_total``, ``..._request_duration_seconds``)."""


def run_ended(result: RunResult, *, queue_wait: float | None, executed: bool) -> None:
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


class _Scrape:
    """What one scrape exposes: the process's registry, then the pool and queue of ``service``."""

    def __init__(self, service: Service | None) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        if self._service is None:
            return  # starting or stopping: there is no pool to count
        stats = self._service.pool.stats()
        pool = GaugeMetricFamily(
            "warmpod_pool_containers",
            "Pool containers by state; paused ones are also counted as ready",
            labels=["state"],
        )
        for state in POOL_STATES:
            pool.add_metric([state], getattr(stats, state))
        yield pool
        yield GaugeMetricFamily(
            "warmpod_queue_depth", "Runs queued, not yet executing", value=self._service.scheduler.queued
        )


class MetricsController(PrometheusController):
    """``GET /metrics``: Litestar's controller, reading the app's service too.

    Its own handler exposes only prometheus_client's default registry, which cannot hold the gauges
    of one app's pool when a process holds several apps (as tests do).
    """

    @get(include_in_schema=False, sync_to_thread=False)
    def get(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """Every series, in Prometheus's text format."""
        body = generate_latest(_Scrape(request.app.state.get("service")))
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
