"""The unit suites: warmpod's own code never blocks the event loop of an async test; the agent
the agent tests exercise; a run store of each kind for the store suites."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest
from support.fakes import pool_module

from warmpod.queue.store.base import Store
from warmpod.queue.store.postgres import PostgresStore
from warmpod.queue.store.sqlite import SqliteStore

# The pool and its sandboxes do their local file work (leftovers' lock files, agents' directories,
# the seccomp profile) on the event loop; until that moves to worker threads their tests run
# without the guard.
UNGUARDED = frozenset(
    {"test_pool.py", "test_pool_environments.py", "test_sandbox_life.py", "test_webhook_deliveries.py"}
)


@pytest.fixture(autouse=True)
def _no_blocking(request: pytest.FixtureRequest) -> None:
    """Every test here but UNGUARDED's runs under tests/conftest.py's blocking guard."""
    if request.path.name not in UNGUARDED:
        request.getfixturevalue("blocking_guard")


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A fresh run store of each kind: a temporary SQLite file, an empty PostgreSQL database.
    The store suites (test_store*.py) hold both to the ``Store`` protocol with it."""
    opened: Store
    if request.param == "sqlite":
        opened = await SqliteStore.open(tmp_path / "runs.sqlite3")
    else:
        opened = await PostgresStore.open(request.getfixturevalue("postgres_db"))
    yield opened
    await opened.aclose()


@pytest.fixture(scope="module")
def agent() -> ModuleType:
    """The real in-container agent (pool/agent.py), imported as a module: fresh for each test module."""
    return pool_module("agent")
