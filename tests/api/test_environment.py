"""API tests of GET /environment: the real app, serving what the start-up probe read from the image."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.apitest import IMAGE

from warmpod.http.app import create_app
from warmpod.models import Environment
from warmpod.service import Service
from warmpod.settings import Settings

AppWith = Callable[[Environment | None], Litestar]
RECORDED = Environment(python="3.13.5", packages={"numpy": "2.5.5", "tabulate": "0.9.0"})


@pytest.fixture
def app_with(settings: Settings, service: Service) -> AppWith:
    """The real app over the API suite's service, its probe having found the environment given;
    nothing else of the service is used."""

    def app(environment: Environment | None) -> Litestar:
        @contextlib.asynccontextmanager
        async def factory(given: Settings) -> AsyncIterator[Service]:
            assert given is settings
            yield dataclasses.replace(service, environment=environment)

        return create_app(settings, service_factory=factory)

    return app


async def test_environment_is_what_the_image_recorded(app_with: AppWith) -> None:
    """GET /environment answers 200 with the Python version and every package the probe read."""
    async with AsyncTestClient(app_with(RECORDED)) as client:
        response = await client.get("/environment")
    assert response.status_code == 200
    assert response.json() == {"python": "3.13.5", "packages": {"numpy": "2.5.5", "tabulate": "0.9.0"}}


async def test_an_image_without_a_record_is_a_problem(app_with: AppWith) -> None:
    """An image built without the record gets a 404 problem that names the image and the file."""
    async with AsyncTestClient(app_with(None)) as client:
        response = await client.get("/environment")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["type"] == "https://warmpod.dev/problems/no-environment"
    assert IMAGE in body["detail"]
    assert "/opt/warmpod/environment.json" in body["detail"]


async def test_environment_is_in_the_schema(app_with: Callable[[Environment | None], Litestar]) -> None:
    """The OpenAPI schema documents GET /environment with its 200 body and its problems."""
    async with AsyncTestClient(app_with(RECORDED)) as client:
        schema = (await client.get("/schema/openapi.json")).json()
    responses = schema["paths"]["/environment"]["get"]["responses"]
    assert set(responses) == {"200", "401", "404", "429", "503"}
