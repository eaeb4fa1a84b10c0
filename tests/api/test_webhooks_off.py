"""Webhooks on the real app with no allow-list (the default): a callback_url is refused, a run has none."""

from __future__ import annotations

import anyio
from litestar import Litestar
from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families
from support.apitest import assert_problem, has_status
from support.fakes import RecordingRunner
from support.live import free_port
from support.waiting import until
from support.webhooks import ATTEMPTS_SERIES, FAILED_SERIES, OUTCOMES


async def test_a_callback_url_is_a_422_without_an_allow_list(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """With WARMPOD_WEBHOOKS__ALLOW empty any callback_url, even to loopback, is a 422 problem
    naming that setting, in JSON (blocking or not) and in a form; nothing runs."""
    url = f"http://127.0.0.1:{free_port()}/hook"
    for wait in (True, False):
        response = await client.post(
            "/run-json/", json={"code": "print(1)", "callback_url": url, "wait": wait}
        )
        assert_problem(response, 422, "WARMPOD_WEBHOOKS__ALLOW")
    form = await client.post(
        "/run-file/", files={"file": ("main.py", b"print(1)")}, data={"callback_url": url}
    )
    assert_problem(form, 422, "WARMPOD_WEBHOOKS__ALLOW")
    assert runner.calls == []


async def test_a_run_without_a_callback_has_a_null_webhook(client: AsyncTestClient[Litestar]) -> None:
    """A run that names no callback_url, or names it null, runs and its status says ``webhook``: null."""
    for fields in ({}, {"callback_url": None}):
        response = await client.post("/run-json/", json={"code": "print(1)", **fields})
        assert response.status_code == 200, response.text
        status = await client.get(f"/status/{response.json()['id']}")
        assert status.status_code == 200, status.text
        assert status.json()["status"] == "succeeded"
        assert status.json()["webhook"] is None, status.json()


async def test_a_queued_run_without_a_callback_has_a_null_webhook_too(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """While it runs, and after, a run without a callback_url has ``webhook`` null."""
    runner.hold = anyio.Event()
    accepted = await client.post("/run-json/", json={"code": "print(1)", "wait": False})
    assert accepted.status_code == 202, accepted.text
    url = accepted.json()["status_url"]
    await until(lambda: has_status(client, url, "running"))
    assert (await client.get(url)).json()["webhook"] is None
    runner.hold.set()
    await until(lambda: has_status(client, url, "succeeded"))
    assert (await client.get(url)).json()["webhook"] is None


async def test_the_webhook_series_are_exposed_before_any_webhook(client: AsyncTestClient[Litestar]) -> None:
    """/metrics has the attempts counter with each outcome, and the given-up counter, before this
    app sent any webhook. Their values are the process's (warmpod.metrics): other tests of this
    process may have counted tries already."""
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    samples = {
        (sample.name, sample.labels.get("outcome")): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    for outcome in OUTCOMES:
        assert (ATTEMPTS_SERIES, outcome) in samples, outcome
    assert (FAILED_SERIES, None) in samples
