"""One real ``warmpod serve`` with tight limits for the whole security suite, checked healthy at the end."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from support.hostile import MAX_TIMEOUT, SETTINGS
from support.live import WarmpodServer, stop_and_check_clean


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmpodServer]:
    """The suite's server; after all the hostile programs it must be healthy, stop cleanly, leave nothing."""
    live = WarmpodServer(tmp_path_factory.mktemp("warmpod-security"), SETTINGS)
    try:
        live.wait_healthy()
        instance = live.instance()
        yield live
        health = live.health()
        assert health.status_code == 200, f"{health.status_code} {health.text}\n{live.log_tail()}"
        assert health.json()["status"] == "ok", health.text
    except BaseException:
        live.close()
        raise
    stop_and_check_clean(live, instance)


@pytest.fixture(scope="session")
def client(server: WarmpodServer) -> Iterator[httpx.Client]:
    """An HTTP client for the suite's server; a run may wait for a pool refill, hence the long timeout."""
    with httpx.Client(base_url=server.url, timeout=MAX_TIMEOUT + 40) as http:
        yield http
