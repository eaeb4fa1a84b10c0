"""GET /metrics on the real app: every series in Prometheus's text format, counted once per run."""

from __future__ import annotations

import functools

import anyio
import msgspec
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families
from support.apitest import POOL_SIZE, has_status
from support.fakes import CANNED, RecordingRunner
from support.waiting import until

from warmpod.metrics import FINAL_STATUSES, LIMITS, PODMAN_CALLS, POOL_STATES

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
MARKER = "print('metrics-marker-5e1f')"


async def scrape(client: AsyncTestClient[Litestar]) -> Samples:
    """Every sample of ``GET /metrics``, parsed as Prometheus parses it, by name and labels."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The value of one sample; 0 where it is absent."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def labelled(samples: Samples, name: str, label: str) -> set[str]:
    """The values ``label`` takes among the samples called ``name``."""
    return {dict(labels)[label] for sample, labels in samples if sample == name and label in dict(labels)}


async def run(client: AsyncTestClient[Litestar], code: str = MARKER) -> str:
    """A blocking run of ``code``; its id."""
    response = await client.post("/run-json/", json={"code": code, "stdin": MARKER})
    assert response.status_code == 200, response.text
    run_id: str = response.json()["id"]
    return run_id


async def test_every_series_is_exposed(client: AsyncTestClient[Litestar]) -> None:
    """Before any run, /metrics has each of warmpod's series with each of its label values, and
    Litestar's request series."""
    await client.get("/health")
    samples = await scrape(client)
    assert labelled(samples, "warmpod_runs_total", "status") == set(FINAL_STATUSES)
    assert set(FINAL_STATUSES) == {"succeeded", "failed", "timeout", "error", "cancelled"}
    assert labelled(samples, "warmpod_limits_hit_total", "limit") == set(LIMITS)
    assert set(LIMITS) == {"wall_time", "cpu_time", "memory", "pids", "output", "disk"}
    assert labelled(samples, "warmpod_pool_containers", "state") == set(POOL_STATES)
    assert labelled(samples, "warmpod_podman_call_seconds_count", "call") == set(PODMAN_CALLS)
    assert {"create", "start", "pause", "unpause", "remove", "inspect"} <= set(PODMAN_CALLS)
    names = {name for name, _ in samples}
    for name in (
        "warmpod_queue_depth",
        "warmpod_queue_wait_seconds_count",
        "warmpod_run_duration_seconds_count",
        "warmpod_container_start_seconds_count",
        "warmpod_refill_failures_total",
        "warmpod_http_requests_total",
        "warmpod_http_request_duration_seconds_count",
    ):
        assert name in names, name
    # The app's fake pool (never filled) and its empty queue, read at scrape time.
    for state in POOL_STATES:
        assert value(samples, "warmpod_pool_containers", state=state) == 0
    assert value(samples, "warmpod_queue_depth") == 0
    assert (
        value(
            samples,
            "warmpod_http_requests_total",
            method="GET",
            path="/health",
            status_code="200",
            app_name="warmpod",
        )
        >= 1
    )


async def test_counters_move_once_per_run_by_its_status_and_limits(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """Runs that succeed, fail on memory, break inside warmpod, and one cancelled while queued
    move each counter by exactly their number; the queue depth is read live."""
    before = await scrape(client)
    for _ in range(3):
        await run(client)
    runner.result = msgspec.structs.replace(CANNED, status="failed", exit_code=-9, limits_hit=["memory"])
    for _ in range(2):
        await run(client)
    runner.result = CANNED
    runner.error = RuntimeError("broken runner")
    await run(client)
    runner.error = None
    runner.hold = anyio.Event()
    ids = [
        (await client.post("/run-json/", json={"code": MARKER, "wait": False})).json()["id"]
        for _ in range(POOL_SIZE + 2)
    ]
    await until(lambda: len(runner.calls) >= 6 + POOL_SIZE)
    assert value(await scrape(client), "warmpod_queue_depth") == 2
    assert (await client.delete(f"/status/{ids[-1]}")).json()["status"] == "cancelled"
    assert value(await scrape(client), "warmpod_queue_depth") == 1
    runner.hold.set()
    for run_id in ids[:-1]:
        await until(functools.partial(has_status, client, f"/status/{run_id}", "succeeded"))
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    executed = 3 + 2 + 1 + POOL_SIZE + 1
    assert {status: moved("warmpod_runs_total", status=status) for status in FINAL_STATUSES} == {
        "succeeded": 3 + POOL_SIZE + 1,
        "failed": 2,
        "timeout": 0,
        "error": 1,
        "cancelled": 1,
    }
    assert {limit: moved("warmpod_limits_hit_total", limit=limit) for limit in LIMITS} == {
        limit: 2 if limit == "memory" else 0 for limit in LIMITS
    }
    # The cancelled run never executed: no queue wait nor program time of its own.
    assert moved("warmpod_queue_wait_seconds_count") == executed
    assert moved("warmpod_run_duration_seconds_count") == executed
    assert moved("warmpod_run_duration_seconds_sum") >= (executed - 1) * CANNED.duration_ms / 1000
    assert value(after, "warmpod_queue_depth") == 0


async def test_labels_carry_no_id_nor_code_and_the_stream_is_not_timed(
    client: AsyncTestClient[Litestar],
) -> None:
    """Requests are timed by route template, never by path; a run's event stream, which lasts as
    long as the run, is left out of the request series."""
    run_id = await run(client)
    assert (await client.get(f"/status/{run_id}")).status_code == 200
    stream = await client.get(f"/status/{run_id}/stream")
    assert stream.status_code == 200
    assert "event: result" in stream.text
    samples = await scrape(client)
    paths = labelled(samples, "warmpod_http_request_duration_seconds_count", "path")
    assert {"/run-json", "/status/{run_id}"} <= {path.rstrip("/") for path in paths}, paths
    assert not [path for path in paths if "stream" in path]
    assert not [name for name, labels in samples if "stream" in str(dict(labels))]
    for name, labels in samples:
        for label in dict(labels).values():
            assert run_id not in label, name
            assert "marker" not in label, name
