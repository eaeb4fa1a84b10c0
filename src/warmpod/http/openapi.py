"""What the OpenAPI schema says of many operations alike: the problems they answer, the key they need."""

from __future__ import annotations

from litestar.openapi.datastructures import ResponseSpec

from warmpod.models import Problem

KEYED: list[dict[str, list[str]]] = [{"apiKey": []}]
"""The schema's word that an operation needs a key where the server has a keys file (all but /health)."""
# Every error answer is a Problem; the schema says which ones each operation gives, so that a
# client (or schemathesis, tests/fuzz) can hold the service to it.
_PROBLEMS = {
    400: "The request is malformed; `detail` says what to fix",
    401: "No API key, or not a valid one (where the server has a keys file); `WWW-Authenticate: Bearer`",
    403: "A secret or a data source the run asks for does not exist, or its key may not use it, or "
    "its key may not use the environment it names; `detail` names it",
    404: "No run has this id (or it expired), or no file has this path",
    409: "The run has already ended",
    413: "The body exceeds the server's limit (WARMPOD_SERVER__MAX_BODY_BYTES)",
    422: "A limit, the timeout, a file or a label is not allowed, the environment does not exist (`detail` "
    "lists those that do), a batch's size is not (or one of its runs asks to wait), or the "
    "Idempotency-Key was sent with another request; `detail` names the rule or the maximum",
    429: "The queue is full, the key has its `max_active` runs, or the client (its key, or its address "
    "where keys are off) sends faster than its rate or has as many requests in flight as it may "
    "(WARMPOD_SERVER__KEY_*); retry after `Retry-After` seconds",
    503: "Starting, stopping, or the run store cannot be written; retry after `Retry-After` seconds",
}


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """The schema's responses for ``statuses``: each a Problem, described as this service gives it."""
    return {
        status: ResponseSpec(
            Problem,
            description=_PROBLEMS[status],
            media_type="application/problem+json",
            generate_examples=False,
        )
        for status in statuses
    }
