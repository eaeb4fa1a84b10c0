"""Preloaded modules: warm in the program's own interpreter, yet every run as fresh as ``python3 main.py``."""

from __future__ import annotations

from collections.abc import Iterator
from textwrap import dedent
from typing import Any

import httpx
import pytest
from support.live import ServerFactory, WarmpodServer, run_json

pytestmark = pytest.mark.integration

MODULE_DUNDERS = [
    "__annotations__",
    "__builtins__",
    "__cached__",
    "__doc__",
    "__file__",
    "__loader__",
    "__name__",
    "__package__",
    "__spec__",
]


@pytest.fixture
def warm(start_server: ServerFactory) -> Iterator[tuple[WarmpodServer, httpx.Client]]:
    """A fresh server preloading numpy, pandas and one module that does not exist."""
    # ``this`` prints the Zen of Python when imported: none of it may reach a run's output.
    live = start_server(WARMPOD_POOL__PRELOAD="numpy,pandas,warmpod_no_such_module,this")
    live.wait_healthy()
    with httpx.Client(base_url=live.url, timeout=60) as http:
        yield live, http


def calm_run(live: WarmpodServer, client: httpx.Client, code: str, **fields: object) -> dict[str, Any]:
    """One run once the pool is full, so it gets a container made while the pool kept up (preloaded)."""
    live.wait_pool_full()
    return run_json(client, code, **fields)


def test_preloaded_modules_are_already_imported(warm: tuple[WarmpodServer, httpx.Client]) -> None:
    """A run finds numpy and pandas in sys.modules before its first line, and imports them in no time."""
    live, client = warm
    code = dedent(
        """
        import sys, time
        print("numpy" in sys.modules, "pandas" in sys.modules)
        started = time.perf_counter()
        import numpy, pandas
        print(time.perf_counter() - started < 0.05)
        """
    )
    result = calm_run(live, client, code)
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "True True\nTrue\n"
    assert result["stderr"] == ""
    assert "'this'" in calm_run(live, client, "import sys\nprint(sorted(sys.modules))")["stdout"]


def test_a_module_that_fails_to_preload_is_reported_and_runs_go_on(
    warm: tuple[WarmpodServer, httpx.Client],
) -> None:
    """/health names a module that could not be preloaded; runs work and importing it fails as usual."""
    live, client = warm
    body = live.wait_pool_full()
    assert body["preload"] == ["numpy", "pandas", "warmpod_no_such_module", "this"]
    assert body["preload_failed"] == ["warmpod_no_such_module"]
    result = run_json(client, "import warmpod_no_such_module")
    assert result["status"] == "failed"
    assert "ModuleNotFoundError: No module named 'warmpod_no_such_module'" in result["stderr"]


def test_the_bootstrap_leaves_nothing_in_the_programs_namespace(
    warm: tuple[WarmpodServer, httpx.Client],
) -> None:
    """Globals hold only the usual dunders; argv, __file__, cwd and stdin are those of python3 main.py."""
    live, client = warm
    code = dedent(
        """
        names = sorted(globals())
        import os, sys
        print(names)
        print(__name__, __file__, sys.argv, os.getcwd(), repr(sys.stdin.read()))
        """
    )
    result = calm_run(live, client, code, stdin="in")
    assert result["status"] == "succeeded", result
    names, facts = result["stdout"].splitlines()
    assert names == repr(MODULE_DUNDERS)
    assert facts == "__main__ /work/main.py ['main.py'] /work 'in'"


def test_runs_do_not_share_module_state(warm: tuple[WarmpodServer, httpx.Client]) -> None:
    """An attribute one run sets on a preloaded module is absent in the next run, a different process."""
    live, client = warm
    code = dedent(
        """
        import os, numpy, pandas
        print(getattr(numpy, "left_by_a_run", None), getattr(pandas, "left_by_a_run", None), os.getpid())
        numpy.left_by_a_run = pandas.left_by_a_run = "secret"
        """
    )
    first = calm_run(live, client, code)
    second = calm_run(live, client, code)
    assert first["status"] == second["status"] == "succeeded", (first, second)
    assert first["stdout"].startswith("None None ")
    assert second["stdout"].startswith("None None ")


def test_the_garbage_collector_is_on_for_the_program(warm: tuple[WarmpodServer, httpx.Client]) -> None:
    """The preload runs with the collector off and freezes what it made; the program gets the
    collector back on, collecting its own cycles, and ``gc.unfreeze()`` shows it the preload's objects."""
    live, client = warm
    code = dedent(
        """
        import gc, weakref, pandas
        class Node: pass
        node = Node()
        node.me = node
        alive = weakref.ref(node)
        del node
        print(gc.isenabled(), gc.get_threshold()[0] > 0, gc.collect() > 0, alive() is None)
        seen = lambda: any(o is pandas.DataFrame for o in gc.get_objects())
        frozen = gc.get_freeze_count() > 0
        before = seen()
        gc.unfreeze()
        print(frozen, before, seen(), gc.get_freeze_count())
        """
    )
    result = calm_run(live, client, code)
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "True True True True\nTrue False True 0\n"


def test_a_preloaded_run_ends_like_python(warm: tuple[WarmpodServer, httpx.Client]) -> None:
    """Threads are joined, atexit handlers run, output without a newline is flushed, exit codes hold."""
    live, client = warm
    code = dedent(
        """
        import atexit, sys, threading, time
        atexit.register(print, "atexit ran")
        threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined"))).start()
        print("no newline", end="")
        sys.exit("bye")
        """
    )
    result = calm_run(live, client, code)
    assert result["exit_code"] == 1, result
    assert result["stdout"] == "no newlinethread joined\natexit ran\n"
    assert result["stderr"] == "bye\n"
    assert calm_run(live, client, "raise SystemExit(3)")["exit_code"] == 3
    assert calm_run(live, client, "import sys\nsys.exit(256 + 7)")["exit_code"] == 7
    crashed = calm_run(live, client, "import pandas\n1/0")
    assert crashed["exit_code"] == 1
    assert crashed["stderr"].endswith("ZeroDivisionError: division by zero\n")
    assert 'File "/work/main.py", line 2' in crashed["stderr"]


def test_without_preload_nothing_is_imported_ahead(start_server: ServerFactory) -> None:
    """With WARMPOD_POOL__PRELOAD empty, a run starts without numpy or pandas and /health lists none."""
    live = start_server(WARMPOD_POOL__PRELOAD="")
    body = live.wait_healthy()
    assert body["preload"] == []
    with httpx.Client(base_url=live.url, timeout=60) as client:
        result = calm_run(live, client, "import sys\nprint('numpy' in sys.modules, 'pandas' in sys.modules)")
    assert result["stdout"] == "False False\n", result


def test_memory_below_the_preloaded_footprint_is_refused_clearly(
    warm: tuple[WarmpodServer, httpx.Client],
) -> None:
    """memory_mb under what a preloaded sandbox already holds gets a 422 naming memory_mb and the minimum."""
    live, client = warm
    live.wait_pool_full()
    response = client.post("/run-json/", json={"code": "print(1)", "memory_mb": 16})
    assert response.status_code == 422, response.text
    assert "memory_mb must be at least" in response.json()["detail"]
    assert "numpy, pandas" in response.json()["detail"]
    assert calm_run(live, client, "print(1)", memory_mb=128)["stdout"] == "1\n"


def test_the_cpu_budget_is_the_programs_own(warm: tuple[WarmpodServer, httpx.Client]) -> None:
    """With numpy and pandas preloaded, a program may spend its whole cpu_time: the preload is not charged."""
    live, client = warm
    code = dedent(
        """
        import time
        started = time.process_time()
        while time.process_time() - started < 0.75:
            pass
        print("done")
        """
    )
    result = calm_run(live, client, code, cpu_time=1)
    assert result["status"] == "succeeded", result
    assert result["limits_hit"] == [], result
    assert result["stdout"] == "done\n"
    spin = calm_run(live, client, "while True:\n    pass\n", cpu_time=1, timeout=15)
    assert spin["status"] == "failed", spin
    assert spin["limits_hit"] == ["cpu_time"], spin
    assert spin["exit_code"] == -24, spin
