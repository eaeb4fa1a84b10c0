"""tests/conftest.py's blocking guard is on for these suites, and its allowances hold."""

from __future__ import annotations

import pytest

from warmpod.host import facts as host
from warmpod.host import image
from warmpod.settings import from_env


async def test_warmpod_code_that_blocks_the_event_loop_fails_the_test() -> None:
    """Reading a file from warmpod's code on the event loop raises, so such a test fails."""
    blockbuster = pytest.importorskip("blockbuster", reason="the guard is off without blockbuster")
    with pytest.raises(blockbuster.BlockingError):
        host.missing_subid_ranges(1)


async def test_an_allowed_blocking_call_passes() -> None:
    """A call listed in ALLOWED_TO_BLOCK (the image context's one stat) runs on the event loop."""
    assert image.context_dir(from_env({})).name


def test_a_sync_test_may_block() -> None:
    """Outside an event loop nothing is guarded: a plain test reads files as it likes."""
    assert isinstance(host.missing_subid_ranges(1), list)
