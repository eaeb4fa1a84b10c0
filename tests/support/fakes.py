"""Test fakes, in one place: engines, leasers, runners and agents that speak pool/agent.py's protocol."""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import anyio
import msgspec
from anyio.abc import ByteStream, SocketAttribute, SocketListener, TaskGroup, TaskStatus

from support.absent import placeholder_sandbox
from support.waiting import until
from warmpod.environments import DEFAULT, Environments, EnvironmentSpec
from warmpod.errors import EngineError, PoolUnavailable
from warmpod.host.podman_api import EngineInfo
from warmpod.models import RunResult, RunSpec
from warmpod.sandbox import protocol
from warmpod.sandbox.limits import RunLimits
from warmpod.sandbox.pool import Pool
from warmpod.sandbox.protocol import MAX_FRAME, Channel, FileChunk, Output
from warmpod.sandbox.runner import Leaser, Runner, RunOutput
from warmpod.sandbox.sandbox import AGENT_COMMAND, AGENT_DIR, SOCKET_NAME, Sandbox
from warmpod.sandbox.unix_stream import UnixStream
from warmpod.settings import FileSettings, LimitSettings


def probe_report(limits: LimitSettings) -> dict[str, Any]:
    """What the start-up probe prints in a sandbox with every layer on, under ``limits``."""
    return {
        "pid1": list(AGENT_COMMAND),
        "hostname": "warmpod-0123abcd-1",
        "uid": 65534,
        "uid_map": "0 2147483647 65536",
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


def file_chunk(path: str, data: bytes, end: bool = True) -> dict[str, Any]:
    """A FileChunk message: a piece of a file the program left in out/, sent after it ended."""
    return {"type": "file", "path": path, "data": base64.b64encode(data).decode(), "end": end}


def sleep(seconds: float) -> dict[str, Any]:
    """Not a message: ``scripted_sandbox``'s agent pauses this long before its next one."""
    return {"type": "sleep", "seconds": seconds}


def call(action: Callable[[dict[str, Any]], Awaitable[None]]) -> dict[str, Any]:
    """Not a message: ``scripted_sandbox``'s agent awaits ``action(job)`` before its next one (to
    use the job's data sources, say, as the real agent does for the program)."""
    return {"type": "call", "action": action}


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
async def scripted_sandbox(
    *messages: dict[str, Any], hang_up: bool = False, oom: bool = False, directory: Path | None = None
) -> AsyncIterator[Sandbox]:
    """A leased sandbox whose agent answers the job with ``messages`` (``sleep(seconds)`` pauses it,
    ``call(action)`` awaits an action on the job), then waits to be hung up on (or, with ``hang_up``,
    goes away itself, as an agent killed with its container does); its engine can lower its memory
    limit, and says it was OOM-killed if ``oom``. ``directory`` is its host directory, if it needs one."""
    server_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with UnixStream(server_end) as server, UnixStream(agent_end) as agent:

        async def play() -> None:
            job = await receive_frame(agent)
            for message in messages:
                if message["type"] == "sleep":
                    # The delay is the script's: how late the agent answers is what a test sets.
                    await anyio.sleep(message["seconds"])
                elif message["type"] == "call":
                    await message["action"](job)
                else:
                    await send_frame(agent, message)
            if hang_up:
                await agent.aclose()

        async with anyio.create_task_group() as tg:
            engine = FakeEngine(tg)
            engine.oom = oom
            tg.start_soon(play)
            yield Sandbox(
                "c001",
                "warmpod-fake-1",
                directory or Path("/nonexistent"),
                Channel(server, MAX_FRAME),
                engine,
                can_limit=True,
            )
            tg.cancel_scope.cancel()


class WatchedSocket(socket.socket):
    """A socket that counts its reads that found nothing: a non-blocking reader has begun waiting
    for it (the event loop watches it) once ``empty_reads`` went up."""

    empty_reads = 0

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read as a socket does, counting a read that would block."""
        try:
            return super().recv(bufsize, flags)
        except BlockingIOError:
            self.empty_reads += 1
            raise

    async def read_in_vain(self, since: int) -> None:
        """Return once a read found nothing, the ``since``-th empty read excluded: its reader is waiting."""
        await until(lambda: self.empty_reads > since, interval=0.001)


def watched_pair() -> tuple[WatchedSocket, socket.socket]:
    """Two connected unix sockets: a watched one (for the stream under test) and its peer."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return WatchedSocket(fileno=ours.detach()), theirs


POOL_DIR = Path(__file__).resolve().parents[2] / "pool"
ROOTFUL_V1 = EngineInfo(
    version="4.3.1",
    api_version="4.3.1",
    rootless=False,
    cgroup_version=1,
    cgroup_manager="systemd",
    oci_runtime="runc",
)
"""What rootful Podman 4.3 on these cgroup v1 hosts reports."""


def pool_module(name: str) -> ModuleType:
    """``pool/<name>.py`` (the agent, the image's build step), loaded as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"warmpod_pool_{name}", POOL_DIR / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Engines, leasers and runners ---------------------------------------------------------------


class FakeEngine:
    """A ``sandbox.Engine`` whose containers are fake agents on unix sockets, run in the test's task group."""

    def __init__(self, tg: TaskGroup) -> None:
        self._tg = tg
        self.calls: list[tuple[str, str]] = []
        self.create_times: list[float] = []
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.exited: set[str] = set()
        """Containers whose agent has answered its job and exited."""
        self.removed_stopped: list[str] = []
        """Containers destroyed after their agent had exited: Podman needs no kill for those."""
        self.containers: dict[str, dict[str, str]] = {}
        self.specs: dict[str, dict[str, object]] = {}
        self._sockets: dict[str, Path] = {}
        self._kills: dict[str, tuple[anyio.Event, list[SocketListener | ByteStream]]] = {}
        self.failing_creates = 0
        self.hello: dict[str, Any] = {"type": "hello", "version": protocol.PROTOCOL_VERSION, "pid": 99}
        self.hello_body: bytes | None = None
        """A frame body the agents greet with instead of ``hello``: what JSON could not say."""
        self.listen_delay = 0.0
        self.silent = False
        self.failing_unpause = False
        self.failing_pause = False
        self.oom = False
        """Whether containers were OOM-killed, as ``oom_killed`` says."""
        self.linger = False
        """Whether agents stay after answering their job, until removed, instead of exiting."""
        # What every fake agent prints instead of echoing the job's code, when set.
        self.stdout: bytes | None = None
        # Starts wait for this gate; set it to let them through.
        self.gate = anyio.Event()
        self.gate.set()
        # Removals wait for this one, the container alive meanwhile (as while Podman kills and removes it).
        self.destroy_gate = anyio.Event()
        self.destroy_gate.set()
        self.failing_destroys: set[str] = set()
        """Containers whose removal fails, as Podman's does when its storage is busy."""

    def count(self, op: str, container_id: str | None = None) -> int:
        """How many times ``op`` was called (on ``container_id``, if given)."""
        return sum(1 for o, c in self.calls if o == op and container_id in (None, c))

    async def create(self, spec: dict[str, object]) -> str:
        """Record the spec; fail while ``failing_creates`` is positive (negative: fail forever)."""
        self.create_times.append(anyio.current_time())
        if self.failing_creates:
            self.failing_creates -= 1
            self.calls.append(("create-failed", ""))
            raise EngineError("podman create failed: no space left on device")
        container_id = f"c{len(self.created) + 1:03d}"
        self.calls.append(("create", container_id))
        self.created.append(container_id)
        labels = spec["labels"]
        mounts = spec["mounts"]
        assert isinstance(labels, dict)
        assert isinstance(mounts, list)
        self.containers[container_id] = dict(labels)
        self.specs[container_id] = spec
        agent_dir = next(m["source"] for m in mounts if m["destination"] == AGENT_DIR)
        self._sockets[container_id] = Path(agent_dir) / SOCKET_NAME
        return container_id

    async def start(self, container_id: str) -> None:
        """Wait for the gate, then start the container's fake agent."""
        self.calls.append(("start", container_id))
        await self.gate.wait()
        await self._tg.start(self._agent, container_id, self._sockets[container_id])

    async def pause(self, container_id: str) -> None:
        """Record the pause; fail it, as runc does when cgroup v1's freezer gives up, if ``failing_pause``."""
        self.calls.append(("pause", container_id))
        if self.failing_pause:
            raise EngineError("podman pause failed: `/usr/bin/runc pause c001` failed: exit status 1")

    async def unpause(self, container_id: str) -> None:
        """Record the unpause; fail it if ``failing_unpause`` is set."""
        self.calls.append(("unpause", container_id))
        if self.failing_unpause:
            raise EngineError("podman unpause failed: container state improper")

    async def update_memory(self, container_id: str, limit_bytes: int) -> None:
        """Record the memory update."""
        self.calls.append(("update_memory", container_id))

    async def oom_killed(self, container_id: str) -> bool:
        """Record the inspection; ``oom`` says whether the container was OOM-killed."""
        self.calls.append(("oom_killed", container_id))
        return self.oom

    async def destroy(self, container_id: str) -> None:
        """Record the removal and stop the container's agent; removing twice is harmless, as in Podman."""
        self.calls.append(("destroy", container_id))
        await self.destroy_gate.wait()
        if container_id in self.failing_destroys:
            raise EngineError(f"cannot remove {container_id}")
        if container_id in self.containers:
            self.destroyed.append(container_id)
            if container_id in self.exited:
                self.removed_stopped.append(container_id)
        self.containers.pop(container_id, None)
        killed, closables = self._kills.pop(container_id, (None, []))
        if killed is not None:
            killed.set()
        for closable in closables:
            await closable.aclose()

    async def crash(self, container_id: str) -> None:
        """End the container's agent by itself, as a kill from outside would: its sockets close,
        and the container stays until it is removed."""
        self.calls.append(("crash", container_id))
        killed, closables = self._kills.pop(container_id, (None, []))
        if killed is not None:
            killed.set()
        for closable in closables:
            await closable.aclose()

    async def list_labelled(self, label: str) -> list[tuple[str, dict[str, str]]]:
        """Every live container carrying ``label``."""
        return [(cid, dict(labels)) for cid, labels in self.containers.items() if label in labels]

    async def _agent(self, container_id: str, path: Path, *, task_status: TaskStatus[None]) -> None:
        # Like pool/agent.py: listen, accept one connection, say hello, answer one job and exit.
        # destroy() ends it by closing its sockets, as removing a container does, rather than cancelling
        # it. Its connection is a UnixStream like the server's: anyio's own loses a race with cancels.
        killed = anyio.Event()
        closables: list[SocketListener | ByteStream] = []
        self._kills[container_id] = (killed, closables)
        listener: SocketListener
        if self.listen_delay:
            # The socket file exists before anyone listens on it: bind now, listen a little later.
            early = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            early.bind(str(path))
            task_status.started()
            with anyio.move_on_after(self.listen_delay):
                await killed.wait()
            early.listen(1)
            listener = await SocketListener.from_socket(early)
        else:
            listener = await anyio.create_unix_listener(path)
            task_status.started()
        closables.append(listener)
        try:
            if killed.is_set():
                return
            async with listener, await listener.accept() as accepted:
                stream = UnixStream(accepted.extra(SocketAttribute.raw_socket).dup())
            closables.append(stream)
            async with stream:
                if self.silent:
                    await killed.wait()
                    return
                if self.hello_body is not None:
                    await stream.send(struct.pack(">I", len(self.hello_body)) + self.hello_body)
                else:
                    await send_frame(stream, self.hello)
                job = await receive_frame(stream)
                code, stdin = base64.b64decode(job["code"]), base64.b64decode(job["stdin"])
                for message in answer(code if self.stdout is None else self.stdout, stdin):
                    await send_frame(stream, message)
                if self.linger:
                    await killed.wait()
                    return
                self.exited.add(container_id)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await listener.aclose()


class FakeLeaser:
    """A Leaser of placeholder sandboxes (``failures`` leases fail) that takes any memory limit: for
    a runner that records runs (``RecordingRunner``) rather than speaking to an agent."""

    def __init__(self) -> None:
        self.failures = 0
        self.environments = [DEFAULT]
        self.events: list[str] = []
        """``lease`` and ``release`` of each sandbox, in order (a test may add its own events)."""

    @contextlib.asynccontextmanager
    async def lease(self, environment: str = DEFAULT) -> AsyncIterator[Sandbox]:
        """A placeholder sandbox, or PoolUnavailable while ``failures`` remain."""
        if self.failures:
            self.failures -= 1
            raise PoolUnavailable("no sandbox became free within 30 s")
        self.events.append("lease")
        try:
            yield placeholder_sandbox()
        finally:
            # Where the pool starts removing the container.
            self.events.append("release")

    def check_memory(self, environment: str, limit_bytes: int) -> None:
        """Any limit will do."""

    def wants_preload(self, environment: str, code: bytes) -> bool:
        """No run does."""
        return False

    def note_demand(self, environment: str, warm: bool) -> None:
        """Nothing to learn."""

    def served(self) -> list[str]:
        """``environments``: sandboxes of any of them may be leased."""
        return self.environments

    def ready(self) -> list[str]:
        """Every one has a sandbox free."""
        return self.environments


def mark_serving(pool: Pool, serving: bool = True) -> None:
    """Have ``pool`` (over an engine never called) report every environment serving, or none."""
    for kind in pool._kinds.values():
        kind.serving = serving


def only_default(limits: LimitSettings, preload: tuple[str, ...] = ()) -> Environments:
    """The environments of a server without an environments file, with these limits."""
    return Environments([EnvironmentSpec(DEFAULT, None, preload, 1, limits)])


CANNED = RunResult(
    id="0" * 32,
    status="succeeded",
    exit_code=0,
    stdout="1\n",
    stderr="",
    stdout_truncated=False,
    stderr_truncated=False,
    limits_hit=[],
    duration_ms=3.5,
)
"""What a RecordingRunner answers unless told otherwise."""


class RecordingRunner(Runner):
    """A Runner that records each run's program and timeout and answers ``result`` (or raises ``error``).

    ``prepare`` is the real one, so limits are resolved and checked as in the service; ``hold`` keeps
    runs executing until it is set (an anyio.Event in the test's loop, or a threading.Event for a
    server in a thread of its own); ``pause`` seconds pass between ``streamed`` chunks.
    """

    def __init__(self, leaser: Leaser, limits: LimitSettings, files: FileSettings | None = None) -> None:
        super().__init__(leaser, only_default(limits), files)
        self.calls: list[tuple[bytes, bytes, float]] = []
        self.files: list[tuple[tuple[str, bytes], ...]] = []
        """The input files of each run."""
        self.specs: list[RunSpec] = []
        """Each run as it was accepted: its entrypoint, args, env and secrets' names among the rest."""
        self.sources: list[tuple[str, ...]] = []
        """The data sources each run asked for."""
        self.left: list[FileChunk] = []
        """File chunks the agent sends, as it would after the program ended; the result lists them."""
        self.run_limits: list[RunLimits] = []
        self.result = CANNED
        self.error: Exception | None = None
        self.hold: anyio.Event | threading.Event | None = None
        self.streamed: list[Output] = []
        self.pause = 0.0
        self.ended: list[float] = []
        """When each run's result was made (time.monotonic())."""

    async def execute(self, run_id: str, spec: RunSpec, sandbox: Sandbox, output: RunOutput) -> RunResult:
        """Record the run, stream ``streamed`` into its output as the runner does, wait for ``hold``,
        and answer with the canned result."""
        self.calls.append((spec.code, spec.stdin, spec.timeout))
        self.files.append(spec.files)
        self.specs.append(spec)
        self.sources.append(spec.sources)
        self.run_limits.append(
            RunLimits(
                cpu_time=spec.cpu_time, memory_mb=spec.memory_mb, max_output_bytes=spec.max_output_bytes
            )
        )
        for index, message in enumerate(self.streamed):
            if index and self.pause:
                # The delay is the test's: a program that prints for a while, chunks this far apart.
                await anyio.sleep(self.pause)
            assert output.add(message.stream, message.data)
        if isinstance(self.hold, threading.Event):
            await anyio.to_thread.run_sync(self.hold.wait, abandon_on_cancel=True)
        elif self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            raise self.error
        for chunk in self.left:
            output.files.add(chunk.path, chunk.data, chunk.end)
        self.ended.append(time.monotonic())
        return msgspec.structs.replace(self.result, id=run_id, files=output.files.describe())
