"""Per-request limits: a run may ask for less than the server's limits, never more."""

from __future__ import annotations

import time
from textwrap import dedent

import httpx
import pytest
from support.hostile import (
    BOMB_TIMEOUT,
    CPU_TIME,
    MAX_OUTPUT_BYTES,
    MAX_TIMEOUT,
    MEMORY_MB,
    Run,
    assert_still_serves,
)
from support.live import WarmpodServer

pytestmark = pytest.mark.security


def post(client: httpx.Client, body: dict[str, object]) -> httpx.Response:
    return client.post("/run-json/", json=body, timeout=MAX_TIMEOUT + 60)


def run_with(client: httpx.Client, code: str, **limits: object) -> Run:
    started = time.monotonic()
    response = post(client, {"code": code, "timeout": 10, **limits})
    assert response.status_code == 200, response.text
    return Run(result=response.json(), seconds=time.monotonic() - started)


def test_lower_cpu_time_stops_a_spin_sooner(server: WarmpodServer, client: httpx.Client) -> None:
    """cpu_time=1 stops a busy loop by cpu_time well before the server's own CPU limit."""
    server.wait_pool_full()
    spin = run_with(client, "while True:\n    pass\n", cpu_time=1)
    assert spin.status == "failed", spin.result
    assert "cpu_time" in spin.limits_hit, spin.result
    assert spin.seconds < CPU_TIME, f"the reply took {spin.seconds:.1f} s"
    assert_still_serves(client)


def test_lower_memory_stops_a_bomb_at_the_asked_size(server: WarmpodServer, client: httpx.Client) -> None:
    """memory_mb=96 kills a program that holds 128 MB, which the server's own limit would allow."""
    code = dedent(
        """
        held = [bytearray(1 << 20) for _ in range(128)]
        print("held", len(held))
        """
    )
    # Page faults are what a slow platform is slowest at: both runs get the bombs' wall time.
    # 96, not 64: a preloaded sandbox holds some 68 MiB at rest (pandas imports pyarrow), and a
    # limit below that is refused.
    bomb = run_with(client, code, memory_mb=96, timeout=BOMB_TIMEOUT)
    assert bomb.status == "failed", bomb.result
    assert "memory" in bomb.limits_hit, bomb.result
    fine = run_with(client, code, timeout=BOMB_TIMEOUT)
    assert fine.status == "succeeded", fine.result
    assert_still_serves(client)


def test_lower_output_cap_truncates_there(client: httpx.Client) -> None:
    """max_output_bytes=100 keeps exactly 100 bytes and reports the output limit."""
    flood = run_with(client, "print('x' * 10000)", max_output_bytes=100)
    assert flood.stdout == "x" * 100, flood.result
    assert flood.result["stdout_truncated"] is True
    assert "output" in flood.limits_hit, flood.result


@pytest.mark.parametrize(
    ("field", "value", "maximum"),
    [
        ("cpu_time", CPU_TIME + 1, CPU_TIME),
        ("memory_mb", MEMORY_MB + 1, MEMORY_MB),
        ("max_output_bytes", MAX_OUTPUT_BYTES + 1, MAX_OUTPUT_BYTES),
    ],
)
def test_more_than_the_server_allows_is_refused(
    client: httpx.Client, field: str, value: int, maximum: int
) -> None:
    """Asking for more than the server's limit is a 422 problem that names the maximum."""
    response = post(client, {"code": "print(1)", field: value})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert str(maximum) in response.json()["detail"]
