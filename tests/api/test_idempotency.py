"""Idempotent submits: an Idempotency-Key names one run, so a retried POST never runs code twice,
and a stored run is always answered with its id (the real app over SQLite, a fake pool)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import assert_problem
from support.fakes import RecordingRunner

from warmpod.client import Client
from warmpod.errors import StoreError
from warmpod.models import RunResult
from warmpod.service import Service

KEY = '"nightly-report-north-2026-12-07"'


async def test_a_repeated_blocking_submit_runs_once_and_answers_the_same_run(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """The same key and body twice: one run, the second answer is its result (200), and with
    ``wait`` false a 202 naming the same run in its final state."""
    first = await client.post("/run-json/", json={"code": "print(1)"}, headers={"Idempotency-Key": KEY})
    again = await client.post("/run-json/", json={"code": "print(1)"}, headers={"Idempotency-Key": KEY})
    assert (first.status_code, again.status_code) == (200, 200), again.text
    assert again.json() == first.json()
    later = await client.post(
        "/run-json/?wait=false", json={"code": "print(1)"}, headers={"Idempotency-Key": KEY}
    )
    assert later.status_code == 202, later.text
    assert (later.json()["id"], later.json()["status"]) == (first.json()["id"], "succeeded")
    assert len(runner.calls) == 1
    fresh = await client.post("/run-json/", json={"code": "print(1)"}, headers={"Idempotency-Key": "another"})
    assert fresh.json()["id"] != first.json()["id"]
    assert len(runner.calls) == 2


async def test_an_uploaded_script_with_a_repeated_key_runs_once(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """/run-file/ takes the key too: the same script and fields under one key are one run,
    whatever multipart boundary each request used."""
    ids = set()
    for _ in range(2):
        response = await client.post(
            "/run-file/",
            files={"file": ("main.py", b"print(2)")},
            data={"timeout": "3"},
            headers={"Idempotency-Key": "upload-1"},
        )
        assert response.status_code == 200, response.text
        ids.add(response.json()["id"])
    assert len(ids) == 1
    assert len(runner.calls) == 1


async def test_a_key_sent_again_with_another_body_is_a_422_problem(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """Reusing a key for different code is refused, naming the header and the first run; nothing runs."""
    first = await client.post("/run-json/", json={"code": "print(1)"}, headers={"Idempotency-Key": KEY})
    other = await client.post("/run-json/", json={"code": "print(2)"}, headers={"Idempotency-Key": KEY})
    body = assert_problem(other, 422, "Idempotency-Key", first.json()["id"])
    assert body["type"].endswith("idempotency-key-reused")
    assert len(runner.calls) == 1


@pytest.mark.parametrize(
    "value",
    ["", '""', "x" * 256, '"' + "x" * 256 + '"', "has space", 'in"side', "back\\slash", "caf\u00e9", '"open'],
)
async def test_a_malformed_idempotency_key_is_a_400_problem(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, value: str
) -> None:
    """Keys longer than 255 characters, empty, or outside visible ASCII (or with a stray quote)
    are refused before anything is stored."""
    response = await client.post(
        "/run-json/",
        json={"code": "print(1)"},
        headers=httpx.Headers({b"Idempotency-Key": value.encode("utf-8")}),
    )
    assert_problem(response, 400, "Idempotency-Key")
    assert runner.calls == []


async def test_a_stored_run_whose_wait_fails_is_answered_202_with_its_id(
    client: AsyncTestClient[Litestar], service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store fails while a blocking submit waits: the answer is 202 naming the stored run (its
    status URL in Location), never a bare 503 that a client would resubmit."""

    async def broken(run_id: str, timeout: float) -> RunResult | None:
        raise StoreError("the run store did not answer within 10 s")

    monkeypatch.setattr(service.queue.results, "wait", broken)
    response = await client.post("/run-json/", json={"code": "print(1)"}, headers={"Idempotency-Key": KEY})
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    assert response.headers["location"].endswith(f"/status/{run_id}")
    monkeypatch.undo()
    again = await client.post("/run-json/", json={"code": "print(1)"}, headers={"Idempotency-Key": KEY})
    assert (again.status_code, again.json()["id"]) == (200, run_id)


async def test_the_schema_documents_the_header_on_both_submits(client: AsyncTestClient[Litestar]) -> None:
    """/schema/openapi.json lists Idempotency-Key as an optional header of /run-json/ and /run-file/."""
    schema = (await client.get("/schema/openapi.json")).json()
    for path in ("/run-json", "/run-file"):
        params: list[dict[str, Any]] = schema["paths"][path]["post"]["parameters"]
        (header,) = [p for p in params if p["name"] == "Idempotency-Key"]
        assert (header["in"], header["required"]) == ("header", False)
        assert "never runs it again" in header["description"]


def test_the_client_sends_a_fresh_key_per_submit_and_the_same_on_its_retries() -> None:
    """Each submit carries its own Idempotency-Key; a submit retried after a 503 sends the same one."""
    seen: list[str] = []
    answers = iter([503, 202, 202])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Idempotency-Key"])
        status = next(answers)
        if status == 503:
            problem = {"status": 503, "title": "Run store unavailable", "detail": "try again"}
            return httpx.Response(503, json=problem, headers={"Retry-After": "0"})
        accepted = {"id": "0" * 32, "status": "queued", "status_url": "u", "stream_url": "s"}
        return httpx.Response(202, json=accepted)

    with Client("http://warmpod.test", transport=httpx.MockTransport(handler)) as warmpod:
        warmpod.submit("print(1)")
        warmpod.submit("print(1)")
    assert seen[0] == seen[1] != seen[2]
    assert all(key.startswith('"') and len(key) == 38 for key in seen)
