"""schemathesis against the real service's own OpenAPI schema: no 5xx, answers as documented."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support.live import WarmpodServer, serving

from warmpod import keys

# Examples per operation and phase; with the coverage phase's cases this is a few thousand requests.
EXAMPLES = int(os.environ.get("WARMPOD_FUZZ_EXAMPLES", "150"))
# Short runs, so that the valid ones among the generated programs (mostly syntax errors) end fast.
SETTINGS = {
    "WARMPOD_POOL__SIZE": "2",
    "WARMPOD_LIMITS__TIMEOUT": "1",
    "WARMPOD_LIMITS__MAX_TIMEOUT": "2",
    "WARMPOD_QUEUE__MAX_QUEUED": "8",
}
# The schema cannot state the server's maxima (they are settings, and a smaller memory limit must
# fit the largest sandbox): a schema-valid cpu_time above the server's is rightly a 422.
EXCLUDED = [positive_data_acceptance]
pytestmark = pytest.mark.integration
OPERATIONS = [
    "POST /run-json",
    "POST /run-file",
    "GET /status/{run_id}",
    "DELETE /status/{run_id}",
    "GET /status/{run_id}/stream",
    "GET /status/{run_id}/files/{path}",
    "GET /health",
    "GET /environment",
    "GET /environments",
    "GET /runs",
    "POST /runs/batch",
]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]

requests_sent = 0
AUTH: dict[str, str] = {}
"""The fuzz server's key, as a header (set by the server fixture)."""


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[WarmpodServer]:
    """One real server for the module; at the end it must stop cleanly and leave no container."""
    directory = tmp_path_factory.mktemp("fuzz")
    # Keys on, as a server on a network has them: every secured operation must then also refuse
    # what schemathesis sends with a made-up key (its ignored-auth check), and accept AUTH.
    key = keys.add(directory / "keys", "fuzz")
    AUTH["Authorization"] = f"Bearer {key}"
    with serving(directory, {**SETTINGS, "WARMPOD_SERVER__API_KEYS_FILE": str(directory / "keys")}) as live:
        yield live
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            # Teardown output is captured (and shown only on failure) unless capture is off for it.
            with capture.global_and_fixture_disabled():
                reporter.write_line(f"tests/fuzz: {requests_sent} generated requests against {live.url}")


@pytest.fixture(scope="module")
def api_schema(server: WarmpodServer) -> Any:
    """The schema the running service publishes (loaded here: schemathesis's own pytest loader
    does not work with pytest 9)."""
    return schemathesis.openapi.from_url(f"{server.url}/schema/openapi.json", headers=AUTH)


def assert_problem(response: Any) -> None:
    """A 4xx or 5xx answer is an RFC 9457 problem whose status is the response's."""
    if response.status_code < 400:
        return
    # httpx's headers hold one value a name, schemathesis's a list of them.
    content_type = response.headers.get("content-type", "")
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/problem+json"), response.text
    body = json.loads(response.content)
    assert body["status"] == response.status_code, body
    assert isinstance(body["title"], str), body
    assert body["title"], body


def test_the_schema_has_every_operation(api_schema: Any) -> None:
    """The operations fuzzed below are all there are: a new one must join them."""
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


@pytest.mark.parametrize(
    ("label", "mode"),
    [(label, GenerationMode.POSITIVE) for label in OPERATIONS]
    # Only these take input a schema can break (a path's string id cannot be): a body, a query, a
    # header. Not the form: its fields are text on the wire, so a "number" where text is due is text.
    + [
        (label, GenerationMode.NEGATIVE)
        for label in ["POST /run-json", "POST /runs/batch", "GET /status/{run_id}/stream"]
    ],
    ids=str,
)
def test_every_answer_is_as_documented(api_schema: Any, label: str, mode: GenerationMode) -> None:
    """Requests the schema describes (positive) or breaks (negative) get no 5xx and an answer
    the schema allows; every error is a problem."""
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        global requests_sent
        requests_sent += 1
        response = case.call_and_validate(headers=AUTH, excluded_checks=EXCLUDED, timeout=30)
        if path != "/health":
            assert_problem(response)

    check()


@given(rest=st.text(max_size=40))
@settings(max_examples=200, deadline=None, derandomize=True, database=None)
def test_unknown_routes_are_problems(server: WarmpodServer, rest: str) -> None:
    """A path under no route is a 404 problem, whatever follows."""
    global requests_sent
    requests_sent += 1
    response = httpx.get(f"{server.url}/nothing-here{quote(rest, safe='/')}", timeout=30)
    assert response.status_code == 404, response.text
    assert_problem(response)


@pytest.mark.parametrize(
    "path",
    [
        "/run-json/",
        "/run-file/",
        "/runs/batch",
        f"/status/{'0' * 32}",
        f"/status/{'0' * 32}/stream",
        "/health",
    ],
)
def test_wrong_methods_are_problems(server: WarmpodServer, path: str) -> None:
    """A method a route does not take is a 405 problem naming the ones it does (``Allow``)."""
    global requests_sent
    allowed = set(httpx.options(server.url + path, timeout=30).headers["allow"].replace(" ", "").split(","))
    for method in sorted(set(METHODS) - allowed - {"HEAD"}):
        requests_sent += 1
        response = httpx.request(method, server.url + path, timeout=30)
        assert response.status_code == 405, (method, path, response.text)
        assert set(response.headers["allow"].replace(" ", "").split(",")) == allowed
        assert_problem(response)


def test_options_lists_every_method(server: WarmpodServer) -> None:
    """A run's URL allows GET (its state), DELETE (cancel) and OPTIONS."""
    response = httpx.options(f"{server.url}/status/{'0' * 32}", timeout=30)
    assert response.status_code == 204
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"DELETE", "GET", "OPTIONS"}
