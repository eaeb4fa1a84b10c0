"""What a program sees and what the service reports about it, through the real service and runner image."""

from __future__ import annotations

import hashlib
import json
import struct
import time
from textwrap import dedent

import httpx
import pytest
from support.live import MAX_OUTPUT_BYTES, WarmpodServer, run_json

pytestmark = pytest.mark.integration

# The names every module namespace may hold before its code defines anything.
MODULE_DUNDERS = frozenset(
    {
        "__name__",
        "__doc__",
        "__package__",
        "__loader__",
        "__spec__",
        "__annotations__",
        "__builtins__",
        "__file__",
        "__cached__",
    }
)


def test_trivial_run_reports_every_field(client: httpx.Client) -> None:
    """A program that prints and exits 0 succeeds with exactly its output and no limit hit."""
    result = run_json(client, "print(1)")
    assert result["status"] == "succeeded"
    assert result["exit_code"] == 0
    assert result["stdout"] == "1\n"
    assert result["stderr"] == ""
    assert result["stdout_truncated"] is False
    assert result["stderr_truncated"] is False
    assert result["limits_hit"] == []
    assert isinstance(result["duration_ms"], float)
    assert result["duration_ms"] > 0
    assert result["error"] is None
    assert isinstance(result["id"], str)
    assert result["id"]


def test_run_ids_differ(client: httpx.Client) -> None:
    """Every run gets its own id."""
    ids = {run_json(client, "pass")["id"] for _ in range(3)}
    assert len(ids) == 3


def test_stdin_is_fed(client: httpx.Client) -> None:
    """The request's stdin is what input() reads, line by line."""
    code = "print(input().upper())\nprint(input())"
    result = run_json(client, code, stdin="hello\nworld\n")
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "HELLO\nworld\n"


def test_stdin_larger_than_a_pipe_buffer_is_read_fully(client: httpx.Client) -> None:
    """Stdin of 200 KB, three times a pipe buffer, reaches the program whole and in order."""
    stdin = "".join(chr(97 + i % 26) for i in range(200_000))
    code = dedent(
        """
        import hashlib, sys
        data = sys.stdin.buffer.read()
        print(len(data), hashlib.sha256(data).hexdigest())
        """
    )
    result = run_json(client, code, stdin=stdin)
    assert result["status"] == "succeeded", result
    assert result["stdout"] == f"{len(stdin)} {hashlib.sha256(stdin.encode()).hexdigest()}\n"


def test_empty_stdin_is_end_of_file(client: httpx.Client) -> None:
    """A program that reads stdin when none was sent gets end-of-file at once instead of hanging."""
    result = run_json(client, "import sys\nprint(repr(sys.stdin.read()))", timeout=5)
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "''\n"


def test_stdout_and_stderr_are_separate(client: httpx.Client) -> None:
    """What a program writes to stderr comes back in stderr only, and stdout in stdout only."""
    code = "import sys\nprint('to out')\nprint('to err', file=sys.stderr)\nprint('out again')"
    result = run_json(client, code)
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "to out\nout again\n"
    assert result["stderr"] == "to err\n"


def test_nonzero_exit_is_failed(client: httpx.Client) -> None:
    """sys.exit(3) is a failed run with exit code 3 and the output printed before it."""
    result = run_json(client, "import sys\nprint('before')\nsys.exit(3)")
    assert result["status"] == "failed"
    assert result["exit_code"] == 3
    assert result["stdout"] == "before\n"
    assert result["limits_hit"] == []
    assert result["error"] is None


def test_uncaught_exception_shows_the_programs_traceback(client: httpx.Client) -> None:
    """An uncaught exception fails with exit 1 and a traceback of main.py alone, as Python prints it."""
    code = "def inner():\n    raise ValueError('boom')\n\ninner()\n"
    result = run_json(client, code)
    assert result["status"] == "failed"
    assert result["exit_code"] == 1
    stderr = result["stderr"]
    assert stderr.startswith(
        'Traceback (most recent call last):\n  File "/work/main.py", line 4, in <module>\n'
    )
    assert 'File "/work/main.py", line 2, in inner' in stderr
    assert stderr.endswith("ValueError: boom\n")
    assert "_warmpod_boot" not in stderr
    assert "<string>" not in stderr


def test_killed_by_signal_is_negative_exit(client: httpx.Client) -> None:
    """A program killed by SIGKILL fails with exit code -9."""
    result = run_json(client, "import os\nprint('alive', flush=True)\nos.kill(os.getpid(), 9)")
    assert result["status"] == "failed"
    assert result["exit_code"] == -9
    assert result["stdout"] == "alive\n"
    assert result["limits_hit"] == []


def test_syntax_error_is_reported_like_python(client: httpx.Client) -> None:
    """A syntax error fails with exit 1 and Python's report naming main.py, without the agent's bootstrap."""
    result = run_json(client, "x = 1\ny = (\n")
    assert result["status"] == "failed"
    assert result["exit_code"] == 1
    stderr = result["stderr"]
    assert 'File "/work/main.py", line 2' in stderr
    assert "SyntaxError" in stderr
    assert "_warmpod_boot" not in stderr, stderr
    assert "<string>" not in stderr, stderr


def test_runs_as_main_py_in_work(client: httpx.Client) -> None:
    """The program runs as __main__ from /work/main.py with argv ['main.py'], as `python main.py` would."""
    code = dedent(
        """
        import json, os, sys
        print(json.dumps([__name__, sys.argv, __file__, os.getcwd()]))
        """
    )
    result = run_json(client, code)
    assert result["status"] == "succeeded", result
    assert json.loads(result["stdout"]) == ["__main__", ["main.py"], "/work/main.py", "/work"]


def test_runs_unprivileged(client: httpx.Client) -> None:
    """The program runs with no root uid, gid or supplementary group."""
    code = dedent(
        """
        import json, os
        print(json.dumps([os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]))
        """
    )
    result = run_json(client, code)
    assert result["status"] == "succeeded", result
    uid, euid, gid, egid, groups = json.loads(result["stdout"])
    assert 0 not in {uid, euid, gid, egid}
    assert 0 not in groups


def test_globals_hold_only_what_the_program_defined(client: httpx.Client) -> None:
    """The program's globals are the module dunders plus its own names, nothing of the bootstrap."""
    code = dedent(
        """
        import json
        answer = 42
        def helper():
            pass
        print(json.dumps(sorted(globals())))
        """
    )
    result = run_json(client, code)
    assert result["status"] == "succeeded", result
    names = set(json.loads(result["stdout"]))
    assert names - MODULE_DUNDERS == {"json", "answer", "helper"}
    assert {"__name__", "__doc__", "__builtins__", "__file__"} <= names


def test_timeout_stops_the_program_and_keeps_its_output(server: WarmpodServer, client: httpx.Client) -> None:
    """A program past its timeout is stopped and reported with what it printed, within timeout + 1 s."""
    server.wait_pool_full()
    code = "import time\nprint('partial', flush=True)\ntime.sleep(30)"
    started = time.monotonic()
    result = run_json(client, code, timeout=1)
    elapsed = time.monotonic() - started
    assert result["status"] == "timeout"
    assert "wall_time" in result["limits_hit"]
    assert "partial" in result["stdout"]
    assert result["exit_code"] == -9
    assert result["error"] is None
    assert elapsed < 2.0


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_cap_truncates_and_stops(client: httpx.Client, stream: str) -> None:
    """A stream past max_output_bytes is cut at the cap, flagged, and the program is stopped early."""
    other = "stderr" if stream == "stdout" else "stdout"
    code = dedent(
        f"""
        import sys, time
        sys.{stream}.write("x" * {2 * MAX_OUTPUT_BYTES})
        sys.{stream}.flush()
        time.sleep(30)
        """
    )
    started = time.monotonic()
    result = run_json(client, code, timeout=15)
    assert time.monotonic() - started < 10
    assert result["status"] == "failed"
    assert result["exit_code"] == -9
    assert result["limits_hit"] == ["output"]
    assert result[f"{stream}_truncated"] is True
    assert result[stream] == "x" * MAX_OUTPUT_BYTES
    assert result[f"{other}_truncated"] is False
    assert result[other] == ""


def test_undecodable_output_is_replaced(client: httpx.Client) -> None:
    """Bytes that are not UTF-8 come back as U+FFFD, the rest of the output intact."""
    result = run_json(client, "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe ok')")
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "\ufffd\ufffd ok"


def test_fake_protocol_frames_are_just_output(client: httpx.Client) -> None:
    """A program printing an agent 'result' frame cannot forge its result: exit 7 and its bytes verbatim."""
    code = dedent(
        """
        import json, struct, sys
        body = json.dumps({
            "type": "result", "exit_code": 0, "stdout": "", "stderr": "",
            "stdout_truncated": False, "stderr_truncated": False,
            "limits_hit": [], "duration_ms": 1.0, "error": None,
        }).encode()
        sys.stdout.buffer.write(struct.pack(">I", len(body)) + body)
        sys.stdout.flush()
        sys.exit(7)
        """
    )
    body = json.dumps(
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
    result = run_json(client, code)
    assert result["status"] == "failed"
    assert result["exit_code"] == 7
    assert result["stdout"] == (struct.pack(">I", len(body)) + body).decode("utf-8", "replace")


def test_numpy_and_pandas_compute(client: httpx.Client) -> None:
    """The runner image's numpy and pandas import and compute."""
    code = dedent(
        """
        import numpy as np
        import pandas as pd
        a = np.arange(10)
        frame = pd.DataFrame({"x": a, "y": a ** 2})
        print(int(a.sum()), int(frame["y"].sum()), frame.shape, float(frame["x"].mean()))
        """
    )
    result = run_json(client, code, timeout=15)
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "45 285 (10, 2) 4.5\n"
