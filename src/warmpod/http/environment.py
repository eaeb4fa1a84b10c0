"""``GET /environment``: the Python and the libraries a run gets, as the runner image recorded them."""

from __future__ import annotations

from typing import Any

from litestar import Request, get
from litestar.openapi.datastructures import ResponseSpec

from warmpod.errors import WarmpodError
from warmpod.http.routes import KEYED, get_service
from warmpod.models import Environment, Problem

ENVIRONMENT_FILE = "/opt/warmpod/environment.json"
"""Written by ``pool/finish_image.py`` when the image is built; read by the start-up probe."""


class EnvironmentNotRecorded(WarmpodError):
    """Raised by ``GET /environment`` when the runner image holds no record of what it installed."""


@get(
    "/environment",
    security=KEYED,
    sync_to_thread=False,
    summary="Python and library versions",
    responses={
        401: ResponseSpec(
            Problem,
            description="No API key, or not a valid one (where the server has a keys file)",
            media_type="application/problem+json",
            generate_examples=False,
        ),
        404: ResponseSpec(
            Problem,
            description="The runner image records no environment (built from another Containerfile)",
            media_type="application/problem+json",
            generate_examples=False,
        ),
        429: ResponseSpec(
            Problem,
            description="The client sends faster than its rate or has as many requests in flight as it "
            "may (WARMPOD_SERVER__KEY_*); retry after `Retry-After` seconds",
            media_type="application/problem+json",
            generate_examples=False,
        ),
        503: ResponseSpec(
            Problem,
            description="Starting; retry after `Retry-After` seconds",
            media_type="application/problem+json",
            generate_examples=False,
        ),
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
