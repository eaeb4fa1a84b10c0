"""The operator's data sources: one TOML table per upstream a run may reach, re-read when it changes.

A run names the sources it needs; its key must be granted them (``keys.Key.sources``), and the node
that runs it reads their addresses and limits here when it claims it (``sandbox.relay`` connects).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from warmpod.errors import SettingsError, SourceDenied
from warmpod.keys import SOURCE_NAME, Key
from warmpod.watched import WatchedFile

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MAX_CONNECTIONS = 64
"""Connections at once a source may allow one run at most: each holds two of the server's files."""
# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAX_HOST = 253


def host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address nor a host name, or None."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return None
    if len(host) > _MAX_HOST or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        return "must be an IP address or a host name (letters, digits, '-' and '.')"
    return None


class Source(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One upstream a run may reach through the relay, and what one run may do with it."""

    host: Annotated[str, Meta(min_length=1, max_length=_MAX_HOST)]
    """Its host name or IP address, as the server resolves and reaches it."""
    port: Annotated[int, Meta(ge=1, le=65535)]
    max_connections: Annotated[int, Meta(ge=1, le=MAX_CONNECTIONS)] = 4
    """Connections one run holds open at once; one past it is closed as soon as it is accepted."""
    max_bytes_in: Annotated[int, Meta(ge=1)] = 256 * MIB
    """Bytes from the upstream to the program in one run, all its connections together."""
    max_bytes_out: Annotated[int, Meta(ge=1)] = 16 * MIB
    """Bytes from the program to the upstream in one run, all its connections together."""
    idle_timeout: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    """Seconds a connection may pass no byte either way before it is cut."""
    connect_timeout: Annotated[float, Meta(gt=0, le=60)] = 5.0
    """Seconds the server waits for the upstream to take a connection."""

    def __post_init__(self) -> None:
        problem = host_problem(self.host)
        if problem is not None:
            raise ValueError(f"host {self.host[:64]!r} {problem}")


def parse(text: str, source: str) -> dict[str, Source]:
    """The sources of a sources file's text: each top-level table one source, named by its key.

    Raises:
        SettingsError: the text is not TOML, a name is not a source's name, or a table has a field
            missing, unknown or out of range (the source is named).
    """
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{source} is not valid TOML: {exc}") from exc
    found: dict[str, Source] = {}
    for name, table in tables.items():
        if not SOURCE_NAME.fullmatch(name):
            raise SettingsError(
                f"{source}: the source name {name[:64]!r} must be 1-32 lowercase letters, digits or '_', "
                "starting with a letter"
            )
        if not isinstance(table, dict):
            raise SettingsError(f"{source}: {name!r} must be a table: [{name}] with host and port")
        try:
            found[name] = msgspec.convert(table, Source)
        except msgspec.ValidationError as exc:
            raise SettingsError(f"{source}: the source {name!r}: {exc}") from exc
    return found


class Sources:
    """The sources file (or none: then no run may ask for a source), and who may reach what."""

    def __init__(self, path: Path | None) -> None:
        self._file = None if path is None else WatchedFile(path, parse, "sources file")

    def _current(self) -> dict[str, Source]:
        if self._file is None:
            return {}
        try:
            return self._file.current()
        except SettingsError as exc:
            log.error("%s; the sources read before stay in force", exc)
            return self._file.last()

    def check(self, names: Sequence[str], key: Key | None, keyed: bool) -> None:
        """Refuse a run that asks for a source that does not exist or that ``key`` may not use.

        ``keyed``: the server has a keys file, so each key uses only the sources granted to it;
        without one (a loopback, single-user server) every source may be asked for.

        Raises:
            SourceDenied: naming the first such source.
        """
        if not names:
            return  # the file is not even looked at
        known = self._current()
        for name in names:
            if name not in known:
                raise SourceDenied(f"no data source named {name!r} in the server's sources file")
            if keyed and (key is None or name not in key.sources):
                raise SourceDenied(f"this API key may not use the data source {name!r}")

    def resolve(self, names: Sequence[str]) -> list[tuple[str, Source]]:
        """The ``(name, source)`` of each source named, read when the run starts.

        Raises:
            SourceDenied: one is no longer in the sources file.
        """
        if not names:
            return []  # a run without sources costs no look at the file
        known = self._current()
        pairs = []
        for name in names:
            if name not in known:
                raise SourceDenied(f"the data source {name!r} is no longer in the server's sources file")
            pairs.append((name, known[name]))
        return pairs
