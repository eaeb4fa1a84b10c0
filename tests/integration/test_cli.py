"""``warmpod run`` as a user runs it, a subprocess against the real service and real sandboxes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from textwrap import dedent

import pytest
from support.live import MAX_TIMEOUT, SLOWNESS, WarmpodServer

pytestmark = pytest.mark.integration

# A run's first answer arrives within this (a wall-time bound on a prompt answer).
ANSWER = 60.0 * SLOWNESS

BOTH_STREAMS = dedent(
    """
    import sys, time
    print("out one", flush=True)
    print("err one", file=sys.stderr, flush=True)
    time.sleep(2)
    print("out two")
    print("err two", file=sys.stderr)
    sys.exit(3)
    """
)


def warmpod_run(
    server: WarmpodServer, *args: str, stdin: int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """``warmpod run --server URL ARGS`` as a child process, its streams piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "warmpod", "run", "--server", server.url, *args],
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def script(tmp_path: Path, source: str, name: str = "main.py") -> str:
    path = tmp_path / name
    path.write_text(source)
    return str(path)


def test_output_is_live_each_stream_on_its_own_and_the_exit_status_the_programs(
    server: WarmpodServer, tmp_path: Path
) -> None:
    proc = warmpod_run(server, script(tmp_path, BOTH_STREAMS))
    assert proc.stdout is not None
    first = proc.stdout.readline()
    first_at = time.monotonic()
    assert first == b"out one\n"
    # The program still sleeps before its second line: the first came while it ran.
    assert proc.poll() is None
    rest, err = proc.communicate(timeout=ANSWER)
    assert time.monotonic() - first_at > 1.0
    assert rest == b"out two\n"
    assert proc.returncode == 3
    lines = err.decode().splitlines()
    assert lines[:2] == ["err one", "err two"], err
    assert re.fullmatch("warmpod: run [0-9a-f]{32} ended failed", lines[2]), err


def test_a_timeout_exits_124(server: WarmpodServer, tmp_path: Path) -> None:
    proc = warmpod_run(server, "--timeout", "1", script(tmp_path, "import time\ntime.sleep(30)\n"))
    _, err = proc.communicate(timeout=ANSWER)
    assert proc.returncode == 124, err
    assert b"ended timeout (wall_time)" in err


def test_a_memory_kill_exits_137(server: WarmpodServer, tmp_path: Path) -> None:
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"
    proc = warmpod_run(server, "--memory-mb", "128", "--timeout", str(MAX_TIMEOUT), script(tmp_path, hog))
    _, err = proc.communicate(timeout=ANSWER + MAX_TIMEOUT)
    assert proc.returncode == 137, err
    assert b"(memory)" in err


def test_stdin_dash_feeds_the_program(server: WarmpodServer, tmp_path: Path) -> None:
    source = "import sys\nprint(sys.stdin.read().upper(), end='')\n"
    proc = warmpod_run(server, "--stdin", "-", script(tmp_path, source), stdin=subprocess.PIPE)
    out, err = proc.communicate(b"piped in\nand more\n", timeout=ANSWER)
    assert (proc.returncode, out) == (0, b"PIPED IN\nAND MORE\n"), err


def test_files_go_in_and_what_it_leaves_in_out_is_saved(server: WarmpodServer, tmp_path: Path) -> None:
    data = tmp_path / "numbers.csv"
    data.write_text("1\n2\n3\n")
    source = dedent(
        """
        import os
        total = sum(int(line) for line in open("in/numbers.csv"))
        os.makedirs("out/tables")
        open("out/total.txt", "w").write(f"{total}\\n")
        open("out/tables/raw.bin", "wb").write(bytes(range(256)) * 8192)
        print("done")
        """
    )
    saved = tmp_path / "results"
    proc = warmpod_run(
        server, "--file", f"{data}:in/numbers.csv", "--out", str(saved), script(tmp_path, source)
    )
    out, err = proc.communicate(timeout=ANSWER)
    assert (proc.returncode, out) == (0, b"done\n"), err
    assert (saved / "total.txt").read_text() == "6\n"
    # 2 MiB: above the inline cap of the result, so it was downloaded by its path.
    assert (saved / "tables" / "raw.bin").read_bytes() == bytes(range(256)) * 8192
    assert b"2 file(s) saved" in err


def test_no_wait_then_logs_follow(server: WarmpodServer, tmp_path: Path) -> None:
    proc = warmpod_run(server, "--no-wait", script(tmp_path, "print('later')\n"))
    out, err = proc.communicate(timeout=ANSWER)
    assert proc.returncode == 0, err
    run_id = out.decode().strip()
    logs = subprocess.run(
        [sys.executable, "-m", "warmpod", "logs", "--server", server.url, "--follow", run_id],
        capture_output=True,
        timeout=ANSWER,
        check=False,
    )
    assert (logs.returncode, logs.stdout) == (0, b"later\n"), logs.stderr


def test_a_project_directory_runs_and_its_out_files_come_back(server: WarmpodServer, tmp_path: Path) -> None:
    """``warmpod run DIR/`` with its entrypoint in a package, an --arg and an --env: the package's two
    modules import, the data file is read, the ignored file never arrives, and out/ is saved."""
    root = tmp_path / "report"
    files = {
        "report/__init__.py": "",
        "report/run.py": dedent(
            """
            import os, sys
            from report.sums import total
            from report.render import line

            month, = sys.argv[1:]
            numbers = [int(n) for n in open("data/sales.csv")]
            os.makedirs("out/tables")
            with open("out/tables/summary.txt", "w") as out:
                out.write(line(os.environ["REPORT_TITLE"], month, total(numbers)))
            print("ignored file sent:", os.path.exists("notes.tmp"))
            """
        ),
        "report/sums.py": "def total(numbers):\n    return sum(numbers)\n",
        "report/render.py": "def line(title, month, value):\n    return f'{title} {month}: {value}\\n'\n",
        "data/sales.csv": "3\n4\n5\n",
        "notes.tmp": "scratch\n",
        ".warmpodignore": "# scratch files stay here\n*.tmp\n",
    }
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    saved = tmp_path / "results"
    proc = warmpod_run(
        server,
        f"{root}/",
        "--entrypoint",
        "report/run.py",
        "--arg",
        "2026-11",
        "--env",
        "REPORT_TITLE=Sales",
        "--out",
        str(saved),
    )
    out, err = proc.communicate(timeout=ANSWER)
    assert (proc.returncode, out) == (0, b"ignored file sent: False\n"), err
    assert (saved / "tables" / "summary.txt").read_text() == "Sales 2026-11: 12\n"
    assert b"1 file(s) saved" in err
