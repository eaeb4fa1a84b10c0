"""Runs share nothing: not files, not hostnames, not containers, and concurrent runs wait their turn."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from textwrap import dedent
from typing import Any

import httpx
import pytest
from warmpod_live import POOL_SIZE, WarmpodServer, container_names, run_json, wait_until

from warmpod.pool import LABEL_INSTANCE

pytestmark = pytest.mark.integration

HOSTNAME = "import socket\nprint(socket.gethostname())"


def test_files_do_not_survive_a_run(client: httpx.Client) -> None:
    """Files one run writes to /tmp and /work are absent from the next run, which starts with empty dirs."""
    write = dedent(
        """
        import os
        for path in ("/tmp/left-behind", "/work/left-behind"):
            with open(path, "w") as file:
                file.write("secret")
        print(os.path.exists("/tmp/left-behind"), os.path.exists("/work/left-behind"))
        """
    )
    first = run_json(client, write)
    assert first["status"] == "succeeded", first
    assert first["stdout"] == "True True\n"
    look = "import os\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/work')))"
    second = run_json(client, look)
    assert second["status"] == "succeeded", second
    assert second["stdout"] == "[] ['main.py']\n"


def test_every_run_has_its_own_hostname(server: WarmpodServer, client: httpx.Client) -> None:
    """Four runs see four different hostnames, each a container name of this server."""
    prefix = f"warmpod-{server.instance()[:8]}-"
    hostnames = [run_json(client, HOSTNAME)["stdout"].strip() for _ in range(4)]
    assert len(set(hostnames)) == 4, hostnames
    assert all(re.fullmatch(re.escape(prefix) + r"\d+", name) for name in hostnames), hostnames


def test_no_container_is_reused(server: WarmpodServer, client: httpx.Client) -> None:
    """A container that served a run is destroyed, never returned to the pool."""
    label = f"{LABEL_INSTANCE}={server.instance()}"
    served = {run_json(client, HOSTNAME)["stdout"].strip() for _ in range(4)}
    assert len(served) == 4
    assert wait_until(lambda: not served & container_names(label), timeout=15), (
        f"containers that served runs still exist: {sorted(served & container_names(label))}"
    )
    # The pool holds only containers that never served.
    assert not served & container_names(label)


def test_runs_beyond_the_pool_size_wait_for_a_container(server: WarmpodServer) -> None:
    """Six parallel runs against a pool of two all succeed, each in a container of its own."""
    runs = 3 * POOL_SIZE
    code = "import socket, time\ntime.sleep(0.5)\nprint(socket.gethostname())"

    def one(index: int) -> dict[str, Any]:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            return run_json(http, f"print({index})\n{code}")

    with ThreadPoolExecutor(max_workers=runs) as executor:
        results = list(executor.map(one, range(runs)))
    assert [r["status"] for r in results] == ["succeeded"] * runs, results
    lines = [r["stdout"].splitlines() for r in results]
    assert [first for first, _ in lines] == [str(i) for i in range(runs)]
    assert len({hostname for _, hostname in lines}) == runs
