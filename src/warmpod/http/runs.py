"""``POST /run-json/`` and ``/run-file/``: a run checked, resolved for its key and queued, its end awaited."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, NamedTuple

import msgspec
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, HeaderParameter, QueryParameter

from warmpod.errors import ShuttingDown, StoreError
from warmpod.http.auth import granted_environments, key_of
from warmpod.http.form import FORM_SCHEMA, read_form
from warmpod.http.openapi import KEYED, problems
from warmpod.labels import Labels, checked_labels
from warmpod.models import (
    Accepted,
    RunRequest,
    RunResult,
    RunSpec,
    RunStatus,
)
from warmpod.sandbox.files import decode_inputs
from warmpod.sandbox.limits import RunLimits
from warmpod.sandbox.program import Program
from warmpod.service import Service

log = logging.getLogger(__name__)

_WAIT_DOC = "false: answer 202 at once with the run's status URL (same as the body's `wait`)"
# draft-ietf-httpapi-idempotency-key-header: a Structured Field String ("..."); the bare form is
# taken too. Visible ASCII without the quote and backslash a String would have to escape.
IDEMPOTENCY_KEY_MAX = 255
_IDEMPOTENCY_KEY = re.compile(
    rf'"([!#-\[\]-~]{{1,{IDEMPOTENCY_KEY_MAX}}})"|([!#-\[\]-~]{{1,{IDEMPOTENCY_KEY_MAX}}})'
)
_IDEMPOTENCY_DOC = (
    'Any unique string (a UUID), 1-255 visible ASCII characters without `"` and `\\`, quoted '
    "as a Structured Field String or bare. A submit repeated with the key of an earlier one of "
    "the same API key is answered with that run (its result if it ended and the request waits, "
    "else 202 with its status URL) and never runs it again; with another body it is a 422 "
    "problem. The key is kept as long as its run."
)
_RUN_RESPONSES = {
    200: ResponseSpec(RunResult, description="The run ended (`wait` true, the default)"),
    202: ResponseSpec(
        Accepted, description="Queued (`wait` false, or still not over after the wait timeout)"
    ),
    **problems(400, 401, 403, 413, 422, 429, 503),
}
# Litestar drops the bounds of optional fields (`gt` inside `| None`) and the ban on unknown
# fields from the schema; msgspec's own schema of the same type keeps both.
_RUN_REQUEST_SCHEMA = msgspec.json.schema_components([RunRequest])[1]["RunRequest"]


def check_query(request: Request[Any, Any, Any]) -> None:
    """Refuse query parameters a run does not take: a misspelt ``wait`` would otherwise run it
    blocking without a word, as unknown body fields would if they were not refused too."""
    unknown = sorted(set(request.query_params) - {"wait"})
    if unknown:
        raise ValidationException(f"unknown query parameters {unknown}: the only one is 'wait'")


async def check_json_body(request: Request[Any, Any, Any]) -> None:
    """Decode the body strictly before Litestar does, so every mistake gets a message that says
    what to fix (Litestar's own is terse for broken JSON and lenient about types)."""
    check_query(request)
    body = await request.body()
    try:
        request_body = msgspec.json.decode(body, type=RunRequest)
        if request_body.code is msgspec.UNSET and request_body.entrypoint is None:
            raise msgspec.ValidationError(
                "Object missing required field `code` (or `entrypoint`, one of `files`)"
            )
    except msgspec.DecodeError as exc:
        raise ValidationException(
            f'the body must be a JSON object like {{"code": "print(1)", "stdin": "", "timeout": 5}}: {exc}'
            if body.strip()
            else 'the body is empty: send a JSON object like {"code": "print(1)"}'
        ) from None


class RunController(Controller):
    """Running programs."""

    tags = ["runs"]  # noqa: RUF012  (Litestar reads it as a class attribute)
    security = KEYED

    @post(
        "/run-json/",
        status_code=200,
        summary="Run Python source sent as JSON",
        before_request=check_json_body,
        responses=_RUN_RESPONSES,
    )
    async def run_json(
        self,
        request: Request[Any, Any, Any],
        data: Annotated[
            RunRequest,
            Body(
                schema_extra={
                    "properties": _RUN_REQUEST_SCHEMA["properties"],
                    "additionalProperties": False,
                }
            ),
        ],
        service: NamedDependency[Service],
        wait: Annotated[bool | None, QueryParameter(name="wait", description=_WAIT_DOC)] = None,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(name="Idempotency-Key", description=_IDEMPOTENCY_DOC),
        ] = None,
    ) -> Response[RunResult | Accepted]:
        """Run ``code`` once in a fresh sandbox; with ``wait`` (default) answer how it ended, else 202."""
        spec = run_spec(request, service, data)
        return await _submit(request, service, spec, _both_waits(wait, data.wait), idempotency_key)

    @post(
        "/run-file/",
        status_code=200,
        summary="Run an uploaded Python file",
        before_request=check_query,
        responses=_RUN_RESPONSES,
    )
    async def run_file(
        self,
        request: Request[Any, Any, Any],
        data: Annotated[
            dict[str, Any],
            Body(
                media_type=RequestEncodingType.MULTI_PART,
                description=(
                    "`file`: the script; `files`: data files, their filenames their paths; the other "
                    "fields as in /run-json/, `wait` true or false."
                ),
                schema_extra=FORM_SCHEMA,
            ),
        ],
        service: NamedDependency[Service],
        wait: Annotated[bool | None, QueryParameter(name="wait", description=_WAIT_DOC)] = None,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(name="Idempotency-Key", description=_IDEMPOTENCY_DOC),
        ] = None,
    ) -> Response[RunResult | Accepted]:
        """Run the uploaded script once in a fresh sandbox; with ``wait`` (default) answer how it ended."""
        form = await read_form(data)
        spec = _prepared(
            request,
            service,
            RunInput(form.code, form.stdin, form.timeout, form.limits, form.files, form.program),
            form.environment,
            form.labels,
            form.callback_url,
        )
        return await _submit(request, service, spec, _both_waits(wait, form.wait), idempotency_key)


def run_spec(request: Request[Any, Any, Any], service: Service, data: RunRequest) -> RunSpec:
    """The run a JSON request asks for, checked and resolved for the request's key: what
    ``/run-json/`` queues, and each run of ``/runs/batch``.

    Raises:
        InvalidRun: a limit, a file, the program or a label breaks a rule, or the environment
            does not exist (422).
        EnvironmentDenied: the key may not use the environment (403).
        SecretDenied: a secret does not exist or the key may not use it (403).
        SourceDenied: a data source does not exist or the key may not use it (403).
    """
    code = None if data.code is msgspec.UNSET else data.code.encode("utf-8", "surrogatepass")
    limits = RunLimits(
        cpu_time=data.cpu_time, memory_mb=data.memory_mb, max_output_bytes=data.max_output_bytes
    )
    program = Program(
        entrypoint=data.entrypoint,
        args=data.args,
        env=data.env,
        secrets=data.secrets,
        sources=data.sources,
    )
    given = RunInput(
        code,
        data.stdin.encode("utf-8", "surrogatepass"),
        data.timeout,
        limits,
        decode_inputs(data.files),
        program,
    )
    return _prepared(
        request, service, given, data.environment, checked_labels(data.labels), data.callback_url
    )


class RunInput(NamedTuple):
    """What ``Runner.prepare`` takes of a request, read from its JSON or its form."""

    code: bytes | None
    stdin: bytes
    timeout: float | None
    limits: RunLimits
    files: list[tuple[str, bytes]]
    program: Program


def _prepared(
    request: Request[Any, Any, Any],
    service: Service,
    given: RunInput,
    environment: str,
    labels: Labels,
    callback_url: str | msgspec.UnsetType | None,
) -> RunSpec:
    """The run a request gives, for the environment it names (checked first: the run is prepared
    for it), with its labels and webhook, once its key may use what it asks for."""
    named = _environment(request, service, environment)
    spec = service.runner.prepare(*given, environment=named)
    spec = msgspec.structs.replace(
        spec, labels=labels, callback_url=_callback(request, service, callback_url)
    )
    _check_grants(request, service, spec)
    return spec


async def _submit(
    request: Request[Any, Any, Any], service: Service, spec: RunSpec, wait: bool, idempotency_key: str | None
) -> Response[RunResult | Accepted]:
    queue = service.queue
    run_id, status = await queue.admission.take(
        spec, key_of(request), checked_idempotency_key(idempotency_key)
    )
    if wait:
        # Once the run is stored the answer names it, whatever the wait meets: a bare 503 would
        # have the client submit it again, and run it twice.
        try:
            result = await queue.results.wait(run_id, service.settings.queue.wait_timeout)
        except (StoreError, ShuttingDown) as exc:
            log.warning("answering run %s with its status URL: its wait ended early: %s", run_id, exc)
            result = None
        if result is not None:
            return Response(result)
    answer = accepted(request, run_id, status)
    return Response(answer, status_code=202, headers={"Location": answer.status_url})


def accepted(request: Request[Any, Any, Any], run_id: str, status: RunStatus) -> Accepted:
    """The 202 answer's account of a run taken into the queue: its id, status and URLs."""
    status_url = f"{str(request.base_url).rstrip('/')}/status/{run_id}"
    return Accepted(id=run_id, status=status, status_url=status_url, stream_url=f"{status_url}/stream")


def checked_idempotency_key(raw: str | None) -> str | None:
    """The key an ``Idempotency-Key`` header holds (unquoted), or None without one.

    Raises:
        ValidationException: it is not 1-255 visible ASCII characters without a quote or backslash (400).
    """
    if raw is None:
        return None
    match = _IDEMPOTENCY_KEY.fullmatch(raw)
    if match is None:
        raise ValidationException(
            f"the Idempotency-Key header must be 1-{IDEMPOTENCY_KEY_MAX} visible ASCII characters "
            "without a double quote or backslash, optionally in double quotes: a UUID, say"
        )
    return match.group(1) or match.group(2)


def _both_waits(query: bool | None, body: bool) -> bool:
    # The body's default is true, so only an explicit false in it can disagree with the query.
    if query and not body:
        raise ValidationException("'wait' is given twice, in the query and the body, with different values")
    return body if query is None else query


def _check_grants(request: Request[Any, Any, Any], service: Service, spec: RunSpec) -> None:
    """Refuse (403) a run that asks for a secret or a data source that does not exist or that its
    key may not use."""
    keyed = request.app.state.get("key_file") is not None
    if spec.secrets:
        service.secrets.check(spec.secrets, key_of(request), keyed=keyed)
    if spec.sources:
        service.sources.check(spec.sources, key_of(request), keyed=keyed)


def _callback(
    request: Request[Any, Any, Any], service: Service, given: str | msgspec.UnsetType | None
) -> str | None:
    """Where a run's webhook goes: the URL it gives, once the allow-list lets it through (else
    422); none for null; when absent, its key's ``webhook=`` endpoint, checked at each delivery."""
    if given is None:
        return None
    if isinstance(given, msgspec.UnsetType):
        key = key_of(request)
        return key.webhook if key is not None and service.webhooks.enabled else None
    return service.webhooks.check(given)


def _environment(request: Request[Any, Any, Any], service: Service, name: str) -> str:
    """The environment a run names, once it exists (else 422, listing those that do) and its key
    may use it (else 403): checked first, since the run is prepared for it."""
    return service.environments.check(name, granted_environments(request)).name
