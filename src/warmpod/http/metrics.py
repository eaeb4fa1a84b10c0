"""``GET /metrics``: the series of ``warmpod.metrics`` and Litestar's request series, in Prometheus's format.

The HTTP side of the metrics, apart from the series themselves, so that the pool, the runtime and the
queue count without importing Litestar or the service.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from litestar import Request, Response, get
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from warmpod.http.health import running_service
from warmpod.metrics import POOL_STATES

if TYPE_CHECKING:
    from warmpod.service import Service

PROMETHEUS = PrometheusConfig(
    app_name="warmpod",
    prefix="warmpod_http",
    group_path=True,  # the route's template, never a run id
    # A stream lasts as long as its run, or longer: its "duration" would swamp the request timings.
    exclude=[r"^/status/[^/]+/stream$"],
)
"""Litestar's request series (``warmpod_http_requests_total``, ``..._request_duration_seconds``)."""


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
        containers = GaugeMetricFamily(
            "warmpod_pool_environment_containers",
            "Pool containers of each environment by state",
            labels=["environment", "state"],
        )
        target = GaugeMetricFamily(
            "warmpod_pool_environment_target",
            "Ready containers each environment aims for: its min_warm and its share of the demand",
            labels=["environment"],
        )
        waiting = GaugeMetricFamily(
            "warmpod_pool_environment_waiting",
            "Runs on this node waiting for a sandbox of each environment",
            labels=["environment"],
        )
        for name, counts in stats.environments.items():
            for state in ("ready", "busy", "starting"):
                containers.add_metric([name, state], getattr(counts, state))
            target.add_metric([name], counts.target)
            waiting.add_metric([name], counts.waiting)
        yield from (containers, target, waiting)
        yield GaugeMetricFamily(
            "warmpod_queue_depth",
            "Runs queued, not yet executing",
            value=self._service.queue.admission.queued,
        )


class MetricsController(PrometheusController):
    """``GET /metrics``: Litestar's controller, reading the app's service too.

    Its own handler exposes only prometheus_client's default registry, which cannot hold the gauges
    of one app's pool when a process holds several apps (as tests do).
    """

    @get(include_in_schema=False, sync_to_thread=False)
    def get(self, request: Request[Any, Any, Any]) -> Response[bytes]:
        """Every series, in Prometheus's text format."""
        body = generate_latest(_Scrape(running_service(request.app)))
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
