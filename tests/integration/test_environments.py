"""Environments end to end: real servers keeping ``default`` and ``extra`` warm at once, each run
in its own library set with its own limits, keys limited to some, and nodes serving different sets."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from support.apitest import PROBLEMS, assert_problem, bearer
from support.environments import EXTRA, EXTRA_MODULE, EXTRA_PACKAGE, Declared, declare
from support.live import GRACEFUL_EXIT, SLOWNESS, WarmpodServer, run_json, serving
from support.postgres import PostgresServer
from support.waiting import until

from warmpod.environments import DEFAULT
from warmpod.models import RunSpec
from warmpod.queue.store.postgres import PostgresStore

pytestmark = pytest.mark.integration

# extra's own limits, well under the server's (timeout 10 s, memory 512 MiB), so that a program
# well inside the server's fails in extra alone.
EXTRA_TIMEOUT = 2
EXTRA_MEMORY_MB = 256
LIMITS = f"[{EXTRA}.limits]\ntimeout = {EXTRA_TIMEOUT}\nmemory_mb = {EXTRA_MEMORY_MB}\n"
FULL_KEY = "environments-full-key"
EXTRA_KEY = "environments-extra-key"
# Both environments' sandboxes starting at once (numpy and pandas preloaded in default's) on a
# 2-CPU machine another suite may be loading.
WARM_TIMEOUT = 120.0 * SLOWNESS
# A run of the server's own, or a heartbeat's effect on another node: seconds, under load.
PROMPT = 30.0 * SLOWNESS
HTTP_TIMEOUT = 120.0
GREET = f"import {EXTRA_MODULE}\nprint({EXTRA_MODULE}.greet('extra'))\n"
LEASE = 3.0


def eventually(predicate: Callable[[], bool], timeout: float) -> None:
    """Wait (``support.waiting.until``) until ``predicate`` holds; each look is an HTTP request."""
    anyio.run(functools.partial(until, predicate, timeout, interval=0.2))


def hashed(key: str) -> str:
    """The SHA-256 hex of ``key``, as a keys file holds it."""
    return hashlib.sha256(key.encode()).hexdigest()


def finished_lines(live: WarmpodServer) -> dict[str, dict[str, Any]]:
    """The ``run finished`` lines of a server's JSON log, by run id."""
    found = {}
    for text in live.log_path.read_text(errors="replace").splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict) and line.get("event") == "run finished":
            found[line["run_id"]] = line
    return found


def health(url: str) -> dict[str, Any]:
    """One ``GET /health`` of the server at ``url``, which must answer 200."""
    response = httpx.get(f"{url}/health", timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def declared(tmp_path_factory: pytest.TempPathFactory) -> Declared:
    """``default`` and ``extra``, extra with its own timeout and memory, both images built."""
    return declare(tmp_path_factory.mktemp("environments"), tables=LIMITS)


@pytest.fixture(scope="module")
def envserver(declared: Declared, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmpodServer]:
    """One server declaring both environments, with a key for all and one limited to ``extra``."""
    directory = tmp_path_factory.mktemp("envserver")
    keys = directory / "keys"
    keys.write_text(f"full:{hashed(FULL_KEY)}\nextra-only:{hashed(EXTRA_KEY)}:environments={EXTRA}\n")
    settings = {
        **declared.settings,
        "WARMPOD_POOL__MIN_SIZE": "2",
        "WARMPOD_POOL__MAX_SIZE": "4",
        "WARMPOD_SERVER__API_KEYS_FILE": str(keys),
        "WARMPOD_SERVER__LOG_FORMAT": "json",
    }
    with serving(directory, settings) as live:
        yield live


@pytest.fixture(scope="module")
def envclient(envserver: WarmpodServer) -> Iterator[httpx.Client]:
    """A client of ``envserver`` with the key that may use every environment."""
    with httpx.Client(base_url=envserver.url, headers=bearer(FULL_KEY), timeout=HTTP_TIMEOUT) as http:
        yield http


def test_each_run_sees_only_its_own_environment_s_packages(envclient: httpx.Client) -> None:
    """In ``extra`` the extra module imports and numpy does not exist; in default numpy and pandas
    import and the extra module does not exist."""
    greeted = run_json(envclient, GREET, environment=EXTRA)
    assert (greeted["status"], greeted["stdout"], greeted["environment"]) == (
        "succeeded",
        "hello extra\n",
        EXTRA,
    )
    missing = run_json(envclient, "import numpy\n", environment=EXTRA)
    assert missing["status"] == "failed", missing
    assert "ModuleNotFoundError: No module named 'numpy'" in missing["stderr"], missing
    libraries = run_json(envclient, "import numpy, pandas\nprint(numpy.__name__, pandas.__name__)\n")
    assert (libraries["status"], libraries["stdout"]) == ("succeeded", "numpy pandas\n"), libraries
    absent = run_json(envclient, f"import {EXTRA_MODULE}\n", environment=DEFAULT)
    assert absent["status"] == "failed", absent
    assert f"ModuleNotFoundError: No module named '{EXTRA_MODULE}'" in absent["stderr"], absent


def test_both_environments_are_warm_at_once_and_listed(
    envserver: WarmpodServer, envclient: httpx.Client, declared: Declared
) -> None:
    """/health counts ready sandboxes of default and extra together; GET /environments lists both
    with Python 3.13, their own packages, preloads, min_warm and image."""

    def both_ready() -> bool:
        counts = health(envserver.url)["pool"]["environments"]
        return all(name in counts and counts[name]["ready"] >= 1 for name in (DEFAULT, EXTRA))

    eventually(both_ready, WARM_TIMEOUT)
    response = envclient.get("/environments")
    assert response.status_code == 200, response.text
    listed = {info["name"]: info for info in response.json()}
    assert [info["name"] for info in response.json()] == [DEFAULT, EXTRA]
    for name, info in listed.items():
        assert re.fullmatch(r"3\.13\.\d+", info["python"]), info
        assert info["min_warm"] == 1, info
        assert info["image"] == declared.refs[name], info
    assert listed[EXTRA]["packages"][EXTRA_PACKAGE] == "1.0"
    assert "numpy" not in listed[EXTRA]["packages"]
    assert {"numpy", "pandas"} <= set(listed[DEFAULT]["packages"])
    assert EXTRA_PACKAGE not in listed[DEFAULT]["packages"]
    assert listed[DEFAULT]["preload"] == ["numpy", "pandas"]
    assert listed[EXTRA]["preload"] == []


def test_a_run_naming_no_environment_runs_in_default(
    envserver: WarmpodServer, envclient: httpx.Client
) -> None:
    """No ``environment`` means default: the result and the ``run finished`` log line say which
    environment ran it, and GET /environment still answers the default's record."""
    plain = run_json(envclient, "print(1)\n")
    extra = run_json(envclient, "print(2)\n", environment=EXTRA)
    assert (plain["status"], plain["environment"]) == ("succeeded", DEFAULT), plain
    assert (extra["status"], extra["environment"]) == ("succeeded", EXTRA), extra

    def logged() -> bool:
        return {plain["id"], extra["id"]} <= set(finished_lines(envserver))

    eventually(logged, PROMPT)
    lines = finished_lines(envserver)
    assert lines[plain["id"]]["environment"] == DEFAULT, lines[plain["id"]]
    assert lines[extra["id"]]["environment"] == EXTRA, lines[extra["id"]]
    recorded = envclient.get("/environment")
    assert recorded.status_code == 200, recorded.text
    (default,) = [info for info in envclient.get("/environments").json() if info["name"] == DEFAULT]
    assert recorded.json() == {"python": default["python"], "packages": default["packages"]}


def test_a_key_limited_to_extra_runs_there_only(envserver: WarmpodServer, envclient: httpx.Client) -> None:
    """A key with ``environments=extra`` gets 403 environment-denied for default (named or not),
    runs in extra, and sees only extra in GET /environments; /run-file/ takes the field too."""
    with httpx.Client(base_url=envserver.url, headers=bearer(EXTRA_KEY), timeout=HTTP_TIMEOUT) as limited:
        for fields in ({}, {"environment": DEFAULT}):
            denied = limited.post("/run-json/", json={"code": "print(1)\n", **fields})
            body = assert_problem(denied, 403, DEFAULT)
            assert body["type"] == PROBLEMS + "environment-denied", body
        ran = run_json(limited, GREET, environment=EXTRA)
        assert (ran["status"], ran["stdout"], ran["environment"]) == ("succeeded", "hello extra\n", EXTRA)
        listed = limited.get("/environments")
        assert [info["name"] for info in listed.json()] == [EXTRA], listed.text
        refused = limited.post("/run-file/", files={"file": ("main.py", GREET.encode())})
        assert assert_problem(refused, 403)["type"] == PROBLEMS + "environment-denied"
        by_form = limited.post(
            "/run-file/", files={"file": ("main.py", GREET.encode())}, data={"environment": EXTRA}
        )
    assert by_form.status_code == 200, by_form.text
    assert (by_form.json()["stdout"], by_form.json()["environment"]) == ("hello extra\n", EXTRA)
    unknown = envclient.post("/run-json/", json={"code": "print(1)\n", "environment": "nope"})
    body = assert_problem(unknown, 422, "nope", DEFAULT, EXTRA)
    assert body["type"] == PROBLEMS + "environment", body
    form_unknown = envclient.post(
        "/run-file/", files={"file": ("main.py", b"print(1)\n")}, data={"environment": "nope"}
    )
    assert assert_problem(form_unknown, 422, DEFAULT, EXTRA)["type"] == PROBLEMS + "environment"


def test_an_environment_s_limits_apply_to_its_runs(envclient: httpx.Client) -> None:
    """extra's own timeout and memory apply to its runs: a program well inside the server's limits
    succeeds in default and hits them in extra."""
    sleeper = "import time\ntime.sleep(4)\nprint('slept')\n"
    slow = run_json(envclient, sleeper, environment=EXTRA)
    assert slow["status"] == "timeout", slow
    assert "wall_time" in slow["limits_hit"], slow
    assert run_json(envclient, sleeper)["stdout"] == "slept\n"
    # Written, not only reserved: every page counts against the cgroup.
    hog = f"data = b'x' * ({EXTRA_MEMORY_MB + 64} << 20)\nprint(len(data) >> 20)\n"
    killed = run_json(envclient, hog, environment=EXTRA)
    assert killed["status"] == "failed", killed
    assert "memory" in killed["limits_hit"], killed
    fits = run_json(envclient, hog)
    assert (fits["status"], fits["stdout"]) == ("succeeded", f"{EXTRA_MEMORY_MB + 64}\n"), fits


def node_settings(store_url: str, name: str, pool: int) -> dict[str, str]:
    """One node on the shared store: its name, a short lease, ``pool`` sandboxes, no preloads, JSON logs."""
    return {
        "WARMPOD_QUEUE__STORE_URL": store_url,
        "WARMPOD_NODE__NAME": name,
        "WARMPOD_NODE__LEASE": str(LEASE),
        "WARMPOD_POOL__MIN_SIZE": str(pool),
        "WARMPOD_POOL__MAX_SIZE": str(pool),
        "WARMPOD_POOL__PRELOAD": "",
        "WARMPOD_SERVER__LOG_FORMAT": "json",
    }


def served(url: str) -> dict[str, list[str]]:
    """The environments each node alive on the queue serves, as the node at ``url`` sees them."""
    return {node["name"]: sorted(node["environments"]) for node in health(url)["nodes"]}


def run_on(live: WarmpodServer, code: str, **fields: object) -> dict[str, Any]:
    """POST ``code`` to ``live`` and wait for its RunResult, which must come with a 200."""
    response = httpx.post(f"{live.url}/run-json/", json={"code": code, **fields}, timeout=HTTP_TIMEOUT)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def enqueue(store_url: str, spec: RunSpec) -> str:
    """Queue a run straight into the shared store, as a node that declares its environment would."""
    store = await PostgresStore.open(store_url)
    try:
        run_id = uuid.uuid4().hex
        await store.add(run_id, spec, max_queued=1000)
        return run_id
    finally:
        await store.aclose()


def test_nodes_serving_different_environments_share_one_queue(
    declared: Declared, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """Node A (default only) and node B (default and extra) on one PostgreSQL: each says what it
    serves, extra's runs run on B alone, A refuses to accept them, a queued extra run waits as
    ``unserved`` while B is away (A runs default meanwhile) and runs once B is back."""
    store_url = postgres_server.create_database()
    a_settings = node_settings(store_url, "node-a", 1)
    b_settings = {**declared.settings, **node_settings(store_url, "node-b", 2)}
    started = [WarmpodServer(tmp_path, a_settings), WarmpodServer(tmp_path, b_settings)]
    a, b = started
    try:
        a.wait_healthy()
        b.wait_healthy()
        want = {"node-a": [DEFAULT], "node-b": [DEFAULT, EXTRA]}
        eventually(lambda: served(a.url) == want, WARM_TIMEOUT)
        refused = httpx.post(f"{a.url}/run-json/", json={"code": GREET, "environment": EXTRA}, timeout=PROMPT)
        body = assert_problem(refused, 422, EXTRA)
        assert body["detail"].endswith(f"this server has {DEFAULT}"), body

        with ThreadPoolExecutor(max_workers=8) as executor:
            extras = [executor.submit(run_on, b, GREET, environment=EXTRA) for _ in range(6)]
            defaults = [executor.submit(run_on, a, "print('plain')\n") for _ in range(6)]
            for future in extras:
                result = future.result()
                assert (result["status"], result["stdout"]) == ("succeeded", "hello extra\n"), result
                assert (result["node"], result["environment"]) == ("node-b", EXTRA), result
            for future in defaults:
                result = future.result()
                assert (result["status"], result["stdout"]) == ("succeeded", "plain\n"), result
                assert result["environment"] == DEFAULT, result

        exit_status = b.stop(signal.SIGTERM)
        assert exit_status in GRACEFUL_EXIT[signal.SIGTERM], f"exit status {exit_status}:\n{b.log_tail()}"
        eventually(lambda: served(a.url) == {"node-a": [DEFAULT]}, PROMPT)
        spec = RunSpec(
            code=GREET.encode(),
            stdin=b"",
            timeout=10.0,
            cpu_time=30,
            memory_mb=EXTRA_MEMORY_MB,
            max_output_bytes=65536,
            environment=EXTRA,
        )
        waiting = anyio.run(enqueue, store_url, spec)
        eventually(lambda: health(a.url)["queue"]["unserved"] == {EXTRA: 1}, PROMPT)
        # A takes no run it cannot serve, and still runs its own.
        assert run_on(a, "print('still')\n")["node"] == "node-a"
        queued = httpx.get(f"{a.url}/status/{waiting}", timeout=PROMPT)
        assert queued.json()["status"] == "queued", queued.text

        back = WarmpodServer(tmp_path, b_settings)
        started.append(back)
        back.wait_healthy()

        def status() -> dict[str, Any]:
            body: dict[str, Any] = httpx.get(f"{a.url}/status/{waiting}", timeout=PROMPT).json()
            return body

        eventually(lambda: status()["status"] not in {"queued", "running"}, WARM_TIMEOUT)
        result = status()
        assert result["status"] == "succeeded", result
        assert (result["stdout"], result["node"], result["environment"]) == ("hello extra\n", "node-b", EXTRA)
        eventually(lambda: health(a.url)["queue"]["unserved"] == {}, PROMPT)
    finally:
        for live in started:
            live.close()
        postgres_server.drop_database(store_url)
