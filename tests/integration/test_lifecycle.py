"""Servers of their own: clean stops, crashes and their leftovers, dead containers and idle periods."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support.live import (
    GRACEFUL_EXIT,
    SLOWNESS,
    ServerFactory,
    WarmpodServer,
    containers,
    podman,
    process_alive,
    run_json,
    wait_until,
)

from warmpod.environments import Environments
from warmpod.host import facts as host
from warmpod.host import image
from warmpod.sandbox.pool import LABEL_INSTANCE, LABEL_PID
from warmpod.settings import from_env

pytestmark = pytest.mark.integration

# anyio ends a worker thread idle for 10 s when the next thread call comes (WorkerThread.MAX_IDLE_TIME).
ANYIO_THREAD_IDLE = 10.0


def instance_containers(instance: str) -> list[str]:
    """Names of every container, running or not, of one server instance."""
    return [name for c in containers(f"{LABEL_INSTANCE}={instance}") for name in c["Names"]]


def burst(server: WarmpodServer, runs: int) -> list[str]:
    """Run ``runs`` trivial programs at once; return each one's status, or its HTTP error."""

    def one(index: int) -> str:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            response = http.post("/run-json/", json={"code": f"print({index})"})
        if response.status_code != 200:
            return f"HTTP {response.status_code}: {response.text}"
        status: str = response.json()["status"]
        return status

    with ThreadPoolExecutor(max_workers=runs) as executor:
        return list(executor.map(one, range(runs)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_stop_leaves_nothing(start_server: ServerFactory, sig: signal.Signals) -> None:
    """On SIGTERM or Ctrl-C the server exits, removing its containers, its Podman service and its state."""
    server = start_server()
    server.wait_healthy()
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert run_json(http, "print(1)")["status"] == "succeeded"
    server.wait_pool_full()
    instance = server.instance()
    service_pid, state_dir = server.podman_service()
    assert instance_containers(instance)

    status = server.stop(sig, timeout=30)

    assert status in GRACEFUL_EXIT[sig], f"exit status {status}:\n{server.log_tail()}"
    assert instance_containers(instance) == [], server.log_tail()
    assert not process_alive(service_pid, "service")
    assert not state_dir.exists()


def test_sigterm_during_start_up_stops_it_at_once(start_server: ServerFactory) -> None:
    """SIGTERM while start-up still waits for its first sandbox (here none ever answers in time,
    and start-up would wait its 600 s): the server exits within seconds and leaves no container."""
    server = start_server(WARMPOD_POOL__START_TIMEOUT="0.001")
    assert wait_until(lambda: "could not make a pool container" in server.log_tail(), 30 * SLOWNESS), (
        server.log_tail()
    )
    status = server.stop(signal.SIGTERM, timeout=15 * SLOWNESS)
    assert status in GRACEFUL_EXIT[signal.SIGTERM], f"exit status {status}:\n{server.log_tail()}"
    assert "stopped during start-up" in server.log_tail(), server.log_tail()
    assert containers(f"{LABEL_PID}={server.pid}") == [], server.log_tail()


def test_crash_leftovers_are_removed_by_the_next_server(start_server: ServerFactory) -> None:
    """A SIGKILLed server's Podman service dies with it, and the next server removes its containers."""
    first = start_server()
    first.wait_healthy()
    first.wait_pool_full()
    first_instance = first.instance()
    service_pid, _ = first.podman_service()

    first.proc.kill()
    first.proc.wait(timeout=10)

    assert wait_until(lambda: not process_alive(service_pid, "service"), timeout=15), (
        "the private podman service outlived its SIGKILLed server"
    )
    assert instance_containers(first_instance), "the crashed server's containers vanished on their own"

    second = start_server()
    second.wait_healthy()
    assert instance_containers(first_instance) == [], second.log_tail()
    second_instance = second.instance()
    status = second.stop(signal.SIGTERM)
    assert status in GRACEFUL_EXIT[signal.SIGTERM], second.log_tail()
    assert instance_containers(second_instance) == [], second.log_tail()
    assert instance_containers(first_instance) == []


def test_crash_leftovers_go_by_the_owner_lock_of_a_kept_state_directory(start_server: ServerFactory) -> None:
    """With a state directory kept across restarts (as compose and Quadlet keep it), a SIGKILLed
    server leaves its owner lock file free, and the next server on that directory removes the
    crashed one's containers, their agents' directories and that lock file; a clean stop leaves
    no lock file behind."""
    # Short: the agents' sockets live under it, and a unix socket's path has 108 bytes at most.
    state = Path(tempfile.mkdtemp(prefix="wp-", dir="/tmp"))
    try:
        first = start_server(WARMPOD_ENGINE__STATE_DIR=str(state))
        first.wait_healthy()
        first.wait_pool_full()
        first_instance = first.instance()
        lock = state / "owners" / f"{first_instance}.lock"
        assert lock.exists(), first.log_tail()
        first.proc.kill()
        first.proc.wait(timeout=10)
        assert instance_containers(first_instance), "the crashed server's containers vanished on their own"

        second = start_server(WARMPOD_ENGINE__STATE_DIR=str(state))
        second.wait_healthy()
        assert instance_containers(first_instance) == [], second.log_tail()
        assert not lock.exists(), second.log_tail()
        assert list(state.glob(f"warmpod-{first_instance[:8]}-*")) == [], second.log_tail()
        second_instance = second.instance()
        assert second.stop(signal.SIGTERM) in GRACEFUL_EXIT[signal.SIGTERM], second.log_tail()
        assert instance_containers(second_instance) == [], second.log_tail()
        assert list((state / "owners").glob("*.lock")) == []
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_warm_container_that_dies_is_replaced_not_handed_to_a_run(start_server: ServerFactory) -> None:
    """A container that dies while it waits in the pool is noticed and replaced: the next run
    gets a live one and succeeds, and the pool is full again."""
    server = start_server()
    server.wait_healthy()
    server.wait_pool_full()
    # Read while it has a container: it is read from their labels, and for a moment it has none.
    instance = server.instance()
    (name,) = instance_containers(instance)
    # The pool unpauses the container the next run will take; kill it once it runs.
    assert wait_until(
        lambda: podman("inspect", "--format", "{{.State.Status}}", name).strip() == "running", 10
    )
    podman("kill", "--signal", "KILL", name)
    assert wait_until(lambda: name not in instance_containers(instance), 10 * SLOWNESS)

    with httpx.Client(base_url=server.url, timeout=60) as http:
        result = run_json(http, "import socket; print(socket.gethostname())")
    assert result["status"] == "succeeded", result
    assert result["stdout"].strip() != name
    server.wait_pool_full()
    assert f"{name} died while idle: replacing it" in server.log_path.read_text()


def test_a_container_that_dies_mid_run_gives_an_error_result(start_server: ServerFactory) -> None:
    """A run whose container is killed under it ends at once with its output so far, not a 500 and
    not a retry (it may have had effects), and the pool recovers. Where Podman does not report OOM
    kills (4.3 with runc on cgroup v1) a SIGKILL from outside looks like the OOM killer's, and the
    run is reported as a memory kill; elsewhere it is an error."""
    server = start_server()
    server.wait_healthy()
    server.wait_pool_full()
    (name,) = instance_containers(server.instance())
    code = "import time; print('started', flush=True); time.sleep(30)"
    with httpx.Client(base_url=server.url, timeout=60) as http:
        run_id = http.post("/run-json/", json={"code": code, "wait": False}).json()["id"]
        assert wait_until(
            lambda: http.get(f"/status/{run_id}").json()["stdout"] == "started\n", 10 * SLOWNESS
        )
        podman("kill", "--signal", "KILL", name)
        assert wait_until(lambda: http.get(f"/status/{run_id}").json()["status"] != "running", 10 * SLOWNESS)
        result = http.get(f"/status/{run_id}").json()
        outcome = (result["status"], result["exit_code"], result["limits_hit"])
        assert outcome in [("error", None, []), ("failed", -9, ["memory"])], result
        assert result["stdout"] == "started\n"
        if result["status"] == "error":
            assert result["error"]
        after = run_json(http, "print(2)")
    assert after["status"] == "succeeded", after
    assert after["stdout"] == "2\n"


def test_podman_service_outlives_idle_threads(start_server: ServerFactory) -> None:
    """After idling past anyio's worker-thread expiry the server still runs programs and refills its pool."""
    server = start_server(WARMPOD_POOL__SIZE="2", WARMPOD_POOL__ACQUIRE_TIMEOUT="10")
    server.wait_healthy()
    service_pid, _ = server.podman_service()
    # Several runs at once spread the Podman calls over several worker threads.
    assert burst(server, 4) == ["succeeded"] * 4
    server.wait_pool_full()

    time.sleep(ANYIO_THREAD_IDLE + 1.5)
    statuses = burst(server, 4)

    assert process_alive(service_pid, "service"), f"the private podman service died:\n{server.log_tail()}"
    assert statuses == ["succeeded"] * 4
    health = server.wait_pool_full(timeout=20 * SLOWNESS)
    assert health["last_error"] is None, health


def test_the_engine_service_comes_back_after_kill_9(start_server: ServerFactory) -> None:
    """kill -9 of the private Podman service during a run: the run still ends well (it talks to its
    agent, not to Podman), the server starts the service again, later runs succeed, nothing leaks."""
    server = start_server(WARMPOD_POOL__SIZE="2")
    server.wait_healthy()
    server.wait_pool_full()
    instance = server.instance()
    killed, _ = server.podman_service()
    code = "import time; print('started', flush=True); time.sleep(2); print('done')"
    with httpx.Client(base_url=server.url, timeout=60) as http:
        accepted = http.post("/run-json/", json={"code": code, "wait": False}).json()
        status_url = f"/status/{accepted['id']}"
        assert wait_until(lambda: http.get(status_url).json()["stdout"] == "started\n", 10 * SLOWNESS)
        os.kill(killed, signal.SIGKILL)
        assert wait_until(lambda: http.get(status_url).json()["status"] not in ("queued", "running"), 20)
        result = http.get(status_url).json()
        assert (result["status"], result["stdout"]) == ("succeeded", "started\ndone\n"), result

        assert wait_until(lambda: server.podman_service(fresh=True)[0] != killed, 10 * SLOWNESS), (
            server.log_tail()
        )
        assert [run_json(http, f"print({n})")["stdout"] for n in range(3)] == ["0\n", "1\n", "2\n"]
    health = server.wait_pool_full(timeout=30 * SLOWNESS)
    # Every container the pool gave up while the service was down was removed once it was back.
    assert wait_until(
        lambda: len(instance_containers(instance)) == health["pool"]["target"], 30 * SLOWNESS
    ), (
        instance_containers(instance),
        health,
    )
    status = server.stop(signal.SIGTERM)
    assert status in GRACEFUL_EXIT[signal.SIGTERM], server.log_tail()
    assert instance_containers(instance) == [], server.log_tail()


def test_a_deleted_runner_image_is_reported_and_recovered_from(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """The runner image deleted while serving (``podman rmi -f``, which removes the pool's
    containers too): /health names the cause, a run submitted meanwhile waits in the queue rather
    than failing, and once the image is built again that run and later ones succeed. The image is
    a copy of the real one under its own name (one layer: a label), so the real one stays."""
    # This checkout's image: older tags may still be in the store, and a copy of one of them
    # would not be the image the server looks for (it would build its own and ignore the copy).
    settings = from_env()
    real = image.image_ref(settings, Environments.load(settings).default)
    assert podman("image", "ls", "--quiet", "--filter", f"reference={real}").strip(), (
        f"no runner image {real}: run `warmpod image build`"
    )
    tag = real.rsplit(":", 1)[1]
    ref = f"localhost/warmpod-fault-{os.getpid()}:{tag}"
    (tmp_path / "Containerfile").write_text(f"FROM {real}\nLABEL io.warmpod.test=fault\n")

    def build() -> None:
        podman("build", "--quiet", "--tag", ref, "--file", str(tmp_path / "Containerfile"), str(tmp_path))

    build()
    try:
        server = start_server(WARMPOD_IMAGE__NAME=ref.rsplit(":", 1)[0], WARMPOD_POOL__BACKOFF_MAX="2")
        server.wait_healthy()
        server.wait_pool_full()
        instance = server.instance()
        # With warmpod's runtime and containers.conf: the host's defaults cannot remove the
        # pool's paused containers, and rmi then only untags the image.
        # rmi removes the image's containers first, and a refill may make a new one before the
        # image goes ("image is in use by a container"): again until the image is gone.
        for _ in range(10):
            argv, env = host.podman_command(from_env().engine, "rmi", "--force", ref)
            subprocess.run(argv, env=env, capture_output=True, check=False, timeout=60)
            argv, env = host.podman_command(from_env().engine, "image", "exists", ref)
            if subprocess.run(argv, env=env, capture_output=True, check=False, timeout=60).returncode:
                break
        else:
            pytest.fail(f"podman rmi --force could not remove {ref}")
        with httpx.Client(base_url=server.url, timeout=60) as http:

            def submit(code: str) -> str:
                run_id: str = http.post("/run-json/", json={"code": code, "wait": False}).json()["id"]
                return run_id

            def state_of(run_id: str) -> str:
                state: str = http.get(f"/status/{run_id}").json()["status"]
                return state

            # A refill racing the removal may still make a container of the old image: the first
            # run may get it (and lose it to the removal, an error); after it none can be made.
            first = submit("print('first')")
            assert wait_until(
                lambda: ref in (http.get("/health").json()["last_error"] or ""), 20 * SLOWNESS
            ), f"{http.get('/health').json()}\n{server.log_tail()}"
            assert wait_until(lambda: state_of(first) != "running", 10 * SLOWNESS)
            assert state_of(first) in ("queued", "succeeded", "error")
            waiting = submit("print('waited')")
            time.sleep(2)
            assert state_of(waiting) == "queued"

            build()
            assert wait_until(lambda: state_of(waiting) == "succeeded", 30 * SLOWNESS), server.log_tail()
            assert http.get(f"/status/{waiting}").json()["stdout"] == "waited\n"
            assert state_of(first) in ("succeeded", "error")
            assert run_json(http, "print(2)")["stdout"] == "2\n"
            assert http.get("/health").json()["status"] == "ok"
        status = server.stop(signal.SIGTERM)
        assert status in GRACEFUL_EXIT[signal.SIGTERM], server.log_tail()
        assert instance_containers(instance) == [], server.log_tail()
    finally:
        subprocess.run(["podman", "rmi", "--force", ref], capture_output=True, check=False)


def test_pool_containers_start_without_an_exit_command(server: WarmpodServer) -> None:
    """The private service's conmon starts no `podman container cleanup` when a pool container ends
    (the API's removal does that work), and containers run on the runtime warmpod picked."""
    server.wait_pool_full()
    names = instance_containers(server.instance())
    assert names
    runtime = host.pick_runtime(from_env().engine, host.HostFacts.read())
    checked = 0
    for name in names:
        try:
            pid = podman("inspect", "--format", "{{.State.ConmonPid}}", name).strip()
        except subprocess.CalledProcessError:
            # Listed, then removed before its inspect (a used container the pool replaced).
            gone = subprocess.run(["podman", "container", "exists", name], check=False, timeout=60)
            if gone.returncode == 1:
                continue
            raise
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ValueError):
            continue  # removed meanwhile
        assert argv[0].endswith(b"conmon"), argv
        assert not [arg for arg in argv if arg.startswith(b"--exit-command")], argv
        if runtime:
            assert os.path.basename(argv[argv.index(b"-r") + 1]) == runtime.encode(), argv
        checked += 1
    assert checked, names
