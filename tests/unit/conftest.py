"""The unit suites: warmpod's own code never blocks the event loop of an async test; the agent
the agent tests exercise."""

from __future__ import annotations

from types import ModuleType

import pytest
from support.fakes import pool_module

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


@pytest.fixture(scope="module")
def agent() -> ModuleType:
    """The real in-container agent (pool/agent.py), imported as a module: fresh for each test module."""
    return pool_module("agent")
