"""``GET /environment`` and ``GET /environments``: the Python and the libraries a run gets, as the
runner images recorded them."""

from __future__ import annotations

from typing import Any

from litestar import Request, get
from litestar.openapi.datastructures import ResponseSpec

from warmpod.errors import WarmpodError
from warmpod.http.auth import granted_environments
from warmpod.http.health import get_service
from warmpod.http.openapi import KEYED
from warmpod.models import Environment, EnvironmentInfo, Problem

ENVIRONMENT_FILE = "/opt/warmpod/environment.json"
"""Written by ``pool/finish_image.py`` when the image is built; read by the start-up probe."""


class EnvironmentNotRecorded(WarmpodError):
    """Raised by ``GET /environment`` when the runner image holds no record of what it installed."""


def _problem(description: str) -> ResponseSpec:
    return ResponseSpec(
        Problem, description=description, media_type="application/problem+json", generate_examples=False
    )


_PROBLEMS = {
    401: _problem("No API key, or not a valid one (where the server has a keys file)"),
    429: _problem(
        "The client sends faster than its rate or has as many requests in flight as it may "
        "(WARMPOD_SERVER__KEY_*); retry after `Retry-After` seconds"
    ),
    503: _problem("Starting; retry after `Retry-After` seconds"),
}


@get(
    "/environment",
    security=KEYED,
    sync_to_thread=False,
    summary="Python and library versions",
    responses={
        **_PROBLEMS,
        404: _problem("The runner image records no environment (built from another Containerfile)"),
    },
)
def environment(request: Request[Any, Any, Any]) -> Environment:
    """The runner's Python version and every installed distribution with its version."""
    service = get_service(request)
    if service.environment is None:
        raise EnvironmentNotRecorded(
            f"the runner image {service.image} has no {ENVIRONMENT_FILE}: build it with warmpod's "
            "Containerfile (pool/), whose finish_image.py records it"
        )
    return service.environment


@get(
    "/environments",
    security=KEYED,
    sync_to_thread=False,
    summary="The environments a run may name",
    responses=_PROBLEMS,
)
def environments(request: Request[Any, Any, Any]) -> list[EnvironmentInfo]:
    """Each environment the request's key may use (``default`` first): its Python, its libraries,
    what its sandboxes preload and keep ready, and its runner image."""
    granted = granted_environments(request)
    return [info for info in get_service(request).catalogue if granted is None or info.name in granted]
