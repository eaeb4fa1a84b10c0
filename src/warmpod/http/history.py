"""``GET /runs``: the caller's runs, newest first, filtered, a page at a time by an opaque cursor."""

from __future__ import annotations

import base64
import binascii
import math
import typing
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, get
from litestar.params import QueryParameter

from warmpod.errors import InvalidQuery
from warmpod.http.auth import key_of
from warmpod.http.health import get_service
from warmpod.http.openapi import KEYED, problems
from warmpod.labels import MAX_LABELS, check_pair, label_pairs
from warmpod.models import RunPage, RunStatus
from warmpod.queue.store.base import Position, RunFilter

DEFAULT_LIMIT = 50
"""Runs in a page when ``limit`` is not given."""
MAX_LIMIT = 500
"""The largest ``limit``: a larger one is a 422, never clamped, so a client learns the bound."""
_STATUSES: frozenset[str] = frozenset(typing.get_args(RunStatus))
_PARAMETERS = frozenset({"status", "label", "environment", "since", "until", "limit", "cursor"})
_TIME_DOC = (
    "Unix seconds (`1767225600`, fractions allowed) or RFC 3339 with an offset (`2026-01-01T00:00:00Z`)"
)


@get(
    "/runs",
    summary="The caller's runs, newest first",
    tags=["runs"],
    security=KEYED,
    responses=problems(400, 401, 422, 429, 503),
)
async def runs(
    request: Request[Any, Any, Any],
    status: Annotated[
        list[str] | None, QueryParameter(description="Only runs in this status (repeatable: any of them)")
    ] = None,
    label: Annotated[
        list[str] | None,
        QueryParameter(description="`name=value`: only runs with this label (repeatable: all of them)"),
    ] = None,
    environment: Annotated[str | None, QueryParameter(description="Only runs of this environment")] = None,
    since: Annotated[str | None, QueryParameter(description=f"Created at or after it: {_TIME_DOC}")] = None,
    until: Annotated[str | None, QueryParameter(description=f"Created before it: {_TIME_DOC}")] = None,
    limit: Annotated[
        str | None, QueryParameter(description=f"Runs per page, 1-{MAX_LIMIT} (default {DEFAULT_LIMIT})")
    ] = None,
    cursor: Annotated[
        str | None, QueryParameter(description="The `next` of the page before, with the same filters")
    ] = None,
) -> RunPage:
    """Summaries of the runs submitted with the request's key (all runs where keys are off), never
    another key's: id, status, times, environment, labels, exit code, duration and node, without
    their output or files. ``next`` is the cursor of the following page, null on the last."""
    unknown = sorted(set(request.query_params) - _PARAMETERS)
    if unknown:
        raise InvalidQuery(f"unknown query parameters {unknown}: allowed are {sorted(_PARAMETERS)}")
    where = RunFilter(
        statuses=_statuses(status or []),
        labels=_labels(label or []),
        environment=environment,
        since=None if since is None else _time(since, "since"),
        until=None if until is None else _time(until, "until"),
    )
    size = _limit(limit)
    key = key_of(request)
    service = get_service(request)
    # One more than the page: whether another page follows is known without asking again.
    found = await service.queue.store.list_runs(
        None if key is None else key.name, where, None if cursor is None else decode_cursor(cursor), size + 1
    )
    page = found[:size]
    more = len(found) > size
    return RunPage(
        runs=[item.summary for item in page], next=encode_cursor(page[-1].position) if more else None
    )


def encode_cursor(position: Position) -> str:
    """The opaque cursor of a page that goes on after ``position``: base64url of its msgpack."""
    return base64.urlsafe_b64encode(msgspec.msgpack.encode(position)).decode().rstrip("=")


def decode_cursor(cursor: str) -> Position:
    """The position ``encode_cursor`` made into ``cursor``.

    Raises:
        InvalidQuery: it is not one.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        position = msgspec.msgpack.decode(raw, type=Position)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise InvalidQuery(
            "the cursor is not one this server gave: send a page's `next` as it is, or none"
        ) from None
    if not math.isfinite(position.created):
        raise InvalidQuery("the cursor is not one this server gave: send a page's `next` as it is, or none")
    return position


def _statuses(given: list[str]) -> tuple[RunStatus, ...]:
    statuses = {part.strip() for value in given for part in value.split(",") if part.strip()}
    wrong = sorted(statuses - _STATUSES)
    if wrong:
        raise InvalidQuery(f"unknown status {wrong}: statuses are {sorted(_STATUSES)}")
    return tuple(typing.cast("RunStatus", status) for status in sorted(statuses))


def _labels(given: list[str]) -> tuple[tuple[str, str], ...]:
    labels = label_pairs(given, "label")
    if len(labels) > MAX_LABELS:
        raise InvalidQuery(f"at most {MAX_LABELS} label filters: a run carries at most {MAX_LABELS} labels")
    for name, value in labels.items():
        check_pair(name, value)
    return tuple(labels.items())


def _time(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidQuery(
                f"{name} must be {_TIME_DOC[0].lower()}{_TIME_DOC[1:]}, not {text[:64]!r}"
            ) from None
        if moment.tzinfo is None:
            raise InvalidQuery(
                f"{name} must give its offset from UTC (`Z` or `+02:00`), not {text[:64]!r}"
            ) from None
        return moment.timestamp()
    if not math.isfinite(value):
        raise InvalidQuery(f"{name} must be a finite number of seconds, not {text[:64]!r}")
    return value


def _limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    try:
        value = int(text)
    except ValueError:
        raise InvalidQuery(f"limit must be a whole number, 1-{MAX_LIMIT}, not {text[:64]!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidQuery(f"limit must be 1-{MAX_LIMIT}, not {value}: page with `cursor` for more")
    return value
