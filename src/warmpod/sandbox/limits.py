"""The limits a request may ask for: each at most the server's own, the server's where it asks none."""

from __future__ import annotations

from dataclasses import dataclass

from warmpod.errors import InvalidRun
from warmpod.settings import LimitSettings


@dataclass(frozen=True)
class RunLimits:
    """Limits a request asks for, each at most the server's own; None keeps the server's."""

    cpu_time: int | None = None
    memory_mb: int | None = None
    max_output_bytes: int | None = None


def resolve_limits(limits: RunLimits, server: LimitSettings) -> RunLimits:
    """The limits of a run, every field filled in from the server's where the request left it.

    Raises:
        InvalidRun: the request asks for more than the server allows; the message names the maximum.
    """
    return RunLimits(
        cpu_time=_at_most("cpu_time", limits.cpu_time, server.cpu_time, "seconds"),
        memory_mb=_at_most("memory_mb", limits.memory_mb, server.memory_mb, "MiB"),
        max_output_bytes=_at_most(
            "max_output_bytes", limits.max_output_bytes, server.max_output_bytes, "bytes"
        ),
    )


def _at_most(name: str, requested: int | None, maximum: int, unit: str) -> int:
    if requested is None:
        return maximum
    if not 0 < requested <= maximum:
        raise InvalidRun(f"{name} must be greater than 0 and at most {maximum} {unit}, got {requested}")
    return requested


def resolve_timeout(requested: float | None, limits: LimitSettings) -> float:
    """The wall-time limit of a run.

    Raises:
        InvalidRun: the request asks for more than the server allows.
    """
    if requested is None:
        return limits.timeout
    if not 0 < requested <= limits.max_timeout:
        raise InvalidRun(
            f"timeout must be greater than 0 and at most {limits.max_timeout:g} seconds, got {requested:g}"
        )
    return requested
