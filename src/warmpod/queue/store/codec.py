"""How runs are kept in a store's rows: versioned msgpack blobs, and output chunks packed into rows."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import msgspec

from warmpod.models import CHUNK_BYTES, Chunk, RunResult, RunSpec, Stream

B = TypeVar("B", RunSpec, RunResult)
ROW_SEGMENTS = 256
"""The most chunks one stored row packs (``output_rows``): with at most ``CHUNK_BYTES`` of data
too, a page read inside a row decodes a bounded row, and the row's own cost (its key, about 50
bytes) is shared by enough chunks to stay well under a byte per chunk."""
PACKED = "packed"
"""The ``stream`` of a stored row that packs several chunks (``output_rows``); a row whose stream
is ``stdout`` or ``stderr`` is one chunk, as every row was before rows packed chunks."""


def encode_blob(value: RunSpec | RunResult) -> bytes:
    """A spec or result as stored: ``[BLOB_VERSION, value]`` in msgpack."""
    return msgspec.msgpack.encode((BLOB_VERSION, value))


def decode_blob(raw: bytes, kind: type[B]) -> B:
    """The value ``encode_blob`` stored, or that a store before blob versions did (a bare map).

    Raises:
        msgspec.DecodeError: not one this version can read.
    """
    if raw[:1] != b"\x92":  # no fixarray of two: a bare struct of before versions
        return msgspec.msgpack.decode(raw, type=kind)
    version, value = msgspec.msgpack.decode(raw, type=tuple[int, msgspec.Raw])
    if version > BLOB_VERSION:
        raise msgspec.DecodeError(f"stored by a newer warmpod (blob version {version} > {BLOB_VERSION})")
    return msgspec.msgpack.decode(value, type=kind)


BLOB_VERSION = 1
"""Of the msgpack specs and results in a store: ``decode_blob`` reads this one and older."""


class _Packed(msgspec.Struct, array_like=True):
    """The ``data`` of a row of several chunks: one mark per chunk, ``size << 1 | stream`` (0 for
    stdout, 1 for stderr: one msgpack byte for a chunk under 64 bytes), and their data joined."""

    marks: list[int]
    data: bytes


_PACKED_DECODER = msgspec.msgpack.Decoder(_Packed)
_STREAMS: tuple[Stream, Stream] = ("stdout", "stderr")


def output_rows(chunks: Sequence[Chunk], kept: int) -> Iterator[tuple[int, int, str, bytes]]:
    """The stored rows ``(seq, last, stream, data)`` of the chunks with seq above ``kept``.

    Chunks of consecutive seqs share a row up to ``ROW_SEGMENTS`` chunks and ``CHUNK_BYTES`` of
    data (a larger chunk is a row of its own); a row of one chunk is stored as it is, one of
    several as ``_Packed`` under the stream ``PACKED``."""
    group: list[Chunk] = []
    size = 0
    for chunk in chunks:
        if chunk.seq <= kept:
            continue
        if group and (
            chunk.seq != group[-1].seq + 1
            or len(group) == ROW_SEGMENTS
            or size + len(chunk.data) > CHUNK_BYTES
        ):
            yield _row(group)
            group, size = [], 0
        group.append(chunk)
        size += len(chunk.data)
    if group:
        yield _row(group)


def _row(group: list[Chunk]) -> tuple[int, int, str, bytes]:
    first, last = group[0], group[-1]
    if len(group) == 1:
        return first.seq, first.seq, first.stream, first.data
    marks = [len(c.data) << 1 | (c.stream == "stderr") for c in group]
    packed = _Packed(marks=marks, data=b"".join(c.data for c in group))
    return first.seq, last.seq, PACKED, msgspec.msgpack.encode(packed)


def unpacked(seq: int, stream: str, data: bytes, after: int = -1) -> Iterator[Chunk]:
    """The chunks with seq above ``after`` of a stored ``(seq, stream, data)`` row, in order
    (``output_rows`` made it); those at or below ``after`` are skipped without being copied."""
    if stream != PACKED:
        if seq > after:
            yield Chunk(seq=seq, stream="stderr" if stream == "stderr" else "stdout", data=bytes(data))
        return
    packed = _PACKED_DECODER.decode(data)
    view = memoryview(packed.data)
    skip = max(after + 1 - seq, 0)
    start = sum(mark >> 1 for mark in packed.marks[:skip])
    for index, mark in enumerate(packed.marks[skip:], start=skip):
        end = start + (mark >> 1)
        yield Chunk(seq=seq + index, stream=_STREAMS[mark & 1], data=bytes(view[start:end]))
        start = end


def segments(row: tuple[int, str, bytes]) -> Iterator[tuple[str, bytes]]:
    """The ``(stream, data)`` of each chunk of a stored ``(seq, stream, data)`` row, for ``joined``."""
    return ((chunk.stream, chunk.data) for chunk in unpacked(*row))


def page(rows: Iterable[tuple[int, str, bytes]], after: int, limit: int) -> list[Chunk]:
    """The first ``limit`` chunks above seq ``after`` of stored ``(seq, stream, data)`` rows in order."""
    found: list[Chunk] = []
    for seq, stream, data in rows:
        found += itertools.islice(unpacked(seq, stream, data, after), limit - len(found))
        if len(found) == limit:
            break
    return found


def joined(chunks: Iterable[tuple[str, bytes]]) -> tuple[str, str]:
    """A run's stdout and stderr as text, from its ``(stream, data)`` chunks in order."""
    printed = Printed()
    for stream, data in chunks:
        printed.add(stream, data)
    return printed.text()


class Printed:
    """A run's stdout and stderr gathered from its chunks as they are read, a page at a time."""

    def __init__(self) -> None:
        self._out = {"stdout": bytearray(), "stderr": bytearray()}

    def add(self, stream: str, data: bytes) -> None:
        """Append a chunk's ``data`` to its ``stream`` (anything but stderr is stdout)."""
        self._out.get(stream, self._out["stdout"]).extend(data)

    def text(self) -> tuple[str, str]:
        """The stdout and stderr so far, decoded (bytes that are not UTF-8 replaced)."""
        return self._out["stdout"].decode("utf-8", "replace"), self._out["stderr"].decode("utf-8", "replace")
