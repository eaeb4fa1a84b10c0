"""Secrets masked in a run's output: every whole value becomes ``***``, across chunk boundaries too."""

from __future__ import annotations

import re
from collections.abc import Sequence

MASK = b"***"


class Masker:
    """Masks the values of a run's secrets in each of its output streams as the output comes.

    A stream's tail that could be the start of a value is held back until the next bytes tell
    (or the run ends, ``flush``): a value printed in two writes, or split between two of the
    agent's frames, is masked whole. Nothing else is delayed.
    """

    def __init__(self, values: Sequence[str]) -> None:
        # Longest first: a value that contains another is masked whole, not in part.
        self._values = sorted({value.encode() for value in values if value}, key=len, reverse=True)
        self._pattern = re.compile(b"|".join(map(re.escape, self._values))) if self._values else None
        self._held: dict[str, bytes] = {}

    def feed(self, stream: str, data: bytes) -> bytes:
        """The bytes of ``stream`` that may be shown now, masked; a possible value's start is held."""
        if self._pattern is None:
            return data
        text = self._pattern.sub(MASK, self._held.pop(stream, b"") + data)
        keep = self._partial(text)
        if keep:
            self._held[stream] = text[-keep:]
            return text[:-keep]
        return text

    def flush(self, stream: str) -> bytes:
        """What ``stream`` held back: at the run's end it cannot become a whole value any more."""
        return self._held.pop(stream, b"")

    def _partial(self, text: bytes) -> int:
        """The length of the longest end of ``text`` that a value starts with (shorter than it)."""
        longest = 0
        for value in self._values:
            first = value[:1]
            start = max(len(text) - len(value) + 1, 0)
            while True:
                at = text.find(first, start)
                if at < 0 or len(text) - at <= longest:
                    break
                if value.startswith(text[at:]):
                    longest = len(text) - at
                    break
                start = at + 1
        return longest
