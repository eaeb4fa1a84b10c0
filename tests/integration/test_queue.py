"""Non-blocking runs against the real service: the durable queue, status, live output, cancel, restarts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.live import GRACEFUL_EXIT, ServerFactory, WarmpodServer, run_json, wait_until

pytestmark = pytest.mark.integration

FINAL = {"succeeded", "failed", "timeout", "error", "cancelled"}
# One run at a time, however far the pool grows: what is queued stays queued while one runs.
ONE_WORKER = {"WARMPOD_QUEUE__WORKERS": "1"}
SLEEPER = "import time\nprint('started', flush=True)\ntime.sleep(60)\n"


def submit(client: httpx.Client, code: str, **fields: object) -> dict[str, Any]:
    """POST with ``wait`` false; the answer must be 202 with the run's URLs."""
    response = client.post("/run-json/", json={"code": code, "wait": False, **fields})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    assert response.headers["location"] == body["status_url"]
    return body


def status(client: httpx.Client, run_id: str) -> dict[str, Any]:
    """One ``GET /status/{id}`` that must answer 200."""
    response = client.get(f"/status/{run_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def final(client: httpx.Client, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll until the run is over and return its RunResult."""
    deadline = time.monotonic() + timeout
    while True:
        body = status(client, run_id)
        if body["status"] in FINAL:
            return body
        assert time.monotonic() < deadline, f"run {run_id} still {body['status']} after {timeout:.0f} s"
        time.sleep(0.05)


def until_status(client: httpx.Client, run_id: str, wanted: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll until the run reaches ``wanted`` and return its RunResult then."""
    deadline = time.monotonic() + timeout
    while True:
        body = status(client, run_id)
        if body["status"] == wanted and (wanted != "running" or body["stdout"]):
            return body
        assert body["status"] not in FINAL, f"run {run_id} ended {body} before it was {wanted}"
        assert time.monotonic() < deadline, f"run {run_id} not {wanted} after {timeout:.0f} s: {body}"
        time.sleep(0.05)


def events(
    client: httpx.Client, url: str, **headers: str
) -> Iterator[tuple[float, str, dict[str, Any], str]]:
    """Server-Sent Events from ``url`` as (arrival time, event, data, id), parsed as a browser would."""
    with client.stream("GET", url, headers={"accept": "text/event-stream", **headers}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event, event_id = "message", ""
        data: list[str] = []
        for line in response.iter_lines():
            if line == "":
                if data:
                    yield time.monotonic(), event, json.loads("\n".join(data)), event_id
                event, data = "message", []
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                event_id = value


def test_a_run_submitted_without_waiting_is_polled_to_its_result(client: httpx.Client) -> None:
    """wait=false answers 202 at once with the status URL; polling it ends with the full RunResult."""
    accepted = submit(client, "import sys\nprint(sys.stdin.read().upper())", stdin="hi")
    assert accepted["status"] == "queued"
    assert accepted["status_url"].endswith(f"/status/{accepted['id']}")
    assert accepted["stream_url"] == accepted["status_url"] + "/stream"
    result = final(client, accepted["id"])
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "HI\n"
    assert result["id"] == accepted["id"]
    # The absolute URL works as given.
    assert httpx.get(accepted["status_url"], timeout=10).json() == result


def test_wait_false_works_for_uploads_and_as_a_query_parameter(client: httpx.Client) -> None:
    """/run-file/ takes wait as a form field; both endpoints take it as ?wait=false."""
    response = client.post("/run-file/", files={"file": ("main.py", b"print(2)")}, data={"wait": "false"})
    assert response.status_code == 202, response.text
    assert final(client, response.json()["id"])["stdout"] == "2\n"
    response = client.post("/run-json/?wait=false", json={"code": "print(3)"})
    assert response.status_code == 202, response.text
    assert final(client, response.json()["id"])["stdout"] == "3\n"


def test_a_blocking_run_is_kept_and_can_be_read_again(client: httpx.Client) -> None:
    """A run answered at once (wait true) is in the store too: /status/{id} gives the same result."""
    result = run_json(client, "print('kept')")
    assert status(client, result["id"]) == result


def test_output_streams_live_before_the_run_ends(client: httpx.Client) -> None:
    """Lines printed with pauses between arrive as SSE events while the program still runs, in order,
    each naming its stream; the last event is the RunResult."""
    code = (
        "import sys, time\n"
        "for i in range(3):\n"
        "    print(f'out {i}', flush=True)\n"
        "    print(f'err {i}', file=sys.stderr, flush=True)\n"
        "    time.sleep(0.7)\n"
    )
    accepted = submit(client, code)
    received = list(events(client, accepted["stream_url"]))
    kinds = [event for _, event, _, _ in received]
    assert kinds[-1] == "result"
    output = [(event, data["text"]) for _, event, data, _ in received if event in {"stdout", "stderr"}]
    assert "".join(text for event, text in output if event == "stdout") == "out 0\nout 1\nout 2\n"
    assert "".join(text for event, text in output if event == "stderr") == "err 0\nerr 1\nerr 2\n"
    first_output = next(at for at, event, _, _ in received if event == "stdout")
    ended = received[-1][0]
    assert ended - first_output > 1.0, "the first line came only when the run ended"
    result = received[-1][2]
    assert result["status"] == "succeeded"
    assert result["stdout"] == "out 0\nout 1\nout 2\n"
    # Sequence numbers grow, so a client can resume with Last-Event-ID.
    ids = [int(event_id) for _, event, _, event_id in received if event in {"stdout", "stderr"}]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_the_stream_of_a_finished_run_replays_it(client: httpx.Client) -> None:
    """A run already over streams what it printed, then its result; Last-Event-ID skips what was seen."""
    result = run_json(client, "print('a', flush=True)\nprint('b', flush=True)")
    url = f"/status/{result['id']}/stream"
    received = [(event, data) for _, event, data, _ in events(client, url)]
    assert "".join(data["text"] for event, data in received if event == "stdout") == "a\nb\n"
    assert received[-1] == ("result", result)
    last_seen = next(event_id for _, event, _, event_id in events(client, url) if event == "stdout")
    rest = list(events(client, url, **{"last-event-id": last_seen}))
    assert all(int(event_id) > int(last_seen) for _, event, _, event_id in rest if event == "stdout")
    assert rest[-1][1] == "result"


def test_cancelling_a_running_run_kills_it_and_keeps_its_output(
    client: httpx.Client, server: WarmpodServer
) -> None:
    """DELETE on a running run stops it at once (its container is killed); it ends cancelled with what
    it had printed, and the next run is served normally."""
    accepted = submit(client, SLEEPER)
    until_status(client, accepted["id"], "running")
    started = time.monotonic()
    response = client.delete(f"/status/{accepted['id']}")
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 5
    cancelled = response.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["stdout"] == "started\n"
    assert status(client, accepted["id"])["status"] == "cancelled"
    # Cancelling again is harmless; the run stays cancelled.
    assert client.delete(f"/status/{accepted['id']}").json()["status"] == "cancelled"
    assert run_json(client, "print('next')")["stdout"] == "next\n"


def test_cancelling_a_finished_run_is_a_conflict(client: httpx.Client) -> None:
    """DELETE on a run that ended otherwise is a 409 problem; the result is unchanged."""
    result = run_json(client, "print(1)")
    response = client.delete(f"/status/{result['id']}")
    assert response.status_code == 409, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert status(client, result["id"]) == result


@pytest.mark.parametrize("run_id", ["0" * 32, "not-an-id", "A" * 32, "x" * 5000])
def test_unknown_runs_are_404_problems(client: httpx.Client, run_id: str) -> None:
    """Unknown or malformed ids are 404 problems for status, stream and cancel alike."""
    for response in (
        client.get(f"/status/{run_id}"),
        client.get(f"/status/{run_id}/stream"),
        client.delete(f"/status/{run_id}"),
    ):
        assert response.status_code == 404, response.text
        assert response.headers["content-type"].startswith("application/problem+json")


def test_a_queued_run_can_be_cancelled_and_the_queue_is_bounded(start_server: ServerFactory) -> None:
    """With the only sandbox busy, runs queue up to max_queued; the next gets 429 with Retry-After
    (blocking or not); a queued run cancelled never runs; the server answers throughout."""
    live = start_server(WARMPOD_QUEUE__MAX_QUEUED="2", **ONE_WORKER)
    live.wait_healthy()
    with httpx.Client(base_url=live.url, timeout=30) as client:
        busy = submit(client, SLEEPER)
        until_status(client, busy["id"], "running")
        first = submit(client, "print('first')")
        second = submit(client, "print('second')")
        for response in (
            client.post("/run-json/", json={"code": "print('third')", "wait": False}),
            client.post("/run-json/", json={"code": "print('blocking')"}),
            client.post("/run-file/", files={"file": ("m.py", b"pass")}, data={"wait": "false"}),
        ):
            assert response.status_code == 429, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert "WARMPOD_QUEUE__MAX_QUEUED" in response.json()["detail"]
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["queue"] == {"queued": 2, "running": 1, "max_queued": 2, "unserved": {}}
        assert status(client, first["id"])["status"] == "queued"
        cancelled = client.delete(f"/status/{first['id']}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert client.delete(f"/status/{busy['id']}").json()["status"] == "cancelled"
        assert final(client, second["id"])["stdout"] == "second\n"
        assert status(client, first["id"])["status"] == "cancelled"
        assert status(client, first["id"])["stdout"] == ""


def test_results_expire_after_the_retention(start_server: ServerFactory) -> None:
    """Past queue.retention a finished run's id is a 404, for status and stream alike."""
    live = start_server(WARMPOD_QUEUE__RETENTION="1")
    live.wait_healthy()
    with httpx.Client(base_url=live.url, timeout=30) as client:
        result = run_json(client, "print(1)")
        assert status(client, result["id"])["stdout"] == "1\n"
        time.sleep(1.5)
        assert client.get(f"/status/{result['id']}").status_code == 404
        assert client.get(f"/status/{result['id']}/stream").status_code == 404


def test_kill_9_loses_no_queued_run_and_reports_the_one_in_flight(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """SIGKILL of the server with a run executing and runs queued: after a restart on the same store
    every queued run completes exactly once, and the one in flight is reported error, not running."""
    store = str(tmp_path / "shared.sqlite3")
    first = start_server(WARMPOD_QUEUE__STORE_PATH=store, **ONE_WORKER)
    first.wait_healthy()
    with httpx.Client(base_url=first.url, timeout=30) as client:
        in_flight = submit(client, SLEEPER)
        until_status(client, in_flight["id"], "running")
        queued = [submit(client, f"print('token-{i}')") for i in range(5)]
        assert all(status(client, run["id"])["status"] == "queued" for run in queued)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)

    second = start_server(WARMPOD_QUEUE__STORE_PATH=store)
    second.wait_healthy()
    with httpx.Client(base_url=second.url, timeout=30) as client:
        lost = status(client, in_flight["id"])
        assert lost["status"] == "error", lost
        # The killed server's node (the host name, as neither start named it) and the same message.
        assert lost["node"]
        assert (
            lost["error"] == f"node {lost['node']} stopped while this run was executing; it was not retried"
        )
        assert lost["stdout"] == "started\n"
        for i, run in enumerate(queued):
            result = final(client, run["id"])
            assert result["status"] == "succeeded", result
            assert result["stdout"] == f"token-{i}\n"


def test_sigterm_finishes_running_runs_and_keeps_queued_ones(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """A graceful stop lets the running run finish, starts nothing new, and the queued run runs after
    the restart."""
    store = str(tmp_path / "shared.sqlite3")
    first = start_server(WARMPOD_QUEUE__STORE_PATH=store, **ONE_WORKER)
    first.wait_healthy()
    with httpx.Client(base_url=first.url, timeout=30) as client:
        running = submit(client, "import time\nprint('begun', flush=True)\ntime.sleep(2)\nprint('done')")
        until_status(client, running["id"], "running")
        waiting = submit(client, "print('after restart')")
    exit_status = first.stop(signal.SIGTERM)
    assert exit_status in GRACEFUL_EXIT[signal.SIGTERM], first.log_tail()

    second = start_server(WARMPOD_QUEUE__STORE_PATH=store)
    second.wait_healthy()
    with httpx.Client(base_url=second.url, timeout=30) as client:
        done = status(client, running["id"])
        assert done["status"] == "succeeded", done
        assert done["stdout"] == "begun\ndone\n"
        assert final(client, waiting["id"])["stdout"] == "after restart\n"


def test_two_servers_cannot_share_a_store(start_server: ServerFactory, tmp_path: Path) -> None:
    """A second server on a store in use refuses to start, naming the setting to change."""
    store = str(tmp_path / "shared.sqlite3")
    first = start_server(WARMPOD_QUEUE__STORE_PATH=store, **ONE_WORKER)
    first.wait_healthy()
    second = start_server(WARMPOD_QUEUE__STORE_PATH=store)
    assert wait_until(lambda: second.proc.poll() is not None, 60), second.log_tail()
    assert second.proc.returncode != 0
    assert "WARMPOD_QUEUE__STORE_PATH" in second.log_tail()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs for the run store, which needs root")
def test_a_full_store_disk_refuses_new_runs_and_loses_none(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """The run store's disk fills up while a run executes: new runs get a 503 problem saying why,
    what was stored is still read, the run in flight keeps its result until it can be written, and
    once there is room again it is there and new runs are taken."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    try:
        server = start_server(WARMPOD_QUEUE__STORE_PATH=str(disk / "runs.sqlite3"))
        server.wait_healthy()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            before = run_json(http, "print('before')")
            during = submit(http, "import time\nprint('started', flush=True)\ntime.sleep(3)\nprint('done')")[
                "id"
            ]
            assert wait_until(lambda: status(http, during)["stdout"] == "started\n", 20)
            filler = disk / "filler"
            with filler.open("wb") as fill, contextlib.suppress(OSError):
                while True:
                    fill.write(b"\0" * 65536)
                    fill.flush()
            refused = [http.post("/run-json/", json={"code": "print(1)", "wait": False}) for _ in range(20)]
            assert {response.status_code for response in refused} == {503}, refused[-1].text
            assert refused[0].headers["content-type"] == "application/problem+json"
            assert "store" in refused[0].json()["detail"]
            assert refused[0].headers["retry-after"]
            assert status(http, before["id"])["stdout"] == "before\n"
            time.sleep(4)
            assert status(http, during)["status"] == "running"

            filler.unlink()
            assert wait_until(lambda: status(http, during)["status"] in FINAL, 40), server.log_tail()
            assert (status(http, during)["status"], status(http, during)["stdout"]) == (
                "succeeded",
                "started\ndone\n",
            )
            assert run_json(http, "print('after')")["stdout"] == "after\n"
        server.close()
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)
