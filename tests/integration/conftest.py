"""Fixtures that run the real ``warmpod serve`` against the host's Podman and the real runner image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.live import (
    MAX_BODY_BYTES,
    MAX_OUTPUT_BYTES,
    MAX_TIMEOUT,
    POOL_SIZE,
    ServerFactory,
    WarmpodServer,
    serving,
)

SESSION_SETTINGS = {
    "WARMPOD_POOL__SIZE": str(POOL_SIZE),
    "WARMPOD_LIMITS__MAX_TIMEOUT": str(MAX_TIMEOUT),
    "WARMPOD_LIMITS__MAX_OUTPUT_BYTES": str(MAX_OUTPUT_BYTES),
    "WARMPOD_SERVER__MAX_BODY_BYTES": str(MAX_BODY_BYTES),
}


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmpodServer]:
    """One real server for the whole session; at the end it must stop on SIGTERM and leave nothing."""
    with serving(tmp_path_factory.mktemp("warmpod"), SESSION_SETTINGS) as live:
        live.podman_service()  # found now, while it surely runs (see _session_server_intact)
        yield live


@pytest.fixture(autouse=True)
def _session_server_intact(request: pytest.FixtureRequest) -> None:
    """Fail a test at once, saying why, if the session server lost its private Podman service.

    Without it every later run would wait the pool's acquire timeout for a container that can
    no longer be made, and fail with a 503 that hides the cause.
    """
    if "server" not in request.fixturenames:
        return
    live: WarmpodServer = request.getfixturevalue("server")
    pid, _ = live.podman_service()
    assert live.podman_service_alive(), (
        f"the session server's private podman service (pid {pid}) died while the server runs; "
        f"see test_podman_service_outlives_idle_threads\n{live.log_tail()}"
    )


@pytest.fixture(scope="session")
def client(server: WarmpodServer) -> Iterator[httpx.Client]:
    """An HTTP client for the session's server; runs may wait for a container, hence the long timeout."""
    with httpx.Client(base_url=server.url, timeout=MAX_TIMEOUT + 60) as http:
        yield http


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start private servers (pool size 1 unless told); any still running at the end is stopped."""
    started: list[WarmpodServer] = []

    def start(**settings: str) -> WarmpodServer:
        live = WarmpodServer(tmp_path, {"WARMPOD_POOL__SIZE": "1", **settings})
        started.append(live)
        return live

    yield start
    for live in started:
        live.close()
