"""A run's files: the path rules for what goes in, and what comes back out of ``out/``."""

from __future__ import annotations

import binascii
import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

import msgspec

from warmpod.errors import InvalidFile, ProtocolError
from warmpod.models import InputFile, OutputFile
from warmpod.sandbox.protocol import MAX_PATH
from warmpod.settings import FileSettings

OUT_DIR = "out"
"""The directory under the working directory whose files come back with the result."""
NAME_MAX = 255
"""Longest name of one file or directory, in bytes (Linux's)."""
# From the name alone, and the same on every host: the system's mime.types is not read.
_TYPES = mimetypes.MimeTypes(filenames=())


def path_problem(path: str) -> str | None:
    """Which rule ``path`` breaks as a relative path under the working directory, or None."""
    if not path:
        return "is empty"
    if len(path) > MAX_PATH:
        return f"is longer than {MAX_PATH} characters"
    if "\0" in path:
        return "contains a NUL character"
    if "\\" in path:
        return "contains a backslash (paths use '/')"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if path.startswith("/"):
        return "is absolute (paths are relative to the working directory)"
    parts = path.split("/")
    if ".." in parts:
        return "has a '..' component"
    if any(part in ("", ".") for part in parts):
        return "has an empty or '.' component"
    if any(len(part.encode()) > NAME_MAX for part in parts):
        return f"has a component longer than {NAME_MAX} bytes"
    return None


def check_inputs(files: Sequence[tuple[str, bytes]], limits: FileSettings) -> tuple[tuple[str, bytes], ...]:
    """The input files as given, once every path and size is allowed.

    Raises:
        InvalidFile: a path breaks a rule, repeats or is reserved, or a cap is exceeded; the
            message names the rule (or the maximum) and the path.
    """
    if len(files) > limits.in_count:
        raise InvalidFile(f"{len(files)} files sent; at most {limits.in_count} (WARMPOD_FILES__IN_COUNT)")
    seen: set[str] = set()
    total = 0
    for path, content in files:
        shown = repr(path[:MAX_PATH])
        problem = path_problem(path)
        if problem is not None:
            raise InvalidFile(f"file path {shown} {problem}")
        if path.split("/", 1)[0] == OUT_DIR:
            raise InvalidFile(f"file path {shown} is reserved: out/ is where the program leaves its files")
        if path in seen:
            raise InvalidFile(f"file path {shown} is given twice")
        seen.add(path)
        if len(content) > limits.in_file_bytes:
            raise InvalidFile(
                f"file {shown} has {len(content)} bytes; at most {limits.in_file_bytes} "
                "(WARMPOD_FILES__IN_FILE_BYTES)"
            )
        total += len(content)
    if total > limits.in_bytes:
        raise InvalidFile(
            f"the files have {total} bytes together; at most {limits.in_bytes} (WARMPOD_FILES__IN_BYTES)"
        )
    # A file named like one of its own parent directories cannot be written.
    for path in seen:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in seen:
                raise InvalidFile(f"file path {parent!r} is also a directory of {path[:MAX_PATH]!r}")
            parent = parent.rpartition("/")[0]
    return tuple(files)


def decode_inputs(files: Sequence[InputFile]) -> list[tuple[str, bytes]]:
    """The files of a JSON request with their content decoded.

    Raises:
        InvalidFile: a content is not valid base64.
    """
    decoded = []
    for file in files:
        try:
            content = binascii.a2b_base64(file.content, strict_mode=True)
        except (binascii.Error, ValueError):
            raise InvalidFile(f"the content of file {file.path[:MAX_PATH]!r} is not valid base64") from None
        decoded.append((file.path, content))
    return decoded


def media_type(path: str) -> str:
    """The media type a file's name suggests."""
    guessed, encoding = _TYPES.guess_type(path, strict=False)
    if guessed is None or encoding is not None:
        return "application/octet-stream"
    return guessed


@dataclass
class CollectedFile:
    """One file from ``out/`` as the agent sent it."""

    path: str
    data: bytearray = field(default_factory=bytearray)
    complete: bool = False

    def describe(self) -> OutputFile:
        """Its entry in the RunResult, without its bytes (the store keeps those once)."""
        return OutputFile(path=self.path, size=len(self.data), media_type=media_type(self.path))


def with_content(entry: OutputFile, data: bytes, inline_bytes: int) -> OutputFile:
    """The entry with its bytes inline in base64 when it is at most ``inline_bytes`` long."""
    if len(data) > inline_bytes:
        return entry
    content = binascii.b2a_base64(data, newline=False).decode()
    return msgspec.structs.replace(entry, content=content)


def with_url(run_id: str, entry: OutputFile) -> OutputFile:
    """The entry with the URL its bytes download from, relative to the server's."""
    return msgspec.structs.replace(entry, url=f"/status/{run_id}/files/{quote(entry.path)}")


class OutputFiles:
    """The files an agent sends back, held to the run's caps: an agent that goes past them lies."""

    def __init__(self, limits: FileSettings) -> None:
        self._limits = limits
        self._files: dict[str, CollectedFile] = {}
        self._bytes = 0

    def add(self, path: str, data: bytes, end: bool) -> None:
        """Take the next chunk of the file at ``path`` (a new path starts a new file).

        Raises:
            ProtocolError: a bad or repeated path, a chunk after the file's end, or past a cap.
        """
        file = self._files.get(path)
        if file is None:
            problem = path_problem(path)
            if problem is not None or path.split("/", 1)[0] != OUT_DIR or path == OUT_DIR:
                raise ProtocolError(f"the agent sent a file outside out/: {path[:MAX_PATH]!r}")
            if len(self._files) >= self._limits.out_count:
                raise ProtocolError(f"the agent sent more than {self._limits.out_count} files")
            file = self._files[path] = CollectedFile(path)
        if file.complete:
            raise ProtocolError(f"the agent sent {path[:MAX_PATH]!r} twice")
        self._bytes += len(data)
        if self._bytes > self._limits.out_bytes:
            raise ProtocolError(f"the agent sent more than {self._limits.out_bytes} bytes of files")
        file.data += data
        file.complete = end

    @property
    def started(self) -> bool:
        """Whether any file has come yet."""
        return bool(self._files)

    @property
    def complete(self) -> list[CollectedFile]:
        """The files received whole, in path order (a partial one, cut by a timeout, is dropped)."""
        return sorted((f for f in self._files.values() if f.complete), key=lambda f: f.path)

    def describe(self) -> list[OutputFile]:
        """The RunResult's entries of the complete files."""
        return [file.describe() for file in self.complete]
