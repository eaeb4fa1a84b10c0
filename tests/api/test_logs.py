"""The real app's log of runs: one "run finished" line per run however it ended, and nothing of its code."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import anyio
import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import MAX_QUEUED, NODE, POOL_SIZE
from support.fakes import CANNED, RecordingRunner
from support.waiting import until

from warmpod import keys
from warmpod.logs import JsonFormatter
from warmpod.models import RunSpec
from warmpod.queue.store.base import Owner
from warmpod.queue.store.sqlite import SqliteStore
from warmpod.sandbox.protocol import Output
from warmpod.settings import Settings, from_env

CODE = "print('code-marker-91c2')"
STDIN = "stdin-marker-91c2"
PRINTED = "output-marker-91c2"


@pytest.fixture(params=[False, True], ids=["keys off", "keys on"])
def secret(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """The API key runs are submitted with (named ``ops``), or None where keys are off."""
    return keys.add(tmp_path / "keys", "ops") if request.param else None


@pytest.fixture
def settings(secret: str | None, tmp_path: Path) -> Settings:
    """The API suite's settings, with the keys file on where there is a key."""
    server: dict[str, object] = {} if secret is None else {"api_keys_file": str(tmp_path / "keys")}
    return from_env(
        {}, server=server, pool={"size": POOL_SIZE}, queue={"max_queued": MAX_QUEUED}, node={"name": NODE}
    )


async def test_each_run_logs_one_finished_line_and_nothing_of_its_code(
    app: Litestar, runner: RecordingRunner, secret: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs that succeed, fail on memory, break inside warmpod, are cancelled while queued and are
    stopped with the server each give exactly one JSON "run finished" line with their id, status,
    times, limits and key name; no line has their code, input, output or the key itself."""
    caplog.set_level(logging.INFO)
    headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
    runner.streamed = [Output(stream="stdout", data=PRINTED.encode())]
    runner.result = msgspec.structs.replace(CANNED, stdout=PRINTED, stderr=PRINTED)
    body = {"code": CODE, "stdin": STDIN}
    expected: dict[str, str] = {}
    async with AsyncTestClient(app) as client:

        async def run(status: str) -> None:
            response = await client.post("/run-json/", json=body, headers=headers)
            assert response.json()["status"] == status, response.text
            expected[response.json()["id"]] = status

        for _ in range(2):
            await run("succeeded")
        runner.result = msgspec.structs.replace(runner.result, status="failed", limits_hit=["memory"])
        await run("failed")
        runner.error = RuntimeError("broken runner")
        await run("error")
        runner.error = None
        runner.hold = anyio.Event()
        for _ in range(POOL_SIZE + 1):
            response = await client.post("/run-json/", json={**body, "wait": False}, headers=headers)
            expected[response.json()["id"]] = "error"  # stopped with the server
        await until(lambda: len(runner.calls) >= 4 + POOL_SIZE)
        response = await client.delete(f"/status/{response.json()['id']}", headers=headers)
        expected[response.json()["id"]] = "cancelled"
    # The app has stopped: its held runs, past the grace, were ended and reported.
    finished = [record for record in caplog.records if record.getMessage() == "run finished"]
    lines = [json.loads(JsonFormatter().format(record)) for record in finished]
    assert len(lines) == len(expected) == 5 + POOL_SIZE
    assert {line["run_id"]: line["status"] for line in lines} == expected
    for line in lines:
        assert set(line) == {
            "time",
            "level",
            "logger",
            "event",
            "run_id",
            "status",
            "duration_ms",
            "queue_ms",
            "limits_hit",
            "key",
            "node",
            "environment",
        }
        # Every run but the one cancelled while it waited ran on this node.
        assert line["node"] == (None if line["status"] == "cancelled" else NODE)
        assert (line["level"], line["logger"], line["event"]) == (
            "info",
            "warmpod.queue.workers",
            "run finished",
        )
        assert line["key"] == (None if secret is None else "ops")
        assert line["limits_hit"] == (["memory"] if line["status"] == "failed" else [])
        assert isinstance(line["duration_ms"], float)
        assert isinstance(line["queue_ms"], float)
        assert line["queue_ms"] >= 0
    everything = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    for secret_text in ("code-marker", STDIN, PRINTED, *([] if secret is None else [secret])):
        assert secret_text not in everything


async def test_a_run_the_last_server_left_executing_is_reported_once_at_start(
    app: Litestar, secret: str | None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run a killed server left executing is reported when the next one starts: one "run
    finished" line, status error, with the key name it was submitted with."""
    caplog.set_level(logging.INFO)
    store = await SqliteStore.open(tmp_path / "runs.sqlite3")
    spec = RunSpec(code=CODE.encode(), stdin=b"", timeout=1.0, cpu_time=1, memory_mb=64, max_output_bytes=64)
    key = None if secret is None else "ops"
    await store.add("a" * 32, spec, max_queued=MAX_QUEUED, key=key)
    assert await store.claim(Owner(node="gone", incarnation="gone-1"), 15.0) is not None
    await store.aclose()
    async with AsyncTestClient(app):
        pass
    lines = [
        json.loads(JsonFormatter().format(record))
        for record in caplog.records
        if record.getMessage() == "run finished"
    ]
    assert [(line["run_id"], line["status"], line["key"]) for line in lines] == [("a" * 32, "error", key)]
