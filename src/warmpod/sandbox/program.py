"""What a run executes beyond its code: the entrypoint among its files, its arguments, its environment,
the data sources it reaches."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from warmpod.environ import MAX_ENV_NAME, name_problem
from warmpod.errors import InvalidFile, InvalidProgram
from warmpod.keys import SOURCE_NAME
from warmpod.sandbox.files import OUT_DIR, path_problem
from warmpod.sandbox.protocol import MAX_PATH

DEFAULT_ENTRYPOINT = "main.py"


@dataclass(frozen=True)
class Program:
    """How a run asks its program to be started, as the request gave it (``Runner.prepare`` checks it)."""

    entrypoint: str | None = None
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Sequence[str] = ()
    sources: Sequence[str] = ()


MAX_ARGS = 256
"""Arguments of one run at most."""
MAX_ARG_BYTES = 16384
"""Bytes of one argument at most."""
MAX_ENV = 64
"""Variables one run adds at most (those of ``env`` and its secrets together)."""
MAX_ENV_VALUE = 32768
"""Bytes of one variable's value at most."""
MAX_PROGRAM_BYTES = 262144
"""Bytes of all arguments and variables of one run together at most."""
MAX_SOURCES = 16
"""Data sources one run may ask for at most."""


def check_entrypoint(entrypoint: str | None, has_code: bool, paths: Sequence[str]) -> str:
    """The path the program runs as, once it is allowed: with ``code``, a path of none of the files
    (``code`` is written there); without, one of them.

    Raises:
        InvalidProgram: the path breaks a rule of file paths, or is not among the files without code.
        InvalidFile: a file has the entrypoint's path although code was sent.
    """
    path = DEFAULT_ENTRYPOINT if entrypoint is None else entrypoint
    shown = repr(path[:MAX_PATH])
    problem = path_problem(path)
    if problem is not None:
        raise InvalidProgram(f"entrypoint {shown} {problem}")
    if not path.endswith(".py"):
        raise InvalidProgram(f"entrypoint {shown} is not a .py file")
    if path.split("/", 1)[0] == OUT_DIR:
        raise InvalidProgram(f"entrypoint {shown} is under out/, where the program leaves its files")
    if has_code and path in paths:
        raise InvalidFile(
            f"file path {shown} is reserved: the code sent is written there, as the entrypoint "
            "(send the program as code or as that file, not both)"
        )
    if not has_code and path not in paths:
        raise InvalidProgram(
            f"entrypoint {shown} is not among the files, and no code was sent: "
            "send code, or the entrypoint as a file"
        )
    return path


def check_args(args: Sequence[str]) -> tuple[str, ...]:
    """The arguments as given, once each is allowed.

    Raises:
        InvalidProgram: too many, one too long, or not text without NUL (its position named).
    """
    if len(args) > MAX_ARGS:
        raise InvalidProgram(f"{len(args)} args sent; at most {MAX_ARGS}")
    for index, arg in enumerate(args):
        problem = _value_problem(arg, MAX_ARG_BYTES)
        if problem is not None:
            raise InvalidProgram(f"args[{index}] {problem}")
    return tuple(args)


def check_env(env: Mapping[str, str], secrets: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The variables as given, once each name and value is allowed and no secret's name is among them.

    Raises:
        InvalidProgram: a name breaks a rule or is a secret's too, a value is too long or not
            text without NUL, or there are too many; the rule and the name are named.
    """
    if len(env) + len(secrets) > MAX_ENV:
        raise InvalidProgram(
            f"{len(env)} env variables and {len(secrets)} secrets sent; at most {MAX_ENV} together"
        )
    for name, value in env.items():
        problem = name_problem(name)
        if problem is not None:
            raise InvalidProgram(f"env name {name[:MAX_ENV_NAME]!r} {problem}")
        problem = _value_problem(value, MAX_ENV_VALUE)
        if problem is not None:
            raise InvalidProgram(f"env value of {name!r} {problem}")
    for name in secrets:
        problem = name_problem(name)
        if problem is not None:
            raise InvalidProgram(f"secret name {name[:MAX_ENV_NAME]!r} {problem}")
        if name in env:
            raise InvalidProgram(
                f"secret name {name!r} is also in env: a variable comes from one or the other"
            )
    if len(set(secrets)) != len(secrets):
        raise InvalidProgram("a secret is named twice")
    return tuple(env.items())


def check_sources(names: Sequence[str]) -> tuple[str, ...]:
    """The data sources' names as given, once each is a source's name, given once.

    Raises:
        InvalidProgram: too many, a name malformed or given twice (the name is named).
    """
    if len(names) > MAX_SOURCES:
        raise InvalidProgram(f"{len(names)} sources asked for; at most {MAX_SOURCES}")
    for name in names:
        if not SOURCE_NAME.fullmatch(name):
            raise InvalidProgram(
                f"source name {name[:64]!r} is not a source's name: 1-32 lowercase letters, digits or "
                "'_', starting with a letter"
            )
    if len(set(names)) != len(names):
        raise InvalidProgram("a source is named twice")
    return tuple(names)


def check_sizes(args: Sequence[str], env: Sequence[tuple[str, str]]) -> None:
    """Raises InvalidProgram when the arguments and variables are larger than a run may carry together."""
    total = sum(len(arg.encode()) for arg in args) + sum(len(n) + len(v.encode()) for n, v in env)
    if total > MAX_PROGRAM_BYTES:
        raise InvalidProgram(f"args and env have {total} bytes together; at most {MAX_PROGRAM_BYTES}")


def _value_problem(value: str, max_bytes: int) -> str | None:
    if "\0" in value:
        return "contains a NUL character"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > max_bytes:
        return f"has {size} bytes; at most {max_bytes}"
    return None
