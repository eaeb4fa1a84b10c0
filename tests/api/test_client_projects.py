"""warmpod.client runs projects against the live app (fake pool): entrypoint, args, env and secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.apitest import PROBLEMS, write_secrets
from support.fakes import RecordingRunner

from warmpod.client import AsyncClient, Client, ProblemError, ProjectError, project_files
from warmpod.secrets import Secrets
from warmpod.service import Service

DSN = "postgres://reports:hunter2@warehouse/sales"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A report in a package: its entrypoint, a module beside it, a data file and an ignored log."""
    root = tmp_path / "report"
    (root / "report").mkdir(parents=True)
    (root / "report" / "__init__.py").write_text("")
    (root / "report" / "run.py").write_text("from report import sums\n")
    (root / "report" / "sums.py").write_text("def total(xs): return sum(xs)\n")
    (root / "sales.csv").write_text("1\n2\n")
    (root / "debug.log").write_text("noise\n")
    (root / ".warmpodignore").write_text("*.log\n")
    return root


@pytest.fixture
def granted(service: Service, tmp_path: Path) -> str:
    """The server's secrets file holds WAREHOUSE_DSN (no keys file: every secret may be asked for)."""
    service.secrets = Secrets(write_secrets(tmp_path / "secrets", {"WAREHOUSE_DSN": DSN}))
    return "WAREHOUSE_DSN"


def test_a_project_directory_runs_its_entrypoint_with_args_env_and_secrets(
    live: str, runner: RecordingRunner, project: Path, granted: str
) -> None:
    """project_files sends a directory's files but the ignored ones; run sends entrypoint, args, env
    and the secrets' names, and no code."""
    with Client(live) as warmpod:
        result = warmpod.run(
            files=project_files(project),
            entrypoint="report/run.py",
            args=["2026-11", "--region", "north"],
            env={"REPORT_TITLE": "Sales"},
            secrets=[granted],
        )
    assert result.status == "succeeded"
    (spec,) = runner.specs
    assert [path for path, _ in spec.files] == [
        "report/__init__.py",
        "report/run.py",
        "report/sums.py",
        "sales.csv",
    ]
    assert dict(spec.files)["report/sums.py"] == b"def total(xs): return sum(xs)\n"
    assert (spec.code, spec.entrypoint) == (b"", "report/run.py")
    assert spec.args == ("2026-11", "--region", "north")
    assert spec.env == (("REPORT_TITLE", "Sales"),)
    assert spec.secrets == ("WAREHOUSE_DSN",)


async def test_async_submit_without_code_or_entrypoint_runs_main_py(
    live: str, runner: RecordingRunner
) -> None:
    """AsyncClient takes the same options; with neither code nor entrypoint the program is main.py."""
    async with AsyncClient(live) as warmpod:
        accepted = await warmpod.submit(files=[("main.py", b"import sys\n")], args=["a b"])
        result = await warmpod.run("print(1)", entrypoint="tools/go.py", env={"N": "1"})
        assert (await warmpod.status(accepted.id)).status == "succeeded"
    assert result.status == "succeeded"
    first, second = sorted(runner.specs, key=lambda spec: spec.entrypoint)
    assert (first.entrypoint, first.code, first.args) == ("main.py", b"", ("a b",))
    assert (second.entrypoint, second.code, second.env) == ("tools/go.py", b"print(1)", (("N", "1"),))


@pytest.mark.parametrize(
    ("options", "status", "slug", "words"),
    [
        ({"secrets": ["NOT_THERE"]}, 403, "secret-denied", ["NOT_THERE"]),
        ({"env": {"LD_PRELOAD": "/x.so"}}, 422, "program", ["LD_PRELOAD", "reserved"]),
        ({"args": ["a\0b"]}, 422, "program", ["args[0]", "NUL"]),
        ({"entrypoint": "report/none.py"}, 422, "program", ["report/none.py", "not among the files"]),
        ({"entrypoint": None}, 422, "program", ["main.py", "not among the files"]),
    ],
)
def test_a_refused_project_run_is_a_problem_naming_the_rule(
    live: str,
    runner: RecordingRunner,
    project: Path,
    granted: str,
    options: dict[str, Any],
    status: int,
    slug: str,
    words: list[str],
) -> None:
    """The server's 403 and 422 answers about a project's program reach the caller as ProblemError."""
    with Client(live) as warmpod, pytest.raises(ProblemError) as caught:
        warmpod.run(files=project_files(project), **{"entrypoint": "report/run.py", **options})
    assert (caught.value.status, caught.value.type) == (status, PROBLEMS + slug)
    for word in words:
        assert word in caught.value.detail
    assert runner.specs == []


def test_options_are_checked_before_anything_is_sent(
    live: str, runner: RecordingRunner, project: Path
) -> None:
    """A lone string for args or secrets, an unknown option or a project over its bounds raise at once."""
    with Client(live) as warmpod:
        with pytest.raises(TypeError, match=r"args=\['2026-11'\]"):
            warmpod.submit("x", args="2026-11")
        with pytest.raises(TypeError, match=r"secrets=\['DSN'\]"):
            warmpod.submit("x", secrets="DSN")
        with pytest.raises(TypeError, match="unknown run options \\['timeot'\\]"):
            warmpod.submit("x", timeot=5)  # type: ignore[call-arg]
        with pytest.raises(ProjectError, match="more than 3 files"):
            warmpod.run(files=project_files(project, max_files=3))
    assert runner.specs == []
