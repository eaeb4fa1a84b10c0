"""`warmpod doctor` on hosts this machine is not: what it says, from a faked `podman info`."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from warmpod import cli
from warmpod.settings import from_env


def podman_info(*, rootless: bool, cgroup: str, controllers: list[str]) -> bytes:
    """A `podman info --format json` document with only what doctor reads."""
    return json.dumps(
        {
            "host": {
                "security": {"rootless": rootless},
                "cgroupVersion": cgroup,
                "cgroupManager": "systemd",
                "cgroupControllers": controllers,
                "ociRuntime": {"name": "crun", "version": "crun version 1.21"},
            },
            "version": {"Version": "5.4.2"},
        }
    ).encode()


def doctor(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], info: bytes
) -> tuple[int, str]:
    """Run doctor against ``info`` and return its exit status and output."""

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess(argv, 0, stdout=info, stderr=b"")

    monkeypatch.setattr(subprocess, "run", fake_run)
    status = cli.doctor(from_env())
    return status, capsys.readouterr().out


def test_rootless_cgroup_v2_without_delegation_says_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rootless on cgroup v2 without memory and pids delegated: doctor names them, the fix, and fails."""
    status, out = doctor(
        monkeypatch, capsys, podman_info(rootless=True, cgroup="v2", controllers=["cpu", "io"])
    )
    assert status == 1, out
    assert "Delegated cgroup controllers: cpu, io; missing memory, pids: set Delegate=" in out, out
    assert "loginctl enable-linger" in out, out
    assert "warmpod serve would fail" in out, out


def test_rootless_cgroup_v2_with_delegation_enforces_by_cgroup(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rootless on cgroup v2 with cpu, memory and pids delegated: every cgroup limit by cgroup, pause on."""
    info = podman_info(rootless=True, cgroup="v2", controllers=["cpu", "io", "memory", "pids"])
    status, out = doctor(monkeypatch, capsys, info)
    assert status == 0, out
    assert "Delegated cgroup controllers" not in out, out
    assert "  memory: cgroup, cgroup memory limit, swap capped at the same value" in out, out
    assert "  cpu_share: cgroup, cgroup cpu quota" in out, out
    assert "Pause idle containers: yes" in out, out
    assert "OOM score: the agent cannot shield itself rootless" in out, out
