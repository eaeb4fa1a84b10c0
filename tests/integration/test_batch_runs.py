"""Batches against the real service: every run of a batch runs in a sandbox of its own and reports
its own result."""

from __future__ import annotations

import httpx
import pytest
from support.live import WarmpodServer
from support.waiting import until

from warmpod.client import AsyncClient, BatchRun, Client

pytestmark = pytest.mark.integration


def test_each_run_of_a_batch_reports_its_own_result(server: WarmpodServer) -> None:
    """Three runs sent as one batch all run: each status reports its own output, stdin, exit code
    and labels, in the order sent."""
    runs: list[BatchRun] = [
        {"code": "print('first')", "labels": {"n": "0"}},
        {"code": "import sys; print(sys.stdin.read().upper())", "stdin": "second", "labels": {"n": "1"}},
        {"code": "raise SystemExit(3)", "labels": {"n": "2"}},
    ]
    with Client(server.url) as warmpod:
        accepted = warmpod.submit_batch(runs)
        results = []
        for run in accepted:
            *_, result = warmpod.stream(run.id)
            results.append(warmpod.status(run.id))
            assert result == results[-1]
    assert [(r.status, r.exit_code, r.stdout, r.labels) for r in results] == [
        ("succeeded", 0, "first\n", {"n": "0"}),
        ("succeeded", 0, "SECOND\n", {"n": "1"}),
        ("failed", 3, "", {"n": "2"}),
    ]


async def test_a_batch_refused_whole_runs_nothing(server: WarmpodServer) -> None:
    """A batch whose last run breaks a rule is a 422 naming it, and its other runs never run: the
    key's history holds none of them."""
    marker = {"batch": "refused-whole"}
    body = {"runs": [{"code": "print(1)", "labels": marker}, {"code": "print(2)", "timeout": 10_000}]}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.post("/runs/batch", json=body)
        assert response.status_code == 422, response.text
        assert "runs[1]" in response.json()["detail"]
    async with AsyncClient(server.url) as warmpod:
        accepted = await warmpod.submit_batch(["print(3)"])

        async def ended() -> bool:
            return (await warmpod.status(accepted[0].id)).status == "succeeded"

        await until(ended, 60, interval=0.2)
        assert [run async for run in warmpod.runs(label=marker)] == []
