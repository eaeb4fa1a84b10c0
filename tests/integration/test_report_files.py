"""Analytics runs through the real service: data files in, a chart and a table out, downloads and stream."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import struct
import zlib
from collections import defaultdict
from textwrap import dedent
from typing import Any

import httpx
import pytest
from support.live import ServerFactory, run_json

pytestmark = pytest.mark.integration

SALES = "region,product,amount\n" + "".join(
    f"{region},{product},{amount}\n"
    for region, product, amount in [
        ("north", "a", 12.5),
        ("south", "b", 7.25),
        ("north", "b", 3.0),
        ("east", "a", 20.0),
        ("south", "a", 1.75),
        ("east", "c", 4.5),
    ]
)

REPORT = dedent(
    """
    import pandas as pd
    import matplotlib.pyplot as plt

    sales = pd.read_csv("data/sales.csv")
    summary = sales.groupby("region", sort=True)["amount"].agg(["count", "sum"]).reset_index()
    summary.to_csv("out/summary.csv", index=False)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.bar(summary["region"], summary["sum"])
    ax.set_title("Sales by region")
    fig.savefig("out/chart.png")
    print(summary.to_string(index=False))
    """
)


def expected_summary() -> str:
    """The summary table the report must write, computed here without pandas."""
    totals: dict[str, list[float]] = defaultdict(list)
    for row in csv.DictReader(io.StringIO(SALES)):
        totals[row["region"]].append(float(row["amount"]))
    lines = ["region,count,sum"] + [f"{r},{len(v)},{sum(v)}" for r, v in sorted(totals.items())]
    return "\n".join(lines) + "\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG, after checking every chunk's CRC and that its pixels inflate to
    the size its header says (8-bit RGB or RGBA, as matplotlib writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
        if kind == b"IEND":
            break
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    channels = {2: 3, 6: 4}[color]
    assert depth == 8
    assert len(zlib.decompress(idat)) == height * (1 + width * channels)
    return width, height


def by_path(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The result's files by path."""
    return {f["path"]: f for f in result["files"]}


def test_a_report_run_returns_its_chart_and_table(client: httpx.Client) -> None:
    """A script reads an uploaded CSV with pandas and leaves a matplotlib chart and a summary CSV in
    out/: the result carries both (the PNG decodes, the CSV is exact), and both download as sent."""
    response = client.post(
        "/run-file/",
        files=[("file", ("report.py", REPORT.encode())), ("files", ("data/sales.csv", SALES.encode()))],
        # A report's own time, not the 10 s default: 0.5-0.8 s here, and in the User-Mode Linux
        # guest of tests/cgv2 (pandas and matplotlib imported, page faults ~50x dearer) it can run
        # past 10 s, rerun included.
        data={"timeout": "30"},
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "succeeded", result
    assert "north" in result["stdout"]
    files = by_path(result)
    assert set(files) == {"out/chart.png", "out/summary.csv"}
    assert result["files_truncated"] is False
    chart, table = files["out/chart.png"], files["out/summary.csv"]
    assert (chart["media_type"], table["media_type"]) == ("image/png", "text/csv")
    png = base64.b64decode(chart["content"])
    assert chart["size"] == len(png)
    assert png_size(png) == (320, 240)
    assert base64.b64decode(table["content"]).decode() == expected_summary()
    for entry in (chart, table):
        download = client.get(f"/status/{result['id']}/files/{entry['path']}")
        assert download.status_code == 200, download.text
        assert download.content == base64.b64decode(entry["content"])
        # Raster images keep their type; anything else downloads as bytes, never a page or a script.
        served = "image/png" if entry["media_type"] == "image/png" else "application/octet-stream"
        assert download.headers["content-type"].startswith(served)
        assert download.headers["x-content-type-options"] == "nosniff"


def test_json_runs_take_files_and_stream_file_events(client: httpx.Client) -> None:
    """Files sent as JSON are in the working directory; a run taken with wait=false streams one file
    event per file before its result, and its status carries the same files."""
    data = bytes(range(256)) * 512  # 128 KiB, every byte value, within the session's body limit
    code = dedent(
        """
        import hashlib, os
        data = open("in/blob.bin", "rb").read()
        os.makedirs("out/nested")
        open("out/nested/hash.txt", "w").write(hashlib.sha256(data).hexdigest())
        open("out/copy.bin", "wb").write(data[:1000])
        """
    )
    files = [{"path": "in/blob.bin", "content": base64.b64encode(data).decode()}]
    response = client.post("/run-json/", json={"code": code, "files": files, "wait": False})
    assert response.status_code == 202, response.text
    accepted = response.json()
    with client.stream("GET", accepted["stream_url"]) as stream:
        events = []
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
            if events and events[-1] == "result" and line.startswith("data: "):
                streamed = json.loads(line.removeprefix("data: "))
                break
    assert [e for e in events if e in ("file", "result")] == ["file", "file", "result"]
    status = client.get(accepted["status_url"]).json()
    assert status == streamed
    got = by_path(status)
    assert base64.b64decode(got["out/copy.bin"]["content"]) == data[:1000]
    digest = base64.b64decode(got["out/nested/hash.txt"]["content"]).decode()
    assert digest == hashlib.sha256(data).hexdigest()


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_100_mb_file_in_out_does_not_reach_the_server(start_server: ServerFactory) -> None:
    """A 100 MB file in out/ is over the collection cap: it is left behind, flagged, the files beside
    it still come back, and the server's memory does not grow by anything like its size."""
    live = start_server(WARMPOD_LIMITS__TMPFS_MB="160", WARMPOD_LIMITS__MEMORY_MB="512")
    live.wait_healthy()
    code = dedent(
        """
        chunk = b"x" * 2**20
        with open("out/huge.bin", "wb") as f:
            for _ in range(100):
                f.write(chunk)
        open("out/small.txt", "w").write("small")
        """
    )
    with httpx.Client(base_url=live.url, timeout=120) as client:
        run_json(client, "print(1)")
        before = rss_bytes(live.pid)
        result = run_json(client, code, timeout=30)
        after = rss_bytes(live.pid)
    assert result["status"] == "succeeded", result
    assert [f["path"] for f in result["files"]] == ["out/small.txt"]
    assert result["files_truncated"] is True
    assert after - before < 30 * 2**20, f"the server grew by {(after - before) / 2**20:.0f} MiB"
