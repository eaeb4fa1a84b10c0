"""Shared by every suite: pytest puts this folder on sys.path, so ``support`` imports everywhere."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import postgres

TESTS = Path(__file__).resolve().parent
PODMAN_SUITES = frozenset({"integration", "security", "cluster", "load"})
"""The suites that run the real service against the host's Podman."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the Podman suites, and only them, on a machine without Podman: before any of their
    session fixtures would try to start a server."""
    if shutil.which("podman") is not None:
        return
    for item in items:
        path = item.path.resolve()
        suite = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else None
        if suite in PODMAN_SUITES:
            item.add_marker(
                pytest.mark.skip(reason=f"podman is not on PATH: the {suite} tests need a real Podman")
            )


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """asyncio, as under uvicorn: with trio installed too (selenium needs it), anyio's pytest
    plugin would run every async test on both."""
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """A throwaway PostgreSQL server for the session (tests/support/postgres.py), stopped and deleted after.

    Skipped where Debian's ``postgresql`` is not installed (``deploy/setup.sh --test`` installs
    it), unless WARMPOD_TEST_POSTGRES=required (CI), which fails instead.
    """
    try:
        postgres.find_bin_dir()
    except postgres.PostgresMissing as exc:
        if os.environ.get("WARMPOD_TEST_POSTGRES") == "required":
            pytest.fail(f"the PostgreSQL tests need {exc}")
        pytest.skip(f"the PostgreSQL tests need {exc}")
    with postgres.running() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: postgres.PostgresServer) -> str:
    """The URL of one database shared by the session's tests (``postgresql://postgres@127.0.0.1:PORT/warmpod``)."""
    return postgres_server.create_database("warmpod")


@pytest.fixture
def postgres_db(postgres_server: postgres.PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database of the session's server, for one test; dropped after it."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


# Where warmpod blocks its event loop on purpose: once, at start or stop, on local files.
ALLOWED_TO_BLOCK = [
    # A pool's construction looks for the image context (the bundled pool/ directory): one stat.
    ("warmpod/host/image.py", {"context_dir", "guest_dir"}),
    # The pool's owner lock: a mkdir, an open and a non-blocking flock at start, an unlink at stop.
    ("warmpod/sandbox/owners.py", {"acquire", "release"}),
    # Per request, and small: the keys file's stat (and a read when it changed) that lets a
    # rotation take effect without a restart, the secrets file's likewise for a run that names
    # secrets; the playground's page, read from the package.
    ("warmpod/keys.py", {"current"}),
    ("warmpod/secrets.py", {"_current"}),
    # The same for the sources file, per request and per run that asks for a source.
    ("warmpod/sources.py", {"_current"}),
    ("warmpod/http/web.py", {"playground"}),
    # `warmpod keys add|remove`'s functions: a command's, which tests call to edit the keys file.
    ("warmpod/keys.py", {"add", "remove"}),
    # A scrape: prometheus_client's process collector reads /proc/self, which never waits on a disk.
    ("warmpod/http/metrics.py", {"get"}),
]


@pytest.fixture
def blocking_guard() -> Iterator[None]:
    """Fail a test whose event loop runs a blocking call (file, socket, sleep, subprocess) made by
    warmpod's own code: such a call stalls every other request. Where blockbuster is not installed
    (the guest job's offline wheels: its forbiddenfruit has no wheel) the guard is off."""
    try:
        from blockbuster import blockbuster_ctx
    except ImportError:
        yield
        return
    with blockbuster_ctx("warmpod") as guard:
        for function in guard.functions.values():
            for path, names in ALLOWED_TO_BLOCK:
                function.can_block_in(path, names)
        yield
