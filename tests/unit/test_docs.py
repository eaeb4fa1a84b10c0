"""The user's documentation: generated parts current, links that resolve, no commit hashes."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOP = ("README.md", "SECURITY.md", "CONTRIBUTING.md")
PAGES = sorted([*(ROOT / name for name in TOP), *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEX = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")


def _anchors(page: Path) -> set[str]:
    # GitHub's slugs: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens.
    anchors = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_configuration_page_is_current() -> None:
    """docs/configuration.md's settings tables say what settings.py's field docstrings say today."""
    generator = runpy.run_path(str(ROOT / "deploy" / "settings_doc.py"))
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert generator["updated"](page) == page, "run `make docs`"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    """Every relative link of a page names a file that exists, and a heading there when it has an anchor."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _anchors(linked)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_no_commit_hashes(page: Path) -> None:
    """A page says what is true now and names no commit: git log keeps the history."""
    assert HEX.findall(page.read_text()) == []


def test_readme_keeps_its_commands() -> None:
    """The README's quick start still gives the commands .ci/run and the Makefile call the README's."""
    readme = (ROOT / "README.md").read_text()
    assert "deploy/setup.sh && .venv/bin/warmpod serve" in readme
    assert "deploy/setup.sh --test && .venv/bin/pytest" in readme
