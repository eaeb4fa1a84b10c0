"""``POST /runs/batch``: several runs checked as one request and queued together, or none of them."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Body, HeaderParameter

from warmpod.errors import EnvironmentDenied, InvalidBatch, InvalidRun, SecretDenied, SourceDenied
from warmpod.http.auth import key_of
from warmpod.http.openapi import KEYED, problems
from warmpod.http.runs import accepted, checked_idempotency_key, run_spec
from warmpod.http.throttle import Throttle
from warmpod.models import BatchAccepted, BatchRequest, RunRequest, RunSpec
from warmpod.service import Service

# What checking one run may refuse: said again with the run's place in the batch.
_RUN_REFUSALS = (InvalidRun, EnvironmentDenied, SecretDenied, SourceDenied)
_IDEMPOTENCY_DOC = (
    "As on /run-json/, for the batch as a whole: the same key and body again, under the same API "
    "key, answer the batch's runs in order and never run them again; with another body it is a 422 "
    "problem, as it is once some of the batch's runs expired. A batch's key and a single run's never meet."
)
_EXAMPLE = '{"runs": [{"code": "print(1)"}, {"code": "print(2)", "labels": {"part": "2"}}]}'
# As /run-json/'s: Litestar drops the ban on unknown fields from the schema, msgspec keeps it.
_BATCH_SCHEMA = {
    "properties": {
        "runs": {
            "type": "array",
            "items": {"$ref": "#/components/schemas/RunRequest"},
            "minItems": 1,
            "description": "Each run as /run-json/ takes it, without `wait` true; at most "
            "WARMPOD_QUEUE__MAX_BATCH (20) of them",
        }
    },
    "required": ["runs"],
    "additionalProperties": False,
}


class _Waited(msgspec.Struct):
    """Whether a run of the body named ``wait``, and how: its ``RunRequest`` says true when absent."""

    wait: bool | None = None


class _Waits(msgspec.Struct):
    runs: list[_Waited]


async def check_batch_body(request: Request[Any, Any, Any]) -> None:
    """Decode the body strictly before Litestar does, as ``/run-json/``'s is: every mistake gets a
    message that says what to fix, and where (``$.runs[3].timeout``)."""
    if request.query_params:
        raise ValidationException(f"unknown query parameters {sorted(request.query_params)}: this takes none")
    body = await request.body()
    try:
        batch = msgspec.json.decode(body, type=BatchRequest)
        for index, run in enumerate(batch.runs):
            if run.code is msgspec.UNSET and run.entrypoint is None:
                raise msgspec.ValidationError(
                    "Object missing required field `code` (or `entrypoint`, one of `files`) - "
                    f"at `$.runs[{index}]`"
                )
    except msgspec.DecodeError as exc:
        raise ValidationException(
            f"the body must be a JSON object like {_EXAMPLE}: {exc}"
            if body.strip()
            else f"the body is empty: send a JSON object like {_EXAMPLE}"
        ) from None


@post(
    "/runs/batch",
    status_code=202,
    summary="Queue several runs at once, all or none",
    tags=["runs"],
    security=KEYED,
    before_request=check_batch_body,
    responses={
        202: ResponseSpec(BatchAccepted, description="Every run queued, in the order sent"),
        **problems(400, 401, 403, 413, 422, 429, 503),
    },
)
async def run_batch(
    request: Request[Any, Any, Any],
    data: Annotated[BatchRequest, Body(schema_extra=_BATCH_SCHEMA)],
    service: NamedDependency[Service],
    idempotency_key: Annotated[
        str | None, HeaderParameter(name="Idempotency-Key", description=_IDEMPOTENCY_DOC)
    ] = None,
) -> Response[BatchAccepted]:
    """Check every run as ``/run-json/`` would, then queue them all in one step, or none: a run
    that breaks a rule (its place named, ``runs[3]: ...``) or a queue or key quota without room
    for all of them refuses the whole batch. Each run then lives on its own: its status, stream,
    files and cancel at its ``status_url``. A batch is never waited for."""
    key = key_of(request)
    idempotency = checked_idempotency_key(idempotency_key)
    service.queue.admission.check_batch(len(data.runs), key)
    throttle: Throttle | None = request.app.state.get("throttle")
    if throttle is not None:
        throttle.charge(request.scope, len(data.runs) - 1)
    waits = msgspec.json.decode(await request.body(), type=_Waits)
    specs = [_checked(request, service, index, run, waits.runs[index]) for index, run in enumerate(data.runs)]
    taken = await service.queue.admission.take_batch(specs, key, idempotency)
    answer = BatchAccepted(runs=[accepted(request, run_id, status) for run_id, status in taken])
    return Response(answer, status_code=202)


def _checked(
    request: Request[Any, Any, Any], service: Service, index: int, run: RunRequest, waited: _Waited
) -> RunSpec:
    """The run at ``index``, as ``run_spec`` makes it; what it refuses names the run's place."""
    if waited.wait:
        raise InvalidBatch(
            f"runs[{index}]: `wait` true is not taken in a batch, which is never waited for: leave it "
            "out (or send false) and follow each run at its status_url"
        )
    try:
        return run_spec(request, service, run)
    except _RUN_REFUSALS as exc:
        raise type(exc)(f"runs[{index}]: {exc}") from None
