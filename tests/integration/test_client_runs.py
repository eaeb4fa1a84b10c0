"""warmpod.client against the real service: output as it is printed, files both ways, sync and async."""

from __future__ import annotations

import base64
import time
from textwrap import dedent

import pytest
from support.live import WarmpodServer

from warmpod.client import AsyncClient, Client
from warmpod.models import FileEvent

pytestmark = pytest.mark.integration

PAUSED = dedent(
    """
    import sys, time
    print("before", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    time.sleep(1.5)
    print("after")
    """
)

REPORT = dedent(
    """
    import csv
    rows = list(csv.DictReader(open("data/sales.csv")))
    total = sum(float(row["amount"]) for row in rows)
    open("out/total.txt", "w").write(f"{total:.2f}\\n")
    print(len(rows), "rows")
    """
)


def test_run_streams_output_before_the_result(server: WarmpodServer) -> None:
    seen: list[tuple[str, str, float]] = []
    with Client(server.url) as warmpod:
        result = warmpod.run(
            PAUSED,
            on_stdout=lambda text: seen.append(("out", text, time.monotonic())),
            on_stderr=lambda text: seen.append(("err", text, time.monotonic())),
        )
    done = time.monotonic()
    assert result.status == "succeeded"
    assert result.stdout == "before\nafter\n"
    assert result.stderr == "to stderr\n"
    assert "".join(text for stream, text, _ in seen if stream == "out") == "before\nafter\n"
    assert "".join(text for stream, text, _ in seen if stream == "err") == "to stderr\n"
    assert seen[0][1] == "before\n"
    assert done - seen[0][2] > 1.0  # the first line came while the program slept


def test_files_in_and_out(server: WarmpodServer) -> None:
    told: list[FileEvent] = []
    sales = b"region,amount\nnorth,12.5\nsouth,7.25\n"
    with Client(server.url) as warmpod:
        result = warmpod.run(REPORT, files=[("data/sales.csv", sales)], on_file=told.append)
        assert result.status == "succeeded", result
        assert result.stdout == "2 rows\n"
        (entry,) = result.files
        assert (entry.path, entry.media_type) == ("out/total.txt", "text/plain")
        assert entry.content is not None
        assert base64.b64decode(entry.content) == b"19.75\n"
        assert warmpod.file(result.id, "out/total.txt") == b"19.75\n"
    assert [event.path for event in told] == ["out/total.txt"]


async def test_async_run_with_async_callbacks(server: WarmpodServer) -> None:
    printed: list[str] = []

    async def on_stdout(text: str) -> None:
        printed.append(text)

    async with AsyncClient(server.url) as warmpod:
        result = await warmpod.run("print(input())", stdin="echoed\n", on_stdout=on_stdout)
        assert result.status == "succeeded"
        assert printed == ["echoed\n"]
        health = await warmpod.health()
        assert health.status == "ok"
        assert (await warmpod.environment()).python.startswith("3.13")
