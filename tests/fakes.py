"""Fakes for the fast unit tests, kept in one place: what a real sandbox would answer."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal, cast

import anyio
from anyio.abc import ByteStream

from warmpod.errors import PoolUnavailable
from warmpod.pool import Sandbox
from warmpod.protocol import MAX_FRAME, Channel
from warmpod.sandbox import AGENT_COMMAND
from warmpod.settings import LimitSettings
from warmpod.unix_stream import UnixStream


def probe_report(limits: LimitSettings) -> dict[str, Any]:
    """What the start-up probe prints in a sandbox with every layer on, under ``limits``."""
    return {
        "pid1": list(AGENT_COMMAND),
        "hostname": "warmpod-0123abcd-1",
        "uid": 65534,
        "interfaces": ["lo"],
        "root_writable": False,
        "seccomp": "2",
        "no_new_privs": "1",
        "cap_eff": "0000000000000000",
        "rlimit_cpu": limits.cpu_time,
        "memory_max": str(limits.memory_mb * 2**20),
        "pids_max": str(limits.pids),
    }


# The agent's side of the protocol, as pool/agent.py speaks it ------------------------------------


def agent_body(message: dict[str, Any]) -> bytes:
    """A frame's body as pool/agent.py's ``send_frame`` serialises ``message``."""
    return json.dumps(message, separators=(",", ":")).encode()


def agent_frame(message: dict[str, Any]) -> bytes:
    """One frame as pool/agent.py's ``send_frame`` writes it."""
    body = agent_body(message)
    return struct.pack(">I", len(body)) + body


async def send_frame(stream: ByteStream, message: dict[str, Any]) -> None:
    """Write one frame the way pool/agent.py does."""
    await stream.send(agent_frame(message))


async def receive_frame(stream: ByteStream) -> dict[str, Any]:
    """Read one frame the way pool/agent.py does."""
    data = b""
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        data += await stream.receive()
    message: dict[str, Any] = json.loads(data[4:])
    return message


def output(stream: Literal["stdout", "stderr"], data: bytes) -> dict[str, Any]:
    """An Output message: one chunk of the program's output, streamed as the agent read it."""
    return {"type": "output", "stream": stream, "data": base64.b64encode(data).decode()}


def result(**changes: Any) -> dict[str, Any]:
    """A Result message as ``agent.run_job`` builds it (exit 0, no limit hit), with ``changes``."""
    message: dict[str, Any] = {
        "type": "result",
        "exit_code": 0,
        "stdout_truncated": False,
        "stderr_truncated": False,
        "limits_hit": [],
        "duration_ms": 1.0,
        "error": None,
    }
    message.update(changes)
    return message


def answer(stdout: bytes, stderr: bytes) -> list[dict[str, Any]]:
    """What the agent sends for a program that printed ``stdout`` and ``stderr`` and exited 0."""
    chunks = [output("stdout", stdout)] if stdout else []
    if stderr:
        chunks.append(output("stderr", stderr))
    return [*chunks, result()]


@contextlib.asynccontextmanager
async def scripted_sandbox(*messages: dict[str, Any], hang_up: bool = False) -> AsyncIterator[Sandbox]:
    """A leased sandbox whose agent answers the job with ``messages``, then waits to be hung up on
    (or, with ``hang_up``, goes away itself, as an agent killed with its container does)."""
    server_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with UnixStream(server_end) as server, UnixStream(agent_end) as agent:

        async def play() -> None:
            await receive_frame(agent)
            for message in messages:
                await send_frame(agent, message)
            if hang_up:
                await agent.aclose()

        async with anyio.create_task_group() as tg:
            tg.start_soon(play)
            yield Sandbox("c001", "warmpod-fake-1", Path("/nonexistent"), Channel(server, MAX_FRAME), False)
            tg.cancel_scope.cancel()


class FakeLeaser:
    """A Leaser of placeholder sandboxes (``failures`` leases fail) that can always limit memory."""

    def __init__(self) -> None:
        self.failures = 0
        self.oom = False

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Sandbox]:
        """A placeholder sandbox, or PoolUnavailable while ``failures`` remain."""
        if self.failures:
            self.failures -= 1
            raise PoolUnavailable("no sandbox became free within 30 s")
        yield cast(Sandbox, object())

    async def oom_killed(self, sandbox: Sandbox) -> bool:
        """Whether ``oom`` is set."""
        return self.oom

    async def limit_memory(self, sandbox: Sandbox, limit_bytes: int) -> bool:
        """Always possible."""
        return True

    def check_memory(self, limit_bytes: int) -> None:
        """Any limit will do."""
