"""Runs share nothing: not files, not hostnames, not containers, and concurrent runs wait their turn."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from textwrap import dedent
from typing import Any

import httpx
import pytest
from support.live import POOL_SIZE, WarmpodServer, container_names, run_json, wait_until

from warmpod.sandbox.pool import LABEL_INSTANCE

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
    look = (
        "import os\nprint(sorted(os.listdir('/tmp')), sorted(os.listdir('/work')), os.listdir('/work/out'))"
    )
    second = run_json(client, look)
    assert second["status"] == "succeeded", second
    # /tmp holds only the agent's fresh MPLCONFIGDIR, /work the program and its empty out/.
    assert second["stdout"] == "['matplotlib'] ['main.py', 'out'] []\n"


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


@pytest.mark.skipif(os.geteuid() != 0, reason="rootful only: tests/rootless covers rootless Podman's map")
def test_each_rootful_container_has_a_user_namespace_of_its_own(server: WarmpodServer) -> None:
    """Container root is not host root, and two sandboxes alive at once never share a host uid."""
    code = "import time\nprint(open('/proc/self/uid_map').read(), end='')\ntime.sleep(1)"

    def one(_: int) -> list[tuple[int, int, int]]:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            result = run_json(http, code)
        assert result["status"] == "succeeded", result
        lines = result["stdout"].splitlines()
        return [(int(a), int(b), int(c)) for a, b, c in (line.split() for line in lines)]

    with ThreadPoolExecutor(max_workers=POOL_SIZE) as executor:
        maps = list(executor.map(one, range(POOL_SIZE)))
    ranges = []
    for mapping in maps:
        # One extent from container uid 0, wide enough for the program's 65534, far from host root.
        assert len(mapping) == 1, maps
        inside, start, size = mapping[0]
        assert inside == 0, maps
        assert size > 65534, maps
        assert start >= 65536, maps
        ranges.append(range(start, start + size))
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            assert a.stop <= b.start or b.stop <= a.start, f"two sandboxes share host uids: {maps}"
