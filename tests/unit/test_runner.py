"""Unit tests of the runner's rules: how an agent's answer is judged, and what a run keeps of it."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from support import fakes

from warmpod.models import CHUNK_BYTES, Chunk, LimitName, RunResult, Stream
from warmpod.sandbox import runner
from warmpod.sandbox.protocol import AgentError, Hello, Result
from warmpod.sandbox.runner import RunOutput
from warmpod.settings import LimitSettings

CAP = 100
LIMITS = LimitSettings(timeout=10.0, max_timeout=60.0, max_output_bytes=CAP)


def result(**changes: Any) -> Result:
    """A successful agent result with ``changes`` applied."""
    fields: dict[str, Any] = {
        "exit_code": 0,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "limits_hit": [],
        "duration_ms": 5.0,
        "error": None,
    }
    fields.update(changes)
    return Result(**fields)


def streamed(stdout: bytes = b"hello\n", stderr: bytes = b"") -> RunOutput:
    """The output the runner collected from the agent's Output frames before its result."""
    output = RunOutput(CAP)
    # Only what was printed: the agent sends no empty Output.
    assert not stdout or output.add("stdout", stdout)
    assert not stderr or output.add("stderr", stderr)
    return output


async def execute(
    *messages: dict[str, Any],
    timeout: float | None = None,
    hang_up: bool = False,
    oom: bool = False,
) -> tuple[RunResult, RunOutput]:
    """What Runner.execute makes of an agent that answers the job with ``messages`` (in a container
    the OOM killer ended, if ``oom``), and the output it collected."""
    run = runner.Runner(fakes.FakeLeaser(), fakes.only_default(LIMITS))
    spec = run.prepare(b"pass", b"", timeout)
    output = RunOutput(spec.max_output_bytes)
    async with fakes.scripted_sandbox(*messages, hang_up=hang_up, oom=oom) as sandbox:
        return await run.execute("id", spec, sandbox, output), output


# _from_agent: status --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exit_code", "limits_hit", "status"),
    [
        (0, [], "succeeded"),
        (1, [], "failed"),
        (255, [], "failed"),
        (-9, ["memory"], "failed"),
        (-9, ["output"], "failed"),
        (-9, ["wall_time"], "timeout"),
        (0, ["wall_time"], "timeout"),
        (None, ["wall_time"], "timeout"),
    ],
)
def test_status_follows_exit_code_and_wall_time(
    exit_code: int | None, limits_hit: list[LimitName], status: str
) -> None:
    """Exit 0 succeeds, non-zero (signals too) fails, and a wall-time hit is a timeout whatever the code."""
    run = runner._from_agent("id", result(exit_code=exit_code, limits_hit=limits_hit), streamed(), 50.0)
    assert run.status == status
    assert run.exit_code == exit_code
    assert run.limits_hit == limits_hit
    assert run.error is None


def test_unknown_exit_status_is_an_error() -> None:
    """A result without an exit code and without a wall-time hit is an error carrying the agent's reason."""
    run = runner._from_agent("id", result(exit_code=None, error="wait() failed"), streamed(), 50.0)
    assert run.status == "error"
    assert run.exit_code is None
    assert run.error == "wait() failed"


def test_unknown_exit_status_without_reason_is_still_explained() -> None:
    """An error result always says something, even when the agent gave no reason."""
    run = runner._from_agent("id", result(exit_code=None), streamed(), 50.0)
    assert run.status == "error"
    assert run.error == "the program's exit status is unknown"


def test_agent_error_is_an_error_result() -> None:
    """An AgentError becomes status error with the agent's message and no output."""
    run = runner._from_agent("id", AgentError(message="agent failed: boom"), streamed(), 7.0)
    assert run.status == "error"
    assert run.error == "agent failed: boom"
    assert (run.stdout, run.stderr, run.exit_code) == ("", "", None)
    assert run.duration_ms == 7.0


def test_second_hello_is_an_error_result() -> None:
    """A Hello where a result is due is reported as an error, not trusted."""
    run = runner._from_agent("id", Hello(version=1, pid=2), streamed(), 7.0)
    assert run.status == "error"
    assert run.error == "unexpected Hello from the agent"


# _from_agent: what the agent claims -------------------------------------------------------------


def test_duplicate_limits_are_reported_once_in_order() -> None:
    """Repeated limit names are deduplicated, keeping the order of first appearance."""
    message = result(exit_code=-9, limits_hit=["output", "memory", "output", "memory", "pids"])
    run = runner._from_agent("id", message, streamed(), 50.0)
    assert run.limits_hit == ["output", "memory", "pids"]


@pytest.mark.parametrize(("agent_ms", "server_ms", "expected"), [(5.0, 50.0, 5.0), (1e12, 50.0, 50.0)])
def test_duration_is_the_smaller_of_agent_and_server(
    agent_ms: float, server_ms: float, expected: float
) -> None:
    """The reported duration never exceeds what the server itself measured."""
    run = runner._from_agent("id", result(duration_ms=agent_ms), streamed(), server_ms)
    assert run.duration_ms == expected


def test_run_id_is_passed_through() -> None:
    """The result carries the run id it was built for."""
    assert runner._from_agent("abc123", result(), streamed(), 1.0).id == "abc123"


# execute: the output the agent streams ---------------------------------------------------------


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
@pytest.mark.parametrize("sizes", [[CAP + 1], [CAP, 1], [1] * (CAP + 1)], ids=["one", "two", "many"])
async def test_output_above_the_cap_is_an_error(
    stream: Literal["stdout", "stderr"], sizes: list[int]
) -> None:
    """An agent streaming more than the cap on a stream, at once or over several frames, is not believed:
    the run is an error and its output is dropped."""
    run, _ = await execute(*(fakes.output(stream, b"x" * size) for size in sizes), fakes.result())
    assert run.status == "error"
    assert (run.stdout, run.stderr) == ("", "")
    assert run.error == "the agent sent more output than the cap allows"


async def test_output_exactly_at_the_cap_is_kept() -> None:
    """Output of exactly the cap on both streams is kept, with the truncation flags passed through."""
    run, _ = await execute(
        fakes.output("stdout", b"o" * (CAP - 1)),
        fakes.output("stderr", b"e" * CAP),
        fakes.output("stdout", b"o"),
        fakes.result(exit_code=-9, stdout_truncated=True, limits_hit=["output"]),
    )
    assert (run.status, run.exit_code) == ("failed", -9)
    assert run.stdout == "o" * CAP
    assert run.stderr == "e" * CAP
    assert run.stdout_truncated is True
    assert run.stderr_truncated is False


async def test_output_bytes_are_decoded_leniently_once_whole() -> None:
    """Invalid UTF-8 in the output is replaced, not an error; a character split across frames is kept."""
    e_acute = "é".encode()
    run, _ = await execute(
        fakes.output("stdout", b"ok \xff\xfe"),
        fakes.output("stderr", e_acute[:1]),
        fakes.output("stderr", e_acute[1:]),
        fakes.result(),
    )
    assert run.status == "succeeded"
    assert run.stdout == "ok \ufffd\ufffd"
    assert run.stderr == "é"


async def test_the_output_of_a_run_is_numbered_once_for_the_store() -> None:
    """Every chunk the agent streamed is handed to the store once, numbered in the order it came."""
    _, output = await execute(
        fakes.output("stdout", b"a"),
        fakes.output("stderr", b"b"),
        fakes.output("stdout", b"c"),
        fakes.result(),
    )
    assert output.take() == [
        Chunk(seq=0, stream="stdout", data=b"a"),
        Chunk(seq=1, stream="stderr", data=b"b"),
        Chunk(seq=2, stream="stdout", data=b"c"),
    ]
    assert output.take() == []
    assert (output.stdout, output.stderr) == ("ac", "b")


def test_output_taken_for_the_store_stays_in_the_result() -> None:
    """Taking chunks for the store empties only the pending ones: the text keeps everything, and
    numbering goes on where it stopped."""
    output = streamed(b"one ", b"err")
    output.take()
    assert output.add("stdout", b"two")
    assert output.take() == [Chunk(seq=2, stream="stdout", data=b"two")]
    assert (output.stdout, output.stderr) == ("one two", "err")


async def test_a_run_past_its_timeout_keeps_what_it_printed() -> None:
    """An agent that streams output and then says nothing more is given up on after the timeout and
    its grace: the run is a timeout with the output it streamed."""
    run, _ = await execute(fakes.output("stdout", b"partial\n"), timeout=0.1)
    assert (run.status, run.limits_hit, run.stdout, run.exit_code) == (
        "timeout",
        ["wall_time"],
        "partial\n",
        None,
    )
    assert run.duration_ms >= (0.1 + runner.SERVER_GRACE) * 1000 - 1  # the loop's clock may be a tick ahead


async def test_an_agent_killed_for_memory_ends_the_run_with_what_it_printed() -> None:
    """When the agent's connection drops and the container was OOM-killed, the run failed on memory
    with the output streamed before."""
    run, _ = await execute(
        fakes.output("stdout", b"allocating\n"), fakes.output("stderr", b"x"), hang_up=True, oom=True
    )
    assert (run.status, run.exit_code, run.limits_hit) == ("failed", -9, ["memory"])
    assert (run.stdout, run.stderr) == ("allocating\n", "x")


async def test_an_agent_that_hangs_up_otherwise_is_a_sandbox_failure() -> None:
    """A dropped connection without an OOM kill is an error naming the sandbox; the output is not kept."""
    run, _ = await execute(fakes.output("stdout", b"half"), hang_up=True)
    assert run.status == "error"
    assert run.error is not None
    assert run.error.startswith("the sandbox failed: agent connection lost")
    assert (run.stdout, run.stderr) == ("", "")


async def test_a_run_marks_its_sandbox_used() -> None:
    """Executing a run marks its sandbox used, so the pool destroys it instead of giving it back."""
    run = runner.Runner(fakes.FakeLeaser(), fakes.only_default(LIMITS))
    spec = run.prepare(b"pass", b"", None)
    async with fakes.scripted_sandbox(fakes.result()) as sandbox:
        assert not sandbox.used
        result = await run.execute("id", spec, sandbox, RunOutput(spec.max_output_bytes))
        assert result.status == "succeeded"
        assert sandbox.used


# execute: the files the agent sends after the program ended -------------------------------------


async def test_files_the_agent_sends_are_listed_in_the_result() -> None:
    """Complete files come back in path order with size and media type (their bytes stay in the
    output, for the store), and the agent's truncation flag is passed through."""
    run, output = await execute(
        fakes.file_chunk("out/b.csv", b"x,y\n", end=False),
        fakes.file_chunk("out/b.csv", b"1,2\n"),
        fakes.file_chunk("out/a/chart.png", b"\x89PNG"),
        fakes.result(files_truncated=True),
    )
    assert run.status == "succeeded"
    assert [(f.path, f.size, f.media_type, f.content) for f in run.files] == [
        ("out/a/chart.png", 4, "image/png", None),
        ("out/b.csv", 8, "text/csv", None),
    ]
    assert run.files_truncated is True
    assert [bytes(f.data) for f in output.files.complete] == [b"\x89PNG", b"x,y\n1,2\n"]


@pytest.mark.parametrize(
    "path", ["main.py", "out", "out/../etc/passwd", "/out/a", "out//a", "out\\a", "data/x"]
)
async def test_a_file_from_outside_out_is_an_error(path: str) -> None:
    """An agent that sends a file from anywhere but under out/ is not believed: the run is an error."""
    run, _ = await execute(fakes.file_chunk(path, b"root:x:0:0"), fakes.result())
    assert run.status == "error"
    assert run.files == []
    assert run.error is not None
    assert "outside out/" in run.error


async def test_a_file_cut_off_by_the_agent_is_left_out() -> None:
    """A file whose last piece never came (its agent stopped mid-file) is not listed."""
    run, _ = await execute(
        fakes.file_chunk("out/a.txt", b"half", end=False), fakes.file_chunk("out/b.txt", b"b"), fakes.result()
    )
    assert [f.path for f in run.files] == ["out/b.txt"]


async def test_files_extend_the_wait_past_the_timeout_and_its_grace() -> None:
    """Once files start coming (the program has ended) the server waits for them past the run's
    timeout and grace, instead of calling a run that ended in time a timeout."""
    late = 0.1 + runner.SERVER_GRACE
    run, _ = await execute(
        fakes.sleep(late - 0.2),
        fakes.file_chunk("out/a.bin", b"a", end=False),
        fakes.sleep(0.4),
        fakes.file_chunk("out/a.bin", b"b"),
        fakes.result(),
        timeout=0.1,
    )
    assert run.status == "succeeded"
    assert [(f.path, f.size) for f in run.files] == [("out/a.bin", 2)]


def test_chunks_the_store_could_not_keep_come_back_first() -> None:
    """Chunks put back after a failed write are taken again ahead of newer ones, unchanged."""
    output = streamed(b"one ", b"err")
    failed = output.take()
    assert output.add("stdout", b"two")
    output.untake(failed)
    assert [c.seq for c in output.take()] == [0, 1, 2]
    assert output.take() == []


def test_adjacent_chunks_of_a_stream_are_merged_until_taken() -> None:
    """Chunks of one stream that follow each other become one chunk for the store; a switch of
    stream starts a new one, so the order across streams is kept."""
    output = RunOutput(CAP)
    pieces: list[tuple[Stream, bytes]] = [
        ("stdout", b"a"),
        ("stdout", b"b"),
        ("stderr", b"c"),
        ("stderr", b"d"),
        ("stdout", b"e"),
    ]
    for stream, data in pieces:
        assert output.add(stream, data)
    assert output.take() == [
        Chunk(seq=0, stream="stdout", data=b"ab"),
        Chunk(seq=1, stream="stderr", data=b"cd"),
        Chunk(seq=2, stream="stdout", data=b"e"),
    ]
    assert (output.stdout, output.stderr) == ("abe", "cd")


def test_a_taken_chunk_never_grows() -> None:
    """Bytes added after a take start a chunk with a higher seq, even after the taken chunks are
    put back: a reader that saw a chunk never misses what came after it."""
    output = RunOutput(CAP)
    assert output.add("stdout", b"one")
    taken = output.take()
    assert output.add("stdout", b"two")
    assert output.take() == [Chunk(seq=1, stream="stdout", data=b"two")]
    output.untake(taken)
    assert output.add("stdout", b"three")
    assert output.take() == [
        Chunk(seq=0, stream="stdout", data=b"one"),
        Chunk(seq=2, stream="stdout", data=b"three"),
    ]


def test_a_merged_chunk_holds_at_most_chunk_bytes() -> None:
    """A stream's bytes are merged into chunks of at most CHUNK_BYTES, numbered in order."""
    output = RunOutput(4 * CHUNK_BYTES)
    piece = b"x" * (CHUNK_BYTES // 4 + 1)
    for _ in range(8):
        assert output.add("stdout", piece)
    chunks = output.take()
    assert all(len(c.data) <= CHUNK_BYTES for c in chunks)
    assert len(chunks) == 3
    assert [c.seq for c in chunks] == [0, 1, 2]
    assert b"".join(c.data for c in chunks) == piece * 8
