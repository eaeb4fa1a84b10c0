"""The agent protocol: length-prefixed JSON frames, typed and bounded on the server's side.

A frame is a 4-byte big-endian length followed by one JSON object whose ``type`` field names the
message. The agent in ``pool/agent.py`` is stdlib-only and speaks the same format by hand. Every
byte from a container is hostile: frames are size-checked before they are read and decoded
into strict types before they are used.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Annotated, Literal

import anyio
import msgspec
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream
from msgspec import Meta

from warmpod.errors import ProtocolError
from warmpod.models import LimitName

PROTOCOL_VERSION = 2
HEADER = struct.Struct(">I")
# Bounds of what the agent sends; MAX_FRAME is sized from them.
AGENT_READ = 65536
"""Bytes the agent reads from a pipe at once (``CHUNK`` in pool/agent.py): the most one Output carries."""
MAX_PRELOAD_FAILED = 64
MAX_MODULE_NAME = 200
MAX_MESSAGE = 4096
MAX_PATH = 1024
"""Longest file path, in characters (``files.MAX_PATH``)."""
# The agent's json.dumps escapes a character outside ASCII as one \uXXXX, or two past U+FFFF.
_ESCAPED_CHAR = 12
MAX_FRAME = 1024 + max(
    4 * ((AGENT_READ + 2) // 3) + MAX_PATH * _ESCAPED_CHAR,  # a FileChunk's data and path
    MAX_PRELOAD_FAILED * (MAX_MODULE_NAME * _ESCAPED_CHAR + 3),  # a Hello's names, quoted, with commas
    MAX_MESSAGE * _ESCAPED_CHAR,  # an AgentError's message or a Result's error
)
"""Largest frame a well-behaved agent sends: its largest field at its bounds, and 1 KiB for the rest."""


class Hello(msgspec.Struct, tag="hello", forbid_unknown_fields=True):
    """Agent -> server: the interpreter is ready and the agent waits for its job."""

    version: int
    pid: int
    landlock: int = 0
    """Landlock ABI confining the program's writes; 0 when the kernel or seccomp offers none."""
    preload_failed: Annotated[
        list[Annotated[str, Meta(max_length=MAX_MODULE_NAME)]], Meta(max_length=MAX_PRELOAD_FAILED)
    ] = []
    """Preload modules the interpreter could not import; runs still work, without them warm."""
    memory: Annotated[int, Meta(ge=0)] = 0
    """Bytes the container's memory cgroup held once ready (preloads included); 0 if unknown."""


class Job(msgspec.Struct, tag="job", forbid_unknown_fields=True):
    """Server -> agent: the one program this container will ever run."""

    code: bytes
    stdin: bytes
    timeout: float
    max_output_bytes: int
    cpu_time: int = 0
    """CPU seconds, when lower than the container's; 0 keeps the container's."""
    address_space: int = 0
    """RLIMIT_AS in bytes where no memory cgroup applies; 0 for none."""
    files: list[tuple[str, bytes]] = []
    """``(path, content)`` of the files to write under the working directory first."""
    out_count: int = 0
    """Files to collect from ``out/`` at most, once the program ended."""
    out_bytes: int = 0
    """Bytes to collect from ``out/`` at most."""
    entrypoint: str = "main.py"
    """The path the program runs as; ``code`` is written there unless ``files`` has it."""
    args: list[str] = []
    env: list[tuple[str, str]] = []
    """Variables added to the program's environment, its secrets' values among them."""
    sources: list[tuple[str, str]] = []
    """``(name, socket path inside the container)`` of each data source: the agent relays the
    program's connections to ``WARMPOD_SOURCE_<NAME>`` to that socket, where the server listens."""


class Output(msgspec.Struct, tag="output", forbid_unknown_fields=True):
    """Agent -> server: a chunk of the program's output, what one stream gave within a few ms."""

    stream: Literal["stdout", "stderr"]
    data: bytes


class FileChunk(msgspec.Struct, tag="file", forbid_unknown_fields=True):
    """Agent -> server: the next piece of a file from ``out/``, after the program ended."""

    path: Annotated[str, Meta(max_length=MAX_PATH)]
    data: Annotated[bytes, Meta(max_length=AGENT_READ)]
    end: bool
    """The file's last piece."""


class Result(msgspec.Struct, tag="result", forbid_unknown_fields=True):
    """Agent -> server: how the program ended (its output came before, in Output frames)."""

    exit_code: Annotated[int, Meta(ge=-64, le=255)] | None
    stdout_truncated: bool
    stderr_truncated: bool
    limits_hit: Annotated[list[LimitName], Meta(max_length=6)]
    duration_ms: Annotated[float, Meta(ge=0)]
    error: Annotated[str, Meta(max_length=MAX_MESSAGE)] | None = None
    files_truncated: bool = False
    """A cap, a name that is not UTF-8 or a file of another kind left something in ``out/`` behind."""


class AgentError(msgspec.Struct, tag="error", forbid_unknown_fields=True):
    """Agent -> server: the agent itself failed; the program's outcome is unknown."""

    message: Annotated[str, Meta(max_length=MAX_MESSAGE)]


AgentMessage = Hello | Output | FileChunk | Result | AgentError

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(AgentMessage)


def encode(message: Job) -> bytes:
    """One frame carrying ``message``."""
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> AgentMessage:
    """The message in one frame's body.

    Raises:
        ProtocolError: the body is not a valid agent message.
    """
    try:
        message: AgentMessage = _decoder.decode(body)
    # msgspec raises its own errors for most bad input but lets Python's UnicodeDecodeError (a
    # ValueError) through for a string that is not UTF-8, and deep nesting could reach the
    # recursion limit: whatever the bytes, the caller sees the protocol's error only.
    except (msgspec.MsgspecError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"invalid frame from agent: {exc}") from exc
    return message


class Channel:
    """The server's end of one agent connection; a lost connection is a ProtocolError, whatever the
    transport raised."""

    def __init__(self, stream: ByteStream, max_frame: int) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._max_frame = max_frame

    async def send(self, message: Job) -> None:
        """Send one frame.

        Raises:
            ProtocolError: the agent's end went away.
        """
        try:
            await self._stream.send(encode(message))
        except (OSError, anyio.BrokenResourceError) as exc:
            raise ProtocolError(f"agent connection lost: {exc!r}") from exc

    async def receive(self) -> AgentMessage:
        """Receive one frame, refusing anything over the maximum size.

        Raises:
            ProtocolError: the agent hung up, or sent an oversized or invalid frame.
        """
        try:
            (size,) = HEADER.unpack(await self._reader.receive_exactly(HEADER.size))
            if size > self._max_frame:
                raise ProtocolError(f"frame of {size} bytes exceeds the {self._max_frame} limit")
            body = await self._reader.receive_exactly(size)
        except (OSError, anyio.IncompleteRead, anyio.BrokenResourceError) as exc:
            raise ProtocolError(f"agent connection lost: {exc!r}") from exc
        return decode(body)

    async def wait_hangup(self) -> None:
        """Return once the agent speaks out of turn or its end goes away; for an idle agent,
        which sends nothing until it has a job, either means its container is dead or broken."""
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._reader.receive(1)

    async def aclose(self) -> None:
        """Hang up."""
        await self._stream.aclose()
