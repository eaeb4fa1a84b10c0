"""API tests: the real Litestar app, with a fake service whose runner returns canned results."""

from __future__ import annotations

import base64
import contextlib
import json
import re
import warnings
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import anyio
import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import (
    IMAGE,
    IN_BYTES,
    IN_COUNT,
    IN_FILE_BYTES,
    MAX_BODY,
    MAX_QUEUED,
    NODE,
    POOL_SIZE,
    PROBLEMS,
    assert_problem,
    has_status,
)
from support.fakes import FakeLeaser, RecordingRunner, mark_serving
from support.waiting import until

from warmpod.errors import StoreError
from warmpod.http.app import begin_drain, create_app
from warmpod.http.status import _events
from warmpod.models import Chunk, RunResult
from warmpod.queue.results import FILE_PIECE, Update
from warmpod.queue.store.base import OUTPUT_PAGE, Fence
from warmpod.queue.store.sqlite import SqliteStore
from warmpod.queue.workers import FLUSH_INTERVAL
from warmpod.sandbox.limits import RunLimits
from warmpod.sandbox.protocol import FileChunk, Output
from warmpod.service import Service
from warmpod.settings import Settings

# /run-json/ -------------------------------------------------------------------------------------


async def test_run_json_returns_the_run_result(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A valid JSON request is handed to the runner as bytes and its result returned as JSON."""
    response = await client.post("/run-json/", json={"code": "print(1)", "stdin": "é\n", "timeout": 2.5})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert re.fullmatch("[0-9a-f]{32}", body["id"])
    assert body == {
        "id": body["id"],
        "status": "succeeded",
        "exit_code": 0,
        "stdout": "1\n",
        "stderr": "",
        "stdout_truncated": False,
        "stderr_truncated": False,
        "limits_hit": [],
        "duration_ms": 3.5,
        "error": None,
        "files": [],
        "files_truncated": False,
        "node": NODE,
        "sources": {},
        "environment": "default",
        "labels": {},
        "webhook": None,
    }
    assert runner.calls == [(b"print(1)", "é\n".encode(), 2.5)]


async def test_run_json_without_optional_fields(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """Only ``code`` is required: stdin defaults to empty and the timeout to the server's."""
    response = await client.post("/run-json/", json={"code": "pass"})
    assert response.status_code == 200, response.text
    assert runner.calls == [(b"pass", b"", 10.0)]


async def test_run_json_reports_a_failed_run_as_200(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A program that failed is a successful request: 200 with status failed, not an HTTP error."""
    runner.result = RunResult(
        id="1" * 32,
        status="failed",
        exit_code=1,
        stdout="",
        stderr="Traceback ...\nValueError: boom\n",
        stdout_truncated=False,
        stderr_truncated=False,
        limits_hit=[],
        duration_ms=9.0,
    )
    response = await client.post("/run-json/", json={"code": "raise ValueError('boom')"})
    assert response.status_code == 200
    assert response.json()["status"] == "failed"
    assert response.json()["exit_code"] == 1


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        pytest.param(b"{code: 'print(1)'}", 400, ["JSON"], id="malformed-json"),
        pytest.param(b"print(1)", 400, ["JSON"], id="not-json"),
        pytest.param(b'{"code": "print(1)"', 400, ["JSON"], id="truncated-json"),
        pytest.param(b"", 400, ["JSON"], id="empty-body"),
        pytest.param(b'["print(1)"]', 400, ["object"], id="array"),
        pytest.param(b"{}", 400, ["code"], id="missing-code"),
        pytest.param(b'{"stdin": "x"}', 400, ["code"], id="missing-code-with-stdin"),
        pytest.param(b'{"code": 1}', 400, ["code", "str"], id="code-int"),
        pytest.param(b'{"code": null}', 400, ["code", "str"], id="code-null"),
        pytest.param(b'{"code": ["print(1)"]}', 400, ["code", "str"], id="code-list"),
        pytest.param(b'{"code": "pass", "stdin": 5}', 400, ["stdin", "str"], id="stdin-int"),
        pytest.param(b'{"code": "pass", "bogus": 1}', 400, ["bogus"], id="unknown-field"),
        pytest.param(b'{"code": "pass", "timeout": true}', 400, ["timeout"], id="timeout-bool"),
    ],
)
async def test_bad_json_body_is_a_problem(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, body: bytes, status: int, words: list[str]
) -> None:
    """A malformed or wrongly shaped JSON body is a 400 problem saying what to fix; nothing runs."""
    response = await client.post("/run-json/", content=body, headers={"content-type": "application/json"})
    assert_problem(response, status, *words)
    assert runner.calls == []


@pytest.mark.parametrize("timeout", [0, -1, -0.001])
async def test_timeout_not_above_zero_is_a_problem(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, timeout: float
) -> None:
    """A timeout of 0 or less does not fit the request's schema: a 400 invalid-request problem naming it."""
    response = await client.post("/run-json/", json={"code": "pass", "timeout": timeout})
    body = assert_problem(response, 400, "timeout")
    assert body["type"] == PROBLEMS + "invalid-request"
    assert runner.calls == []


@pytest.mark.parametrize("timeout", [60.5, 3600])
async def test_timeout_above_the_maximum_is_a_problem_naming_it(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, timeout: float
) -> None:
    """A timeout above limits.max_timeout is a 422 limit problem that names the maximum."""
    response = await client.post("/run-json/", json={"code": "pass", "timeout": timeout})
    body = assert_problem(response, 422, "timeout", "at most 60 seconds")
    assert body["type"] == PROBLEMS + "limit"
    assert runner.calls == []


async def test_timeout_at_the_maximum_is_accepted(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A timeout equal to limits.max_timeout is allowed."""
    response = await client.post("/run-json/", json={"code": "pass", "timeout": 60})
    assert response.status_code == 200, response.text
    assert runner.calls == [(b"pass", b"", 60.0)]


async def test_body_over_the_limit_is_413(client: AsyncTestClient[Litestar], runner: RecordingRunner) -> None:
    """A JSON body over server.max_body_bytes is a 413 problem naming the limit, and nothing runs."""
    response = await client.post("/run-json/", json={"code": "#" * (MAX_BODY + 1)})
    assert_problem(response, 413, str(MAX_BODY))
    assert runner.calls == []


async def test_body_just_under_the_limit_is_accepted(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A body of exactly server.max_body_bytes is accepted."""
    prefix, suffix = b'{"code": "', b'"}'
    body = prefix + b"#" * (MAX_BODY - len(prefix) - len(suffix)) + suffix
    assert len(body) == MAX_BODY
    response = await client.post("/run-json/", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert len(runner.calls) == 1


# /run-file/ -------------------------------------------------------------------------------------


async def test_run_file_with_stdin_and_timeout(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """An uploaded file with stdin and timeout fields is run with the file's bytes, that stdin and timeout."""
    script = b"import sys\nprint(sys.stdin.read())\n\xff"
    response = await client.post(
        "/run-file/",
        files={
            "file": ("main.py", script, "text/x-python"),
            "stdin": (None, b"input\n"),
            "timeout": (None, b"3"),
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert runner.calls == [(script, b"input\n", 3.0)]


async def test_run_file_with_file_only(client: AsyncTestClient[Litestar], runner: RecordingRunner) -> None:
    """stdin and timeout are optional: empty stdin and the server's default timeout."""
    response = await client.post("/run-file/", files={"file": ("main.py", b"pass\n")})
    assert response.status_code == 200, response.text
    assert runner.calls == [(b"pass\n", b"", 10.0)]


async def test_run_file_takes_stdin_as_an_uploaded_file(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """stdin may also be sent as a file part, for binary input."""
    response = await client.post(
        "/run-file/", files={"file": ("main.py", b"pass\n"), "stdin": ("in.bin", b"\x00\xff")}
    )
    assert response.status_code == 200, response.text
    assert runner.calls == [(b"pass\n", b"\x00\xff", 10.0)]


@pytest.mark.parametrize(
    ("files", "status", "words"),
    [
        pytest.param({"stdin": (None, b"x")}, 400, ["file"], id="missing-file"),
        pytest.param({"file": (None, b"print(1)")}, 400, ["file"], id="file-as-plain-field"),
        pytest.param(
            {"file": ("m.py", b"pass"), "timeout": (None, b"soon")}, 400, ["timeout"], id="timeout-text"
        ),
        pytest.param(
            {"file": ("m.py", b"pass"), "timeout": (None, b"nan")}, 400, ["timeout"], id="timeout-nan"
        ),
        pytest.param(
            {"file": ("m.py", b"pass"), "timeout": (None, b"0")}, 400, ["timeout"], id="timeout-zero"
        ),
        pytest.param(
            {"file": ("m.py", b"pass"), "timeout": (None, b"90")}, 422, ["timeout", "60"], id="timeout-big"
        ),
        pytest.param({"file": ("m.py", b"pass"), "bogus": (None, b"1")}, 400, ["bogus"], id="unknown-field"),
        pytest.param({"file": ("m.py", b"#" * (MAX_BODY + 1))}, 413, [str(MAX_BODY)], id="too-large"),
    ],
)
async def test_bad_form_is_a_problem(
    client: AsyncTestClient[Litestar],
    runner: RecordingRunner,
    files: dict[str, tuple[str | None, bytes]],
    status: int,
    words: list[str],
) -> None:
    """A form without a file, with a non-numeric or out-of-range timeout, or an unknown field is a problem."""
    response = await client.post("/run-file/", files=files)
    assert_problem(response, status, *words)
    assert runner.calls == []


async def test_run_file_without_multipart_is_a_problem(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A JSON body sent to /run-file/ is a 400 problem, not a 500."""
    response = await client.post("/run-file/", json={"code": "print(1)"})
    assert_problem(response, 400)
    assert runner.calls == []


# Availability -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/run-json/", "/run-file/"])
async def test_a_run_waits_through_a_pool_outage(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, leaser: FakeLeaser, path: str
) -> None:
    """When no sandbox can be leased the run stays queued and is retried; it is never lost or failed."""
    leaser.failures = 2
    if path == "/run-json/":
        response = await client.post(path, json={"code": "pass"})
    else:
        response = await client.post(path, files={"file": ("main.py", b"pass")})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert leaser.failures == 0
    assert len(runner.calls) == 1


async def test_unexpected_error_is_an_error_result_without_internals(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A bug in the server ends the run with status error and a generic message that leaks nothing."""
    runner.error = RuntimeError("secret /var/lib/warmpod path")
    response = await client.post("/run-json/", json={"code": "pass"})
    assert response.status_code == 200, response.text
    assert "secret" not in response.text
    body = response.json()
    assert body["status"] == "error"
    assert "server log" in body["error"]
    # The worker survived it.
    runner.error = None
    response = await client.post("/run-json/", json={"code": "pass"})
    assert response.json()["status"] == "succeeded"


async def test_health_reports_image_engine_and_pool(client: AsyncTestClient[Litestar]) -> None:
    """/health is 200 once the pool serves, with the image, Podman version and pool counts."""
    response = await client.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert body["image"] == IMAGE
    assert body["podman_version"] == "4.3.1"
    assert body["pool"] == {
        "ready": 0,
        "busy": 0,
        "starting": 0,
        "closing": 0,
        "target": POOL_SIZE,
        "environments": {
            "default": {
                "ready": 0,
                "busy": 0,
                "starting": 0,
                "target": POOL_SIZE,
                "min_warm": POOL_SIZE,
                "waiting": 0,
            }
        },
    }
    assert body["rootless"] is False
    assert body["cgroup_version"] == 1
    assert body["paused_idle"] is True
    assert body["queue"] == {"queued": 0, "running": 0, "max_queued": MAX_QUEUED, "unserved": {}}


async def test_health_is_503_until_the_pool_serves(
    client: AsyncTestClient[Litestar], service: Service
) -> None:
    """/health is 503 with Retry-After and status starting while the pool has not yet filled once."""
    mark_serving(service.pool, False)
    response = await client.get("/health")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["status"] == "starting"


async def test_health_is_503_before_the_service_has_started(app: Litestar) -> None:
    """/health and runs are 503 problems with Retry-After while the lifespan has not started the service."""
    # httpx's ASGI transport does not run the lifespan, so the service is never set. (Litestar's
    # precise ASGI signature and httpx's loose one do not unify for mypy, hence the cast.)
    transport = httpx.ASGITransport(app=cast(Any, app))
    async with httpx.AsyncClient(transport=transport, base_url="http://warmpod.test") as client:
        for response in [await client.get("/health"), await client.post("/run-json/", json={"code": "pass"})]:
            assert_problem(response, 503, "starting")
            assert response.headers["retry-after"] == "1"


# OpenAPI ----------------------------------------------------------------------------------------


async def test_openapi_documents_both_run_endpoints(client: AsyncTestClient[Litestar]) -> None:
    """The OpenAPI schema is served and documents POST /run-json/ (RunRequest -> RunResult) and /run-file/."""
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/vnd.oai.openapi+json"
    schema = response.json()
    assert schema["openapi"] == "3.1.0"
    # Litestar normalises route paths without their trailing slash; both spellings are routed.
    paths = {path.rstrip("/"): item for path, item in schema["paths"].items()}
    run_json = paths["/run-json"]["post"]
    run_file = paths["/run-file"]["post"]
    assert run_json["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/RunRequest")
    assert run_json["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/RunResult"
    )
    assert "multipart/form-data" in run_file["requestBody"]["content"]
    assert run_file["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/RunResult"
    )
    components = schema["components"]["schemas"]
    # ``code`` or an ``entrypoint`` among ``files``: neither is required alone.
    assert not components["RunRequest"].get("required")
    assert set(components["RunRequest"]["properties"]) == {
        "code",
        "stdin",
        "timeout",
        "cpu_time",
        "memory_mb",
        "max_output_bytes",
        "wait",
        "files",
        "entrypoint",
        "args",
        "env",
        "secrets",
        "sources",
        "environment",
        "labels",
        "callback_url",
    }
    assert components["RunRequest"]["properties"]["files"]["items"]["$ref"].endswith("/InputFile")
    assert set(components["InputFile"]["properties"]) == {"path", "content"}
    assert set(components["OutputFile"]["properties"]) == {"path", "size", "media_type", "content", "url"}
    assert set(components["RunResult"]["properties"]) == {
        "id",
        "status",
        "exit_code",
        "stdout",
        "stderr",
        "stdout_truncated",
        "stderr_truncated",
        "limits_hit",
        "duration_ms",
        "error",
        "files",
        "files_truncated",
        "node",
        "sources",
        "environment",
        "labels",
        "webhook",
    }
    assert set(components["SourceUse"]["properties"]) == {"connections", "refused", "bytes_in", "bytes_out"}
    assert set(run_json["responses"]) == {"200", "202", "400", "401", "403", "413", "422", "429", "503"}


# Upkeep -----------------------------------------------------------------------------------------


def test_app_builds_without_deprecations(settings: Settings) -> None:
    """Building the app uses no Litestar API deprecated for removal (inferred dependencies, unmarked data)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_app(settings)
    assert [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)] == []


@pytest.mark.parametrize(
    ("field", "value", "maximum"),
    [("cpu_time", 31, "30"), ("memory_mb", 513, "512"), ("max_output_bytes", 2**20 + 1, "1048576")],
)
async def test_limit_above_the_server_maximum_is_a_problem_naming_it(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, field: str, value: int, maximum: str
) -> None:
    """A per-request limit above the server's is refused with a 422 that names the maximum."""
    response = await client.post("/run-json/", json={"code": "pass", field: value})
    assert_problem(response, 422, field, maximum)
    assert runner.calls == []


@pytest.mark.parametrize("field", ["cpu_time", "memory_mb", "max_output_bytes"])
async def test_limit_of_zero_is_a_problem(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, field: str
) -> None:
    """A per-request limit must be a positive whole number."""
    response = await client.post("/run-json/", json={"code": "pass", field: 0})
    assert_problem(response, 400, field)


async def test_limits_reach_the_runner_from_json_and_form(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """Per-request limits from /run-json/ and /run-file/ are handed to the runner as asked."""
    wanted = RunLimits(cpu_time=2, memory_mb=128, max_output_bytes=1000)
    response = await client.post(
        "/run-json/", json={"code": "pass", "cpu_time": 2, "memory_mb": 128, "max_output_bytes": 1000}
    )
    assert response.status_code == 200, response.text
    response = await client.post(
        "/run-file/",
        files={"file": ("m.py", b"pass")},
        data={"cpu_time": "2", "memory_mb": "128", "max_output_bytes": "1000"},
    )
    assert response.status_code == 200, response.text
    assert runner.run_limits == [wanted, wanted]


# The queue --------------------------------------------------------------------------------------


async def test_wait_false_is_202_with_location_and_the_result_is_polled(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """wait=false answers 202 with id, status queued, absolute status and stream URLs and Location."""
    runner.hold = anyio.Event()
    response = await client.post("/run-json/", json={"code": "print(1)", "wait": False})
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"id", "status", "status_url", "stream_url"}
    assert body["status"] == "queued"
    assert body["status_url"] == f"http://testserver.local/status/{body['id']}"
    assert body["stream_url"] == f"http://testserver.local/status/{body['id']}/stream"
    assert response.headers["location"] == body["status_url"]
    await until(lambda: bool(runner.calls))
    polled = await client.get(f"/status/{body['id']}")
    assert polled.status_code == 200
    assert (polled.json()["status"], polled.json()["stdout"]) == ("running", "")
    runner.hold.set()
    await until(lambda: has_status(client, f"/status/{body['id']}", "succeeded"))


@pytest.mark.parametrize(
    ("request_kwargs", "status"),
    [
        pytest.param({"url": "/run-json/?wait=false", "json": {"code": "pass"}}, 202, id="json-query"),
        pytest.param({"url": "/run-json/?wait=true", "json": {"code": "pass"}}, 200, id="json-query-true"),
        pytest.param(
            {"url": "/run-file/", "files": {"file": ("m.py", b"pass")}, "data": {"wait": "false"}},
            202,
            id="form-field",
        ),
        pytest.param(
            {"url": "/run-file/?wait=0", "files": {"file": ("m.py", b"pass")}}, 202, id="form-query"
        ),
    ],
)
async def test_wait_is_taken_from_the_query_or_the_form(
    client: AsyncTestClient[Litestar], request_kwargs: dict[str, Any], status: int
) -> None:
    """``wait`` works as a query parameter on both endpoints and as a form field on /run-file/."""
    response = await client.post(**request_kwargs)
    assert response.status_code == status, response.text


@pytest.mark.parametrize(
    "request_kwargs",
    [
        pytest.param({"url": "/run-json/?wait=maybe", "json": {"code": "pass"}}, id="query-word"),
        pytest.param({"url": "/run-json/?wiat=false", "json": {"code": "pass"}}, id="query-unknown"),
        pytest.param(
            {"url": "/run-file/?wiat=false", "files": {"file": ("m.py", b"pass")}}, id="form-query-unknown"
        ),
        pytest.param({"url": "/run-json/", "json": {"code": "pass", "wait": "no"}}, id="json-string"),
        pytest.param({"url": "/run-json/?wait=true", "json": {"code": "pass", "wait": False}}, id="conflict"),
        pytest.param(
            {"url": "/run-file/", "files": {"file": ("m.py", b"pass")}, "data": {"wait": "later"}},
            id="form-word",
        ),
    ],
)
async def test_a_bad_wait_is_a_400_problem(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, request_kwargs: dict[str, Any]
) -> None:
    """A wait that is not a boolean, a misspelt one, or two that disagree, is a 400 problem naming
    it; nothing runs."""
    response = await client.post(**request_kwargs)
    assert_problem(response, 400, "wait")
    assert runner.calls == []


async def test_a_full_queue_is_429_with_retry_after(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """With every worker busy and max_queued runs waiting, the next submission is a 429 problem."""
    runner.hold = anyio.Event()
    accepted = [
        (await client.post("/run-json/", json={"code": "pass", "wait": False})).status_code
        for _ in range(POOL_SIZE + MAX_QUEUED)
    ]
    assert accepted == [202] * (POOL_SIZE + MAX_QUEUED)
    await until(lambda: len(runner.calls) >= POOL_SIZE)
    for response in (
        await client.post("/run-json/", json={"code": "pass", "wait": False}),
        await client.post("/run-json/", json={"code": "pass"}),
    ):
        body = assert_problem(response, 429, "queue", str(MAX_QUEUED))
        assert body["type"] == PROBLEMS + "queue-full"
        assert response.headers["retry-after"] == "1"
    health = (await client.get("/health")).json()
    assert health["queue"] == {
        "queued": MAX_QUEUED,
        "running": POOL_SIZE,
        "max_queued": MAX_QUEUED,
        "unserved": {},
    }
    runner.hold.set()


async def test_cancel_of_queued_and_running_runs(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """DELETE stops a running run (keeping its output) and a queued one; both end cancelled."""
    runner.hold = anyio.Event()
    runner.streamed = [Output(stream="stdout", data=b"so far\n")]
    ids = [
        (await client.post("/run-json/", json={"code": "pass", "wait": False})).json()["id"]
        for _ in range(POOL_SIZE + 1)
    ]
    await until(lambda: len(runner.calls) >= POOL_SIZE)
    running, queued = ids[0], ids[-1]
    assert (await client.get(f"/status/{queued}")).json()["status"] == "queued"
    response = await client.delete(f"/status/{queued}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    response = await client.delete(f"/status/{running}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert response.json()["stdout"] == "so far\n"
    runner.hold.set()
    assert len(runner.calls) == POOL_SIZE, "the cancelled queued run must never start"


async def test_the_stream_sends_status_output_and_result_events(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """The SSE stream of a run: output events named after their stream, with JSON text, then the result."""
    runner.streamed = [
        Output(stream="stdout", data=b"a\n"),
        Output(stream="stderr", data="é".encode()[:1]),
        Output(stream="stderr", data="é".encode()[1:]),
    ]
    # Apart by more than the store's flush interval: chunks that come together are merged.
    runner.pause = 2.5 * FLUSH_INTERVAL
    result = (await client.post("/run-json/", json={"code": "pass"})).json()
    response = await client.get(f"/status/{result['id']}/stream")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [block for block in response.text.split("\r\n\r\n") if block.strip()]
    parsed = [dict(line.split(": ", 1) for line in block.splitlines()) for block in blocks]
    assert [event["event"] for event in parsed] == ["stdout", "stderr", "stderr", "result"]
    assert [json.loads(event["data"]).get("text") for event in parsed[:3]] == ["a\n", "", "é"]
    assert [event.get("id") for event in parsed] == ["0", "1", "2", None]
    assert json.loads(parsed[-1]["data"]) == result


def sse_blocks(text: str) -> list[dict[str, str]]:
    """The events of an SSE body, each as its fields."""
    blocks = [block for block in text.split("\r\n\r\n") if block.strip()]
    return [dict(line.split(": ", 1) for line in block.splitlines()) for block in blocks]


async def test_output_longer_than_a_page_is_read_page_by_page(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with more stored chunks than a page: its status while running and its stream's replay
    show every chunk once, in order, each read of the store at most a page; a stream resumed
    after an id in the middle of a page sends exactly the chunks after it."""
    count = 2 * OUTPUT_PAGE + 3
    # Alternating streams: chunks that are never merged.
    runner.streamed = [
        Output(stream="stdout" if i % 2 == 0 else "stderr", data=f"{i},".encode()) for i in range(count)
    ]
    runner.hold = anyio.Event()
    limits: list[int] = []
    original = SqliteStore.output

    async def counted(
        self: SqliteStore, run_id: str, after: int = -1, limit: int = OUTPUT_PAGE
    ) -> list[Chunk]:
        limits.append(limit)
        return await original(self, run_id, after, limit)

    monkeypatch.setattr(SqliteStore, "output", counted)
    run_id = (await client.post("/run-json/", json={"code": "pass", "wait": False})).json()["id"]
    stdout = "".join(f"{i}," for i in range(0, count, 2))
    stderr = "".join(f"{i}," for i in range(1, count, 2))
    status: dict[str, Any] = {}

    async def printed() -> bool:
        status.update((await client.get(f"/status/{run_id}")).json())
        return bool(status["stdout"] == stdout)

    await until(printed, interval=0.05)
    assert (status["status"], status["stderr"]) == ("running", stderr)
    runner.hold.set()
    await until(lambda: has_status(client, f"/status/{run_id}", "succeeded"), interval=0.05)
    limits.clear()
    events = sse_blocks((await client.get(f"/status/{run_id}/stream")).text)
    output = [event for event in events if event["event"] in ("stdout", "stderr")]
    assert [event["id"] for event in output] == [str(i) for i in range(count)]
    assert [json.loads(event["data"])["text"] for event in output] == [f"{i}," for i in range(count)]
    assert events[-1]["event"] == "result"
    assert len(limits) >= 3
    assert max(limits) <= OUTPUT_PAGE
    after = OUTPUT_PAGE + 1
    resumed = sse_blocks(
        (await client.get(f"/status/{run_id}/stream", headers={"Last-Event-ID": str(after)})).text
    )
    assert [event["id"] for event in resumed if "id" in event] == [str(i) for i in range(after + 1, count)]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_unknown_run_is_404_problem(client: AsyncTestClient[Litestar], method: str) -> None:
    """Unknown and malformed ids are 404 problems."""
    for run_id in ("f" * 32, "F" * 32, "x", "%00"):
        response = await client.request(method, f"/status/{run_id}")
        body = assert_problem(response, 404, "no run")
        assert body["type"] == PROBLEMS + "no-such-run"
    assert_problem(await client.request(method, "/status/../../etc"), 404)


async def test_waited_runs_leave_no_watch_behind(client: AsyncTestClient[Litestar], service: Service) -> None:
    """Blocking runs and a followed stream leave no per-run event in the queue once they end."""
    for _ in range(30):
        response = await client.post("/run-json/", json={"code": "pass"})
        assert response.status_code == 200, response.text
    stream = await client.get(f"/status/{response.json()['id']}/stream")
    assert stream.status_code == 200
    assert service.queue.results._changed == {}
    assert service.queue.results._watchers == {}


async def test_a_store_failure_during_a_run_does_not_stop_the_service(
    client: AsyncTestClient[Litestar],
    service: Service,
    runner: RecordingRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A StoreError while a run executes (writing its output) is logged; the run and the service go on."""

    polls: list[str] = []

    async def broken(fence: Fence, chunks: Sequence[Chunk]) -> bool:
        polls.append(fence.run_id)
        raise StoreError("database is locked")

    monkeypatch.setattr(service.queue.store, "add_output", broken)
    # Two chunks apart by more than a flush: two writes, both failing.
    runner.streamed = [Output(stream="stdout", data=b"a"), Output(stream="stdout", data=b"b")]
    runner.pause = 0.3
    runner.hold = anyio.Event()
    submitted = await client.post("/run-json/", json={"code": "pass", "wait": False})
    assert submitted.status_code == 202, submitted.text
    await until(lambda: len(polls) >= 2)  # the poll failed twice and the run goes on
    runner.hold.set()
    await until(lambda: has_status(client, f"/status/{submitted.json()['id']}", "succeeded"))
    again = await client.post("/run-json/", json={"code": "pass"})
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "succeeded"


async def test_the_sandbox_goes_before_a_failing_store_records_the_result(
    client: AsyncTestClient[Litestar],
    service: Service,
    leaser: FakeLeaser,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run's sandbox is given up (its container removed) as soon as the run ends, before its
    result's write is retried through a store outage: not once the result is finally recorded."""
    store = service.queue.store
    real = store.finish
    attempts: list[str] = []

    async def flaky(run_id: str, result: RunResult, *args: Any, **kwargs: Any) -> bool:
        leaser.events.append("finish")
        attempts.append(run_id)
        if len(attempts) <= 2:
            raise StoreError("database is locked")
        return await real(run_id, result, *args, **kwargs)

    monkeypatch.setattr(store, "finish", flaky)
    response = await client.post("/run-json/", json={"code": "pass"})
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert leaser.events == ["lease", "release", "finish", "finish", "finish"]


async def test_a_cancelled_runs_sandbox_goes_before_a_failing_store_records_it(
    client: AsyncTestClient[Litestar],
    service: Service,
    leaser: FakeLeaser,
    runner: RecordingRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run cancelled while the store cannot record results has its sandbox given up at once;
    the cancelled result is written afterwards, once the store takes it."""
    store = service.queue.store
    real = store.finish
    attempts: list[str] = []

    async def flaky(run_id: str, result: RunResult, *args: Any, **kwargs: Any) -> bool:
        leaser.events.append("finish")
        attempts.append(run_id)
        if len(attempts) <= 2:
            raise StoreError("database is locked")
        return await real(run_id, result, *args, **kwargs)

    monkeypatch.setattr(store, "finish", flaky)
    runner.hold = anyio.Event()
    run_id = (await client.post("/run-json/", json={"code": "pass", "wait": False})).json()["id"]
    await until(lambda: bool(runner.calls))
    response = await client.delete(f"/status/{run_id}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert leaser.events == ["lease", "release", "finish", "finish", "finish"]
    runner.hold.set()


async def test_a_keepalive_is_a_comment_without_data(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet stream's keepalive is ``: keepalive`` alone: no empty data line a client would parse."""

    async def quiet(run_id: str, after: int) -> AsyncIterator[Update]:
        yield Update("keepalive")

    monkeypatch.setattr(service.queue.results, "follow", quiet)
    messages = [m async for m in _events(service.queue.results, "0" * 32, -1)]
    assert [m.encode() for m in messages] == [b": keepalive\r\n\r\n"]


async def test_sigterm_during_start_up_stops_it_and_cleans_up(settings: Settings, service: Service) -> None:
    """begin_drain (what SIGTERM calls) while the service is still starting, say waiting for its
    first sandbox up to the start-up timeout, ends the start-up at once and runs the service's
    cleanup; uvicorn, told to exit, then shuts down. Before, start-up ignored it until the wait ended."""
    entered, cleaned = anyio.Event(), anyio.Event()

    @contextlib.asynccontextmanager
    async def never_ready(given: Settings) -> AsyncIterator[Service]:
        entered.set()
        try:
            await anyio.sleep_forever()
            yield service  # never reached
        finally:
            cleaned.set()

    app = create_app(settings, service_factory=never_ready)
    sent: list[str] = []
    to_app = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    started = anyio.Event()

    async def receive() -> dict[str, Any]:
        if len(to_app) == 1:
            await started.wait()
        return to_app.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])
        started.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
            tg.start_soon(app, scope, receive, send)  # type: ignore[arg-type]
            await entered.wait()
            begin_drain(app, 1.0)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert cleaned.is_set()
    assert app.state.get("service") is None


# Files in and out -------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    """``data`` in base64, as a client sends file contents."""
    return base64.b64encode(data).decode()


async def test_run_json_takes_files(client: AsyncTestClient[Litestar], runner: RecordingRunner) -> None:
    """The JSON body's files reach the run decoded, in the order sent, each at its path."""
    files = [
        {"path": "data/sales.csv", "content": b64(b"a,b\n1,2\n")},
        {"path": "c.json", "content": b64(b"\xff")},
    ]
    response = await client.post("/run-json/", json={"code": "pass", "files": files})
    assert response.status_code == 200, response.text
    assert runner.files == [(("data/sales.csv", b"a,b\n1,2\n"), ("c.json", b"\xff"))]


async def test_run_file_takes_files_parts(client: AsyncTestClient[Litestar], runner: RecordingRunner) -> None:
    """Each multipart part named files is an input file whose filename is its path."""
    parts = [
        ("file", ("main.py", b"pass")),
        ("files", ("data/sales.csv", b"a,b\n")),
        ("files", ("deep/er/x.bin", b"\x00\x01")),
    ]
    response = await client.post("/run-file/", files=parts)
    assert response.status_code == 200, response.text
    assert runner.files == [(("data/sales.csv", b"a,b\n"), ("deep/er/x.bin", b"\x00\x01"))]
    single = await client.post(
        "/run-file/", files=[("file", ("m.py", b"pass")), ("files", ("one.txt", b"1"))]
    )
    assert single.status_code == 200, single.text
    assert runner.files[-1] == (("one.txt", b"1"),)


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("..", "'..'"),
        ("a\\b", "backslash"),
        ("a\x00b", "NUL"),
        (".", "'.'"),
        ("./a", "'.'"),
        ("a//b", "empty"),
        ("a/", "empty"),
        ("main.py", "reserved"),
        ("out", "reserved"),
        ("out/chart.png", "reserved"),
        ("x" * 256, "255 bytes"),
        ("a/" * 600 + "b", "1024"),
    ],
)
async def test_bad_file_paths_are_422_naming_the_rule(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, path: str, rule: str
) -> None:
    """Every input path rule, broken in JSON or a multipart part, is a 422 problem naming it and the path."""
    body = json.dumps({"code": "pass", "files": [{"path": path, "content": ""}]})
    response = await client.post("/run-json/", content=body, headers={"content-type": "application/json"})
    problem = assert_problem(response, 422, rule, repr(path[:30])[1:-1][:20])
    assert problem["type"] == PROBLEMS + "file"
    if path and "\x00" not in path:
        parts = [("file", ("m.py", b"pass")), ("files", (path, b""))]
        assert_problem(await client.post("/run-file/", files=parts), 422, rule)
    assert runner.calls == []


async def test_a_filename_that_is_not_utf8_is_refused(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A multipart filename in bytes that are not UTF-8 is a 4xx problem, not a file with a mangled name."""
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="m.py"\r\n\r\npass\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="'.encode()
        + b"\xff\xfe.csv"
        + f'"\r\n\r\n1\r\n--{boundary}--\r\n'.encode()
    )
    response = await client.post(
        "/run-file/", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert runner.calls == []


@pytest.mark.parametrize(
    ("paths", "words"),
    [
        (["a.csv", "a.csv"], ["twice", "a.csv"]),
        (["data", "data/x.csv"], ["directory", "data"]),
        (["a/b/c", "a/b"], ["directory", "a/b"]),
    ],
)
async def test_clashing_file_paths_are_422(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, paths: list[str], words: list[str]
) -> None:
    """A path given twice, or a file that is also another file's directory, is a 422 problem."""
    files = [{"path": path, "content": ""} for path in paths]
    assert_problem(await client.post("/run-json/", json={"code": "pass", "files": files}), 422, *words)
    assert runner.calls == []


async def test_bad_base64_and_caps_are_422_naming_the_maximum(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """Content that is not base64, and more files, a larger file or more bytes than allowed, are 422s."""
    for content in ("not base64!", "YQ", "YQ==\n", "YWJj ZA=="):
        files = [{"path": "a.txt", "content": content}]
        assert_problem(
            await client.post("/run-json/", json={"code": "pass", "files": files}), 422, "base64", "a.txt"
        )
    many = [{"path": f"f{i}", "content": ""} for i in range(IN_COUNT + 1)]
    assert_problem(await client.post("/run-json/", json={"code": "pass", "files": many}), 422, str(IN_COUNT))
    big = [{"path": "big", "content": b64(b"x" * (IN_FILE_BYTES + 1))}]
    assert_problem(
        await client.post("/run-json/", json={"code": "pass", "files": big}), 422, str(IN_FILE_BYTES), "big"
    )
    total = [{"path": f"f{i}", "content": b64(b"x" * 400)} for i in range(3)]
    assert_problem(await client.post("/run-json/", json={"code": "pass", "files": total}), 422, str(IN_BYTES))
    parts = [("file", ("m.py", b"pass")), ("files", ("big", b"x" * (IN_FILE_BYTES + 1)))]
    assert_problem(await client.post("/run-file/", files=parts), 422, str(IN_FILE_BYTES))
    text_part = await client.post("/run-file/", files=[("file", ("m.py", b"pass"))], data={"files": "x"})
    assert_problem(text_part, 400, "filename")
    assert runner.calls == []


def left(path: str, data: bytes) -> list[FileChunk]:
    """The frames an agent sends for one file: 7-byte pieces, the last one marked."""
    pieces = [data[i : i + 7] for i in range(0, len(data), 7)] or [b""]
    return [FileChunk(path=path, data=piece, end=i == len(pieces) - 1) for i, piece in enumerate(pieces)]


async def test_files_left_in_out_come_back_and_download(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """Collected files are listed in path order with size and media type, inline up to the inline cap,
    and each downloads as raw bytes with its media type and headers that keep a browser from running it."""
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 30
    runner.left = [*left("out/summary.csv", b"a,b\n1,2\n"), *left("out/chart.png", png), *left("out/e", b"")]
    body = (await client.post("/run-json/", json={"code": "pass"})).json()
    files = f"/status/{body['id']}/files/out/"
    assert body["files"] == [
        {
            "path": "out/chart.png",
            "size": len(png),
            "media_type": "image/png",
            "content": None,
            "url": files + "chart.png",
        },
        {
            "path": "out/e",
            "size": 0,
            "media_type": "application/octet-stream",
            "content": "",
            "url": files + "e",
        },
        {
            "path": "out/summary.csv",
            "size": 8,
            "media_type": "text/csv",
            "content": b64(b"a,b\n1,2\n"),
            "url": files + "summary.csv",
        },
    ]
    assert body["files_truncated"] is False
    status = (await client.get(f"/status/{body['id']}")).json()
    assert status == body
    download = await client.get(f"/status/{body['id']}/files/out/chart.png")
    assert download.status_code == 200
    assert download.content == png
    assert download.headers["content-type"] == "image/png"
    assert download.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in download.headers["content-security-policy"]
    assert download.headers["content-disposition"].startswith("attachment")
    csv = await client.get(f"/status/{body['id']}/files/out/summary.csv")
    assert csv.content == b"a,b\n1,2\n"
    # Listed as text/csv, served as bytes to save: only raster images keep their type.
    assert csv.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize(
    ("path", "served"),
    [
        ("out/page.html", "application/octet-stream"),
        ("out/drawing.svg", "application/octet-stream"),
        ("out/feed.xml", "application/octet-stream"),
        ("out/doc.pdf", "application/octet-stream"),
        ("out/app.js", "application/octet-stream"),
        ("out/notes.txt", "application/octet-stream"),
        ("out/photo.jpeg", "image/jpeg"),
        ("out/anim.gif", "image/gif"),
        ("out/pic.webp", "image/webp"),
    ],
)
async def test_a_download_is_never_a_page_of_this_origin(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, path: str, served: str
) -> None:
    """A file a run left is served as octet-stream (raster images aside), as an attachment, not
    sniffed and sandboxed: an out/x.html or .svg can never open as a page of warmpod's origin."""
    runner.left = left(path, b"<html><script>alert(1)</script></html>")
    body = (await client.post("/run-json/", json={"code": "pass"})).json()
    download = await client.get(f"/status/{body['id']}/files/{path}")
    assert download.status_code == 200
    assert download.headers["content-type"] == served
    assert download.headers["content-disposition"].startswith("attachment;")
    assert download.headers["x-content-type-options"] == "nosniff"
    policy = [part.strip() for part in download.headers["content-security-policy"].split(";")]
    assert "sandbox" in policy
    assert "default-src 'none'" in policy


async def test_unknown_files_are_404_problems(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """A path the run did not leave, a run still going and an unknown run are 404 problems."""
    runner.left = left("out/a.txt", b"a")
    done = (await client.post("/run-json/", json={"code": "pass"})).json()
    for path in ("out/b.txt", "out", "out/a.txt/x", "a.txt", "out/A.txt"):
        body = assert_problem(await client.get(f"/status/{done['id']}/files/{path}"), 404)
        assert body["type"] in (PROBLEMS + "no-such-file", PROBLEMS + "no-such-run")
    assert_problem(await client.get(f"/status/{'f' * 32}/files/out/a.txt"), 404, "no run")
    runner.hold = anyio.Event()
    queued = (await client.post("/run-json/?wait=false", json={"code": "pass"})).json()
    assert_problem(await client.get(f"/status/{queued['id']}/files/out/a.txt"), 404, "ended")
    runner.hold.set()


async def test_a_large_download_is_streamed_in_pieces_with_its_length(
    client: AsyncTestClient[Litestar], runner: RecordingRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file larger than a piece downloads whole, with its Content-Length, read from the store one
    FILE_PIECE at a time and never whole: a reader who stops reading holds a piece, not the file;
    an empty file is an empty answer."""
    data = bytes(range(256)) * (2 * FILE_PIECE // 256) + b"and a bit"
    runner.left = [
        FileChunk(path="out/big.bin", data=data, end=True),
        FileChunk(path="out/empty", data=b"", end=True),
    ]
    body = (await client.post("/run-json/", json={"code": "pass"})).json()
    read: list[int] = []
    piece = SqliteStore.file_piece

    async def recorded(store: SqliteStore, run_id: str, path: str, offset: int, size: int) -> bytes | None:
        read.append(size)
        return await piece(store, run_id, path, offset, size)

    monkeypatch.setattr(SqliteStore, "file_piece", recorded)
    download = await client.get(f"/status/{body['id']}/files/out/big.bin")
    assert download.status_code == 200
    assert download.content == data
    assert download.headers["content-length"] == str(len(data))
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-disposition"].startswith("attachment;")
    assert read == [FILE_PIECE, FILE_PIECE, len(b"and a bit")]
    empty = await client.get(f"/status/{body['id']}/files/out/empty")
    assert (empty.status_code, empty.content, empty.headers["content-length"]) == (200, b"", "0")


async def test_the_stream_sends_a_file_event_per_file_before_the_result(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """The SSE stream sends one file event (path, size, media type, no content) per file, then the result."""
    runner.left = [*left("out/a.txt", b"hello"), *left("out/b/c.json", b"{}")]
    result = (await client.post("/run-json/", json={"code": "pass"})).json()
    response = await client.get(f"/status/{result['id']}/stream")
    blocks = [block for block in response.text.split("\r\n\r\n") if block.strip()]
    parsed = [dict(line.split(": ", 1) for line in block.splitlines()) for block in blocks]
    assert [event["event"] for event in parsed] == ["file", "file", "result"]
    assert [json.loads(event["data"]) for event in parsed[:2]] == [
        {"path": "out/a.txt", "size": 5, "media_type": "text/plain"},
        {"path": "out/b/c.json", "size": 2, "media_type": "application/json"},
    ]
    assert json.loads(parsed[-1]["data"]) == result
