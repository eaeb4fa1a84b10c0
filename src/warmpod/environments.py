"""The operator's environments: locked library sets, each built into its own runner image and kept warm.

Without an environments file there is one, ``default``: today's image settings and preloads. A run
names its environment (``RunRequest.environment``); a key may be limited to some
(``keys.Key.environments``); the pool keeps sandboxes of each (``sandbox.pool``).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from warmpod.errors import EnvironmentDenied, SettingsError, UnknownEnvironment
from warmpod.settings import LimitSettings, ModuleName, Settings

DEFAULT = "default"
"""The environment of a run that names none; it always exists."""
NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
"""An environment's name: it tags images, metrics and log lines."""
MAX_ENVIRONMENTS = 16
"""Environments one server may declare: each keeps sandboxes warm and has its own image."""
# Limits that are the server's alone, not a default an environment may change.
_SERVER_LIMITS = frozenset({"allow_unenforced"})


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One environment's table in the environments file, as written."""

    requirements: str | msgspec.UnsetType = msgspec.UNSET
    preload: tuple[ModuleName, ...] | msgspec.UnsetType = msgspec.UNSET
    min_warm: Annotated[int, Meta(ge=0, le=256)] | msgspec.UnsetType = msgspec.UNSET
    limits: dict[str, Any] = {}


@dataclass(frozen=True)
class EnvironmentSpec:
    """One library set: where its requirements are, what its sandboxes preload and keep ready."""

    name: str
    requirements: Path | None
    """Its requirements.in; None for ``default`` keeping ``WARMPOD_IMAGE__REQUIREMENTS`` (or the
    image context's own lock)."""
    preload: tuple[str, ...]
    """Modules its pooled interpreters import before their run."""
    min_warm: int
    """Sandboxes of it the pool keeps ready, whatever the demand."""
    limits: LimitSettings
    """The limits of its runs: the server's, with the environment's defaults over them."""


class Environments:
    """Every environment this server declares, ``default`` first, read once at start."""

    def __init__(self, environments: list[EnvironmentSpec]) -> None:
        self._by_name = {environment.name: environment for environment in environments}
        if DEFAULT not in self._by_name:
            raise SettingsError(f"the environments must include {DEFAULT!r}")

    @classmethod
    def load(cls, settings: Settings) -> Environments:
        """The environments ``settings`` declare: the environments file's, or ``default`` alone.

        Raises:
            SettingsError: the file cannot be read, is not TOML, names an environment wrongly, has
                a field missing, unknown or out of range (the environment is named), or keeps more
                sandboxes warm than the pool may hold.
        """
        if not settings.environments.file:
            return cls([_default(settings, _Table(), None)])
        path = Path(settings.environments.file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise SettingsError(f"cannot read the environments file {path}: {exc.strerror}") from exc
        environments = parse(text, path, settings)
        warm = sum(max(environment.min_warm, 1) for environment in environments)
        if warm > settings.pool.bounds[1]:
            raise SettingsError(
                f"{path}: the environments keep {warm} sandboxes ready (min_warm, at least 1 each), more "
                f"than WARMPOD_POOL__MAX_SIZE ({settings.pool.bounds[1]}) allows"
            )
        return cls(environments)

    @property
    def names(self) -> list[str]:
        """Every environment's name, ``default`` first."""
        return list(self._by_name)

    def __iter__(self) -> Any:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __getitem__(self, name: str) -> EnvironmentSpec:
        return self._by_name[name]

    @property
    def default(self) -> EnvironmentSpec:
        """The environment of a run that names none."""
        return self._by_name[DEFAULT]

    def check(self, name: str, granted: frozenset[str] | None) -> EnvironmentSpec:
        """The environment a run asked for, if it exists and its key may use it.

        ``granted``: the environments the run's key may use; None, every one.

        Raises:
            UnknownEnvironment: no such environment (the message lists the known ones).
            EnvironmentDenied: the key may not use it.
        """
        environment = self._by_name.get(name)
        if environment is None:
            raise UnknownEnvironment(
                f"no environment named {name[:64]!r}; this server has {', '.join(self._by_name)}"
            )
        if granted is not None and name not in granted:
            raise EnvironmentDenied(f"this API key may not use the environment {name!r}")
        return environment


def parse(text: str, path: Path, settings: Settings) -> list[EnvironmentSpec]:
    """The environments of an environments file's text, ``default`` first (added if not declared).

    Raises:
        SettingsError: as ``Environments.load`` says.
    """
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path} is not valid TOML: {exc}") from exc
    if len(tables) > MAX_ENVIRONMENTS:
        raise SettingsError(f"{path}: {len(tables)} environments, more than {MAX_ENVIRONMENTS}")
    found: dict[str, EnvironmentSpec] = {}
    for name, raw in tables.items():
        where = f"{path}: the environment {name[:64]!r}"
        if not NAME.fullmatch(name):
            raise SettingsError(
                f"{where}: a name must be 1-32 lowercase letters, digits, '_' or '-', starting with a letter"
            )
        if not isinstance(raw, dict):
            raise SettingsError(f"{where} must be a table: [{name}] with requirements")
        try:
            table = msgspec.convert(raw, _Table)
        except msgspec.ValidationError as exc:
            raise SettingsError(f"{where}: {exc}") from exc
        if name == DEFAULT:
            found[name] = _default(settings, table, where)
            continue
        if table.requirements is msgspec.UNSET:
            raise SettingsError(f"{where} has no requirements: name its requirements.in")
        requirements = path.parent / table.requirements
        if not requirements.is_file():
            raise SettingsError(f"{where}: its requirements {requirements} is not a file")
        found[name] = EnvironmentSpec(
            name=name,
            requirements=requirements,
            preload=() if table.preload is msgspec.UNSET else table.preload,
            min_warm=1 if table.min_warm is msgspec.UNSET else table.min_warm,
            limits=_limits(settings.limits, table.limits, where),
        )
    default = found.pop(DEFAULT, None) or _default(settings, _Table(), f"{path}: the environment {DEFAULT!r}")
    return [default, *found.values()]


def _default(settings: Settings, table: _Table, where: str | None) -> EnvironmentSpec:
    if table.requirements is not msgspec.UNSET:
        raise SettingsError(
            f"{where}: the default environment's requirements are WARMPOD_IMAGE__REQUIREMENTS, not the file's"
        )
    return EnvironmentSpec(
        name=DEFAULT,
        requirements=None,
        preload=settings.pool.preload if table.preload is msgspec.UNSET else table.preload,
        # Declared alone, the pool's own floor; beside others, one ready like theirs unless told.
        min_warm=(settings.pool.bounds[0] if where is None else 1)
        if table.min_warm is msgspec.UNSET
        else table.min_warm,
        limits=_limits(settings.limits, table.limits, where or DEFAULT),
    )


def _limits(server: LimitSettings, overrides: dict[str, Any], where: str) -> LimitSettings:
    if not overrides:
        return server
    reserved = sorted(_SERVER_LIMITS & overrides.keys())
    if reserved:
        raise SettingsError(f"{where}: limits.{reserved[0]} is the server's alone")
    try:
        limits = msgspec.convert({**msgspec.structs.asdict(server), **overrides}, LimitSettings)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"{where}: limits: {exc}") from exc
    if limits.timeout > limits.max_timeout:
        raise SettingsError(f"{where}: limits.timeout must not exceed limits.max_timeout")
    return limits
