"""The ``/run-file/`` form: its fields, their schema, and reading them into the parts of a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.datastructures import UploadFile
from litestar.exceptions import ValidationException

from warmpod.environments import DEFAULT
from warmpod.labels import Labels, checked_labels, label_pairs
from warmpod.sandbox.limits import RunLimits
from warmpod.sandbox.program import Program

_LIMIT_FIELDS = ("cpu_time", "memory_mb", "max_output_bytes")
# Fields that may be given several times: each ``args`` part one argument, each ``env`` part one
# NAME=VALUE, each ``secrets`` or ``sources`` part one name (or several, comma-separated).
# Each ``label`` part is one label, name=value.
_LIST_FIELDS = ("args", "env", "secrets", "sources", "label")
_FORM_FIELDS = frozenset(
    {
        "file",
        "files",
        "stdin",
        "timeout",
        "wait",
        "entrypoint",
        "environment",
        "callback_url",
        *_LIST_FIELDS,
        *_LIMIT_FIELDS,
    }
)
# The form's fields are text (the script a file); each means what the JSON field of its name does.
FORM_SCHEMA = {
    "properties": {
        "file": {
            "type": "string",
            "format": "binary",
            "description": "The script, run as the entrypoint (`main.py` unless named); absent when the "
            "entrypoint is one of `files`",
        },
        "files": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "Data files, one part each, its `filename` the path under the working directory",
        },
        **{
            name: {"type": "string", "description": f"As `{name}` in /run-json/"}
            for name in sorted(_FORM_FIELDS - {"file", "files", *_LIST_FIELDS})
        },
        **{
            name: {
                "type": "array",
                "items": {"type": "string"},
                "description": f"As `{name}` in /run-json/{how}",
            }
            for name, how in (
                ("args", ", one part each"),
                ("env", ", one `NAME=VALUE` part each"),
                ("secrets", ", one part each or comma-separated"),
                ("sources", ", one part each or comma-separated"),
                ("label", " (`labels`), one `name=value` part each"),
            )
        },
    },
    "additionalProperties": False,
}
"""The OpenAPI schema of the form's fields."""


@dataclass(frozen=True)
class RunForm:
    """What a ``/run-file/`` form asks for, each field read from its text; the server's rules not yet
    checked, but for the labels'."""

    code: bytes | None
    stdin: bytes
    timeout: float | None
    limits: RunLimits
    wait: bool
    files: list[tuple[str, bytes]]
    labels: Labels
    program: Program
    environment: str
    callback_url: str | msgspec.UnsetType | None
    """UNSET when the form has no ``callback_url``, None when it is empty, else the URL (unchecked)."""


async def read_form(data: dict[str, Any]) -> RunForm:
    """The run ``data``, a ``/run-file/`` form, asks for, read field by field in the order its
    mistakes are reported.

    Raises:
        ValidationException: an unknown field, no script, or a field that is not what it must be (400).
        InvalidLabel: a ``label`` part that breaks a rule (422).
    """
    unknown = sorted(set(data) - _FORM_FIELDS)
    if unknown:
        raise ValidationException(f"unknown form fields {unknown}: allowed are {sorted(_FORM_FIELDS)}")
    upload = data.get("file")
    entrypoint = (await _text_field(data.get("entrypoint"), "entrypoint")).decode("utf-8", "replace") or None
    if upload is None and entrypoint is None:
        raise ValidationException(
            "the script must be sent as a file in the form field 'file', "
            "or an 'entrypoint' named among 'files'"
        )
    if upload is not None and not isinstance(upload, UploadFile):
        raise ValidationException("the script must be sent as a file in the form field 'file'")
    code = None if upload is None else await upload.read()
    stdin = await _text_field(data.get("stdin"), "stdin")
    timeout = _timeout_field(await _text_field(data.get("timeout"), "timeout"))
    values = {name: _int_field(await _text_field(data.get(name), name), name) for name in _LIMIT_FIELDS}
    wait = _bool_field(await _text_field(data.get("wait"), "wait"), "wait")
    files = await _file_parts(data.get("files"))
    args, env, secrets, sources, label = [await _text_list(data.get(name), name) for name in _LIST_FIELDS]
    labels = checked_labels(label_pairs(label, "form field 'label'"))
    program = Program(
        entrypoint=entrypoint,
        args=args,
        env=_env_parts(env),
        secrets=_names(secrets),
        sources=_names(sources),
    )
    named = (await _text_field(data.get("environment"), "environment")).decode("utf-8", "replace")
    return RunForm(
        code=code,
        stdin=stdin,
        timeout=timeout,
        limits=RunLimits(**values),
        wait=wait,
        files=files,
        labels=labels,
        program=program,
        environment=named.strip() or DEFAULT,
        callback_url=await _callback_field(data),
    )


async def _callback_field(data: dict[str, Any]) -> str | msgspec.UnsetType | None:
    # The form has no null: an empty field asks for no webhook, as null does in JSON.
    if "callback_url" not in data:
        return msgspec.UNSET
    url = await _text_field(data["callback_url"], "callback_url")
    return url.decode("utf-8", "replace").strip() or None


def _bool_field(raw: bytes, name: str) -> bool:
    value = raw.strip().lower()
    if value in (b"", b"true", b"1", b"yes"):
        return True
    if value in (b"false", b"0", b"no"):
        return False
    raise ValidationException(f"form field {name!r} must be true or false")


async def _text_field(value: object, name: str) -> bytes:
    if value is None:
        return b""
    if isinstance(value, UploadFile):
        return await value.read()
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    raise ValidationException(f"form field {name!r} must be given once")


def _names(parts: Sequence[str]) -> list[str]:
    """The names of a form's list field, each part one name or several, comma-separated."""
    return [name.strip() for part in parts for name in part.split(",") if name.strip()]


async def _text_list(value: object, name: str) -> list[str]:
    parts = [] if value is None else value if isinstance(value, list) else [value]
    return [(await _text_field(part, name)).decode("utf-8", "surrogatepass") for part in parts]


def _env_parts(parts: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for part in parts:
        name, equals, value = part.partition("=")
        if not equals:
            raise ValidationException(f"form field 'env' must be NAME=VALUE, not {part[:64]!r}")
        if name in env:
            raise ValidationException(f"form field 'env' gives {name[:64]!r} twice")
        env[name] = value
    return env


async def _file_parts(value: object) -> list[tuple[str, bytes]]:
    if value is None:
        return []
    parts = value if isinstance(value, list) else [value]
    files = []
    for part in parts:
        if not isinstance(part, UploadFile):
            raise ValidationException(
                "each form part named 'files' must be a file whose filename is its path, "
                'as in Content-Disposition: form-data; name="files"; filename="data/sales.csv"'
            )
        files.append((part.filename, await part.read()))
    return files


def _int_field(raw: bytes, name: str) -> int | None:
    if not raw.strip():
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValidationException(f"form field {name!r} must be a whole number") from None
    if value <= 0:
        raise ValidationException(f"form field {name!r} must be greater than 0")
    return value


def _timeout_field(raw: bytes) -> float | None:
    if not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValidationException("form field 'timeout' must be a number of seconds") from None
    if not value > 0:
        raise ValidationException("form field 'timeout' must be greater than 0")
    return value
