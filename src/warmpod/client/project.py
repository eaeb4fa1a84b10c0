"""A project directory as a run's files: the regular files under it, bounded, less what it ignores."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from warmpod.client.ignore import IGNORE_FILE, IgnoreRules
from warmpod.sandbox.files import path_problem
from warmpod.settings import FileSettings

_SERVER_DEFAULTS = FileSettings()
MAX_FILES = _SERVER_DEFAULTS.in_count
"""Files one project sends at most: the server's default cap (``WARMPOD_FILES__IN_COUNT``)."""
MAX_BYTES = _SERVER_DEFAULTS.in_bytes
"""Bytes of all its files together at most: the server's default cap (``WARMPOD_FILES__IN_BYTES``)."""
# Read without following a link swapped in after the walk saw a file, and without waiting on a
# FIFO that took a file's place (the read then finds it is not a regular file). POSIX only.
_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
)


class ProjectError(ValueError):
    """A project directory that cannot be sent as it is: too many files or bytes, or a bad name."""


def project_files(
    directory: str | os.PathLike[str],
    *,
    max_files: int = MAX_FILES,
    max_bytes: int = MAX_BYTES,
) -> list[tuple[str, bytes]]:
    """The files of a project directory, as ``files=`` of ``Client.run`` takes them.

    Each regular file under ``directory`` comes as ``(its path relative to the directory, its bytes)``,
    in path order. Symbolic links (to files or directories) are skipped, never followed, so nothing
    outside the directory is read; so are sockets, FIFOs and devices. What the ``.warmpodignore`` at
    the directory's root leaves out, and ``.git/``, ``__pycache__/``, ``.venv/`` and ``out/``, are not
    sent (see ``warmpod.client.ignore``).

    Args:
        directory: the project's root; its files keep their paths under it in the sandbox's ``/work``.
        max_files: files sent at most (the server's default cap unless given).
        max_bytes: bytes of all files together at most (the server's default cap unless given).

    Raises:
        ProjectError: more files or bytes than allowed, or a name the server would refuse.
        OSError: the directory or one of its files cannot be read.
    """
    root = Path(directory)
    rules = _rules(root)
    files: list[tuple[str, bytes]] = []
    total = 0
    for relative, size in _walk(root, rules):
        problem = path_problem(relative)
        if problem is not None:
            raise ProjectError(f"{root}: the file path {relative!r} {problem}")
        if len(files) == max_files:
            raise ProjectError(
                f"{root} has more than {max_files} files to send; leave some out in its {IGNORE_FILE}"
            )
        if total + size > max_bytes:
            raise ProjectError(
                f"{root} has more than {max_bytes} bytes of files to send; "
                f"leave some out in its {IGNORE_FILE}"
            )
        data = _read(root / relative, max_bytes - total)
        if data is None:
            raise ProjectError(f"{root}: {relative} changed while it was read (it grew past the cap)")
        total += len(data)
        files.append((relative, data))
    return sorted(files)


def _rules(root: Path) -> IgnoreRules:
    path = root / IGNORE_FILE
    # The rules file counts only as a regular file of the directory itself, as every file sent does.
    if path.is_file() and not path.is_symlink():
        return IgnoreRules.parse(path.read_text(encoding="utf-8"))
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    return IgnoreRules.parse("")


def _walk(root: Path, rules: IgnoreRules) -> Iterator[tuple[str, int]]:
    """``(relative path, size)`` of each regular file to send; an ignored directory is not entered."""
    pending = [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(root / prefix if prefix else root) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
        below = []
        for entry in entries:
            relative = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if not rules.ignored(relative, is_dir=True):
                    below.append(relative + "/")
            elif entry.is_file(follow_symlinks=False) and not rules.ignored(relative):
                yield relative, entry.stat(follow_symlinks=False).st_size
        pending.extend(below)


def _read(path: Path, at_most: int) -> bytes | None:
    """The bytes of the regular file at ``path``, or None when it has more than ``at_most``."""
    fd = os.open(path, _OPEN_FLAGS)
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ProjectError(f"{path} is no longer a regular file")
        data = file.read(at_most + 1)
    return None if len(data) > at_most else data
