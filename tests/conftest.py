"""Shared by every suite: pytest puts this folder on sys.path, so ``warmpod_live`` imports everywhere."""

from __future__ import annotations

import os
from collections.abc import Iterator

import postgres
import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """asyncio, as under uvicorn: with trio installed too (selenium needs it), anyio's pytest
    plugin would run every async test on both."""
    return "asyncio"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.PostgresServer]:
    """A throwaway PostgreSQL server for the session (tests/postgres.py), stopped and deleted after.

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
