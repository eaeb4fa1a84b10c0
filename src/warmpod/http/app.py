"""Assembly of the Litestar app: lifespan, dependencies, problem details and OpenAPI."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.status_codes import HTTP_413_REQUEST_ENTITY_TOO_LARGE, HTTP_500_INTERNAL_SERVER_ERROR

from warmpod import __version__
from warmpod.errors import (
    EnvironmentDenied,
    InvalidBatch,
    InvalidCallback,
    InvalidFile,
    InvalidLabel,
    InvalidProgram,
    InvalidQuery,
    InvalidRun,
    KeyBusy,
    KeyReused,
    NoSuchFile,
    QueueFull,
    RunFinished,
    RunNotFound,
    SecretDenied,
    SettingsError,
    ShuttingDown,
    SourceDenied,
    StoreError,
    Throttled,
    UnknownEnvironment,
    WarmpodError,
)
from warmpod.http import auth, batch, history, metrics, throttle, web
from warmpod.http.environment import EnvironmentNotRecorded, environment, environments
from warmpod.http.health import get_service, health, running_service
from warmpod.http.runs import RunController
from warmpod.http.status import StatusController
from warmpod.keys import KeyFile
from warmpod.service import Service, run_service
from warmpod.settings import Settings

log = logging.getLogger(__name__)
ServiceFactory = Callable[[Settings], AbstractAsyncContextManager[Service]]
_PROBLEM = "https://warmpod.dev/problems/"
_STATUSES = {status.value for status in HTTPStatus}


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
    # The title names the kind of problem (HTTP's phrase for its own); the detail says what happened.
    title = HTTPStatus(exc.status_code).phrase if exc.status_code in _STATUSES else exc.detail
    return ProblemDetailsException(
        status_code=exc.status_code, title=title, detail=detail, headers=exc.headers
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
    service = running_service(app)
    if service is not None:
        service.queue.shutdown.begin(grace)
    elif (stop_starting := app.state.get("stop_starting")) is not None:
        stop_starting()


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    detail = str(exc) if isinstance(exc, WarmpodError) else "internal error; see the server log"
    return ProblemDetailsException(
        status_code=HTTP_500_INTERNAL_SERVER_ERROR, title="Internal error", detail=detail
    ).to_response(request)


def _exposed(host: str) -> bool:
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or "" (every address)
        return True


def key_file(settings: Settings) -> KeyFile | None:
    """The keys file in force, read now; None where keys are off.

    Raises:
        SettingsError: it cannot be read, or the server would listen beyond loopback with no keys
            and no explicit opt-out.
    """
    server = settings.server
    if server.api_keys_file:
        return KeyFile(Path(server.api_keys_file))
    if _exposed(server.host) and not server.allow_anonymous:
        raise SettingsError(
            f"warmpod would serve {server.host!r}, beyond loopback, to anyone who reaches it: create keys "
            "(warmpod keys add NAME --file PATH) and set WARMPOD_SERVER__API_KEYS_FILE=PATH, or set "
            "WARMPOD_SERVER__ALLOW_ANONYMOUS=true on a trusted network behind an authenticating proxy"
        )
    return None


def create_app(settings: Settings, service_factory: ServiceFactory = run_service) -> Litestar:
    """The warmpod app; its lifespan starts the service and removes every container on exit.

    Raises:
        SettingsError: as ``key_file``.
    """
    keys = key_file(settings)

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
            # An InvalidRun too: Litestar takes the handler of the nearest class in its MRO.
            UnknownEnvironment: _problem(422, "Unknown environment", "environment"),
            EnvironmentDenied: _problem(403, "Environment not allowed", "environment-denied"),
            InvalidFile: _problem(422, "File not allowed", "file"),
            InvalidProgram: _problem(422, "Program not allowed", "program"),
            InvalidLabel: _problem(422, "Label not allowed", "label"),
            InvalidCallback: _problem(422, "Callback URL not allowed", "callback-url"),
            InvalidBatch: _problem(422, "Batch not allowed", "batch"),
            InvalidQuery: _problem(422, "Query not allowed", "query"),
            SecretDenied: _problem(403, "Secret not allowed", "secret-denied"),
            SourceDenied: _problem(403, "Data source not allowed", "source-denied"),
            KeyBusy: _problem(429, "Key quota reached", "key-busy"),
            QueueFull: _problem(429, "Queue full", "queue-full"),
            Throttled: _problem(429, "Too many requests", "throttled"),
            ShuttingDown: _problem(503, "Shutting down", "shutting-down"),
            RunNotFound: _problem(404, "No such run", "no-such-run"),
            NoSuchFile: _problem(404, "No such file", "no-such-file"),
            RunFinished: _problem(409, "Run already ended", "run-finished"),
            KeyReused: _problem(422, "Idempotency key reused", "idempotency-key-reused"),
            StoreError: _problem(503, "Run store unavailable", "store-unavailable"),
            EnvironmentNotRecorded: _problem(404, "No environment recorded", "no-environment"),
        }
    )
    # Its own instance in the state too: a batch charges its client one request per run.
    limiter = throttle.Throttle(settings.server)
    return Litestar(
        route_handlers=[
            RunController,
            StatusController,
            batch.run_batch,
            health,
            environment,
            environments,
            history.runs,
            metrics.MetricsController,
            web.playground,
            web.static_router(),
        ],
        dependencies={"service": Provide(get_service, sync_to_thread=False)},
        lifespan=[lifespan],
        plugins=[ProblemDetailsPlugin(problems)],
        exception_handlers={Exception: _internal},
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="warmpod",
            version=__version__,
            render_plugins=[web.OfflineSwagger()],
            components=Components(
                security_schemes={
                    "apiKey": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="A key from `warmpod keys add`, needed when the server has a keys file "
                        "(every operation but /health)",
                    )
                }
            ),
        ),
        # The throttle after authentication, which names the key it counts against.
        middleware=[
            metrics.PROMETHEUS.middleware,
            *([] if keys is None else [auth.middleware(keys)]),
            limiter,
        ],
        after_request=web.page_headers,
        state=State({"key_file": keys, "throttle": limiter}),
    )
