"""Unit tests of the agent protocol: every message both ways, and every way a frame can be hostile."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.fakes import agent_body, output, pool_module, result

from warmpod.errors import ProtocolError
from warmpod.sandbox import protocol
from warmpod.sandbox.files import OutputFiles
from warmpod.sandbox.protocol import AgentError, Channel, FileChunk, Hello, Job, Output, Result
from warmpod.sandbox.unix_stream import UnixStream
from warmpod.settings import FileSettings

TEST_FRAME = 1024
# The widest character in the agent's JSON: outside the BMP, escaped as two \uXXXX.
WIDE = "\U0001d41a"


@pytest.fixture(scope="module")
def agent() -> ModuleType:
    """The real in-container agent, imported as a module so its own framing functions can be used."""
    return pool_module("agent")


@pytest.fixture
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """Two connected unix sockets: the server's end and the agent's end."""
    server_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with server_end, agent_end:
        yield server_end, agent_end


@pytest.fixture
async def wired(
    socket_pair: tuple[socket.socket, socket.socket],
) -> AsyncIterator[tuple[Channel, UnixStream, socket.socket]]:
    """A Channel on the server's end, that end's raw anyio stream, and the agent's blocking socket."""
    server_end, agent_end = socket_pair
    stream = UnixStream(server_end.dup())
    async with stream:
        yield Channel(stream, max_frame=TEST_FRAME), stream, agent_end


@pytest.fixture
async def full_size(
    socket_pair: tuple[socket.socket, socket.socket],
) -> AsyncIterator[tuple[Channel, socket.socket]]:
    """A Channel on the server's end taking frames up to the real MAX_FRAME, and the agent's socket."""
    server_end, agent_end = socket_pair
    async with UnixStream(server_end.dup()) as stream:
        yield Channel(stream, max_frame=protocol.MAX_FRAME), agent_end


def frame(body: bytes) -> bytes:
    """A frame as the agent writes it: 4-byte big-endian length, then the body."""
    return struct.pack(">I", len(body)) + body


async def receive_soon(channel: Channel) -> protocol.AgentMessage:
    """Receive one frame, failing the test instead of hanging if the channel waits for more bytes."""
    with anyio.fail_after(2):
        return await channel.receive()


# Round trips ------------------------------------------------------------------------------------


def test_job_frame_decodes_as_the_agent_reads_it() -> None:
    """A Job frame is length-prefixed JSON tagged "job" whose code and stdin are base64 of the bytes sent."""
    code = "print('héllo')\n".encode() + b"\x00\xff\xfe raw bytes"
    job = Job(
        code=code,
        stdin=b"line 1\nline 2\n\x00",
        timeout=2.5,
        max_output_bytes=4096,
        files=[("data/a.csv", b"x,y\n\xff")],
        out_count=3,
        out_bytes=1000,
        sources=[("warehouse", "/run/warmpod/source-0.sock")],
    )
    data = protocol.encode(job)
    (size,) = struct.unpack(">I", data[:4])
    assert size == len(data) - 4
    message = json.loads(data[4:])
    assert message == {
        "type": "job",
        "code": base64.b64encode(job.code).decode(),
        "stdin": base64.b64encode(job.stdin).decode(),
        "timeout": 2.5,
        "max_output_bytes": 4096,
        "cpu_time": 0,
        "address_space": 0,
        "files": [["data/a.csv", base64.b64encode(b"x,y\n\xff").decode()]],
        "out_count": 3,
        "out_bytes": 1000,
        "entrypoint": "main.py",
        "args": [],
        "env": [],
        "sources": [["warehouse", "/run/warmpod/source-0.sock"]],
    }
    assert base64.b64decode(message["code"]) == code
    assert base64.b64decode(message["stdin"]) == job.stdin


async def test_job_reaches_the_real_agent_intact(
    wired: tuple[Channel, UnixStream, socket.socket], agent: ModuleType
) -> None:
    """A Job sent over a Channel is read back by the agent's own recv_frame with every field intact."""
    channel, _, agent_end = wired
    job = Job(code=bytes(range(256)) * 3, stdin=b"", timeout=0.25, max_output_bytes=1)
    await channel.send(job)
    message = await anyio.to_thread.run_sync(agent.recv_frame, agent_end)
    assert message["type"] == "job"
    assert base64.b64decode(message["code"]) == job.code
    assert base64.b64decode(message["stdin"]) == b""
    assert float(message["timeout"]) == 0.25
    assert int(message["max_output_bytes"]) == 1


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        pytest.param(
            {"type": "hello", "version": protocol.PROTOCOL_VERSION, "pid": 42},
            Hello(version=protocol.PROTOCOL_VERSION, pid=42),
            id="hello",
        ),
        pytest.param(
            output("stdout", b"\xff\x00partial"),
            Output(stream="stdout", data=b"\xff\x00partial"),
            id="stdout",
        ),
        pytest.param(output("stderr", b"Killed\n"), Output(stream="stderr", data=b"Killed\n"), id="stderr"),
        pytest.param(
            result(exit_code=-9, stdout_truncated=True, limits_hit=["output", "memory"], duration_ms=0),
            Result(
                exit_code=-9,
                stdout_truncated=True,
                stderr_truncated=False,
                limits_hit=["output", "memory"],
                duration_ms=0.0,
                error=None,
            ),
            id="result",
        ),
        pytest.param(
            result(exit_code=None, error="lost track of the program"),
            Result(
                exit_code=None,
                stdout_truncated=False,
                stderr_truncated=False,
                limits_hit=[],
                duration_ms=1.0,
                error="lost track of the program",
            ),
            id="result-without-exit-code",
        ),
        pytest.param(
            {"type": "error", "message": "agent failed: OSError(28, 'No space left on device')"},
            AgentError(message="agent failed: OSError(28, 'No space left on device')"),
            id="error",
        ),
    ],
)
async def test_agent_messages_round_trip(
    wired: tuple[Channel, UnixStream, socket.socket],
    agent: ModuleType,
    sent: dict[str, Any],
    expected: protocol.AgentMessage,
) -> None:
    """Each agent message, sent by the agent's own send_frame, is received as the matching typed struct."""
    channel, _, agent_end = wired
    await anyio.to_thread.run_sync(agent.send_frame, agent_end, sent)
    assert await receive_soon(channel) == expected
    assert protocol.decode(agent_body(sent)) == expected


def test_result_without_error_field_defaults_to_none() -> None:
    """A result that omits the optional ``error`` field decodes with ``error`` None."""
    body = result()
    del body["error"]
    message = protocol.decode(agent_body(body))
    assert isinstance(message, Result)
    assert message.error is None


@pytest.mark.parametrize("exit_code", [-64, 0, 1, 255])
def test_exit_code_in_range_is_accepted(exit_code: int) -> None:
    """Exit codes from -64 (killed by signal 64) to 255 decode unchanged."""
    message = protocol.decode(agent_body(result(exit_code=exit_code)))
    assert isinstance(message, Result)
    assert message.exit_code == exit_code


def test_every_known_limit_name_is_accepted() -> None:
    """A result may name all six limits at once."""
    names = ["wall_time", "cpu_time", "memory", "pids", "output", "disk"]
    message = protocol.decode(agent_body(result(limits_hit=names)))
    assert isinstance(message, Result)
    assert message.limits_hit == names


# Hostile bodies ---------------------------------------------------------------------------------


BAD_BODIES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"not json at all", id="garbage"),
    pytest.param(b"\xff\xfe\x00\x01", id="binary"),
    pytest.param(b'{"type":"hello","version":1', id="truncated-json"),
    pytest.param(b'{"type":"hello","version":1,"pid":1}{"type":"hello"}', id="trailing-data"),
    pytest.param(b"null", id="null"),
    pytest.param(b"[]", id="array"),
    pytest.param(b"{}", id="untagged"),
    pytest.param(b'{"type":"bogus"}', id="unknown-tag"),
    pytest.param(
        agent_body({"type": "job", "code": "", "stdin": "", "timeout": 1, "max_output_bytes": 1}), id="job"
    ),
    pytest.param(agent_body({"type": "hello", "version": "1", "pid": 1}), id="hello-version-str"),
    pytest.param(agent_body({"type": "hello", "version": True, "pid": 1}), id="hello-version-bool"),
    pytest.param(agent_body({"type": "hello", "version": 1}), id="hello-missing-pid"),
    pytest.param(agent_body({"type": "hello", "version": 1, "pid": 1, "extra": 0}), id="hello-unknown-field"),
    pytest.param(agent_body(result(surprise=True)), id="result-unknown-field"),
    # The old protocol's result carried both streams; output now only comes in Output frames.
    pytest.param(agent_body(result(stdout=base64.b64encode(b"out").decode())), id="result-carrying-stdout"),
    pytest.param(agent_body(result(stderr="")), id="result-carrying-stderr"),
    pytest.param(agent_body(result(error="x" * 4097)), id="result-error-too-long"),
    pytest.param(agent_body({**output("stdout", b""), "data": "not base64!"}), id="output-not-base64"),
    pytest.param(agent_body({**output("stdout", b""), "data": None}), id="output-data-null"),
    pytest.param(agent_body({**output("stdout", b"x"), "stream": "stdin"}), id="output-unknown-stream"),
    pytest.param(agent_body({"type": "output", "stream": "stdout"}), id="output-missing-data"),
    pytest.param(agent_body({**output("stdout", b""), "seq": 1}), id="output-unknown-field"),
    pytest.param(
        agent_body({"type": "hello", "version": 1, "pid": 1, "preload_failed": ["x" * 201]}),
        id="hello-long-name",
    ),
    pytest.param(
        agent_body({"type": "hello", "version": 1, "pid": 1, "preload_failed": ["x"] * 65}),
        id="hello-many-names",
    ),
    pytest.param(agent_body(result(exit_code=0.5)), id="result-exit-code-float"),
    pytest.param(agent_body(result(exit_code="0")), id="result-exit-code-str"),
    pytest.param(agent_body(result(stdout_truncated="no")), id="result-truncated-str"),
    pytest.param(agent_body(result(duration_ms=-1)), id="result-negative-duration"),
    pytest.param(agent_body(result(limits_hit="wall_time")), id="result-limits-not-list"),
    pytest.param(b'{"type":"result","duration_ms":NaN}', id="result-nan"),
    pytest.param(agent_body({"type": "error", "message": 7}), id="error-message-int"),
    pytest.param(agent_body({"type": "error", "message": "x" * 4097}), id="error-message-too-long"),
    pytest.param(agent_body({"type": "error"}), id="error-missing-message"),
]


@pytest.mark.parametrize("body", BAD_BODIES)
def test_invalid_body_is_a_protocol_error(body: bytes) -> None:
    """Garbage, truncated, wrongly typed, unknown-field and unknown-tag bodies raise ProtocolError."""
    with pytest.raises(ProtocolError, match="invalid frame from agent"):
        protocol.decode(body)


@pytest.mark.parametrize("body", BAD_BODIES[:4])
async def test_invalid_frame_over_a_channel_is_a_protocol_error(
    wired: tuple[Channel, UnixStream, socket.socket], body: bytes
) -> None:
    """A well-sized frame with a bad body, received over a Channel, raises ProtocolError."""
    channel, _, agent_end = wired
    agent_end.sendall(frame(body))
    with pytest.raises(ProtocolError):
        await receive_soon(channel)


@pytest.mark.parametrize(
    "limits_hit",
    [["timeout"], ["wall_time", "WALL_TIME"], ["memory", ""], [None], [1], ["wall_time"] * 7],
    ids=["unknown", "wrong-case", "empty", "null", "int", "too-many"],
)
def test_limits_hit_with_unknown_names_is_rejected(limits_hit: list[object]) -> None:
    """limits_hit may only hold the six known limit names (at most six entries)."""
    with pytest.raises(ProtocolError):
        protocol.decode(agent_body(result(limits_hit=limits_hit)))


@pytest.mark.parametrize("exit_code", [-65, 256, 2**31, -(2**31), 2**64])
def test_exit_code_out_of_range_is_rejected(exit_code: int) -> None:
    """An exit code below -64 or above 255 cannot come from a real process and is refused."""
    with pytest.raises(ProtocolError):
        protocol.decode(agent_body(result(exit_code=exit_code)))


# Framing ----------------------------------------------------------------------------------------


async def test_frame_of_exactly_the_maximum_size_is_accepted(
    wired: tuple[Channel, UnixStream, socket.socket],
) -> None:
    """A frame whose body is exactly max_frame bytes long is read and decoded."""
    channel, _, agent_end = wired
    body = agent_body({"type": "error", "message": ""})
    padded = body[:-1] + b" " * (TEST_FRAME - len(body)) + b"}"
    assert len(padded) == TEST_FRAME
    agent_end.sendall(frame(padded))
    assert await receive_soon(channel) == AgentError(message="")


async def test_oversized_header_is_refused_before_the_body_is_read(
    wired: tuple[Channel, UnixStream, socket.socket],
) -> None:
    """A header announcing more than max_frame bytes raises ProtocolError without consuming the body."""
    channel, stream, agent_end = wired
    body = b"x" * (TEST_FRAME + 1)
    agent_end.sendall(frame(body))
    with pytest.raises(ProtocolError, match="exceeds"):
        await receive_soon(channel)
    # Every byte of the body is still waiting in the socket: the channel stopped after the header.
    left = b""
    with anyio.fail_after(2):
        while len(left) < len(body):
            left += await stream.receive()
    assert left == body


async def test_oversized_header_is_refused_even_if_the_body_never_comes(
    wired: tuple[Channel, UnixStream, socket.socket],
) -> None:
    """A 4 GiB header with no body after it is refused at once instead of waiting for the body."""
    channel, _, agent_end = wired
    agent_end.sendall(struct.pack(">I", 2**32 - 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        await receive_soon(channel)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"\x00\x00", id="half-header"),
        pytest.param(struct.pack(">I", 100) + b'{"type":"hello"', id="half-body"),
    ],
)
async def test_truncated_frame_then_hang_up_is_a_protocol_error(
    wired: tuple[Channel, UnixStream, socket.socket], data: bytes
) -> None:
    """An agent that hangs up before a whole frame arrived raises ProtocolError, not EOF or IncompleteRead."""
    channel, _, agent_end = wired
    agent_end.sendall(data)
    agent_end.shutdown(socket.SHUT_WR)
    with pytest.raises(ProtocolError, match="connection lost"):
        await receive_soon(channel)


async def test_a_job_sent_to_an_agent_that_went_away_is_a_protocol_error(
    wired: tuple[Channel, UnixStream, socket.socket],
) -> None:
    """Sending to an agent whose end is closed raises ProtocolError, not the transport's own error."""
    channel, _, agent_end = wired
    agent_end.close()
    job = Job(code=b"print(1)", stdin=b"", timeout=1.0, max_output_bytes=100)
    with anyio.fail_after(2), pytest.raises(ProtocolError, match="connection lost"):
        await channel.send(job)


async def test_frames_are_read_one_at_a_time(
    wired: tuple[Channel, UnixStream, socket.socket],
) -> None:
    """Two frames arriving in one write are received as two messages, in order."""
    channel, _, agent_end = wired
    hello = {"type": "hello", "version": 1, "pid": 7}
    error = {"type": "error", "message": "second"}
    agent_end.sendall(frame(agent_body(hello)) + frame(agent_body(error)))
    assert await receive_soon(channel) == Hello(version=1, pid=7)
    assert await receive_soon(channel) == AgentError(message="second")


async def test_the_largest_output_frame_the_agent_sends_is_received(
    full_size: tuple[Channel, socket.socket], agent: ModuleType
) -> None:
    """An Output carrying one whole read of the agent's (its CHUNK, base64 of 0xff bytes) fits MAX_FRAME."""
    channel, agent_end = full_size
    assert agent.CHUNK == protocol.AGENT_READ
    data = b"\xff" * agent.CHUNK
    await anyio.to_thread.run_sync(agent.send_frame, agent_end, output("stderr", data))
    assert await receive_soon(channel) == Output(stream="stderr", data=data)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(
            {
                "type": "hello",
                "version": protocol.PROTOCOL_VERSION,
                "pid": 2**62,
                "landlock": 2**62,
                "preload_failed": [WIDE * protocol.MAX_MODULE_NAME] * protocol.MAX_PRELOAD_FAILED,
                "memory": 2**62,
            },
            id="hello",
        ),
        pytest.param({"type": "error", "message": WIDE * protocol.MAX_MESSAGE}, id="error"),
        pytest.param(
            result(
                exit_code=-64,
                stdout_truncated=True,
                stderr_truncated=True,
                limits_hit=["wall_time", "cpu_time", "memory", "pids", "output", "disk"],
                duration_ms=1.7976931348623157e308,
                error=WIDE * protocol.MAX_MESSAGE,
            ),
            id="result",
        ),
    ],
)
def test_every_other_message_at_its_bounds_fits_a_frame(message: dict[str, Any]) -> None:
    """A Hello, AgentError or Result with each field at its bound, in the widest escapes, fits MAX_FRAME."""
    body = agent_body(message)
    assert len(body) <= protocol.MAX_FRAME
    protocol.decode(body)  # and the bounds admit it


async def test_a_frame_one_byte_over_max_frame_is_refused(full_size: tuple[Channel, socket.socket]) -> None:
    """A frame of exactly MAX_FRAME bytes is read; one announcing MAX_FRAME + 1 is refused from its header."""
    channel, agent_end = full_size
    body = agent_body({"type": "error", "message": ""})
    padded = body[:-1] + b" " * (protocol.MAX_FRAME - len(body)) + b"}"
    await anyio.to_thread.run_sync(agent_end.sendall, frame(padded))
    assert await receive_soon(channel) == AgentError(message="")
    agent_end.sendall(struct.pack(">I", protocol.MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match=f"frame of {protocol.MAX_FRAME + 1} bytes exceeds"):
        await receive_soon(channel)


def test_job_encoding_matches_msgspec_schema() -> None:
    """The job frame body decodes back into an identical Job with msgspec (no field is lost)."""
    job = Job(code=b"1", stdin=b"2", timeout=3.0, max_output_bytes=4)
    assert msgspec.json.decode(protocol.encode(job)[4:], type=Job) == job


# decode, fuzzed -----------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_TAGS = st.sampled_from(["hello", "output", "result", "error", "job", ""]) | st.text(max_size=8)


@given(body=st.binary(max_size=512))
@settings(max_examples=500, deadline=None, database=None)
def test_decode_of_any_bytes_is_a_message_or_a_protocol_error(body: bytes) -> None:
    """Whatever bytes a container sends as a frame body, decode returns an agent message or raises
    the protocol's own error: never another exception."""
    try:
        message = protocol.decode(body)
    except ProtocolError:
        return
    assert isinstance(message, Hello | Output | Result | AgentError)


@given(tag=_TAGS, fields=st.dictionaries(st.text(max_size=20), _JSON, max_size=8))
@settings(max_examples=500, deadline=None, database=None)
def test_decode_of_any_json_object_is_a_message_or_a_protocol_error(tag: str, fields: dict[str, Any]) -> None:
    """Objects that look like frames (a known or unknown ``type``, any fields and values) decode
    to a valid message or raise ProtocolError."""
    # NaN and infinities come out as bare words, which is not JSON either: also a ProtocolError.
    body = json.dumps({**fields, "type": tag}).encode()
    try:
        message = protocol.decode(body)
    except ProtocolError:
        return
    assert isinstance(message, Hello | Output | Result | AgentError)


# Valid frames whose strings carry bytes that are not UTF-8: msgspec lets Python's
# UnicodeDecodeError through for them unless decode translates it.
_HELLO_BODY = agent_body({"type": "hello", "version": 2, "pid": 1, "preload_failed": ["numpy"]})
BAD_UTF8 = [
    pytest.param(b'{"type":"hello","version":2,"pid":1,"preload_failed":["\xff"]}', id="invalid-start-byte"),
    pytest.param(b'{"type":"error","message":"\xc3"}', id="truncated-sequence"),
    pytest.param(b'{"type":"error","message":"\xc0\xaf"}', id="overlong"),
    pytest.param(b'{"type":"error","message":"\xed\xa0\x80"}', id="encoded-surrogate"),
    pytest.param(b'{"type":"error","message":"\xf4\x90\x80\x80"}', id="past-u10ffff"),
    pytest.param(b'{"type":"\xff"}', id="in-the-tag"),
    pytest.param(b'{"\xff":1,"type":"error","message":""}', id="in-a-key"),
    pytest.param(b'{"type":"file","path":"\x80","data":"","end":true}', id="in-a-path"),
    pytest.param(b'{"type":"output","stream":"std\xffout","data":""}', id="in-a-literal"),
]


@pytest.mark.parametrize("body", BAD_UTF8)
def test_strings_that_are_not_utf8_are_a_protocol_error(body: bytes) -> None:
    """A string holding bytes that are not UTF-8 (a broken agent's Hello) raises ProtocolError, not
    UnicodeDecodeError, which would escape the pool's task group."""
    with pytest.raises(ProtocolError, match="invalid frame from agent"):
        protocol.decode(body)


@pytest.mark.parametrize("body", BAD_UTF8[:2])
async def test_a_frame_that_is_not_utf8_over_a_channel_is_a_protocol_error(
    wired: tuple[Channel, UnixStream, socket.socket], body: bytes
) -> None:
    """Over a Channel too, a frame whose strings are not UTF-8 raises ProtocolError."""
    channel, _, agent_end = wired
    agent_end.sendall(frame(body))
    with pytest.raises(ProtocolError):
        await receive_soon(channel)


_VALID_BODIES = st.sampled_from(
    [
        _HELLO_BODY,
        agent_body(output("stdout", b"hello")),
        agent_body(result(error="boom")),
        agent_body({"type": "error", "message": "agent failed"}),
        agent_body({"type": "file", "path": "out/a.txt", "data": "aGk=", "end": True}),
    ]
)


@given(
    body=_VALID_BODIES, at=st.integers(min_value=0), cut=st.integers(min_value=0), junk=st.binary(max_size=8)
)
@settings(max_examples=1000, deadline=None, database=None)
def test_decode_of_a_mutated_frame_is_a_message_or_a_protocol_error(
    body: bytes, at: int, cut: int, junk: bytes
) -> None:
    """A real message with random bytes spliced in (often inside a string, where bad UTF-8 hides)
    and some bytes cut out decodes to a valid message or raises ProtocolError, nothing else."""
    at %= len(body) + 1
    mutated = body[:at] + junk + body[at + cut % 4 :]
    try:
        message = protocol.decode(mutated)
    except ProtocolError:
        return
    assert isinstance(message, Hello | Output | FileChunk | Result | AgentError)


@given(
    frames=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2 * TEST_FRAME), st.binary(max_size=64) | _VALID_BODIES),
        max_size=4,
    )
)
@settings(max_examples=100, deadline=None, database=None)
def test_any_byte_stream_over_a_channel_gives_messages_then_a_protocol_error(
    frames: list[tuple[int, bytes]],
) -> None:
    """Frames whose headers lie (too long, too short, oversized) and whose bodies are garbage, then
    a hang-up: the Channel yields valid messages until it raises ProtocolError, and nothing else."""
    data = b"".join(struct.pack(">I", size) + body for size, body in frames)

    async def main() -> None:
        server_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with agent_end:
            agent_end.setblocking(False)
            async with UnixStream(server_end) as stream:
                channel = Channel(stream, max_frame=TEST_FRAME)
                # A socket pair buffers more than these few frames: the write cannot block.
                agent_end.sendall(data)
                agent_end.shutdown(socket.SHUT_WR)
                for _ in range(len(frames) + 1):
                    try:
                        message = await receive_soon(channel)
                    except ProtocolError:
                        return
                    assert isinstance(message, Hello | Output | FileChunk | Result | AgentError)
                pytest.fail("the channel read past the end of the stream")

    anyio.run(main)


# The agent's collection of out/, on a directory of this host ------------------------------------


async def collect(
    agent: ModuleType,
    work: Path,
    full_size: tuple[Channel, socket.socket],
    count: int = 100,
    size: int = 1000,
) -> tuple[OutputFiles, bool]:
    """What the server makes of the agent's send_files over ``work``: the files and the truncation flag."""
    channel, agent_end = full_size
    setattr(agent, "WORKDIR", str(work))  # noqa: B010  (a module attribute mypy cannot see)
    files = OutputFiles(FileSettings(out_count=count, out_bytes=size))

    def send() -> bool:
        truncated: bool = agent.send_files(agent_end, count, size)
        agent_end.shutdown(socket.SHUT_WR)
        return truncated

    async def receive() -> None:
        with contextlib.suppress(ProtocolError):
            while True:
                message = await channel.receive()
                assert isinstance(message, FileChunk)
                files.add(message.path, message.data, message.end)

    async with anyio.create_task_group() as tg:
        tg.start_soon(receive)
        truncated = await anyio.to_thread.run_sync(send)
    return files, truncated


async def test_the_agent_sends_regular_files_of_out_only(
    agent: ModuleType, tmp_path: Path, full_size: tuple[Channel, socket.socket]
) -> None:
    """Regular files under out/ come in path order, whole; links, FIFOs, names that are not UTF-8 or
    hold a backslash, and anything outside out/ are left behind, flagged."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "b.txt").write_bytes(b"b" * 100_000)
    (out / "sub" / "a.csv").write_text("x\n")
    (out / "empty").write_bytes(b"")
    (tmp_path / "secret").write_text("not in out")
    (out / "link").symlink_to(tmp_path / "secret")
    (out / "dirlink").symlink_to(tmp_path)
    os.mkfifo(out / "fifo")
    (out / "back\\slash").write_text("x")
    os.close(os.open(bytes(out) + b"/\xff", os.O_CREAT | os.O_WRONLY, 0o644))
    files, truncated = await collect(agent, tmp_path, full_size, size=200_000)
    assert [(f.path, bytes(f.data)) for f in files.complete] == [
        ("out/b.txt", b"b" * 100_000),
        ("out/empty", b""),
        ("out/sub/a.csv", b"x\n"),
    ]
    assert truncated is True


async def test_the_agent_keeps_to_the_count_and_byte_caps(
    agent: ModuleType, tmp_path: Path, full_size: tuple[Channel, socket.socket]
) -> None:
    """Past the count cap the rest are flagged; a file larger than the bytes left is skipped, not cut."""
    out = tmp_path / "out"
    out.mkdir()
    for name, size in [("a", 300), ("b", 800), ("c", 300), ("d", 300), ("e", 1)]:
        (out / name).write_bytes(b"x" * size)
    files, truncated = await collect(agent, tmp_path, full_size, count=3, size=1000)
    assert [(f.path, len(f.data)) for f in files.complete] == [("out/a", 300), ("out/c", 300), ("out/d", 300)]
    assert truncated is True


async def test_the_agent_sends_nothing_for_a_missing_or_linked_out(
    agent: ModuleType, tmp_path: Path, full_size: tuple[Channel, socket.socket]
) -> None:
    """No out/ is no files and no flag; out/ swapped for a symlink is no files, flagged."""
    files, truncated = await collect(agent, tmp_path, full_size)
    assert (files.complete, truncated) == ([], False)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").write_text("x")
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    files, truncated = await collect(agent, tmp_path, full_size)
    assert (files.complete, truncated) == ([], True)
