"""API tests of GET /environment: the real app, serving what the start-up probe read from the image."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, cast

from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.fakes import ROOTFUL_V1

from warmpod.http.app import create_app
from warmpod.models import Environment
from warmpod.queue.node import QueueNode
from warmpod.sandbox.pool import Pool
from warmpod.sandbox.runner import Runner
from warmpod.service import Service
from warmpod.settings import Settings, from_env

IMAGE = "localhost/warmpod-runner:0123456789ab"
INFO = ROOTFUL_V1
RECORDED = Environment(python="3.13.5", packages={"numpy": "2.5.5", "tabulate": "0.9.0"})


def app_with(environment: Environment | None) -> Litestar:
    """The real app over a service whose probe found ``environment``; nothing else of it is used."""
    settings = from_env({})

    @contextlib.asynccontextmanager
    async def factory(given: Settings) -> AsyncIterator[Service]:
        parts: Any = None
        yield Service(
            given, IMAGE, INFO, cast(Pool, parts), cast(Runner, parts), cast(QueueNode, parts), environment
        )

    return create_app(settings, service_factory=factory)


async def test_environment_is_what_the_image_recorded() -> None:
    """GET /environment answers 200 with the Python version and every package the probe read."""
    async with AsyncTestClient(app_with(RECORDED)) as client:
        response = await client.get("/environment")
    assert response.status_code == 200
    assert response.json() == {"python": "3.13.5", "packages": {"numpy": "2.5.5", "tabulate": "0.9.0"}}


async def test_an_image_without_a_record_is_a_problem() -> None:
    """An image built without the record gets a 404 problem that names the image and the file."""
    async with AsyncTestClient(app_with(None)) as client:
        response = await client.get("/environment")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == "https://warmpod.dev/problems/no-environment"
    assert IMAGE in body["detail"]
    assert "/opt/warmpod/environment.json" in body["detail"]


async def test_environment_is_in_the_schema() -> None:
    """The OpenAPI schema documents GET /environment with its 200 body and its problems."""
    async with AsyncTestClient(app_with(RECORDED)) as client:
        schema = (await client.get("/schema/openapi.json")).json()
    responses = schema["paths"]["/environment"]["get"]["responses"]
    assert set(responses) == {"200", "401", "404", "429", "503"}
