"""Unit tests of the one retry delay every loop that retries shares."""

from __future__ import annotations

from warmpod.backoff import Backoff


async def test_delays_double_up_to_the_maximum_and_start_over_after_a_reset() -> None:
    """Each sleep doubles the next delay, never past the maximum; a reset goes back to the first."""
    backoff = Backoff(first=0.001, maximum=0.004)
    seen = []
    for _ in range(4):
        seen.append(backoff.delay)
        await backoff.sleep()
    assert seen == [0.001, 0.002, 0.004, 0.004]
    backoff.reset()
    assert backoff.delay == 0.001


def test_a_maximum_below_the_first_delay_caps_that_one_too() -> None:
    """A maximum smaller than the first delay (pool.backoff_max may be 0.05 s) bounds every delay."""
    backoff = Backoff(first=0.5, maximum=0.05)
    assert backoff.delay == 0.05
    backoff.reset()
    assert backoff.delay == 0.05
