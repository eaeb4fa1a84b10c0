"""Unit tests of the private state directories: a new one sweeps those its dead predecessors left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from warmpod.host import podman_service
from warmpod.settings import EngineSettings


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_fresh_state_directory_removes_those_of_dead_servers_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Directories whose owner pid is dead go; a live owner's stays, and so does one whose owner
    file cannot be read or does not hold a pid (it is not known to be dead)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    owners = {"dead": str(dead_pid()), "alive": str(os.getppid()), "garbled": "not a pid"}
    for name, owner in owners.items():
        (tmp_path / f"warmpod-{name}").mkdir()
        (tmp_path / f"warmpod-{name}" / podman_service.OWNER_FILE).write_text(owner)
    (tmp_path / "warmpod-no-owner-file").mkdir()
    fresh = podman_service.state_dir(EngineSettings())
    assert fresh.parent == tmp_path
    assert (fresh / podman_service.OWNER_FILE).read_text() == str(os.getpid())
    assert sorted(path.name for path in tmp_path.iterdir() if path != fresh) == [
        "warmpod-alive",
        "warmpod-garbled",
        "warmpod-no-owner-file",
    ]
