"""bench/load.py's 2-minute form against a real server: every check the load script makes must hold."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest
from support.live import SLOWNESS, WarmpodServer, stop_and_check_clean

pytestmark = pytest.mark.integration

BENCH = Path(__file__).resolve().parents[2] / "bench"
MINUTES = 2.0


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/load.py, imported the way it runs: beside the bench scripts whose helpers it uses."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("load")


def quiet_log_tail(live: WarmpodServer) -> str:
    """The end of the server's log without the load's own requests, which would crowd out the cause."""
    lines = live.log_tail(size=1 << 20).splitlines(keepends=True)
    return "".join(line for line in lines if '"GET /status/' not in line and '"POST /run-json/' not in line)[
        -4000:
    ]


def test_sustained_load_keeps_every_promise(tmp_path: Path, load: ModuleType) -> None:
    """Two minutes of trivial, pandas, timeout, flood and memory-bomb runs at saturation: each
    accepted run ends once as its kind should, no answer is a 5xx, the server's memory stays flat,
    its containers stay within the pool's maximum, and SIGTERM leaves none behind."""
    live = WarmpodServer(tmp_path, load.server_settings())
    try:
        live.wait_healthy()
        instance = live.instance()
        observed = load.drive(
            live.url, live.pid, instance, minutes=MINUTES, run_deadline=load.RUN_DEADLINE * SLOWNESS
        )
        figures = load.report(observed, stored=load.stored_runs(Path(live.env["WARMPOD_QUEUE__STORE_PATH"])))
    except BaseException:
        live.close()
        raise
    # Shown with a failure: the whole table says more than the first failed check.
    print(load.table(figures))
    stop_and_check_clean(live, instance)
    failed = load.failures(figures)
    assert not failed, "\n".join(failed) + "\n" + quiet_log_tail(live)
