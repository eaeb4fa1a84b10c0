"""warmpod.client against the real app served by uvicorn on loopback, with a fake pool."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from support.apitest import INLINE, MAX_QUEUED, POOL_SIZE, PROBLEMS
from support.fakes import RecordingRunner

from warmpod.client import AsyncClient, Client, ProblemError
from warmpod.models import Environment, FileEvent, Health, OutputEvent, RunResult, StatusEvent
from warmpod.sandbox.protocol import FileChunk, Output
from warmpod.service import Service


@pytest.fixture
def client(live: str) -> Iterator[Client]:
    """A blocking client of the live app (the name shadows the API suite's test client)."""
    with Client(live) as warmpod:
        yield warmpod


def staged(runner: RecordingRunner, pause: float = 0.3) -> None:
    """Make the runner print two lines to stdout and one to stderr, ``pause`` seconds apart."""
    runner.streamed = [
        Output(stream="stdout", data=b"first\n"),
        Output(stream="stderr", data=b"warning\n"),
        Output(stream="stdout", data=b"second\n"),
    ]
    runner.pause = pause


def test_run_calls_back_with_output_as_it_is_printed(client: Client, runner: RecordingRunner) -> None:
    staged(runner)
    seen: list[tuple[str, str, float]] = []
    result = client.run(
        "print('first')",
        stdin="ignored",
        on_stdout=lambda text: seen.append(("stdout", text, time.monotonic())),
        on_stderr=lambda text: seen.append(("stderr", text, time.monotonic())),
    )
    assert isinstance(result, RunResult)
    assert result.status == "succeeded"
    assert result.exit_code == 0
    assert [(stream, text) for stream, text, _ in seen] == [
        ("stdout", "first\n"),
        ("stderr", "warning\n"),
        ("stdout", "second\n"),
    ]
    # Live, not replayed at the end: the first line reached us while the run was still printing.
    (ended,) = runner.ended
    assert seen[0][2] < ended - 0.3, (seen, ended)
    assert runner.calls == [(b"print('first')", b"ignored", 10.0)]


async def test_async_run_takes_plain_and_async_callbacks(live: str, runner: RecordingRunner) -> None:
    staged(runner)
    stdout: list[tuple[str, float]] = []
    stderr: list[str] = []

    async def on_stdout(text: str) -> None:
        await anyio.lowlevel.checkpoint()  # a callback that does yield to the loop
        stdout.append((text, time.monotonic()))

    async with AsyncClient(live) as warmpod:
        result = await warmpod.run("print(1)", on_stdout=on_stdout, on_stderr=stderr.append)
    assert result.status == "succeeded"
    assert [text for text, _ in stdout] == ["first\n", "second\n"]
    assert stderr == ["warning\n"]
    assert stdout[0][1] < runner.ended[0] - 0.3


def test_files_go_in_and_come_back(client: Client, runner: RecordingRunner, tmp_path: Path) -> None:
    local = tmp_path / "sales.csv"
    local.write_bytes(b"region,total\n")
    big = bytes(range(40))  # above the inline cap of 16 bytes: fetched by path
    runner.left = [
        FileChunk(path="out/a.txt", data=b"small", end=True),
        FileChunk(path="out/big.bin", data=big, end=True),
    ]
    told: list[FileEvent] = []
    result = client.run("x", files=[local, ("data/raw.bin", b"\x00\xff")], on_file=told.append)
    assert runner.files == [(("sales.csv", b"region,total\n"), ("data/raw.bin", b"\x00\xff"))]
    assert [(event.path, event.size, event.media_type) for event in told] == [
        ("out/a.txt", 5, "text/plain"),
        ("out/big.bin", 40, "application/octet-stream"),
    ]
    small, large = result.files
    assert small.content is not None
    assert base64.b64decode(small.content) == b"small"
    assert large.size > INLINE
    assert large.content is None
    assert client.file(result.id, large.path) == big
    with pytest.raises(ProblemError) as caught:
        client.file(result.id, "out/none.txt")
    assert (caught.value.status, caught.value.type) == (404, PROBLEMS + "no-such-file")


def test_a_full_queue_is_retried_after_retry_after(
    client: Client, runner: RecordingRunner, live: str
) -> None:
    runner.hold = threading.Event()
    try:
        # POOL_SIZE runs executing and MAX_QUEUED waiting fill the queue.
        held = [client.submit("x") for _ in range(POOL_SIZE + MAX_QUEUED)]
        with pytest.raises(ProblemError) as caught, Client(live, retry_for=0) as impatient:
            impatient.submit("x")
        assert caught.value.status == 429
        threading.Timer(1.5, runner.hold.set).start()
        started = time.monotonic()
        accepted = client.submit("print('after the queue drained')")
        assert time.monotonic() - started >= 1.0  # it waited for the slot, answered 429 at first
    finally:
        runner.hold.set()
    final = [_final(client, run.id) for run in [*held, accepted]]
    assert {result.status for result in final} == {"succeeded"}


def _final(client: Client, run_id: str) -> RunResult:
    for event in client.stream(run_id):
        if isinstance(event, RunResult):
            return event
    raise AssertionError("a stream ends with its result")


def test_a_problem_answer_raises_with_its_fields(client: Client) -> None:
    with pytest.raises(ProblemError) as caught:
        client.run("x", timeout=10_000)
    problem = caught.value
    assert problem.status == 422
    assert problem.title == "Limit out of range"
    assert "timeout" in problem.detail
    assert problem.type == PROBLEMS + "limit"
    assert "422 Limit out of range" in str(problem)
    with pytest.raises(ProblemError) as missing:
        client.status("0" * 32)
    assert (missing.value.status, missing.value.type) == (404, PROBLEMS + "no-such-run")


def test_submit_status_stream_and_cancel_are_typed(client: Client, runner: RecordingRunner) -> None:
    runner.hold = threading.Event()
    try:
        accepted = client.submit("x")
        assert accepted.status == "queued"
        assert accepted.status_url.endswith(f"/status/{accepted.id}")
        events = client.stream(accepted.id)
        assert isinstance(next(events), StatusEvent)
        cancelled = client.cancel(accepted.id)
        assert cancelled.status == "cancelled"
        assert next(event for event in events if isinstance(event, RunResult)).status == "cancelled"
        assert client.status(accepted.id).status == "cancelled"
    finally:
        runner.hold.set()


def test_a_finished_runs_stream_replays_it(client: Client, runner: RecordingRunner) -> None:
    staged(runner, pause=0)
    result = client.run("x")
    events = list(client.stream(result.id))
    assert [(e.stream, e.text) for e in events if isinstance(e, OutputEvent)] == [
        ("stdout", "first\n"),
        ("stderr", "warning\n"),
        ("stdout", "second\n"),
    ]
    assert events[-1] == result


class DropsFirstStream(httpx.HTTPTransport):
    """A network that cuts the first stream of a run after its first output event."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if not request.url.path.endswith("/stream"):
            return response
        self.streams.append(request)
        if len(self.streams) > 1:
            return response
        assert isinstance(response.stream, httpx.SyncByteStream)  # an HTTPTransport's is
        upstream: httpx.SyncByteStream = response.stream

        class Cut(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                seen = b""
                for chunk in upstream:
                    seen += chunk
                    yield chunk
                    if b"event: stdout" in seen:
                        raise httpx.ReadError("connection reset (test)")

            def close(self) -> None:
                upstream.close()

        return httpx.Response(response.status_code, headers=response.headers, stream=Cut())


def test_a_dropped_stream_resumes_after_the_last_output(live: str, runner: RecordingRunner) -> None:
    staged(runner, pause=0.2)
    network = DropsFirstStream()
    printed: list[str] = []
    with Client(live, transport=network) as warmpod:
        result = warmpod.run("x", on_stdout=printed.append, on_stderr=printed.append)
    assert printed == ["first\n", "warning\n", "second\n"]
    assert result.status == "succeeded"
    assert len(network.streams) == 2
    assert "last-event-id" not in network.streams[0].headers
    assert network.streams[1].headers["last-event-id"] == "0"


def test_health_and_environment_are_typed(client: Client, service: Service) -> None:
    health = client.health()
    assert isinstance(health, Health)
    assert health.status == "ok"
    with pytest.raises(ProblemError) as caught:
        client.environment()
    assert caught.value.type == PROBLEMS + "no-environment"
    service.environment = Environment(python="3.13.5", packages={"numpy": "2.3.0"})
    assert client.environment().packages == {"numpy": "2.3.0"}


def test_url_and_key_come_from_the_environment(live: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return super().handle_request(request)

    monkeypatch.setenv("WARMPOD_URL", live)
    monkeypatch.setenv("WARMPOD_API_KEY", "secret-key")
    with Client(transport=Recording()) as warmpod:
        assert warmpod.run("x").status == "succeeded"
    assert {str(request.url).startswith(live) for request in seen} == {True}
    assert {request.headers["authorization"] for request in seen} == {"Bearer secret-key"}
    with Client(live, api_key="") as keyless:
        assert "authorization" not in keyless._http.headers
    assert keyless._http.is_closed


def test_stdin_bytes_must_be_utf8(client: Client) -> None:
    with pytest.raises(ValueError, match="UTF-8"):
        client.submit("x", stdin=b"\xff")
    assert client.run("x", stdin="é".encode()).status == "succeeded"
