"""Output: floods are cut at the cap, binary comes back replaced, and forged result frames are just bytes."""

from __future__ import annotations

import json
import struct
from textwrap import dedent

import httpx
import pytest

from .hostile import FLOOD_SECONDS, MAX_OUTPUT_BYTES, assert_still_serves, run

pytestmark = pytest.mark.security

FLOODS = [
    pytest.param("stdout", "while True:\n    print('y' * 99)\n", ("y" * 99 + "\n"), id="stdout-lines"),
    pytest.param(
        "stderr",
        "import sys\nwhile True:\n    sys.stderr.write('e' * 99 + '\\n')\n",
        "e" * 99 + "\n",
        id="stderr-lines",
    ),
    pytest.param("stdout", "import sys\nsys.stdout.write('z' * 10**7)\n", "z", id="one-enormous-line"),
]


@pytest.mark.parametrize(("stream", "code", "unit"), FLOODS)
def test_output_flood_is_cut_at_the_cap(client: httpx.Client, stream: str, code: str, unit: str) -> None:
    """A stream flooded past the cap comes back exactly cap bytes long, flagged, the program stopped."""
    other = "stderr" if stream == "stdout" else "stdout"
    flood = run(client, code)
    assert flood.status == "failed", flood.result
    assert flood.exit_code == -9, flood.result
    assert flood.limits_hit == ["output"], flood.result
    assert flood.result[f"{stream}_truncated"] is True
    assert flood.result[f"{other}_truncated"] is False
    text = flood.result[stream]
    assert len(text) == MAX_OUTPUT_BYTES
    assert text == (unit * (MAX_OUTPUT_BYTES // len(unit) + 1))[:MAX_OUTPUT_BYTES]
    assert flood.result[other] == ""
    assert flood.seconds < FLOOD_SECONDS, f"the flood was answered after {flood.seconds:.1f} s"
    assert_still_serves(client)


def test_binary_flood_is_cut_and_replaced(client: httpx.Client) -> None:
    """Every byte value, flooded, comes back as the cap's worth of bytes decoded with U+FFFD for non-UTF-8."""
    flood = run(client, "import sys\nwhile True:\n    sys.stdout.buffer.write(bytes(range(256)))\n")
    assert flood.status == "failed", flood.result
    assert flood.limits_hit == ["output"], flood.result
    assert flood.result["stdout_truncated"] is True
    raw = bytes(range(256)) * (MAX_OUTPUT_BYTES // 256)
    assert len(raw) == MAX_OUTPUT_BYTES
    assert flood.stdout == raw.decode("utf-8", "replace")
    assert "\ufffd" in flood.stdout
    assert_still_serves(client)


def test_forged_result_frame_is_only_output(client: httpx.Client) -> None:
    """A program printing an agent result frame that claims exit 0 gets exit 7 and its bytes back verbatim."""
    forged = json.dumps(
        {
            "type": "result",
            "exit_code": 0,
            "stdout": "",
            "stderr": "",
            "stdout_truncated": False,
            "stderr_truncated": False,
            "limits_hit": [],
            "duration_ms": 1.0,
            "error": None,
        }
    ).encode()
    frame = struct.pack(">I", len(forged)) + forged
    code = dedent(
        f"""
        import os, sys
        frame = {frame!r}
        sys.stdout.buffer.write(frame)
        sys.stdout.flush()
        sys.stderr.buffer.write(frame)
        sys.stderr.flush()
        os._exit(7)
        """
    )
    attempt = run(client, code)
    assert attempt.status == "failed", attempt.result
    assert attempt.exit_code == 7, attempt.result
    assert attempt.stdout == frame.decode("utf-8", "replace")
    assert attempt.stderr == frame.decode("utf-8", "replace")
    assert attempt.limits_hit == []
    assert_still_serves(client)
