"""Unit tests of the agent's run loop (its one stop path) and of every name it shares with the server."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, get_args

import pytest
from support.fakes import POOL_DIR, pool_module
from support.sources import SourceServer

from warmpod import models
from warmpod.sandbox import files, protocol, runner, sandbox
from warmpod.settings import LimitSettings


@pytest.fixture(scope="module")
def bootstrap() -> ModuleType:
    """The real program bootstrap, imported as a module."""
    return pool_module("bootstrap")


def spec_env(*, cgroup_limits: bool) -> dict[str, str]:
    """The environment the server gives a sandbox's agent."""
    spec = sandbox.container_spec(
        image="img",
        seccomp_profile=Path("/s/seccomp.json"),
        name="warmpod-x-1",
        labels={},
        agent_dir=Path("/s/warmpod-x-1"),
        limits=LimitSettings(),
        cgroup_limits=cgroup_limits,
        userns=False,
        preload=("numpy",),
    )
    env: dict[str, str] = spec["env"]
    return env


# Names shared with the server -------------------------------------------------------------


def test_agent_speaks_the_servers_protocol_version(agent: ModuleType) -> None:
    """The version in the agent's hello is the one the server accepts."""
    assert agent.PROTOCOL_VERSION == protocol.PROTOCOL_VERSION


def test_agent_listens_where_the_server_connects(agent: ModuleType) -> None:
    """The agent's socket path is the server's bind mount and socket name."""
    assert f"{sandbox.AGENT_DIR}/{sandbox.SOCKET_NAME}" == agent.SOCKET_PATH


def test_agent_works_in_the_sandboxs_tmpfs(agent: ModuleType) -> None:
    """The agent's working directory is the fresh tmpfs the server mounts."""
    spec = sandbox.container_spec(
        image="img",
        seccomp_profile=Path("/s/seccomp.json"),
        name="warmpod-x-1",
        labels={},
        agent_dir=Path("/s/warmpod-x-1"),
        limits=LimitSettings(),
        cgroup_limits=True,
        userns=False,
        preload=(),
    )
    mounts = {mount["destination"]: mount for mount in spec["mounts"]}
    assert mounts[agent.WORKDIR]["type"] == "tmpfs"


def test_out_dir_and_path_bound_are_the_servers(agent: ModuleType, bootstrap: ModuleType) -> None:
    """The out/ the bootstrap makes, the agent sends and the server accepts is one, as is the path bound."""
    assert agent.OUT_DIR == bootstrap.OUT_DIR == files.OUT_DIR
    assert agent.MAX_PATH == protocol.MAX_PATH


def test_the_exit_name_the_bootstrap_sets_is_the_one_the_agent_reads(
    agent: ModuleType, bootstrap: ModuleType
) -> None:
    """The bootstrap announces its exit under the very name the agent looks for."""
    assert bootstrap.EXIT_NAME.encode() == agent.EXIT_NAME


def test_agent_reads_exactly_the_environment_the_server_sets(agent: ModuleType) -> None:
    """Every WARMPOD_ variable the agent reads is one the server sets, and the other way round."""
    source = (POOL_DIR / "agent.py").read_text()
    read = set(re.findall(r"\"(WARMPOD_[A-Z_]+)\"", source))
    given = {
        name
        for env in (spec_env(cgroup_limits=True), spec_env(cgroup_limits=False))
        for name in env
        if name.startswith("WARMPOD_")
    }
    assert read == given


def test_agent_stops_only_for_limits_the_protocol_names(agent: ModuleType) -> None:
    """Each limit the agent stops a program for is a limit name the server's Result accepts."""
    assert set(agent.LIMIT_STOPS) <= set(get_args(models.LimitName))


def test_server_waits_for_the_agents_drain_and_a_margin(agent: ModuleType) -> None:
    """The server's grace past the timeout is the agent's drain grace plus a positive margin."""
    assert runner.AGENT_DRAIN_GRACE == agent.DRAIN_GRACE
    assert runner.SERVER_GRACE - agent.DRAIN_GRACE >= 0.2


# The run loop, with a real child process -------------------------------------------------------


class Child:
    """A real process wired as the agent wires the program's interpreter: its pipes and a job pipe."""

    def __init__(self, agent: ModuleType, argv: list[str]) -> None:
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        self.job_r, self.job_w = os.pipe()
        pid = os.posix_spawn(
            argv[0],
            argv,
            {"PATH": "/usr/bin:/bin"},
            file_actions=[
                (os.POSIX_SPAWN_DUP2, stdin_r, 0),
                (os.POSIX_SPAWN_DUP2, stdout_w, 1),
                (os.POSIX_SPAWN_DUP2, stderr_w, 2),
            ],
        )
        for fd in (stdin_r, stdout_w, stderr_w):
            os.close(fd)
        self.proc = agent.Program(pid, stdin_w, stdout_r, stderr_r)

    def kill(self) -> None:
        """SIGKILL the process, if it still runs."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        """Kill and reap the process, close every descriptor the test still holds."""
        self.kill()
        self.proc.wait()
        for fd in (self.job_r, self.proc.stdout, self.proc.stderr):
            os.close(fd)
        self.proc.close_stdin()


@pytest.fixture
def spawn(
    agent: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Callable[[list[str]], Child]]:
    """Start real children as the program; the agent's kill(-1) is replaced by a kill of the child
    (never kill(-1) on the host), and it sees no cgroup counters and a private working directory."""
    children: list[Child] = []
    monkeypatch.setenv("WARMPOD_CGROUP_COUNTERS", "0")
    monkeypatch.delenv("WARMPOD_CPU_SECONDS", raising=False)
    monkeypatch.setattr(agent, "WORKDIR", str(tmp_path))

    def start(argv: list[str]) -> Child:
        child = Child(agent, argv)
        children.append(child)
        monkeypatch.setattr(agent, "kill_everything", child.kill)
        return child

    yield start
    for child in children:
        child.close()


def job(timeout: float, cap: int) -> dict[str, Any]:
    """A job frame's content as the agent receives it."""
    empty = base64.b64encode(b"").decode()
    return {
        "type": "job",
        "code": base64.b64encode(b"pass").decode(),
        "stdin": empty,
        "timeout": timeout,
        "max_output_bytes": cap,
        "files": [],
    }


@pytest.fixture
def conn() -> Iterator[socket.socket]:
    """The agent's end of a connection whose server end is never read (frames wait in its buffer)."""
    server_end, agent_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with server_end, agent_end:
        yield agent_end


def test_wall_time_stops_the_program_once_within_the_drain_grace(
    agent: ModuleType, spawn: Callable[[list[str]], Child], conn: socket.socket
) -> None:
    """A program that outlives its timeout is stopped for wall_time and answered by timeout + DRAIN_GRACE."""
    child = spawn(["/bin/sleep", "30"])
    the_job = job(timeout=0.3, cap=100)
    run = agent.Run(agent.PendingOutput(conn), child.proc, the_job)
    run.start(child.job_w)
    run.watch()
    assert time.monotonic() - run.started < 0.3 + agent.DRAIN_GRACE + 0.3
    result = run.finish(conn, the_job)
    assert result["limits_hit"] == ["wall_time"]
    assert result["exit_code"] == -signal.SIGKILL


def test_a_program_that_survives_its_stop_gets_one_drain_grace_only(
    agent: ModuleType,
    spawn: Callable[[list[str]], Child],
    conn: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After a limit stop the watch ends DRAIN_GRACE later even if the program still holds its pipes,
    never with a second grace (which could carry the answer past the server's SERVER_GRACE)."""
    child = spawn(["/bin/sh", "-c", "head -c 2000 /dev/zero; exec sleep 30"])
    # A program still dying (a large address space to free): the stop's kill does not end it yet.
    monkeypatch.setattr(agent, "kill_everything", lambda: None)
    run = agent.Run(agent.PendingOutput(conn), child.proc, job(timeout=10.0, cap=100))
    stops: list[tuple[str, float]] = []
    stop = run.stop

    def recorded(reason: str) -> None:
        stops.append((reason, time.monotonic()))
        stop(reason)

    run.stop = recorded
    run.start(child.job_w)
    run.watch()
    ended = time.monotonic()
    assert [reason for reason, _ in stops] == ["output"]
    assert ended - stops[0][1] < agent.DRAIN_GRACE + 0.3
    assert run.limits_hit == ["output"]
    assert run.truncated == {"stdout": True, "stderr": False}
    assert run.sent["stdout"] == 100


def test_cpu_spent_across_processes_stops_the_run_for_cpu_time(
    agent: ModuleType,
    spawn: Callable[[list[str]], Child],
    conn: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the container's CPU counter grew a second past the budget, the program is stopped for cpu_time."""
    monkeypatch.setenv("WARMPOD_CPU_SECONDS", "2")
    used = iter([0.0, 100.0])
    monkeypatch.setattr(agent, "program_cpu_seconds", lambda: next(used, 100.0))
    child = spawn(["/bin/sleep", "30"])
    the_job = job(timeout=10.0, cap=100)
    run = agent.Run(agent.PendingOutput(conn), child.proc, the_job)
    run.start(child.job_w)
    run.watch()
    result = run.finish(conn, the_job)
    assert result["limits_hit"] == ["cpu_time"]
    assert result["exit_code"] == -signal.SIGKILL


def test_stdin_is_fed_and_the_output_streamed_until_the_program_exits(
    agent: ModuleType, spawn: Callable[[list[str]], Child], conn: socket.socket
) -> None:
    """A program that reads its stdin, echoes it and exits by itself ends with its code and no limit."""
    child = spawn(["/bin/sh", "-c", "cat; exit 3"])
    the_job = job(timeout=10.0, cap=100)
    the_job["stdin"] = base64.b64encode(b"hello").decode()
    pending = agent.PendingOutput(conn)
    sent: list[tuple[str, bytes]] = []
    add = pending.add

    def recorded(stream: str, data: bytes) -> None:
        sent.append((stream, data))
        add(stream, data)

    pending.add = recorded
    run = agent.Run(pending, child.proc, the_job)
    run.start(child.job_w)
    run.watch()
    result = run.finish(conn, the_job)
    assert (result["exit_code"], result["limits_hit"]) == (3, [])
    assert sent == [("stdout", b"hello")]


def test_a_runs_data_sources_are_relayed_while_it_runs_and_cut_when_it_ends(
    agent: ModuleType, spawn: Callable[[list[str]], Child], conn: socket.socket, tmp_path: Path
) -> None:
    """A job's sources get listeners named in the program's environment and ports in the job's
    header; connections carry bytes while the program runs, refused once it stopped, and all cut
    by the end of the run."""
    source = SourceServer(tmp_path / "source-0.sock")
    child = spawn(["/bin/sleep", "30"])
    the_job = job(timeout=10.0, cap=100)
    the_job["sources"] = [["warehouse", str(source.path)]]
    run = agent.Run(agent.PendingOutput(conn), child.proc, the_job)
    port = run.relays.ports[0]
    header = run.pieces[0].split()
    assert header[4:6] == [b"1", str(port).encode()]
    assert b"WARMPOD_SOURCE_WAREHOUSE" in run.pieces
    assert f"127.0.0.1:{port}".encode() in run.pieces
    run.start(child.job_w)
    watching = threading.Thread(target=run.watch)
    watching.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as program:
            program.sendall(b"select 1")
            assert program.recv(8) == b"select 1"
            child.kill()
            watching.join(5)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5)
            result = run.finish(conn, the_job)
            assert program.recv(1) == b""
        assert source.ended[0].wait(5)
        assert result["exit_code"] == -signal.SIGKILL
        assert run.relays.relays == {}
    finally:
        watching.join(5)
        source.close()
