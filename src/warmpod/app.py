"""Assembly of the Litestar app: lifespan, dependencies, problem details and OpenAPI."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from litestar import Litestar, Request, Response
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE, HTTP_500_INTERNAL_SERVER_ERROR

from warmpod import __version__
from warmpod.api import RunController, StatusController, get_service, health
from warmpod.errors import (
    InvalidRun,
    PoolUnavailable,
    QueueFull,
    RunFinished,
    RunNotFound,
    ShuttingDown,
    WarmpodError,
)
from warmpod.service import Service, run_service
from warmpod.settings import Settings

log = logging.getLogger(__name__)
ServiceFactory = Callable[[Settings], AbstractAsyncContextManager[Service]]
_PROBLEM = "https://warmpod.dev/problems/"


def _validation_problem(exc: ValidationException) -> ProblemDetailsException:
    messages = [
        f"{item['key']}: {item.get('message', '')}" if item.get("key") else str(item.get("message", ""))
        for item in (exc.extra if isinstance(exc.extra, list) else [])
        if isinstance(item, dict)
    ]
    detail = "; ".join(messages) if messages else exc.detail
    return ProblemDetailsException(
        status_code=exc.status_code,
        title="Invalid request",
        detail=detail,
        type_=_PROBLEM + "invalid-request",
    )


def _http_problem(max_body: int, exc: HTTPException) -> ProblemDetailsException:
    detail = exc.detail
    if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
        detail = f"the request body exceeds the limit of {max_body} bytes (WARMPOD_SERVER__MAX_BODY_BYTES)"
    return ProblemDetailsException(
        status_code=exc.status_code, title=exc.detail, detail=detail, headers=exc.headers
    )


def _invalid_run(exc: InvalidRun) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=422, title="Limit out of range", detail=str(exc), type_=_PROBLEM + "limit"
    )


def _unavailable(exc: PoolUnavailable) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=503,
        title="No sandbox available",
        detail=str(exc),
        headers={"Retry-After": str(exc.retry_after)},
        type_=_PROBLEM + "unavailable",
    )


def _queue_full(exc: QueueFull) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=429,
        title="Queue full",
        detail=str(exc),
        headers={"Retry-After": str(exc.retry_after)},
        type_=_PROBLEM + "queue-full",
    )


def _shutting_down(exc: ShuttingDown) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=503,
        title="Shutting down",
        detail=str(exc),
        headers={"Retry-After": str(exc.retry_after)},
        type_=_PROBLEM + "shutting-down",
    )


def _not_found(exc: RunNotFound) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=404, title="No such run", detail=str(exc), type_=_PROBLEM + "no-such-run"
    )


def _finished(exc: RunFinished) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=409, title="Run already ended", detail=str(exc), type_=_PROBLEM + "run-finished"
    )


def begin_drain(app: Litestar, grace: float) -> None:
    """On SIGTERM, before the HTTP server stops: take no new runs and start no queued ones."""
    service: Service | None = app.state.get("service")
    if service is not None:
        service.scheduler.begin_drain(grace)


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    detail = str(exc) if isinstance(exc, WarmpodError) else "internal error; see the server log"
    return ProblemDetailsException(
        status_code=HTTP_500_INTERNAL_SERVER_ERROR, title="Internal error", detail=detail
    ).to_response(request)


def create_app(settings: Settings, service_factory: ServiceFactory = run_service) -> Litestar:
    """The warmpod app; its lifespan starts the service and removes every container on exit."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with service_factory(settings) as service:
            app.state.service = service
            try:
                yield
            finally:
                app.state.service = None

    problems = ProblemDetailsConfig(
        exception_to_problem_detail_map={
            ValidationException: _validation_problem,
            HTTPException: functools.partial(_http_problem, settings.server.max_body_bytes),
            InvalidRun: _invalid_run,
            PoolUnavailable: _unavailable,
            QueueFull: _queue_full,
            ShuttingDown: _shutting_down,
            RunNotFound: _not_found,
            RunFinished: _finished,
        }
    )
    return Litestar(
        route_handlers=[RunController, StatusController, health],
        dependencies={"service": Provide(get_service, sync_to_thread=False)},
        lifespan=[lifespan],
        plugins=[ProblemDetailsPlugin(problems)],
        exception_handlers={Exception: _internal},
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(title="warmpod", version=__version__),
        state=None,
    )
