"""Unit tests of the start-up self-test's judgement of a probe report."""

from __future__ import annotations

import ast
import socket

import pytest
from support.fakes import POOL_DIR, probe_report

from warmpod.sandbox.selftest import PROBE, failures
from warmpod.settings import LimitSettings

LIMITS = LimitSettings(memory_mb=256, pids=64, cpu_time=5)
GOOD = probe_report(LIMITS)


def test_a_locked_sandbox_passes() -> None:
    """A report with every layer on has no failures."""
    assert failures(GOOD, LIMITS, cgroups=True) == []


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("uid", 0, "root"),
        ("interfaces", ["eth0", "lo"], "network"),
        ("root_writable", True, "writable"),
        ("seccomp", "0", "seccomp"),
        ("no_new_privs", "0", "no_new_privileges"),
        ("cap_eff", "00000000000000e0", "capabilities"),
        ("rlimit_cpu", -1, "RLIMIT_CPU"),
        ("memory_max", "max", "memory"),
        ("pids_max", "max", "pids"),
        ("pid1", ["/sbin/init"], "PID namespace"),
        ("hostname", socket.gethostname(), "UTS namespace"),
        ("rlimit_cpu", 3, "RLIMIT_CPU"),
    ],
)
def test_each_missing_layer_is_named(key: str, value: object, words: str) -> None:
    """Each missing layer makes the self-test fail with words that name it."""
    found = failures({**GOOD, key: value}, LIMITS, cgroups=True)
    assert len(found) == 1
    assert words in found[0]


def test_cgroup_limits_are_not_required_without_cgroups() -> None:
    """Where the engine applies no cgroup limits, their absence is not a self-test failure."""
    report = {**GOOD, "memory_max": None, "pids_max": None}
    assert failures(report, LIMITS, cgroups=False) == []


def test_the_cpu_limit_may_sit_above_the_start_up_cpu() -> None:
    """RLIMIT_CPU counts from the program's start: the budget above the whole seconds preloading used."""
    assert failures({**GOOD, "rlimit_cpu": 6, "cpu_used": 0.62}, LIMITS, cgroups=True) == []
    assert failures({**GOOD, "rlimit_cpu": 7, "cpu_used": 0.62}, LIMITS, cgroups=True) != []


@pytest.mark.parametrize("uid_map", ["0 0 4294967295", "0 0 65536\n65536 100000 65536", None])
def test_container_root_as_host_root_fails_where_a_user_namespace_is_expected(uid_map: str | None) -> None:
    """Where each container should have a user namespace, a map that keeps uid 0 as host uid 0 fails."""
    found = failures({**GOOD, "uid_map": uid_map}, LIMITS, cgroups=True, userns=True)
    assert len(found) == 1
    assert "no user namespace of its own" in found[0]
    assert failures({**GOOD, "uid_map": uid_map}, LIMITS, cgroups=True, userns=False) == []


def test_a_rootless_map_passes() -> None:
    """Rootless Podman's map (root is the user, the rest a subordinate range) is a user namespace."""
    rootless = "         0       1000          1\n         1     100000      65536"
    assert failures({**GOOD, "uid_map": rootless}, LIMITS, cgroups=True, userns=True) == []


def test_the_probe_is_pool_probe_py_and_prints_every_key_the_judgement_reads() -> None:
    """The probe sent is pool/probe.py (linted and typed), and its report has every key of a good one."""
    assert (POOL_DIR / "probe.py").read_text() == PROBE
    printed = {
        key.value
        for node in ast.walk(ast.parse(PROBE))
        if isinstance(node, ast.Dict)
        for key in node.keys
        if isinstance(key, ast.Constant)
    }
    assert set(GOOD) | {"cpu_used", "environment"} <= printed
