"""The operator's secrets: one ``NAME=value`` per line in a 0600 file, re-read when it changes.

A run names the secrets it needs; its key must be granted them (``keys.Key.secrets``), and the node
that runs it reads their values here when it claims it, so no value is ever stored with a run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from warmpod.environ import name_problem
from warmpod.errors import SecretDenied, SettingsError
from warmpod.keys import Key
from warmpod.watched import WatchedFile

log = logging.getLogger(__name__)

MIN_VALUE = 4
"""Characters of a secret's value at least: a shorter one would mask common text in every output."""
MAX_VALUE = 4096
"""Bytes of a secret's value at most."""


def parse(text: str, source: str) -> dict[str, str]:
    """The secrets of a secrets file's text; blank lines and ``#`` comments are skipped.

    Raises:
        SettingsError: a line is malformed, a name repeats or a value is too short or too long
            (the line number and the name are named, never a value).
    """
    found: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        name = name.strip()
        if not equals:
            raise SettingsError(f"{source} line {number}: expected NAME=value")
        problem = name_problem(name)
        if problem is not None:
            raise SettingsError(f"{source} line {number}: the name {name[:64]!r} {problem}")
        if name in found:
            raise SettingsError(f"{source} line {number}: the secret {name!r} is given twice")
        if len(value) < MIN_VALUE or len(value.encode()) > MAX_VALUE:
            raise SettingsError(
                f"{source} line {number}: the value of {name!r} must have {MIN_VALUE} to {MAX_VALUE} "
                "characters (a shorter one would be masked wherever its text appears in output)"
            )
        found[name] = value
    return found


class Secrets:
    """The secrets file (or none: then no run may ask for a secret), and who may use what."""

    def __init__(self, path: Path | None) -> None:
        self._file = None if path is None else WatchedFile(path, parse, "secrets file", private=True)

    def _current(self) -> dict[str, str]:
        if self._file is None:
            return {}
        try:
            return self._file.current()
        except SettingsError as exc:
            log.error("%s; the secrets read before stay in force", exc)
            return self._file.last()

    def check(self, names: Sequence[str], key: Key | None, keyed: bool) -> None:
        """Refuse a run that asks for a secret that does not exist or that ``key`` may not use.

        ``keyed``: the server has a keys file, so each key uses only the secrets granted to it;
        without one (a loopback, single-user server) every secret may be asked for.

        Raises:
            SecretDenied: naming the first such secret.
        """
        known = self._current()
        for name in names:
            if name not in known:
                raise SecretDenied(f"no secret named {name!r} in the server's secrets file")
            if keyed and (key is None or name not in key.secrets):
                raise SecretDenied(f"this API key may not use the secret {name!r}")

    def resolve(self, names: Sequence[str]) -> list[tuple[str, str]]:
        """The ``(name, value)`` of each secret named, read when the run starts.

        Raises:
            SecretDenied: one is no longer in the secrets file.
        """
        if not names:
            return []  # a run without secrets costs no look at the file
        known = self._current()
        pairs = []
        for name in names:
            if name not in known:
                raise SecretDenied(f"the secret {name!r} is no longer in the server's secrets file")
            pairs.append((name, known[name]))
        return pairs
