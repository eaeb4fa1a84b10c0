"""Two nodes on one PostgreSQL queue: who runs what, dead and zombie nodes, cross-node cancel, once only."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.live import SLOWNESS, container_names, containers, wait_until
from support.postgres import PostgresServer

from warmpod.sandbox.pool import LABEL_PID

from .nodes import (
    EARLIEST_REAP,
    HTTP_TIMEOUT,
    LEASE,
    NAMES,
    PROMPT,
    REAP_MARGIN,
    Cluster,
    Link,
    cancel,
    final,
    log_lines,
    node_names,
    occupy,
    run,
    status,
    submit,
    until,
)

pytestmark = pytest.mark.integration

# Prints to both streams, then sleeps far past every test's end.
SLEEPER = (
    "import sys, time\n"
    "print('started', flush=True)\n"
    "print('warn', file=sys.stderr, flush=True)\n"
    "time.sleep(100)\n"
)
# A line every 0.2 s for about 100 s: output that would keep growing if anything still took it.
TICKER = "import time\nfor i in range(500):\n    print(i, flush=True)\n    time.sleep(0.2)\n"


def finished_once(cluster: Cluster, run_id: str) -> dict[str, Any]:
    """The one ``run finished`` line of the run across every node's log (there must be exactly one)."""
    lines = [line for line in cluster.finished_lines() if line.get("run_id") == run_id]
    assert len(lines) == 1, f"run {run_id} has {len(lines)} 'run finished' lines: {lines}"
    return lines[0]


def test_health_names_this_node_and_lists_both(cluster: Cluster) -> None:
    """Each node's /health names it with its incarnation and lists both nodes seen within the lease."""
    incarnations = {}
    for name in NAMES:
        health = cluster[name].health().json()
        assert health["node"]["name"] == name, health
        incarnations[name] = health["node"]["incarnation"]
        seen = {node["name"]: node for node in health["nodes"]}
        assert set(seen) == set(NAMES), health
        for node in seen.values():
            assert 0 <= node["seen_ago"] < LEASE, health
            assert isinstance(node["running"], int), health
        assert seen[name]["incarnation"] == health["node"]["incarnation"]
    assert incarnations["node-a"] != incarnations["node-b"]
    # Each sees the other's incarnation as the other states it.
    for name, other in (NAMES, NAMES[::-1]):
        seen = {node["name"]: node for node in cluster[name].health().json()["nodes"]}
        assert seen[other]["incarnation"] == incarnations[other]


def test_a_run_submitted_to_a_busy_node_runs_on_the_other(cluster: Cluster) -> None:
    """A run posted to node A while A's only sandbox holds a long run is run by node B, promptly,
    and both nodes answer its status with B's name."""
    a, b = cluster["node-a"], cluster["node-b"]
    busy = occupy(cluster, SLEEPER, {"node-a"})["node-a"]
    cluster.wait_pool_full("node-b")
    started = time.monotonic()
    result = run(a, "print('where')")
    elapsed = time.monotonic() - started
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "where\n"
    assert result["node"] == "node-b", result
    # B had a ready sandbox: nothing waited for A, nor for a container to start.
    assert elapsed < 10 * SLOWNESS, f"{elapsed:.1f} s for a run on a node with a ready sandbox"
    assert status(a, result["id"]) == status(b, result["id"]) == result
    row = cluster.row(result["id"])
    assert (row["status"], row["node"], row["attempt"]) == ("succeeded", "node-b", 1), row
    # A's long run was not disturbed by any of it.
    assert status(b, busy)["status"] == "running"
    assert status(b, busy)["node"] == "node-a"


def test_a_node_killed_mid_run_is_reported_by_the_survivor_and_never_rerun(cluster: Cluster) -> None:
    """kill -9 of node A while it runs a program: B reports that run error, with what it had
    printed, within the lease and a few seconds; it never runs again (one claim, no more output,
    one "run finished" line) and a restarted A leaves B's result as it is; the runs queued at A
    when it died finish on B."""
    a, b = cluster["node-a"], cluster["node-b"]
    held = occupy(cluster, SLEEPER, set(NAMES))
    victim, keeper = held["node-a"], held["node-b"]
    queued = [submit(a, f"print('queued {i}')") for i in range(3)]
    for run_id in queued:
        body = status(b, run_id)
        assert (body["status"], body["node"]) == ("queued", None), body
    incarnation = a.health().json()["node"]["incarnation"]
    assert cluster.row(victim)["incarnation"] == incarnation

    pid = cluster.kill("node-a")
    killed = time.monotonic()
    result = until(b, victim, lambda body: body["status"] != "running", LEASE + REAP_MARGIN, "reaped")
    reaped = time.monotonic() - killed
    assert result["status"] == "error", result
    assert result["error"] == "node node-a stopped while this run was executing; it was not retried"
    assert (result["stdout"], result["stderr"]) == ("started\n", "warn\n"), result
    assert result["node"] == "node-a"
    assert reaped > EARLIEST_REAP, f"reported {reaped:.1f} s after the kill, inside the lease of {LEASE} s"
    assert wait_until(lambda: "node-a" not in node_names(b.health().json()), LEASE + REAP_MARGIN), (
        f"B still lists the dead A: {b.health().json()}"
    )
    chunks = cluster.output_rows(victim)

    # B is free once its own long run is cancelled: what was queued at A runs there.
    assert cancel(b, keeper).status_code == 200
    for index, run_id in enumerate(queued):
        done = final(b, run_id)
        assert (done["status"], done["stdout"], done["node"]) == ("succeeded", f"queued {index}\n", "node-b")

    # A comes back as a new incarnation, removes what the dead one left, and changes nothing of it.
    restarted = cluster.start("node-a")
    assert restarted.health().json()["node"]["incarnation"] != incarnation
    assert containers(f"{LABEL_PID}={pid}") == [], "the killed node's containers outlived its restart"
    cluster.wait_pool_full("node-a")
    time.sleep(LEASE)
    assert status(restarted, victim) == status(b, victim) == result
    row = cluster.row(victim)
    assert (row["status"], row["node"], row["attempt"]) == ("error", "node-a", 1), row
    assert cluster.output_rows(victim) == chunks
    line = finished_once(cluster, victim)
    assert line["status"] == "error"
    for run_id in queued:
        assert cluster.row(run_id)["attempt"] == 1


def test_a_cancel_sent_to_one_node_stops_a_run_on_the_other(cluster: Cluster) -> None:
    """DELETE at node B of a run executing on node A ends it cancelled within a few seconds: A's
    sandbox is freed, its output stops growing, and both nodes say cancelled with what it printed."""
    a, b = cluster["node-a"], cluster["node-b"]
    run_id = occupy(cluster, TICKER, {"node-a"})["node-a"]
    printed_before = len(status(a, run_id)["stdout"].splitlines())
    started = time.monotonic()
    response = cancel(b, run_id)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < PROMPT
    assert wait_until(lambda: status(a, run_id)["status"] == "cancelled", PROMPT), status(a, run_id)
    assert wait_until(lambda: a.health().json()["queue"]["running"] == 0, PROMPT), (
        f"A still runs the cancelled run: {a.health().json()}\n{a.log_tail()}"
    )
    stopped = time.monotonic() - started
    chunks = cluster.output_rows(run_id)
    time.sleep(1.0)
    assert cluster.output_rows(run_id) == chunks, "the cancelled run's output still grows"
    result = status(b, run_id)
    assert result == status(a, run_id)
    assert result["status"] == "cancelled", result
    assert result["node"] == "node-a"
    # What it printed up to the kill, each line once and in order; a line every 0.2 s, so no more
    # lines after the DELETE than the time it took A to stop it allows.
    lines = result["stdout"].splitlines()
    assert lines == [str(i) for i in range(len(lines))], result
    assert len(lines) - printed_before <= stopped / 0.2 + 2, (
        f"{len(lines) - printed_before} lines after the DELETE"
    )
    assert result["stdout"] == cluster.output_text(run_id, "stdout")
    assert cluster.row(run_id)["attempt"] == 1
    finished_once(cluster, run_id)


# What a zombie's run does while its node is stopped, and so which write of the node's is refused
# first when it continues: more output, only the heartbeat, or the final result.
ZOMBIE_RUNS = {
    "chatty": TICKER,
    "silent": SLEEPER,
    "ends-meanwhile": "import time\nprint('started', flush=True)\ntime.sleep(1.5)\nprint('done')\n",
}


@pytest.mark.parametrize("program", list(ZOMBIE_RUNS))
def test_a_zombie_node_is_fenced_and_stops_its_lost_run(cluster: Cluster, program: str) -> None:
    """Node A stopped (SIGSTOP) past its lease while it runs a program: B reports the run error;
    once A continues, its writes are refused (output, heartbeat or final result), it stops the
    run's container and logs "lost run <id>", and B's error result stands, with no output and no
    second "run finished" added after it."""
    a, b = cluster["node-a"], cluster["node-b"]
    run_id = occupy(cluster, ZOMBIE_RUNS[program], {"node-a"})["node-a"]
    cluster.pause("node-a")
    paused = time.monotonic()
    result = until(b, run_id, lambda body: body["status"] != "running", LEASE + REAP_MARGIN, "reaped")
    assert result["status"] == "error", result
    assert result["error"] == "node node-a stopped while this run was executing; it was not retried"
    assert result["node"] == "node-a"
    reaped = time.monotonic() - paused
    assert reaped > EARLIEST_REAP, f"reported {reaped:.1f} s after the stop, inside the lease of {LEASE} s"
    chunks = cluster.output_rows(run_id)
    assert result["stdout"] == cluster.output_text(run_id, "stdout"), "the error is not what was stored"
    # Long enough that A's program has printed much more meanwhile (or ended, for ends-meanwhile).
    time.sleep(1.0)

    cluster.resume("node-a")
    woke = time.monotonic()

    def lost() -> list[dict[str, Any]]:
        return [line for line in log_lines(a.log_path) if f"lost run {run_id}" in str(line.get("event"))]

    assert wait_until(lost, PROMPT), f"A never logged 'lost run {run_id}':\n{a.log_tail()}"
    (line,) = lost()
    assert (line["level"], line["logger"]) == ("warning", "warmpod.queue.workers"), line
    assert wait_until(lambda: a.health().json()["queue"]["running"] == 0, PROMPT), (
        f"A still runs its lost run {time.monotonic() - woke:.1f} s after it woke: {a.health().json()}"
    )
    time.sleep(1.0)
    assert cluster.output_rows(run_id) == chunks, "the zombie's output was taken after B reported the run"
    assert status(a, run_id) == status(b, run_id) == result
    row = cluster.row(run_id)
    assert (row["status"], row["attempt"]) == ("error", 1), row
    assert finished_once(cluster, run_id)["status"] == "error"
    # A is a node again: it takes the next run.
    cluster.wait_pool_full("node-a")
    assert run(a, "print('after')")["stdout"] == "after\n"


def test_a_node_restarted_at_once_after_kill_9_comes_back(tmp_path: Path, postgres_db: str) -> None:
    """A node killed with -9 and started again at once under its name, as a unit with
    Restart=on-failure does, well within its dead incarnation's lease, comes up (waiting the lease
    out if it must) rather than exiting; the run the dead one held ends error, reported once."""
    # A lease longer than a start takes (about 6 s here), so the restart does come within it.
    lease = 20.0
    alone = Cluster(tmp_path, postgres_db, lease=lease)
    try:
        alone.start("node-a").wait_pool_full()
        run_id = occupy(alone, SLEEPER, {"node-a"})["node-a"]
        alone.kill("node-a")
        killed = time.monotonic()
        restarted = alone.launch("node-a")
        restarted.wait_healthy()
        result = final(restarted, run_id, max(0.0, killed + lease + REAP_MARGIN - time.monotonic()))
        assert result["status"] == "error", result
        assert re.fullmatch(r".*stopped while this run was executing; it was not retried", result["error"])
        assert (result["stdout"], result["stderr"]) == ("started\n", "warn\n"), result
        assert alone.row(run_id)["attempt"] == 1
        finished_once(alone, run_id)
    finally:
        alone.close()


def test_runs_go_on_when_the_database_drops_every_connection(cluster: Cluster) -> None:
    """PostgreSQL ending every session of both nodes (a failover, an operator's restart) while a
    run prints: both nodes still answer its status (no stale pooled connection turned into a 503),
    the run ends succeeded with all of its output, in its result and in the store (what a stream
    replays), on its one claim, nothing is reported lost, and both nodes take new runs."""
    a = cluster["node-a"]
    code = "import time\nfor i in range(20):\n    print(i, flush=True)\n    time.sleep(0.2)\n"
    run_id = occupy(cluster, code, {"node-a"})["node-a"]
    assert cluster.drop_connections() > 0
    time.sleep(0.5)
    assert cluster.drop_connections() > 0
    for name in NAMES:
        # Several reads: each may be handed another of the pool's connections.
        for _ in range(10):
            response = httpx.get(f"{cluster[name].url}/status/{run_id}", timeout=PROMPT * 2)
            assert response.status_code == 200, f"{name} after the connections dropped: {response.text}"
    result = final(a, run_id)
    assert result["status"] == "succeeded", f"{result}\n{a.log_tail()}"
    assert result["stdout"] == "".join(f"{i}\n" for i in range(20))
    assert result["node"] == "node-a"
    assert cluster.output_text(run_id, "stdout") == result["stdout"], "the store lost output it was sent"
    assert cluster.row(run_id)["attempt"] == 1
    lost = [
        line
        for live in cluster.started
        for line in log_lines(live.log_path)
        if f"lost run {run_id}" in str(line.get("event"))
    ]
    assert not lost, lost
    for name in NAMES:
        cluster.wait_pool_full(name)
        assert run(cluster[name], "print('still')")["stdout"] == "still\n"


def test_a_node_cut_off_from_the_database_stops_its_runs_within_its_lease(
    tmp_path: Path, postgres_server: PostgresServer, postgres_db: str
) -> None:
    """Node A's path to PostgreSQL silently drops every packet (a partition: no reset, no refusal)
    while it runs a chatty program: within its lease and a little A stops that run's container
    itself and B reports the run error; a submission to A is answered 503 with Retry-After, not
    left hanging; once the path is back, A's held writes change nothing of B's result and A takes
    runs again."""
    link = Link(postgres_server.port)
    pair = Cluster(tmp_path, postgres_db, via={"node-a": link.url(postgres_db)})
    try:
        for name in NAMES:
            pair.start(name)
        for name in NAMES:
            pair.wait_pool_full(name)
            pair.wait_lists_both(name)
        a, b = pair["node-a"], pair["node-b"]
        run_id = occupy(pair, TICKER, {"node-a"})["node-a"]
        (busy,) = container_names(f"{LABEL_PID}={a.pid}")

        link.cut()
        cut = time.monotonic()
        result = until(b, run_id, lambda body: body["status"] != "running", LEASE + REAP_MARGIN, "reaped")
        assert result["status"] == "error", result
        assert result["error"] == "node node-a stopped while this run was executing; it was not retried"
        assert wait_until(lambda: busy not in container_names(f"{LABEL_PID}={a.pid}"), LEASE + REAP_MARGIN), (
            f"A still runs the container of its run {time.monotonic() - cut:.1f} s after it lost the "
            f"database, though B reported the run error:\n{a.log_tail()}"
        )
        chunks = pair.output_rows(run_id)
        asked = time.monotonic()
        try:
            response = httpx.post(f"{a.url}/run-json/", json={"code": "print(1)", "wait": False}, timeout=30)
        except httpx.TimeoutException:
            raise AssertionError("a submission to the cut-off node was left hanging for 30 s") from None
        assert response.status_code == 503, response.text
        assert "retry-after" in response.headers
        assert time.monotonic() - asked < 15 * SLOWNESS

        link.mend()
        pair.wait_lists_both("node-a")
        pair.wait_pool_full("node-a")
        assert run(a, "print('back')")["stdout"] == "back\n"
        assert status(a, run_id) == status(b, run_id) == result
        assert pair.output_rows(run_id) == chunks
        assert pair.row(run_id)["attempt"] == 1
        assert finished_once(pair, run_id)["status"] == "error"
    finally:
        link.mend()
        pair.close()
        link.close()


def test_two_nodes_started_at_once_on_an_empty_database(tmp_path: Path, postgres_db: str) -> None:
    """Two nodes started together on a database no warmpod has used both create-or-find its tables
    and come up, and each lists the other."""
    pair = Cluster(tmp_path, postgres_db)
    try:
        for name in NAMES:
            pair.launch(name)
        for name in NAMES:
            pair[name].wait_healthy()
        for name in NAMES:
            pair.wait_lists_both(name)
        assert run(pair["node-b"], "print('fresh')")["stdout"] == "fresh\n"
    finally:
        pair.close()


def test_live_output_streams_from_the_node_that_does_not_run_it(cluster: Cluster) -> None:
    """GET /status/{id}/stream at node B of a run on node A gives A's output as it is printed, in
    order, then the result naming A."""
    a, b = cluster["node-a"], cluster["node-b"]
    code = "import time\nfor i in range(5):\n    print(f'line {i}', flush=True)\n    time.sleep(0.3)\n"
    busy = occupy(cluster, SLEEPER, {"node-b"})["node-b"]
    run_id = submit(a, code)
    events: list[tuple[float, str, dict[str, Any]]] = []
    with httpx.stream(
        "GET",
        f"{b.url}/status/{run_id}/stream",
        headers={"accept": "text/event-stream"},
        timeout=HTTP_TIMEOUT,
    ) as response:
        assert response.status_code == 200, response.read()
        event, data = "message", list[str]()
        for text in response.iter_lines():
            if text == "":
                if data:
                    events.append((time.monotonic(), event, json.loads("\n".join(data))))
                event, data = "message", []
            elif text.startswith("event:"):
                event = text.removeprefix("event:").strip()
            elif text.startswith("data:"):
                data.append(text.removeprefix("data:").removeprefix(" "))
    assert events[-1][1] == "result", events
    result = events[-1][2]
    assert (result["status"], result["node"]) == ("succeeded", "node-a"), result
    printed = "".join(data["text"] for _, event, data in events if event == "stdout")
    assert printed == "".join(f"line {i}\n" for i in range(5))
    first = next(at for at, event, _ in events if event == "stdout")
    # The first line came while the program still ran (1.2 s of sleeps after it), not at the end.
    assert events[-1][0] - first > 0.6, "the output arrived only with the result"
    assert cancel(b, busy).status_code == 200


@pytest.mark.timeout(900)
def test_no_run_is_claimed_by_two_nodes(cluster: Cluster) -> None:
    """Hundreds of short runs posted alternately to both nodes, several at a time, all succeed,
    each claimed once (attempt 1) and reported by exactly one "run finished" line, and both nodes
    ran some."""
    count = 300
    urls = [cluster[name].url for name in NAMES]

    def one(index: int) -> dict[str, Any]:
        response = httpx.post(
            f"{urls[index % 2]}/run-json/", json={"code": f"print({index})"}, timeout=HTTP_TIMEOUT * 2
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as executor:
        results = list(executor.map(one, range(count)))
    elapsed = time.monotonic() - started
    wrong = [
        (i, r["status"], r["stdout"], r.get("error"))
        for i, r in enumerate(results)
        if r["stdout"] != f"{i}\n"
    ]
    assert not wrong, wrong[:10]
    assert all(r["status"] == "succeeded" for r in results)
    ids = [r["id"] for r in results]
    assert len(set(ids)) == count
    rows = cluster.rows(ids)
    assert len(rows) == count
    claimed_twice = [row for row in rows.values() if row["attempt"] != 1]
    assert not claimed_twice, claimed_twice[:10]
    assert all(rows[r["id"]]["node"] == r["node"] for r in results)
    by_node = Counter(r["node"] for r in results)
    assert set(by_node) == set(NAMES), by_node

    lines = [line for line in cluster.finished_lines() if line.get("run_id") in rows]
    reported = Counter(line["run_id"] for line in lines)
    assert not [run_id for run_id in ids if reported[run_id] != 1], Counter(reported.values())
    for line in lines:
        assert line["status"] == "succeeded", line
        assert line["node"] == rows[line["run_id"]]["node"], line
    print(f"{count} runs in {elapsed:.1f} s ({count / elapsed:.1f} runs/s), by node {dict(by_node)}")
