"""API keys: the keys file, one ``NAME:SHA256_HEX[:OPTION=VALUE...]`` per line, re-read when it changes."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmpod.environ import name_problem
from warmpod.environments import NAME as ENVIRONMENT_NAME
from warmpod.errors import InvalidCallback, SettingsError
from warmpod.watched import WatchedFile
from warmpod.webhooks.destinations import parse_url
from warmpod.webhooks.sender import signers

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HASH = re.compile(r"[0-9a-f]{64}")
_OPTION = re.compile(r":(?=[a-z_]+=)")
SOURCE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
"""A data source's name (``sources.Source``): its program's variables are named after it."""
KEY_BYTES = 32
"""Entropy of a generated key; it is written as URL-safe base64 (43 characters)."""


@dataclass(frozen=True)
class Key:
    """One key as the file holds it: never the key itself, only its SHA-256."""

    name: str
    digest: str
    max_active: int | None = None
    """Runs of this key queued or running at once; None for no limit of its own."""
    secrets: frozenset[str] = frozenset()
    """The operator's secrets its runs may ask for (``secrets=A,B``)."""
    sources: frozenset[str] = frozenset()
    """The operator's data sources its runs may ask for (``sources=a,b``)."""
    environments: frozenset[str] | None = None
    """The environments its runs may name (``environments=a,b``); None, every one."""
    webhook: str | None = None
    """Where its runs' webhooks go when a run names no ``callback_url`` (``webhook=URL``)."""
    webhook_secrets: tuple[str, ...] = ()
    """``whsec_`` secrets signing its webhooks instead of the server's, each one signing
    (``webhook_secret=whsec_A,whsec_B``): another key's receiver never trusts this key's signature."""

    def line(self) -> str:
        """Its line in the keys file."""
        quota = "" if self.max_active is None else f":max_active={self.max_active}"
        granted = f":secrets={','.join(sorted(self.secrets))}" if self.secrets else ""
        reached = f":sources={','.join(sorted(self.sources))}" if self.sources else ""
        named = "" if self.environments is None else f":environments={','.join(sorted(self.environments))}"
        hook = "" if self.webhook is None else f":webhook={self.webhook}"
        signed = f":webhook_secret={','.join(self.webhook_secrets)}" if self.webhook_secrets else ""
        return f"{self.name}:{self.digest}{quota}{granted}{reached}{named}{hook}{signed}\n"


def digest(key: str) -> str:
    """The SHA-256 of a key, in hex, as the file keeps it."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def parse(text: str, source: str) -> list[Key]:
    """The keys of a keys file's text; blank lines and ``#`` comments are skipped.

    Raises:
        SettingsError: a line is malformed or a name repeats (the line number is named, never its hash).
    """
    keys: list[Key] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":")
        hashed, _, options = rest.partition(":")
        if not _NAME.fullmatch(name) or not _HASH.fullmatch(hashed):
            raise SettingsError(
                f"{source} line {number}: expected "
                "NAME:SHA256_HEX[:max_active=N][:secrets=A,B][:sources=a,b][:environments=a,b]"
                "[:webhook=URL][:webhook_secret=whsec_A,whsec_B] "
                "(NAME letters, digits, '.', '_' or '-'; the hash 64 lowercase hex digits)"
            )
        if any(key.name == name for key in keys):
            raise SettingsError(f"{source} line {number}: the name {name!r} is given twice")
        keys.append(Key(name, hashed, **_options(options, f"{source} line {number}")))
    return keys


def _options(text: str, where: str) -> dict[str, Any]:
    """A key line's options after its hash: ``max_active=N``, ``secrets=A,B``, ``sources=a,b`` and
    ``environments=a,b``, each at most once."""
    found: dict[str, Any] = {}
    # An option starts at a ':' followed by its name and '=': a URL's own colons stay in its value.
    for option in filter(None, _OPTION.split(text)):
        name, _, value = option.partition("=")
        if name in found:
            raise SettingsError(f"{where}: the option {name!r} is given twice")
        if name == "max_active":
            if not value.isdigit() or int(value) < 1:
                raise SettingsError(f"{where}: the option must be max_active=N with N >= 1")
            found[name] = int(value)
        elif name == "secrets":
            found[name] = secret_names(value, where)
        elif name == "sources":
            found[name] = source_names(value, where)
        elif name == "environments":
            found[name] = environment_names(value, where)
        elif name == "webhook":
            found[name] = _webhook(value, where)
        elif name == "webhook_secret":
            found["webhook_secrets"] = tuple(part.strip() for part in value.split(","))
            signers(found["webhook_secrets"], where)
        else:
            raise SettingsError(
                f"{where}: unknown option {name!r}: the options are max_active=N, secrets=A,B, sources=a,b, "
                "environments=a,b, webhook=URL and webhook_secret=whsec_A,whsec_B"
            )
    return found


def _webhook(value: str, where: str) -> str:
    # The allow-list is the server's, checked at each delivery; the URL's form is checked here.
    try:
        parse_url(value)
    except InvalidCallback as exc:
        raise SettingsError(f"{where}: webhook={value[:100]!r}: {exc}") from None
    return value


def secret_names(value: str, where: str) -> frozenset[str]:
    """The names of a ``secrets=A,B`` list.

    Raises:
        SettingsError: one is not a plain variable name.
    """
    names = frozenset(part.strip() for part in value.split(",") if part.strip())
    for name in names:
        problem = name_problem(name)
        if problem is not None:
            raise SettingsError(f"{where}: the secret name {name[:64]!r} {problem}")
    return names


def source_names(value: str, where: str) -> frozenset[str]:
    """The names of a ``sources=a,b`` list.

    Raises:
        SettingsError: one is not a source's name.
    """
    names = frozenset(part.strip() for part in value.split(",") if part.strip())
    for name in names:
        if not SOURCE_NAME.fullmatch(name):
            raise SettingsError(
                f"{where}: the source name {name[:64]!r} must be 1-32 lowercase letters, digits or '_', "
                "starting with a letter"
            )
    return names


def environment_names(value: str, where: str) -> frozenset[str]:
    """The names of an ``environments=a,b`` list: at least one, since leaving the option out is
    what grants every environment.

    Raises:
        SettingsError: the list is empty, or one is not an environment's name.
    """
    names = frozenset(part.strip() for part in value.split(",") if part.strip())
    if not names:
        raise SettingsError(
            f"{where}: environments= names at least one environment; leave it out for every one"
        )
    for name in names:
        if not ENVIRONMENT_NAME.fullmatch(name):
            raise SettingsError(
                f"{where}: the environment name {name[:64]!r} must be 1-32 lowercase letters, digits, "
                "'_' or '-', starting with a letter"
            )
    return names


class KeyFile:
    """The keys file, read again whenever it changed since the last look (or when told to)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = WatchedFile(path, parse, "keys file")

    def reload(self) -> None:
        """Read the file now.

        Raises:
            SettingsError: it cannot be read or is malformed (the keys read before stay in force).
        """
        self._file.reload()

    def current(self) -> list[Key]:
        """The keys in force: the file is read again first if it changed (a rotation needs no restart).

        A file that became unreadable or malformed keeps the keys it last held, so a half-written
        edit never opens the service nor locks everyone out; the error is raised for the log.
        """
        return self._file.current()

    def named(self, name: str) -> Key | None:
        """The key called ``name`` in the file, read again if it changed; if it became malformed,
        among the keys it last held."""
        try:
            keys = self._file.current()
        except SettingsError:
            keys = self._file.last()
        return next((key for key in keys if key.name == name), None)

    def find(self, presented: str) -> Key | None:
        """The key whose hash matches ``presented`` among those read last; every entry is
        compared, each in constant time."""
        hashed = digest(presented)
        found = None
        for key in self._file.last():
            if hmac.compare_digest(key.digest, hashed):
                found = key
        return found


def add(
    path: Path,
    name: str,
    max_active: int | None = None,
    granted: frozenset[str] = frozenset(),
    sources: frozenset[str] = frozenset(),
    environments: frozenset[str] | None = None,
    *,
    webhook: str | None = None,
    webhook_secrets: tuple[str, ...] = (),
) -> str:
    """Create a key named ``name``, append its hash to the keys file (made 0600), and return the key.

    ``granted`` names the secrets its runs may ask for, ``sources`` the data sources,
    ``environments`` the environments (None: every one); ``webhook`` is its webhook endpoint and
    ``webhook_secrets`` sign its webhooks.

    Raises:
        SettingsError: the name is not allowed, is taken, or the file cannot be written.
    """
    if not _NAME.fullmatch(name):
        raise SettingsError(f"a key name is 1-64 letters, digits, '.', '_' or '-', not {name!r}")
    existing = _read(path)
    if any(key.name == name for key in existing):
        raise SettingsError(f"{path} already has a key named {name!r}: remove it first to replace it")
    key = secrets.token_urlsafe(KEY_BYTES)
    # A key starting with '-' reads as an option: `warmpod run --api-key -Gx...` would refuse it.
    while key.startswith("-"):
        key = secrets.token_urlsafe(KEY_BYTES)
    if webhook is not None:
        _webhook(webhook, "--webhook")
    line = Key(name, digest(key), max_active, granted, sources, environments, webhook, webhook_secrets).line()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as out:
            out.write(line)
    except OSError as exc:
        raise SettingsError(f"cannot write the keys file {path}: {exc}") from exc
    return key


def remove(path: Path, name: str) -> None:
    """Remove the key named ``name`` from the keys file (rewritten whole, 0600, then renamed over it).

    Raises:
        SettingsError: no key has that name, or the file cannot be written.
    """
    keys = _read(path)
    if not any(key.name == name for key in keys):
        raise SettingsError(f"{path} has no key named {name!r}")
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.writelines(key.line() for key in keys if key.name != name)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SettingsError(f"cannot write the keys file {path}: {exc}") from exc


def _read(path: Path) -> list[Key]:
    if not path.exists():
        return []
    return KeyFile(path).current()
