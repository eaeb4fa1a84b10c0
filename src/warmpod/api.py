"""HTTP handlers: thin translations between requests and the runner."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import UploadFile
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.exceptions import ServiceUnavailableException, ValidationException
from litestar.params import Body, JSONBody

from warmpod.models import Health, RunRequest, RunResult
from warmpod.runner import RunLimits
from warmpod.service import Service

_LIMIT_FIELDS = ("cpu_time", "memory_mb", "max_output_bytes")
_FORM_FIELDS = frozenset({"file", "stdin", "timeout", *_LIMIT_FIELDS})


def get_service(request: Request[Any, Any, Any]) -> Service:
    """The running service, or 503 while it starts."""
    service: Service | None = request.app.state.get("service")
    if service is None:
        raise ServiceUnavailableException("warmpod is starting", headers={"Retry-After": "1"})
    return service


async def check_json_body(request: Request[Any, Any, Any]) -> None:
    """Decode the body strictly before Litestar does, so every mistake gets a message that says
    what to fix (Litestar's own is terse for broken JSON and lenient about types)."""
    body = await request.body()
    try:
        msgspec.json.decode(body, type=RunRequest)
    except msgspec.DecodeError as exc:
        raise ValidationException(
            f'the body must be a JSON object like {{"code": "print(1)", "stdin": "", "timeout": 5}}: {exc}'
            if body.strip()
            else 'the body is empty: send a JSON object like {"code": "print(1)"}'
        ) from None


class RunController(Controller):
    """Running programs."""

    tags = ["runs"]  # noqa: RUF012  (Litestar reads it as a class attribute)

    @post(
        "/run-json/",
        status_code=200,
        summary="Run Python source sent as JSON",
        before_request=check_json_body,
    )
    async def run_json(self, data: JSONBody[RunRequest], service: NamedDependency[Service]) -> RunResult:
        """Run ``code`` once in a fresh sandbox and return how it ended."""
        code = data.code.encode("utf-8", "surrogatepass")
        stdin = data.stdin.encode("utf-8", "surrogatepass")
        limits = RunLimits(
            cpu_time=data.cpu_time, memory_mb=data.memory_mb, max_output_bytes=data.max_output_bytes
        )
        return await service.runner.run(code, stdin, data.timeout, limits)

    @post("/run-file/", status_code=200, summary="Run an uploaded Python file")
    async def run_file(
        self,
        data: Annotated[
            dict[str, Any],
            Body(
                media_type=RequestEncodingType.MULTI_PART,
                description=(
                    "`file`: the script (required); optional fields `stdin`, `timeout`, "
                    "`cpu_time`, `memory_mb`, `max_output_bytes`."
                ),
            ),
        ],
        service: NamedDependency[Service],
    ) -> RunResult:
        """Run the uploaded script once in a fresh sandbox and return how it ended."""
        unknown = sorted(set(data) - _FORM_FIELDS)
        if unknown:
            raise ValidationException(f"unknown form fields {unknown}: allowed are {sorted(_FORM_FIELDS)}")
        upload = data.get("file")
        if not isinstance(upload, UploadFile):
            raise ValidationException("the script must be sent as a file in the form field 'file'")
        code = await upload.read()
        stdin = await _text_field(data.get("stdin"), "stdin")
        timeout = _timeout_field(await _text_field(data.get("timeout"), "timeout"))
        values = {name: _int_field(await _text_field(data.get(name), name), name) for name in _LIMIT_FIELDS}
        limits = RunLimits(**values)
        return await service.runner.run(code, stdin, timeout, limits)


async def _text_field(value: object, name: str) -> bytes:
    if value is None:
        return b""
    if isinstance(value, UploadFile):
        return await value.read()
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    raise ValidationException(f"form field {name!r} must be given once")


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


@get("/health", summary="Service health", sync_to_thread=False)
def health(request: Request[Any, Any, Any]) -> Response[Health]:
    """200 with the pool's counts once runs can be taken; 503 before that."""
    service: Service | None = request.app.state.get("service")
    if service is None:
        raise ServiceUnavailableException("warmpod is starting", headers={"Retry-After": "1"})
    body = service.health()
    if body.status == "ok":
        return Response(body)
    return Response(body, status_code=503, headers={"Retry-After": "1"})
