"""``warmpod run``, ``status``, ``cancel`` and ``logs`` in this process, against the live app (fake pool)."""

from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support.apitest import POOL_SIZE
from support.fakes import CANNED, RecordingRunner
from support.live import free_port

from warmpod.cli import main
from warmpod.client import Client
from warmpod.sandbox.protocol import FileChunk, Output


@pytest.fixture
def script(tmp_path: Path) -> Path:
    """A script file to run (the fake runner does not read it)."""
    path = tmp_path / "report.py"
    path.write_text("print('report')\n")
    return path


def warmpod(live: str, *args: str) -> int:
    """``warmpod ARGS`` with ``--server`` pointing at the live app."""
    command, *rest = args
    return main([command, "--server", live, *rest])


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, 0),
        ({"status": "failed", "exit_code": 3}, 3),
        ({"status": "timeout", "exit_code": -9, "limits_hit": ["wall_time"]}, 124),
        ({"status": "failed", "exit_code": -24, "limits_hit": ["cpu_time"]}, 124),
        ({"status": "failed", "exit_code": -9, "limits_hit": ["memory"]}, 137),
        ({"status": "failed", "exit_code": -11}, 139),
        ({"status": "failed", "exit_code": 1, "limits_hit": ["pids"]}, 1),
        ({"status": "error", "exit_code": None, "error": "the sandbox died"}, 125),
    ],
)
def test_the_exit_status_says_how_the_run_ended(
    live: str,
    runner: RecordingRunner,
    script: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
    expected: int,
) -> None:
    runner.result = msgspec.structs.replace(CANNED, **changes)
    assert warmpod(live, "run", str(script)) == expected
    out, err = capsys.readouterr()
    assert out == ""  # nothing was streamed: the result's stdout is not printed again
    if expected:
        assert re.search(rf"warmpod: run [0-9a-f]{{32}} ended {changes['status']}", err), err
    if "error" in changes:
        assert "the sandbox died" in err


def test_output_goes_to_the_matching_stream(
    live: str, runner: RecordingRunner, script: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner.streamed = [
        Output(stream="stdout", data="first é\n".encode()),
        Output(stream="stderr", data=b"warning\n"),
        Output(stream="stdout", data=b"second\n"),
    ]
    assert warmpod(live, "run", str(script)) == 0
    out, err = capsys.readouterr()
    assert out == "first é\nsecond\n"
    # Not a terminal: no spinner, and nothing of warmpod's own for a run that succeeded.
    assert err == "warning\n"


def test_json_prints_the_result_and_no_wait_the_id(
    live: str, runner: RecordingRunner, script: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner.streamed = [Output(stream="stdout", data=b"live\n")]
    assert warmpod(live, "run", str(script), "--json") == 0
    out, _ = capsys.readouterr()
    result = json.loads(out)
    assert result["status"] == "succeeded"
    assert "live" not in out.replace(result["stdout"], "")
    assert warmpod(live, "run", str(script), "--no-wait") == 0
    run_id = capsys.readouterr().out.strip()
    assert re.fullmatch("[0-9a-f]{32}", run_id)
    assert warmpod(live, "status", run_id) == 0
    assert json.loads(capsys.readouterr().out)["id"] == run_id
    assert warmpod(live, "logs", run_id, "--follow") == 0
    assert capsys.readouterr().out == "live\n"


def test_stdin_and_files_are_sent(
    live: str,
    runner: RecordingRunner,
    script: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "sales.csv"
    data.write_bytes(b"a,b\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from a pipe\n")))
    args = ["run", str(script), "--stdin", "-", "--file", str(data), "--file", f"{data}:in/renamed.csv"]
    assert warmpod(live, *args, "--timeout", "2.5", "--memory-mb", "200") == 0
    assert runner.calls == [(b"print('report')\n", b"from a pipe\n", 2.5)]
    assert runner.files == [(("sales.csv", b"a,b\n"), ("in/renamed.csv", b"a,b\n"))]
    assert runner.run_limits[0].memory_mb == 200


def test_files_left_in_out_are_saved(
    live: str, runner: RecordingRunner, script: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = bytes(range(256))  # above the inline cap: downloaded by path
    runner.left = [
        FileChunk(path="out/chart.png", data=b"\x89PNG", end=True),
        FileChunk(path="out/tables/big.bin", data=big, end=True),
    ]
    target = tmp_path / "results"
    assert warmpod(live, "run", str(script), "--out", str(target)) == 0
    assert (target / "chart.png").read_bytes() == b"\x89PNG"
    assert (target / "tables" / "big.bin").read_bytes() == big
    assert "2 file(s) saved" in capsys.readouterr().err


def test_a_run_without_files_makes_no_out_directory(
    live: str, script: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert warmpod(live, "run", str(script)) == 0
    assert not (tmp_path / "out").exists()


def test_warmpods_own_failures_exit_125_with_the_reason(
    live: str, script: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert warmpod(live, "run", str(script), "--timeout", "100000") == 125
    assert "422 Limit out of range" in capsys.readouterr().err
    assert main(["run", "--server", f"http://127.0.0.1:{free_port()}", str(script)]) == 125
    assert "warmpod: " in capsys.readouterr().err
    assert warmpod(live, "run", str(script) + ".missing") == 125
    assert "No such file" in capsys.readouterr().err
    assert warmpod(live, "status", "0" * 32) == 125
    assert "404 No such run" in capsys.readouterr().err


def test_cancel_stops_a_run(
    live: str, runner: RecordingRunner, script: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runner.hold = threading.Event()
    try:
        assert warmpod(live, "run", str(script), "--no-wait") == 0
        run_id = capsys.readouterr().out.strip()
        assert warmpod(live, "cancel", run_id) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
        assert warmpod(live, "logs", run_id, "--follow") == 125
    finally:
        runner.hold.set()


def test_a_spinner_shows_on_a_terminals_stderr_while_queued_and_never_on_stdout(
    live: str, runner: RecordingRunner, script: Path
) -> None:
    runner.hold = threading.Event()
    runner.streamed = [Output(stream="stdout", data=b"done\n")]
    try:
        with Client(live) as client:
            for _ in range(POOL_SIZE):  # every worker busy: the next run waits in the queue
                client.submit("x")
        primary, secondary = os.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "warmpod", "run", "--server", live, str(script)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=secondary,
        )
        os.close(secondary)
        seen = b""
        deadline = time.monotonic() + 30
        while b"queued (run" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                seen += os.read(primary, 4096)
        assert b"queued (run" in seen
        runner.hold.set()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert out == b"done\n"
        assert b"queued" not in out
        assert b"\r" not in out
        os.close(primary)
    finally:
        runner.hold.set()
