"""``warmpod run DIR/`` and the program's options, in this process against the live app (fake pool)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.apitest import write_secrets
from support.fakes import RecordingRunner

from warmpod.cli import main
from warmpod.sandbox.protocol import FileChunk
from warmpod.secrets import Secrets
from warmpod.service import Service


def warmpod(live: str, *args: str) -> int:
    """``warmpod run ARGS`` with ``--server`` pointing at the live app."""
    return main(["run", "--server", live, *args])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A report whose entrypoint is in a package, with a data file and an ignored scratch file."""
    root = tmp_path / "report"
    for path, text in {
        "report/__init__.py": "",
        "report/run.py": "from report import sums\n",
        "report/sums.py": "def total(xs): return sum(xs)\n",
        "sales.csv": "1\n2\n",
        "scratch.tmp": "ignored\n",
        ".warmpodignore": "*.tmp\n",
    }.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def test_a_directory_is_sent_as_a_project_with_its_program_options(
    live: str, runner: RecordingRunner, project: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``warmpod run DIR/`` sends the directory's files but the ignored, no code, the entrypoint, each
    --arg in order and each --env; what the run leaves in out/ is saved as for a script."""
    runner.left = [FileChunk(path="out/summary.txt", data=b"3\n", end=True)]
    saved = tmp_path / "results"
    args = ["--entrypoint", "report/run.py", "--arg", "2026-11", "--arg=--region", "--arg", "north"]
    args += ["--env", "TITLE=Sales", "--env", "QUERY=a=b", "--out", str(saved)]
    assert warmpod(live, f"{project}/", *args) == 0
    (spec,) = runner.specs
    assert [path for path, _ in spec.files] == [
        "report/__init__.py",
        "report/run.py",
        "report/sums.py",
        "sales.csv",
    ]
    assert (spec.code, spec.entrypoint) == (b"", "report/run.py")
    assert spec.args == ("2026-11", "--region", "north")
    assert spec.env == (("TITLE", "Sales"), ("QUERY", "a=b"))
    assert (saved / "summary.txt").read_bytes() == b"3\n"
    assert "1 file(s) saved" in capsys.readouterr().err


def test_a_secret_is_asked_for_by_name(
    live: str,
    runner: RecordingRunner,
    service: Service,
    project: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--secret sends the name alone; a server without that secret answers 403 naming it (exit 125)."""
    args = [str(project), "--entrypoint", "report/run.py", "--secret", "WAREHOUSE_DSN"]
    assert warmpod(live, *args) == 125
    assert "403 Secret not allowed" in capsys.readouterr().err
    assert runner.specs == []
    service.secrets = Secrets(write_secrets(tmp_path / "secrets", {"WAREHOUSE_DSN": "postgres://w/h"}))
    assert warmpod(live, *args) == 0
    assert runner.specs[0].secrets == ("WAREHOUSE_DSN",)


def test_a_script_takes_the_program_options_too(live: str, runner: RecordingRunner, tmp_path: Path) -> None:
    """``warmpod run FILE.py`` sends the file as code, with --arg and --env, at --entrypoint if named."""
    script = tmp_path / "report.py"
    script.write_text("print('report')\n")
    assert warmpod(live, str(script), "--arg", "x y", "--env", "N=1") == 0
    assert warmpod(live, str(script), "--entrypoint", "tools/report.py") == 0
    first, second = runner.specs
    assert (first.code, first.entrypoint, first.args, first.env) == (
        b"print('report')\n",
        "main.py",
        ("x y",),
        (("N", "1"),),
    )
    assert (second.code, second.entrypoint) == (b"print('report')\n", "tools/report.py")


def test_a_project_without_its_entrypoint_is_refused_before_sending(
    live: str, runner: RecordingRunner, project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A directory without main.py (or the --entrypoint named, or with it ignored) exits 125 saying so."""
    assert warmpod(live, str(project)) == 125
    err = capsys.readouterr().err
    assert "main.py is not among the files" in err
    assert "--entrypoint" in err
    (project / ".warmpodignore").write_text("report/run.py\n")
    assert warmpod(live, str(project), "--entrypoint", "report/run.py") == 125
    assert "report/run.py is not among the files" in capsys.readouterr().err
    assert runner.specs == []


def test_a_project_over_the_client_bounds_is_refused_before_sending(
    live: str, runner: RecordingRunner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """More files than the server's default cap (100) exit 125, pointing at .warmpodignore."""
    root = tmp_path / "many"
    root.mkdir()
    for index in range(101):
        (root / f"m{index:03}.py").write_text("")
    assert warmpod(live, str(root)) == 125
    assert "more than 100 files to send; leave some out in its .warmpodignore" in capsys.readouterr().err
    assert runner.specs == []


def test_bad_env_options_are_refused(live: str, project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--env without '=' is a usage error (exit 2); one name given twice exits 125."""
    with pytest.raises(SystemExit) as usage:
        warmpod(live, str(project), "--env", "NOEQUALS")
    assert usage.value.code == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
    entry = ["--entrypoint", "report/run.py"]
    assert warmpod(live, str(project), *entry, "--env", "A=1", "--env", "A=2") == 125
    assert "--env gives A twice" in capsys.readouterr().err
