"""Unit tests of the per-limit enforcement report and the refusal to start without it."""

from __future__ import annotations

import pytest

from warmpod.errors import SettingsError
from warmpod.host.enforcement import check, enforcement


def test_every_limit_has_a_layer_with_cgroups() -> None:
    """With cgroups every limit is enforced, memory, pids and CPU share by cgroups."""
    rows = {row.limit: row for row in enforcement(cgroups=True)}
    assert all(row.layer for row in rows.values())
    assert {rows[name].layer for name in ("memory", "pids", "cpu_share")} == {"cgroup"}
    assert check(list(rows.values()), allow_unenforced=False) == []


def test_without_cgroups_the_missing_limit_refuses_start() -> None:
    """Without cgroups CPU share has no layer and start-up is refused, naming the way out."""
    rows = enforcement(cgroups=False)
    with pytest.raises(SettingsError, match=r"cpu_share.*WARMPOD_LIMITS__ALLOW_UNENFORCED"):
        check(rows, allow_unenforced=False)


def test_weaker_mode_is_explicit_and_says_what_is_missing() -> None:
    """An operator who allows unenforced limits starts, and is told which ones."""
    rows = enforcement(cgroups=False)
    assert check(rows, allow_unenforced=True) == ["cpu_share"]
    layers = {row.limit: row.layer for row in rows}
    assert layers["memory"] == "rlimit"
    assert layers["pids"] == "rlimit"
