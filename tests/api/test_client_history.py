"""The client and the CLI on run history: labels on a run, ``runs`` across pages, ``warmpod runs``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support.fakes import RecordingRunner

from warmpod.cli import main
from warmpod.client import AsyncClient, Client, RunResult


def test_runs_iterates_across_pages_with_filters(live: str, runner: RecordingRunner) -> None:
    """Seven runs read three a page come back newest first, each once; labels and times filter."""
    with Client(live) as client:
        ids = [client.run("1", labels={"n": str(i), "team": "a" if i % 2 else "b"}).id for i in range(7)]
        assert [run.id for run in client.runs(page_size=3)] == ids[::-1]
        assert [run.id for run in client.runs(label={"team": "a"}, page_size=2)] == ids[1::2][::-1]
        assert [run.id for run in client.runs(label=["team=b", "n=4"], status="succeeded")] == [ids[4]]
        assert list(client.runs(since=datetime(2999, 1, 1, tzinfo=UTC))) == []
        assert len(list(client.runs(until=4102444800, status=["succeeded", "failed"]))) == 7
        first = next(iter(client.runs()))
        assert (first.labels, first.exit_code, first.environment) == ({"n": "6", "team": "b"}, 0, "default")


async def test_async_runs_iterates_across_pages(live: str, runner: RecordingRunner) -> None:
    """The async client pages the same way."""
    async with AsyncClient(live) as client:
        ids = [(await client.submit("1", labels={"k": "v"})).id for _ in range(3)]
        assert [run.id async for run in client.runs(page_size=2, label={"k": "v"})][::-1] == ids


def test_warmpod_runs_prints_a_table_or_json(
    live: str, runner: RecordingRunner, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`warmpod run --label` keeps the labels; `warmpod runs` prints id, status, environment,
    created and labels, filtered by --label and --status, at most --limit, or JSON."""
    with Client(live) as client:
        client.run("1")
    script = tmp_path / "report.py"
    script.write_text("print(1)\n")
    assert main(["run", "--server", live, "--label", "team=ops", "--no-wait", str(script)]) == 0
    labelled = capsys.readouterr().out.strip()
    with Client(live) as client:
        *_, ended = client.stream(labelled)  # to its end, so that --status succeeded picks it
        assert isinstance(ended, RunResult)
        assert ended.labels == {"team": "ops"}
        client.run("1", labels={"team": "other"})
    assert main(["runs", "--server", live, "--label", "team=ops", "--status", "succeeded"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "ENVIRONMENT", "CREATED", "LABELS"]
    assert lines[1].split()[0] == labelled
    assert lines[1].split()[-1] == "team=ops"
    assert main(["runs", "--server", live, "--limit", "1", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 1
    assert listed[0]["labels"] == {"team": "other"}
    assert main(["runs", "--server", live, "--status", "done"]) == 125
    assert "unknown status" in capsys.readouterr().err
