"""One retry delay that doubles after each failure up to a maximum, and starts over after a success."""

from __future__ import annotations

import anyio


class Backoff:
    """Delays of ``first``, twice that, ... at most ``maximum`` seconds; ``reset`` after a success."""

    def __init__(self, first: float = 0.5, maximum: float = 30.0) -> None:
        # A maximum below the first delay caps that one too (settings may allow 0.05 s).
        self._first = min(first, maximum)
        self._maximum = maximum
        self._next = self._first

    @property
    def delay(self) -> float:
        """The wait the next ``sleep`` takes."""
        return self._next

    async def sleep(self) -> None:
        """Wait the current delay, then double it for next time."""
        delay = self._next
        self._next = min(delay * 2, self._maximum)
        await anyio.sleep(delay)

    def reset(self) -> None:
        """Start over from ``first``: the operation succeeded."""
        self._next = self._first
