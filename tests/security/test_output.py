"""Output: floods are cut at the cap, binary comes back replaced, and forged result frames are just bytes."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import struct
from pathlib import Path
from textwrap import dedent

import httpx
import pytest
from support.hostile import (
    FLOOD_SECONDS,
    MAX_OUTPUT_BYTES,
    alternating_program,
    assert_still_serves,
    paced_program,
    run,
)
from support.live import WarmpodServer

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


PACED_SECONDS = 4
# What the store may take beyond the bytes themselves: the run's record, the b-tree pages a few
# dozen chunks touch, and the slack of SQLite's page allocation.
STORE_OVERHEAD = 64 * 1024


def stored_bytes(path: Path) -> int:
    """The SQLite store's size once its write-ahead log is copied back (the WAL is reused, not grown)."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as db:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
        assert busy == 0, "the store's write-ahead log could not be copied back"
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        (page_size,) = db.execute("PRAGMA page_size").fetchone()
    return int(pages) * int(page_size)


def test_paced_one_byte_writes_cost_the_store_about_their_bytes(
    client: httpx.Client, server: WarmpodServer
) -> None:
    """A program writing a byte at a time grows the run store by a small multiple of what it kept,
    not by a stored chunk per write."""
    store = Path(server.env["WARMPOD_QUEUE__STORE_PATH"])
    before = stored_bytes(store)
    paced = run(client, paced_program(PACED_SECONDS), timeout=PACED_SECONDS + 10)
    assert paced.status == "succeeded", paced.result
    kept = len(paced.stdout)
    assert kept > 1000, paced.result
    assert paced.stdout == "x" * kept
    grown = stored_bytes(store) - before
    assert grown <= 4 * kept + STORE_OVERHEAD, f"{grown} store bytes for {kept} bytes of output"
    assert_still_serves(client)


def test_alternating_one_byte_writes_cost_the_store_about_their_bytes(
    client: httpx.Client, server: WarmpodServer
) -> None:
    """A program alternating stdout and stderr a byte at a time grows the run store by a small
    multiple of what it kept, not by a stored row per stream switch."""
    store = Path(server.env["WARMPOD_QUEUE__STORE_PATH"])
    before = stored_bytes(store)
    paced = run(client, alternating_program(PACED_SECONDS), timeout=PACED_SECONDS + 10)
    assert paced.status == "succeeded", paced.result
    kept = len(paced.stdout) + len(paced.stderr)
    assert kept > 1000, paced.result
    assert paced.stdout == "o" * len(paced.stdout)
    assert paced.stderr == "e" * len(paced.stderr)
    grown = stored_bytes(store) - before
    assert grown <= 4 * kept + STORE_OVERHEAD, f"{grown} store bytes for {kept} bytes of output"
    assert_still_serves(client)


def test_interleaved_stdout_and_stderr_keep_their_order(client: httpx.Client) -> None:
    """Writes alternating between stdout and stderr come back through the stream in the order made."""
    code = dedent(
        """
        import os, time
        for i in range(30):
            os.write(1 + i % 2, f"{i};".encode())
            time.sleep(0.02)
        """
    )
    result = run(client, code).result
    assert result["status"] == "succeeded", result
    seen: list[tuple[str, str]] = []
    event = ""
    with client.stream("GET", f"/status/{result['id']}/stream") as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            field, _, value = line.partition(": ")
            if field == "event":
                event = value
            elif field == "data" and event in ("stdout", "stderr"):
                seen.append((event, json.loads(value)["text"]))
    streams = [stream for stream, _ in seen]
    assert "".join(text for _, text in seen) == "".join(f"{i};" for i in range(30))
    assert streams == [("stdout", "stderr")[i % 2] for i in range(30)]
