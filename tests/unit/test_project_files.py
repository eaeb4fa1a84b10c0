"""A project directory as a run's files: each .warmpodignore rule kind, links, special files, bounds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from warmpod.client import ProjectError, project_files
from warmpod.client.ignore import IgnoreRules, parse_rule


@pytest.mark.parametrize(
    ("rules", "path", "is_dir", "ignored"),
    [
        # Blank lines and comments are no rules; an escaped # is a name.
        ("\n   \n# main.py\n", "main.py", False, False),
        ("\\#notes\n", "#notes", False, True),
        # * and ? stay within one component; a name alone matches at any depth.
        ("*.log\n", "debug.log", False, True),
        ("*.log\n", "deep/down/debug.log", False, True),
        ("*.log\n", "debug.log.txt", False, False),
        ("data/*.csv\n", "data/sub/a.csv", False, False),
        ("data?.csv\n", "data1.csv", False, True),
        ("data?.csv\n", "data12.csv", False, False),
        ("[abc].txt\n", "b.txt", False, True),
        # ** as a component: any number of directories, or all that is inside.
        ("**/cache\n", "cache", True, True),
        ("**/cache\n", "a/b/cache", True, True),
        ("src/**/gen.py\n", "src/gen.py", False, True),
        ("src/**/gen.py\n", "src/a/b/gen.py", False, True),
        ("build/**\n", "build/x/y.o", False, True),
        ("build/**\n", "build", True, False),
        # A trailing / matches directories only, and what is under them.
        ("tmp/\n", "tmp", True, True),
        ("tmp/\n", "tmp", False, False),
        ("tmp/\n", "a/tmp/f.txt", False, True),
        # A leading / (or one in the middle) anchors at the root.
        ("/notes.md\n", "notes.md", False, True),
        ("/notes.md\n", "docs/notes.md", False, False),
        ("docs/notes.md\n", "x/docs/notes.md", False, False),
        # ! takes back what an earlier rule left out; the last matching rule decides.
        ("*.csv\n!keep.csv\n", "keep.csv", False, False),
        ("*.csv\n!keep.csv\n", "drop.csv", False, True),
        ("!keep.csv\n*.csv\n", "keep.csv", False, True),
        ("\\!bang\n", "!bang", False, True),
        # ...but not from under a directory left out, as in git.
        ("tmp/\n!tmp/keep.txt\n", "tmp/keep.txt", False, True),
        # The defaults, and taking one back.
        ("", ".git/config", False, True),
        ("", "pkg/__pycache__/m.cpython-311.pyc", False, True),
        ("", ".venv/bin/python", False, True),
        ("", "out/old.png", False, True),
        ("", "pkg/out/table.csv", False, False),
        ("", ".warmpodignore", False, True),
        ("!.venv/\n", ".venv/lib/site.py", False, False),
        # Trailing spaces go unless escaped.
        ("notes.md   \n", "notes.md", False, True),
        ("notes\\ \n", "notes ", False, True),
    ],
)
def test_each_ignore_rule_kind(rules: str, path: str, is_dir: bool, ignored: bool) -> None:
    """Each rule of the gitignore subset decides as git would for the path given."""
    assert IgnoreRules.parse(rules).ignored(path, is_dir) is ignored


def test_lines_that_are_no_rules() -> None:
    """Comments, blank lines and a bare / or ! parse to no rule."""
    assert [parse_rule(line) for line in ("", "  ", "# x", "/", "!", "!/")] == [None] * 6


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project with a package, data, ignored files and the defaults' directories."""
    root = tmp_path / "project"
    for path, text in {
        "main.py": "import pkg.mod\n",
        "pkg/__init__.py": "",
        "pkg/mod.py": "X = 1\n",
        "pkg/__pycache__/mod.cpython-311.pyc": "bytecode",
        "data/sales.csv": "1\n",
        "data/scratch.tmp": "ignored\n",
        ".git/HEAD": "ref: main\n",
        ".venv/pyvenv.cfg": "home\n",
        "out/last.png": "old",
        ".warmpodignore": "# scratch\n*.tmp\n",
    }.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def test_a_projects_files_are_its_regular_files_but_the_ignored(project: Path) -> None:
    """Paths relative to the root, in path order, bytes as on disk; ignored files and directories stay."""
    assert project_files(project) == [
        ("data/sales.csv", b"1\n"),
        ("main.py", b"import pkg.mod\n"),
        ("pkg/__init__.py", b""),
        ("pkg/mod.py", b"X = 1\n"),
    ]


def test_links_and_special_files_are_never_followed(project: Path, tmp_path: Path) -> None:
    """A symlink to a file or a directory outside (or inside) is skipped, as are FIFOs and sockets."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("private")
    (project / "key").symlink_to(outside / "id_rsa")
    (project / "home").symlink_to(outside)
    (project / "again.py").symlink_to(project / "main.py")
    os.mkfifo(project / "pipe")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(project / "sock"))
        paths = [path for path, _ in project_files(project)]
    assert paths == ["data/sales.csv", "main.py", "pkg/__init__.py", "pkg/mod.py"]


def test_a_symlinked_ignore_file_is_not_read(project: Path, tmp_path: Path) -> None:
    """The rules come from a regular .warmpodignore of the directory itself, not one a link points to."""
    rules = tmp_path / "rules"
    rules.write_text("*.py\n")
    (project / ".warmpodignore").unlink()
    (project / ".warmpodignore").symlink_to(rules)
    assert "main.py" in dict(project_files(project))


def test_bounds_and_bad_names_are_refused_with_the_reason(project: Path) -> None:
    """More files or bytes than the bounds, or a name the server would refuse, raise ProjectError."""
    assert len(project_files(project, max_files=4, max_bytes=23)) == 4
    with pytest.raises(ProjectError, match=r"more than 3 files .* \.warmpodignore"):
        project_files(project, max_files=3)
    with pytest.raises(ProjectError, match="more than 22 bytes"):
        project_files(project, max_bytes=22)
    (project / "back\\slash.py").write_text("")
    with pytest.raises(ProjectError, match="backslash"):
        project_files(project)


def test_a_missing_directory_is_an_os_error(tmp_path: Path) -> None:
    """A path that is no directory raises an OSError naming it."""
    with pytest.raises(NotADirectoryError, match="nothing"):
        project_files(tmp_path / "nothing")
    (tmp_path / "file.py").write_text("")
    with pytest.raises(NotADirectoryError):
        project_files(tmp_path / "file.py")
