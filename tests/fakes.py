"""Fakes for the fast unit tests, kept in one place: what a real sandbox would answer."""

from __future__ import annotations

from typing import Any

from warmpod.sandbox import AGENT_COMMAND
from warmpod.settings import LimitSettings


def probe_report(limits: LimitSettings) -> dict[str, Any]:
    """What the start-up probe prints in a sandbox with every layer on, under ``limits``."""
    return {
        "pid1": list(AGENT_COMMAND),
        "hostname": "warmpod-0123abcd-1",
        "uid": 65534,
        "interfaces": ["lo"],
        "root_writable": False,
        "seccomp": "2",
        "no_new_privs": "1",
        "cap_eff": "0000000000000000",
        "rlimit_cpu": limits.cpu_time,
        "memory_max": str(limits.memory_mb * 2**20),
        "pids_max": str(limits.pids),
    }
