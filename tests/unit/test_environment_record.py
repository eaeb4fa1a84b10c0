"""Unit tests of the image's record of what it installed: written at build time, read by the probe."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from types import ModuleType

import pytest
from support.fakes import pool_module

from warmpod.http.environment import ENVIRONMENT_FILE
from warmpod.models import Environment
from warmpod.sandbox.selftest import PROBE


@pytest.fixture
def finish_image() -> ModuleType:
    """pool/finish_image.py, the image's last build step, loaded as a module."""
    return pool_module("finish_image")


def test_build_step_and_probe_agree_on_the_file(finish_image: ModuleType) -> None:
    """The file the build writes is the one the start-up probe reads."""
    assert str(finish_image.ENVIRONMENT_FILE) == ENVIRONMENT_FILE
    assert f'open("{ENVIRONMENT_FILE}")' in PROBE


def test_record_lists_every_distribution(
    finish_image: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record holds the Python version and every installed distribution by normalised name."""
    monkeypatch.setattr(finish_image, "ENVIRONMENT_FILE", tmp_path / "opt" / "environment.json")
    finish_image.record_environment()
    recorded = Environment.from_report(json.loads((tmp_path / "opt" / "environment.json").read_text()))
    assert recorded is not None
    assert recorded.python == platform.python_version()
    assert recorded.packages["msgspec"] == importlib.metadata.version("msgspec")
    assert recorded.packages["typing-extensions"] == importlib.metadata.version("typing_extensions")
    assert all(name == name.lower() and "_" not in name for name in recorded.packages)
    assert list(recorded.packages) == sorted(recorded.packages)


def test_only_the_known_test_suites_are_dropped(finish_image: ModuleType, tmp_path: Path) -> None:
    """The big libraries' ``tests`` directories go, at any depth; other modules and packages stay."""
    for relative in (
        "numpy/tests/a.py",
        "numpy/_core/tests/b.py",
        "numpy/testing/c.py",
        "scipy/linalg/tests/d.py",
        "someone/tests/e.py",
    ):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("")
    finish_image.drop_test_suites(tmp_path)
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*.py"))
    assert left == ["numpy/testing/c.py", "someone/tests/e.py"]


@pytest.mark.parametrize(
    "report",
    [None, {"python": "3.13.5"}, {"python": "3.13.5", "packages": {"numpy": 2}}, "garbage"],
)
def test_a_missing_or_broken_record_is_none(report: object) -> None:
    """The probe's report of an image without a (valid) record gives no environment, not an error."""
    assert Environment.from_report(report) is None


def test_a_record_converts() -> None:
    """A valid record becomes the environment served at GET /environment."""
    recorded = Environment.from_report({"python": "3.13.5", "packages": {"numpy": "2.5.5"}})
    assert recorded == Environment(python="3.13.5", packages={"numpy": "2.5.5"})
