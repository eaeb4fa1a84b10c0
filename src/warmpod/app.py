"""Assembly of the Litestar app: lifespan, dependencies, problem details and OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
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

from warmpod import __version__, web
from warmpod.api import RunController, StatusController, get_service, health
from warmpod.environment import EnvironmentNotRecorded, environment
from warmpod.errors import (
    InvalidFile,
    InvalidRun,
    NoSuchFile,
    QueueFull,
    RunFinished,
    RunNotFound,
    ShuttingDown,
    StoreError,
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


def _problem(status: int, title: str, slug: str) -> Callable[[WarmpodError], ProblemDetailsException]:
    """A mapper of one of warmpod's errors to a problem; ``Retry-After`` where the error has one."""

    def to_problem(exc: WarmpodError) -> ProblemDetailsException:
        retry_after = getattr(exc, "retry_after", None)
        headers = None if retry_after is None else {"Retry-After": str(retry_after)}
        return ProblemDetailsException(
            status_code=status, title=title, detail=str(exc), headers=headers, type_=_PROBLEM + slug
        )

    return to_problem


def begin_drain(app: Litestar, grace: float) -> None:
    """On SIGTERM, before the HTTP server stops: take no new runs and start no queued ones; during
    start-up, stop starting (it may wait for its first sandbox up to the start-up timeout)."""
    service: Service | None = app.state.get("service")
    if service is not None:
        service.scheduler.begin_drain(grace)
    elif (stop_starting := app.state.get("stop_starting")) is not None:
        stop_starting()


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
        started = False
        with anyio.CancelScope() as starting:
            # Called from a signal handler, which must not touch the event loop's state itself.
            loop = asyncio.get_running_loop()
            app.state.stop_starting = functools.partial(loop.call_soon_threadsafe, starting.cancel)
            async with service_factory(settings) as service:
                app.state.stop_starting = None
                app.state.service = service
                started = True
                try:
                    yield
                finally:
                    app.state.service = None
        if not started:
            # uvicorn, told to exit, shuts down right after a start-up that ends: no traceback for
            # a stop that was asked for, and the same exit as a stop after serving.
            log.info("stopped during start-up (SIGTERM or Ctrl-C); every container removed")
            yield

    problems = ProblemDetailsConfig(
        exception_to_problem_detail_map={
            ValidationException: _validation_problem,
            HTTPException: functools.partial(_http_problem, settings.server.max_body_bytes),
            InvalidRun: _problem(422, "Limit out of range", "limit"),
            InvalidFile: _problem(422, "File not allowed", "file"),
            QueueFull: _problem(429, "Queue full", "queue-full"),
            ShuttingDown: _problem(503, "Shutting down", "shutting-down"),
            RunNotFound: _problem(404, "No such run", "no-such-run"),
            NoSuchFile: _problem(404, "No such file", "no-such-file"),
            RunFinished: _problem(409, "Run already ended", "run-finished"),
            StoreError: _problem(503, "Run store unavailable", "store-unavailable"),
            EnvironmentNotRecorded: _problem(404, "No environment recorded", "no-environment"),
        }
    )
    return Litestar(
        route_handlers=[
            RunController,
            StatusController,
            health,
            environment,
            web.playground,
            web.static_router(),
        ],
        dependencies={"service": Provide(get_service, sync_to_thread=False)},
        lifespan=[lifespan],
        plugins=[ProblemDetailsPlugin(problems)],
        exception_handlers={Exception: _internal},
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="warmpod", version=__version__, render_plugins=[web.OfflineSwagger()]
        ),
        after_request=web.page_headers,
        state=None,
    )
