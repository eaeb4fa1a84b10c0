"""Unit tests of a run's data sources through the runner: the job names the sockets, a scripted agent
uses them as the real one does for the program, and the result counts what moved; all cut at the end."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream
from support import fakes

from warmpod.models import RunResult, SourceUse
from warmpod.sandbox.program import Program
from warmpod.sandbox.runner import Runner, RunOutput
from warmpod.sandbox.unix_stream import UnixStream
from warmpod.settings import LimitSettings
from warmpod.sources import Sources

LIMITS = LimitSettings(timeout=10.0, max_timeout=60.0)


class Echo:
    """A TCP echo server on 127.0.0.1; it counts the connections that ended."""

    def __init__(self) -> None:
        self.port = 0
        self.ended = 0

    async def serve(self, stream: SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    await stream.send(await stream.receive())
        self.ended += 1


@contextlib.asynccontextmanager
async def echo_server() -> Any:
    """An Echo listening while the block runs."""
    echo = Echo()
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    echo.port = listener.extra(SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, echo.serve)
        yield echo
        tg.cancel_scope.cancel()


async def sources_file(tmp_path: Path, port: int) -> Sources:
    """A sources file declaring ``warehouse`` at 127.0.0.1:port, read (at start-up, in production)."""
    path = tmp_path / "sources.toml"
    path.write_text(f'[warehouse]\nhost = "127.0.0.1"\nport = {port}\n')
    return await anyio.to_thread.run_sync(Sources, path)


async def execute(
    tmp_path: Path, sources: Sources, asked: list[str], *messages: dict[str, Any]
) -> tuple[RunResult, Path]:
    """What Runner.execute makes of a run asking for ``asked`` whose agent answers with
    ``messages``, in a sandbox whose host directory exists; and that directory."""
    run = Runner(fakes.FakeLeaser(), fakes.only_default(LIMITS), sources=sources)
    spec = run.prepare(b"pass", b"", None, program=Program(sources=asked))
    directory = tmp_path / "sandbox"
    directory.mkdir(mode=0o700)
    async with fakes.scripted_sandbox(*messages, directory=directory) as sandbox:
        return await run.execute("id", spec, sandbox, RunOutput(spec.max_output_bytes)), directory


async def test_the_job_names_the_sockets_and_the_result_counts_what_moved(tmp_path: Path) -> None:
    """The agent's job lists each source with its socket under /run/warmpod; a connection the agent
    makes there reaches the upstream, and the result counts its bytes both ways."""
    seen: list[Any] = []
    directory = tmp_path / "sandbox"

    async def use_source(job: dict[str, Any]) -> None:
        seen.append(job["sources"])
        ((_, inside),) = job["sources"]
        conn = await UnixStream.connect(directory / Path(inside).name)
        await conn.send(b"select 1;")
        await conn.send_eof()
        got = b""
        with contextlib.suppress(anyio.EndOfStream):
            while True:
                got += await conn.receive()
        await conn.aclose()
        seen.append(got)

    async with echo_server() as echo:
        result, _ = await execute(
            tmp_path,
            await sources_file(tmp_path, echo.port),
            ["warehouse"],
            fakes.call(use_source),
            fakes.result(),
        )
    assert result.status == "succeeded", result
    assert seen == [[["warehouse", "/run/warmpod/source-0.sock"]], b"select 1;"]
    assert result.sources == {"warehouse": SourceUse(connections=1, refused=0, bytes_in=9, bytes_out=9)}


async def test_a_connection_open_when_the_run_ends_is_cut(tmp_path: Path) -> None:
    """A connection the program still holds when its result comes is closed on both sides."""
    held: list[UnixStream] = []
    directory = tmp_path / "sandbox"

    async def hold_open(job: dict[str, Any]) -> None:
        conn = await UnixStream.connect(directory / Path(job["sources"][0][1]).name)
        await conn.send(b"ping")
        assert await conn.receive() == b"ping"
        held.append(conn)

    async with echo_server() as echo:
        result, _ = await execute(
            tmp_path,
            await sources_file(tmp_path, echo.port),
            ["warehouse"],
            fakes.call(hold_open),
            fakes.result(),
        )
        with anyio.fail_after(5):
            with pytest.raises(anyio.EndOfStream):
                await held[0].receive()
            while echo.ended < 1:
                await anyio.sleep(0.01)
        await held[0].aclose()
    assert result.sources["warehouse"].connections == 1
    with pytest.raises(ConnectionRefusedError):
        await UnixStream.connect(directory / "source-0.sock")


async def test_a_source_gone_from_the_file_before_the_run_starts_is_an_error(tmp_path: Path) -> None:
    """A queued run whose source the operator removed since ends ``error`` naming it, unrun."""
    sources = await sources_file(tmp_path, 5432)
    (tmp_path / "sources.toml").write_text('[crm]\nhost = "127.0.0.1"\nport = 1\n')
    result, _ = await execute(tmp_path, sources, ["warehouse"], fakes.result())
    assert result.status == "error"
    assert result.error is not None
    assert "'warehouse' is no longer" in result.error


async def test_a_run_without_sources_gets_none_and_opens_nothing(tmp_path: Path) -> None:
    """No source asked for: the job's list is empty, nothing listens, and the result has no sources."""
    seen: list[Any] = []

    async def look(job: dict[str, Any]) -> None:
        seen.append(job["sources"])

    result, directory = await execute(
        tmp_path, await sources_file(tmp_path, 1), [], fakes.call(look), fakes.result()
    )
    assert result.status == "succeeded"
    assert seen == [[]]
    assert result.sources == {}
    assert list(directory.iterdir()) == []


async def test_sources_that_cannot_be_listened_for_are_an_error(tmp_path: Path) -> None:
    """A sandbox directory where no socket can be made ends the run ``error`` before its job is sent."""
    run = Runner(fakes.FakeLeaser(), fakes.only_default(LIMITS), sources=await sources_file(tmp_path, 1))
    spec = run.prepare(b"pass", b"", None, program=Program(sources=["warehouse"]))
    async with fakes.scripted_sandbox(fakes.result(), directory=tmp_path / "missing") as sandbox:
        result = await run.execute("id", spec, sandbox, RunOutput(spec.max_output_bytes))
    assert result.status == "error"
    assert result.error is not None
    assert "could not be relayed" in result.error
