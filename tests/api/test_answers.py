"""Bounded answers: however many files a run left, an answer about it carries a bounded amount inline."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.fakes import RecordingRunner

from warmpod.sandbox.protocol import FileChunk
from warmpod.settings import Settings

# Within INLINE each, more than this together: the budget, not the per-file cap, decides.
BUDGET = 20


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The API suite's settings with an answer's inline budget of BUDGET bytes."""
    return msgspec.structs.replace(
        settings, files=msgspec.structs.replace(settings.files, inline_total_bytes=BUDGET)
    )


async def test_files_past_the_answers_budget_come_as_links(
    client: AsyncTestClient[Litestar], runner: RecordingRunner
) -> None:
    """Every answer (the blocking result, the status and the stream's result) inlines files in path
    order while they fit in the budget, and gives each file a URL its bytes download from."""
    left_files = {
        "out/a.txt": b"a" * 10,
        "out/b c.txt": b"b" * 12,
        "out/d.txt": b"d" * 8,
        "out/e.bin": b"e" * 99,
    }
    runner.left = [FileChunk(path=path, data=data, end=True) for path, data in left_files.items()]
    body = (await client.post("/run-json/", json={"code": "pass"})).json()
    inline = {f["path"]: f["content"] for f in body["files"]}
    # a fits (10 left); b does not (12); d does (2 left); e is above the per-file cap.
    assert inline == {
        "out/a.txt": base64.b64encode(b"a" * 10).decode(),
        "out/b c.txt": None,
        "out/d.txt": base64.b64encode(b"d" * 8).decode(),
        "out/e.bin": None,
    }
    assert sum(f["size"] for f in body["files"] if f["content"] is not None) <= BUDGET
    for entry in body["files"]:
        download = await client.get(entry["url"])
        assert download.status_code == 200, entry
        assert download.content == left_files[entry["path"]]
    assert body["files"][1]["url"] == f"/status/{body['id']}/files/out/b%20c.txt"
    assert (await client.get(f"/status/{body['id']}")).json() == body
    stream = (await client.get(f"/status/{body['id']}/stream")).text
    result = next(block for block in stream.split("\r\n\r\n") if "event: result" in block)
    assert json.loads(result.split("data: ", 1)[1]) == body
