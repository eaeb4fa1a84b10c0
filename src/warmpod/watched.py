"""A file the operator edits while the server runs (keys, secrets), parsed again whenever it changed."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from warmpod.errors import SettingsError

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """``parse(text, source)`` of a file, read again whenever it changed since the last look.

    ``private`` files (the secrets file) must be readable by their owner alone.
    """

    def __init__(
        self, path: Path, parse: Callable[[str, str], T], what: str, *, private: bool = False
    ) -> None:
        self.path = path
        self._parse = parse
        self._what = what
        self._private = private
        self._stamp: tuple[int, int, int, int] | None = None
        self._value: T
        self.reload()

    def reload(self) -> None:
        """Read the file now.

        Raises:
            SettingsError: it cannot be read, is malformed, or is a private file others may read
                (what was read before stays in force).
        """
        try:
            info = self.path.stat()
            if self._private and info.st_mode & 0o077:
                raise SettingsError(
                    f"the {self._what} {self.path} may be read by others (mode "
                    f"{stat.filemode(info.st_mode)}): make it 0600 (chmod 600)"
                )
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"cannot read the {self._what} {self.path}: {exc}") from exc
        self._value = self._parse(text, str(self.path))
        self._stamp = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def current(self) -> T:
        """What the file holds: read again first if it changed (a rotation needs no restart).

        A file that became unreadable or malformed keeps what it last held, so a half-written edit
        changes nothing; the error is raised for the log.
        """
        try:
            info = self.path.stat()
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        except OSError:
            stamp = None
        if stamp != self._stamp:
            self.reload()
        return self._value

    def last(self) -> T:
        """What the file held when it was last read, without looking at it again."""
        return self._value
