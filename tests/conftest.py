"""Shared by every suite: pytest puts this folder on sys.path, so ``warmpod_live`` imports everywhere."""

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """asyncio, as under uvicorn: with trio installed too (selenium needs it), anyio's pytest
    plugin would run every async test on both."""
    return "asyncio"
