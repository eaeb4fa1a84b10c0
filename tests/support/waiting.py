"""Waiting for what a test waits for: a condition polled up to a deadline, never a fixed sleep."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import anyio

WAIT = 5.0
"""How long a condition may take to hold before the test fails: far longer than any takes here,
even on this machine under load, and short enough that a hang fails well before the test timeout."""


async def until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = WAIT, *, interval: float = 0.01
) -> None:
    """Return as soon as ``predicate()`` holds; a coroutine it returns is awaited first.

    Args:
        predicate: what the test waits for: the state of a fake, of the store, of an HTTP answer.
        timeout: seconds after which the test fails.
        interval: seconds between looks; longer for a look that costs a request or a query.

    Raises:
        TimeoutError: ``predicate()`` still did not hold after ``timeout`` seconds.
    """
    with anyio.fail_after(timeout):
        while True:
            held = predicate()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await anyio.sleep(interval)
