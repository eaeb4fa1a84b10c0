"""One run: lease a sandbox, hand its agent the job, and turn the agent's answer into a RunResult."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import anyio

from warmpod.environments import DEFAULT, Environments
from warmpod.errors import EngineError, InvalidRun, ProtocolError, SecretDenied, SourceDenied
from warmpod.models import CHUNK_BYTES, Chunk, RunResult, RunSpec, RunStatus, Stream
from warmpod.sandbox import protocol
from warmpod.sandbox.files import OutputFiles, check_inputs
from warmpod.sandbox.limits import RunLimits, resolve_limits, resolve_timeout
from warmpod.sandbox.masking import Masker
from warmpod.sandbox.program import (
    Program,
    check_args,
    check_entrypoint,
    check_env,
    check_sizes,
    check_sources,
)
from warmpod.sandbox.protocol import AgentError, FileChunk, Job, Output, Result
from warmpod.sandbox.relay import Relay
from warmpod.sandbox.sandbox import Sandbox
from warmpod.secrets import Secrets
from warmpod.settings import FileSettings
from warmpod.sources import Source, Sources

AGENT_DRAIN_GRACE = 0.5
"""How long the agent drains the pipes once it stopped the program, at the timeout at the latest
(``DRAIN_GRACE`` in pool/agent.py, which a unit test holds equal to this)."""
SERVER_GRACE = AGENT_DRAIN_GRACE + 0.3
"""How long past the timeout the server waits for the agent's answer: the drain, then a margin
for reaping the program and sending the result. Past it the container is killed with whatever it
held and the run reported a timeout."""
# Once the agent starts sending the files the program left (the program has ended by then), they
# get this long to arrive, however late in the run: 16 MiB is well under a second here.
FILES_GRACE = 10.0
# What a sandbox that broke (rather than the program in it) raises; the run is reported ``error``.
SANDBOX_FAILURES = (ProtocolError, EngineError)


class Leaser(Protocol):
    """Where sandboxes of each environment come from (``pool.Pool``), the memory floor they set for
    a request, and which runs its preloaded ones serve best."""

    def lease(self, environment: str = DEFAULT) -> AbstractAsyncContextManager[Sandbox]: ...
    def check_memory(self, environment: str, limit_bytes: int) -> None: ...
    def wants_preload(self, environment: str, code: bytes) -> bool: ...
    def note_demand(self, environment: str, warm: bool) -> None: ...
    def served(self) -> list[str]: ...
    def ready(self) -> list[str]: ...


class RunOutput:
    """A run's output as its agent streamed it, kept once: for its result, a cancel and the store.

    Chunks of one stream that follow each other are merged, up to ``CHUNK_BYTES``, until they are
    taken: the store gets one chunk per stream switch, not one per frame of the agent. A chunk once
    taken never grows (a reader may have seen it), and seq numbers only rise."""

    def __init__(self, cap: int, files: FileSettings | None = None) -> None:
        self._cap = cap
        self._raw = {"stdout": 0, "stderr": 0}
        """Bytes the agent sent per stream, before masking: what its cap counts."""
        self._streams = {"stdout": bytearray(), "stderr": bytearray()}
        self._masker: Masker | None = None
        self._pending: list[Chunk] = []
        # The newest chunk, still open to merging: its seq, stream and bytes.
        self._open: tuple[int, Stream, bytearray] | None = None
        self._seq = 0
        self.files = OutputFiles(files or FileSettings())
        """The files the program left in ``out/``, as the agent sends them."""

    def mask(self, values: Sequence[str]) -> None:
        """Mask these secrets' values in all output added from now on."""
        self._masker = Masker(values) if values else None

    def add(self, stream: Stream, data: bytes) -> bool:
        """Keep a chunk; False, keeping nothing, if it takes its stream past the cap (the agent lied)."""
        if self._raw[stream] + len(data) > self._cap:
            return False
        self._raw[stream] += len(data)
        if self._masker is not None:
            data = self._masker.feed(stream, data)
        self._keep(stream, data)
        return True

    def end(self) -> bool:
        """Release what masking held back, now that the program has ended; True if there was any."""
        if self._masker is None:
            return False
        streams: tuple[Stream, Stream] = ("stdout", "stderr")
        tails = [(stream, self._masker.flush(stream)) for stream in streams]
        for stream, tail in tails:
            self._keep(stream, tail)
        return any(tail for _, tail in tails)

    def _keep(self, stream: Stream, data: bytes) -> None:
        self._streams[stream] += data
        if not data:
            return
        if (
            self._open is not None
            and self._open[1] == stream
            and len(self._open[2]) + len(data) <= CHUNK_BYTES
        ):
            self._open[2].extend(data)
            return
        self._close()
        self._open = (self._seq, stream, bytearray(data))
        self._seq += 1

    def _close(self) -> None:
        """Make the open chunk a pending one: nothing more is merged into it."""
        if self._open is not None:
            seq, stream, data = self._open
            self._pending.append(Chunk(seq=seq, stream=stream, data=bytes(data)))
            self._open = None

    def take(self) -> list[Chunk]:
        """The chunks added since the last take, numbered in the order they came, for the store."""
        self._close()
        chunks, self._pending = self._pending, []
        return chunks

    def untake(self, chunks: list[Chunk]) -> None:
        """Put chunks the store could not keep back ahead of newer ones, for the next take."""
        self._pending[:0] = chunks

    @property
    def stdout(self) -> str:
        """The program's stdout so far, as text."""
        return self._streams["stdout"].decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        """The program's stderr so far, as text."""
        return self._streams["stderr"].decode("utf-8", "replace")


class Runner:
    """Runs programs in single-use sandboxes."""

    def __init__(
        self,
        leaser: Leaser,
        environments: Environments,
        files: FileSettings | None = None,
        secrets: Secrets | None = None,
        sources: Sources | None = None,
    ) -> None:
        self._leaser = leaser
        self.environments = environments
        """The environments its runs may name, with their limits."""
        self._files = files or FileSettings()
        self._secrets = secrets or Secrets(None)
        self._sources = sources or Sources(None)

    def prepare(
        self,
        code: bytes | None,
        stdin: bytes,
        timeout: float | None,
        limits: RunLimits | None = None,
        files: Sequence[tuple[str, bytes]] = (),
        program: Program | None = None,
        environment: str = DEFAULT,
    ) -> RunSpec:
        """The run as it will execute in ``environment`` (checked already), every limit resolved
        against that environment's.

        Raises:
            InvalidRun: the limits asked for are out of range.
            InvalidFile: an input file's path or size is not allowed.
            InvalidProgram: the entrypoint, an argument, a variable or a source's name is not allowed.
        """
        checked = check_inputs(files, self._files)
        program = program or Program()
        entrypoint = check_entrypoint(program.entrypoint, code is not None, [path for path, _ in checked])
        args = check_args(program.args)
        env = check_env(program.env, program.secrets)
        check_sizes(args, env)
        sources = check_sources(program.sources)
        server = self.environments[environment].limits
        resolved = resolve_limits(limits or RunLimits(), server)
        if resolved.memory_mb and resolved.memory_mb < server.memory_mb:
            self._leaser.check_memory(environment, resolved.memory_mb * 1024 * 1024)
        # What decides the sandbox is what the program imports: its code, or its project's modules.
        modules = [code] if code is not None else []
        modules += [content for path, content in checked if path.endswith(".py")]
        return RunSpec(
            code=code or b"",
            stdin=stdin,
            timeout=resolve_timeout(timeout, server),
            cpu_time=resolved.cpu_time or server.cpu_time,
            memory_mb=resolved.memory_mb or server.memory_mb,
            max_output_bytes=resolved.max_output_bytes or server.max_output_bytes,
            files=checked,
            entrypoint=entrypoint,
            args=args,
            env=env,
            secrets=tuple(program.secrets),
            sources=sources,
            warm=any(self._leaser.wants_preload(environment, module) for module in modules),
            environment=environment,
        )

    def output(self, spec: RunSpec) -> RunOutput:
        """A fresh RunOutput for ``spec``, held to its output cap and the server's file caps."""
        return RunOutput(spec.max_output_bytes, self._files)

    async def run(
        self,
        code: bytes,
        stdin: bytes,
        timeout: float | None,
        limits: RunLimits | None = None,
        environment: str = DEFAULT,
    ) -> RunResult:
        """Run ``code`` once in the next free sandbox of ``environment`` and report how it ended.

        Raises:
            InvalidRun: the limits asked for are out of range.
            PoolUnavailable: no sandbox became free in time.
        """
        spec = self.prepare(code, stdin, timeout, limits, environment=environment)
        run_id = uuid.uuid4().hex
        try:
            async with self._leaser.lease(environment) as sandbox:
                return await self.execute(run_id, spec, sandbox, self.output(spec))
        except SANDBOX_FAILURES as exc:
            return _error(run_id, f"the sandbox failed: {exc}", 0)

    async def execute(self, run_id: str, spec: RunSpec, sandbox: Sandbox, output: RunOutput) -> RunResult:
        """Run ``spec`` in a leased ``sandbox``, adding its output to ``output`` as it comes; its data
        sources are relayed while it runs, and cut when it ends."""
        result = await self._execute(run_id, spec, sandbox, output)
        result.environment = spec.environment
        return result

    async def _execute(self, run_id: str, spec: RunSpec, sandbox: Sandbox, output: RunOutput) -> RunResult:
        # Read now, on the node that runs it: a queued run holds the names only.
        try:
            secrets = self._secrets.resolve(spec.secrets)
            sources = self._sources.resolve(spec.sources)
        except (SecretDenied, SourceDenied) as exc:
            return _error(run_id, str(exc), 0)
        output.mask([value for _, value in secrets])
        result = await self._relayed(run_id, spec, sandbox, output, secrets, sources)
        if output.end() and result.status != "error":
            result.stdout, result.stderr = output.stdout, output.stderr
        return result

    async def _relayed(
        self,
        run_id: str,
        spec: RunSpec,
        sandbox: Sandbox,
        output: RunOutput,
        secrets: list[tuple[str, str]],
        sources: list[tuple[str, Source]],
    ) -> RunResult:
        """The exchange with the agent, its data sources relayed while it lasts."""
        if not sources:  # the common run: no relay to make, enter or close
            return await self._exchange(run_id, spec, sandbox, output, secrets, [])
        relay = Relay(sources)
        try:
            try:
                await anyio.to_thread.run_sync(relay.listen, sandbox.directory)
            except OSError as exc:
                return _error(run_id, f"the data sources could not be relayed: {exc}", 0)
            async with relay.running():
                result = await self._exchange(run_id, spec, sandbox, output, secrets, relay.job_sources)
        finally:
            relay.close()  # made in a thread: a cancel as it returned leaves them to close here
        result.sources = relay.usage()
        return result

    async def _exchange(
        self,
        run_id: str,
        spec: RunSpec,
        sandbox: Sandbox,
        output: RunOutput,
        secrets: list[tuple[str, str]],
        sources: list[tuple[str, str]],
    ) -> RunResult:
        server = self.environments[spec.environment].limits
        wall = spec.timeout
        job = Job(
            code=spec.code,
            stdin=spec.stdin,
            timeout=wall,
            max_output_bytes=spec.max_output_bytes,
            cpu_time=spec.cpu_time if spec.cpu_time < server.cpu_time else 0,
            files=list(spec.files),
            out_count=self._files.out_count,
            out_bytes=self._files.out_bytes,
            entrypoint=spec.entrypoint,
            args=list(spec.args),
            env=[*spec.env, *secrets],
            sources=sources,
        )
        started = time.perf_counter()
        try:
            try:
                if spec.memory_mb < server.memory_mb and not await sandbox.limit_memory(
                    spec.memory_mb * 1024 * 1024
                ):
                    # No memory cgroup to lower: the program's address space is the fallback.
                    job.address_space = spec.memory_mb * 1024 * 1024
            except InvalidRun as exc:
                # Checked at submission against the largest sandbox seen; this one is larger still.
                return _error(run_id, str(exc), 0)
            started = time.perf_counter()
            await sandbox.send(job)
            with anyio.move_on_after(wall + SERVER_GRACE) as scope:
                try:
                    while True:
                        message = await sandbox.receive()
                        if isinstance(message, FileChunk):
                            if not output.files.started:
                                scope.deadline = max(scope.deadline, anyio.current_time() + FILES_GRACE)
                            output.files.add(message.path, message.data, message.end)
                        elif isinstance(message, Output):
                            if not output.add(message.stream, message.data):
                                return _error(run_id, "the agent sent more output than the cap allows", 0)
                        else:
                            return _from_agent(run_id, message, output, _elapsed_ms(started))
                except ProtocolError as exc:
                    # The agent is PID 1: if the OOM killer took it, the container ended with it.
                    if await sandbox.oom_killed():
                        return _memory_kill(run_id, output, _elapsed_ms(started))
                    return _error(run_id, f"the sandbox failed: {exc}", _elapsed_ms(started))
        except SANDBOX_FAILURES as exc:
            return _error(run_id, f"the sandbox failed: {exc}", _elapsed_ms(started))
        # The agent did not answer within the timeout and its grace: the container is gone now.
        return RunResult.from_server(
            run_id,
            "timeout",
            stdout=output.stdout,
            stderr=output.stderr,
            limits_hit=["wall_time"],
            duration_ms=_elapsed_ms(started),
        )


def _memory_kill(run_id: str, output: RunOutput, duration_ms: float) -> RunResult:
    return RunResult.from_server(
        run_id,
        "failed",
        stdout=output.stdout,
        stderr=output.stderr,
        exit_code=-9,
        limits_hit=["memory"],
        duration_ms=duration_ms,
    )


def _elapsed_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _error(run_id: str, message: str, duration_ms: float) -> RunResult:
    return RunResult.from_server(run_id, "error", duration_ms=duration_ms, error=message)


def _from_agent(
    run_id: str, message: protocol.AgentMessage, output: RunOutput, server_ms: float
) -> RunResult:
    """Check the agent's claims, then build the result with the output it streamed before."""
    if isinstance(message, AgentError):
        return _error(run_id, message.message, server_ms)
    if not isinstance(message, Result):
        return _error(run_id, f"unexpected {type(message).__name__} from the agent", server_ms)
    limits: list[str] = list(dict.fromkeys(message.limits_hit))
    status: RunStatus
    if "wall_time" in limits:
        status = "timeout"
    elif message.exit_code == 0:
        status = "succeeded"
    elif message.exit_code is None:
        return _error(run_id, message.error or "the program's exit status is unknown", server_ms)
    else:
        status = "failed"
    return RunResult(
        id=run_id,
        status=status,
        exit_code=message.exit_code,
        stdout=output.stdout,
        stderr=output.stderr,
        stdout_truncated=message.stdout_truncated,
        stderr_truncated=message.stderr_truncated,
        limits_hit=limits,
        duration_ms=min(message.duration_ms, server_ms),
        files=output.files.describe(),
        files_truncated=message.files_truncated,
    )
