"""``GET /health``, and the running service every handler depends on (a 503 while it starts)."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.exceptions import ServiceUnavailableException
from litestar.openapi.datastructures import ResponseSpec

from warmpod.models import Health
from warmpod.service import Service


def running_service(app: Litestar) -> Service | None:
    """The service ``app`` serves, None while it starts (or once it stopped)."""
    service: Service | None = app.state.get("service")
    return service


def get_service(request: Request[Any, Any, Any]) -> Service:
    """The running service, or 503 while it starts."""
    service = running_service(request.app)
    if service is None:
        raise ServiceUnavailableException("warmpod is starting", headers={"Retry-After": "1"})
    return service


@get(
    "/health",
    summary="Service health",
    sync_to_thread=False,
    responses={
        503: ResponseSpec(Health, description="Runs cannot be taken now (starting, stopping, no engine)")
    },
)
def health(request: Request[Any, Any, Any]) -> Response[Health]:
    """200 with the pool's counts once runs can be taken; 503 before that."""
    body = get_service(request).health()
    if body.status == "ok":
        return Response(body)
    return Response(body, status_code=503, headers={"Retry-After": "1"})
