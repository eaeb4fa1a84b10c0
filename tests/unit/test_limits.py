"""Unit tests of the limits a request may ask for: each within the server's, the server's by default."""

from __future__ import annotations

import pytest

from warmpod.errors import InvalidRun
from warmpod.sandbox import limits
from warmpod.sandbox.limits import RunLimits
from warmpod.settings import LimitSettings

LIMITS = LimitSettings(timeout=10.0, max_timeout=60.0, cpu_time=30, memory_mb=512, max_output_bytes=1000)


# resolve_timeout --------------------------------------------------------------------------------


def test_absent_timeout_is_the_default() -> None:
    """A request without a timeout gets the server's default."""
    assert limits.resolve_timeout(None, LIMITS) == 10.0


@pytest.mark.parametrize("requested", [0.001, 1.0, 59.99, 60.0])
def test_timeout_within_range_is_kept(requested: float) -> None:
    """A timeout above 0 and up to the maximum is used as asked."""
    assert limits.resolve_timeout(requested, LIMITS) == requested


@pytest.mark.parametrize("requested", [0.0, -1.0, 60.0001, 3600.0, float("inf"), float("nan")])
def test_timeout_out_of_range_is_refused_naming_the_maximum(requested: float) -> None:
    """A timeout of 0 or less, above the maximum, or not a number raises InvalidRun naming the maximum."""
    with pytest.raises(InvalidRun, match="at most 60 seconds"):
        limits.resolve_timeout(requested, LIMITS)


# resolve_limits ---------------------------------------------------------------------------------


def test_absent_limits_are_the_servers() -> None:
    """A request that asks for no limit gets every one of the server's."""
    assert limits.resolve_limits(RunLimits(), LIMITS) == RunLimits(
        cpu_time=30, memory_mb=512, max_output_bytes=1000
    )


def test_limits_within_the_servers_are_kept() -> None:
    """Limits above 0 and up to the server's are used as asked, each on its own."""
    asked = RunLimits(cpu_time=1, memory_mb=512, max_output_bytes=10)
    assert limits.resolve_limits(asked, LIMITS) == asked


@pytest.mark.parametrize(
    ("asked", "message"),
    [
        (RunLimits(cpu_time=31), "cpu_time must be greater than 0 and at most 30 seconds, got 31"),
        (RunLimits(memory_mb=0), "memory_mb must be greater than 0 and at most 512 MiB, got 0"),
        (RunLimits(max_output_bytes=-1), "max_output_bytes must be greater than 0 and at most 1000 bytes"),
    ],
)
def test_limits_out_of_range_are_refused_naming_the_maximum(asked: RunLimits, message: str) -> None:
    """A limit of 0 or less, or above the server's, raises InvalidRun naming the maximum and its unit."""
    with pytest.raises(InvalidRun, match=message):
        limits.resolve_limits(asked, LIMITS)
