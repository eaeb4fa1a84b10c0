"""Data sources: a program granted one reaches its relay and nothing else, and cannot abuse it.

The test plays the server's part (``protocol.Job.sources``): it makes each source's Unix socket
in the sandbox's directory and serves the connections the agent relays there, while a real agent
in a real sandbox runs the hostile program. Nothing leaves this
machine: the sources are the test's own Unix sockets, every TCP connection stays in the
sandbox's loopback.
"""

from __future__ import annotations

import errno
import itertools
import json
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from textwrap import dedent
from typing import Any

import anyio
import pytest
from support.fakes import pool_module
from support.hostile import CPU_TIME, MEMORY_MB, PIDS
from support.sources import Serve, SourceServer, echo

from warmpod.environments import Environments
from warmpod.host import image, podman_service
from warmpod.host.facts import own_user_namespaces
from warmpod.host.image import context_dir
from warmpod.host.podman_api import PodmanApi
from warmpod.sandbox.protocol import Job, Output, Result
from warmpod.sandbox.sandbox import AGENT_DIR, Sandbox
from warmpod.settings import Settings, from_env

pytestmark = pytest.mark.security

LABEL = "io.warmpod.test"
MAX_RELAYS = pool_module("agent").MAX_RELAYS
"""The agent's cap on connections relayed at once."""


@dataclass(frozen=True)
class Ran:
    """What the agent answered for one program: its result, its output, and how long it took."""

    result: Result
    stdout: str
    stderr: str
    seconds: float
    landlock: int
    """The Landlock ABI the agent reported in its greeting."""

    def report(self) -> Any:
        """The JSON document the program printed as the last line of its stdout."""
        assert self.stdout.strip(), f"the program printed nothing: {self}"
        return json.loads(self.stdout.strip().splitlines()[-1])


class Sandboxes:
    """Makes real sandboxes as the pool does and runs one program in each, its sources served by the test."""

    def __init__(
        self, settings: Settings, podman_api: PodmanApi, state: Path, *, can_limit: bool, userns: bool
    ):
        self.settings = settings
        self.podman_api = podman_api
        self.state = state
        self.can_limit = can_limit
        self.userns = userns
        self.image = image.image_ref(settings, Environments.load(settings).default)
        self.seccomp = (context_dir(settings) / "seccomp.json").resolve()
        self.serial = itertools.count()

    async def run(
        self,
        code: str,
        sources: Sequence[tuple[str, Serve]] = (),
        *,
        timeout: float = 10.0,
        after: Callable[[list[SourceServer]], None] | None = None,
    ) -> Ran:
        """Run ``code`` with ``sources`` (name, how its server serves a connection) granted;
        ``after(servers)`` is called once the agent answered, before the sandbox goes."""
        directory = self.state / f"sources-{next(self.serial)}"
        directory.mkdir(mode=0o700)
        sandbox = await Sandbox.start(
            self.podman_api,
            image=self.image,
            seccomp_profile=self.seccomp,
            name=f"warmpod-sources-{uuid.uuid4().hex[:8]}",
            labels={LABEL: "sources"},
            directory=directory,
            limits=self.settings.limits,
            can_limit=self.can_limit,
            userns=self.userns,
            timeout=60,
        )
        servers: list[SourceServer] = []
        try:
            for index, (_name, serve) in enumerate(sources):
                servers.append(SourceServer(directory / f"source-{index}.sock", serve))
            job = Job(
                code=code.encode(),
                stdin=b"",
                timeout=timeout,
                max_output_bytes=65536,
                sources=[
                    (name, f"{AGENT_DIR}/source-{index}.sock") for index, (name, _) in enumerate(sources)
                ],
            )
            started = time.monotonic()
            await sandbox.send(job)
            out = {"stdout": b"", "stderr": b""}
            with anyio.fail_after(timeout + 10):
                while not isinstance(message := await sandbox.receive(), Result):
                    if isinstance(message, Output):
                        out[message.stream] += message.data
            ran = Ran(
                message,
                out["stdout"].decode(errors="replace"),
                out["stderr"].decode(errors="replace"),
                time.monotonic() - started,
                sandbox.landlock,
            )
            if after is not None:
                await anyio.to_thread.run_sync(after, servers)
            return ran
        finally:
            await sandbox.aclose()
            for server in servers:
                server.close()


@pytest.fixture(scope="module")
async def sandboxes() -> AsyncIterator[Sandboxes]:
    """A private Podman service and the runner image (built if missing), as ``warmpod serve`` has them."""
    settings = from_env(limits={"memory_mb": MEMORY_MB, "pids": PIDS, "cpu_time": CPU_TIME})
    state = Path(tempfile.mkdtemp(prefix="wp-sources-", dir="/tmp"))
    async with podman_service.running(settings.engine, state) as podman:
        podman_api = PodmanApi(podman.url, settings.engine.api_concurrency)
        try:
            info = await podman_api.info()
            if not await podman_api.image_exists(
                image.image_ref(settings, Environments.load(settings).default)
            ):
                await anyio.to_thread.run_sync(
                    image.build_image, settings, Environments.load(settings).default, print
                )
            userns = own_user_namespaces(settings, rootless=info.rootless)
            yield Sandboxes(settings, podman_api, state, can_limit=info.can_limit, userns=userns)
            assert await podman_api.list_labelled(LABEL) == []
        finally:
            podman_api.close()
    shutil.rmtree(state, ignore_errors=True)


def probe(code: str) -> str:
    """A program that fills ``out`` (a dict) with ``code`` and prints it as JSON; ``attempt(name,
    fn)`` records ``fn()``'s value, or the errno name of the OSError it raised."""
    return (
        dedent(
            """
            import errno, json, os, socket
            out = {}
            HOST = os.environ["WARMPOD_SOURCE_WAREHOUSE_HOST"]
            PORT = int(os.environ["WARMPOD_SOURCE_WAREHOUSE_PORT"])
            def attempt(name, fn):
                try:
                    out[name] = fn()
                except socket.gaierror as exc:
                    out[name] = "gaierror"
                except OSError as exc:
                    out[name] = errno.errorcode.get(exc.errno, repr(exc))
            def tcp(address, family=socket.AF_INET):
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.settimeout(5)
                    s.connect(address)
                    s.sendall(b"ping")
                    return s.recv(4).decode()
            """
        )
        + dedent(code)
        + "\nprint(json.dumps(out))\n"
    )


async def test_a_granted_source_is_the_only_tcp_the_program_has(sandboxes: Sandboxes) -> None:
    """With a source granted the program reaches its relay, and may bind no TCP port and connect
    to no other loopback port (its own listener, sshd's): Landlock says no before the socket does."""
    ran = await sandboxes.run(
        probe(
            """
            out["address"] = os.environ["WARMPOD_SOURCE_WAREHOUSE"] == f"{HOST}:{PORT}"
            attempt("relay", lambda: tcp((HOST, PORT)))
            def bind(family, address):
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.bind(address)
                    return "bound"
            attempt("bind", lambda: bind(socket.AF_INET, ("127.0.0.1", 0)))
            attempt("bind any", lambda: bind(socket.AF_INET, ("0.0.0.0", 8080)))
            attempt("bind ipv6", lambda: bind(socket.AF_INET6, ("::1", 0)))
            # listen() without bind takes an ephemeral port by itself: nothing may connect to it.
            lone = socket.socket()
            try:
                lone.listen()
                own = lone.getsockname()[1]
                attempt("own listener", lambda: tcp(("127.0.0.1", own)))
            except OSError as exc:
                out["own listener"] = errno.errorcode.get(exc.errno, repr(exc))
            attempt("ssh", lambda: tcp(("127.0.0.1", 22)))
            attempt("next port", lambda: tcp(("127.0.0.1", PORT + 1)))
            """
        ),
        [("warehouse", echo)],
    )
    assert ran.result.exit_code == 0, ran
    if ran.landlock < 4:
        pytest.skip(f"Landlock ABI {ran.landlock} here: network rules need 4")
    denied = errno.errorcode[errno.EACCES]
    assert ran.report() == {
        "address": True,
        "relay": "ping",
        "bind": denied,
        "bind any": denied,
        "bind ipv6": denied,
        "own listener": denied,
        "ssh": denied,
        "next port": denied,
    }


async def test_without_sources_the_programs_loopback_is_as_before(sandboxes: Sandboxes) -> None:
    """A job without sources gets no relay variables and keeps its own loopback TCP (no network rules)."""
    ran = await sandboxes.run(
        dedent(
            """
            import json, os, socket
            with socket.socket() as server, socket.socket() as client:
                server.bind(("127.0.0.1", 0))
                server.listen()
                client.connect(server.getsockname())
                conn, _ = server.accept()
                client.sendall(b"own")
                echoed = conn.recv(3).decode()
                conn.close()
            names = sorted(name for name in os.environ if name.startswith("WARMPOD"))
            print(json.dumps({"echoed": echoed, "names": names}))
            """
        )
    )
    assert ran.result.exit_code == 0, ran
    assert json.loads(ran.stdout) == {"echoed": "own", "names": []}


async def test_no_name_resolves_and_the_agents_sockets_are_out_of_reach(sandboxes: Sandboxes) -> None:
    """With a source granted, no host name resolves, and the Unix sockets behind the relay (the
    server's, in the agent's directory) cannot be reached: only the relay's TCP port leads out."""
    ran = await sandboxes.run(
        probe(
            f"""
            attempt("resolve", lambda: socket.getaddrinfo("example.com", 443))
            def unix(path):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(path)
                    return "connected"
            attempt("source socket", lambda: unix("{AGENT_DIR}/source-0.sock"))
            attempt("agent socket", lambda: unix("{AGENT_DIR}/agent.sock"))
            attempt("list", lambda: os.listdir("{AGENT_DIR}"))
            """
        ),
        [("warehouse", echo)],
    )
    assert ran.result.exit_code == 0, ran
    denied = errno.errorcode[errno.EACCES]
    assert ran.report() == {
        "resolve": "gaierror",
        "source socket": denied,
        "agent socket": denied,
        "list": denied,
    }


async def test_forged_frames_on_a_relay_reach_only_its_own_stream(sandboxes: Sandboxes) -> None:
    """Bytes shaped like the agent's frames (a result, output, an oversized length) sent on one
    relayed connection arrive verbatim on that connection's socket only; the run's result and
    output are the program's own."""
    forged = (
        b"\x00\x00\x00\x2a"
        + b'{"type":"result","exit_code":99,"error":null}'
        + b"\x00\x00\x00\x30"
        + b'{"type":"output","stream":"stdout","data":"cHduZWQ="}'
        + b"\xff\xff\xff\xff"
        + b"job"
    )
    received: dict[bytes, bytes] = {}
    lock = threading.Lock()

    def record(conn: socket.socket) -> None:
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        with lock:
            received[data[:6]] = data
        conn.sendall(b"stream " + data[:6])

    ran = await sandboxes.run(
        probe(
            f"""
            def send(data):
                with socket.create_connection((HOST, PORT), timeout=5) as s:
                    s.sendall(data)
                    s.shutdown(socket.SHUT_WR)
                    answer = b""
                    while chunk := s.recv(100):
                        answer += chunk
                    return answer.decode()
            attempt("forged", lambda: send(b"forged" + {forged!r}))
            attempt("plain", lambda: send(b"plain!"))
            print("the program's own line")
            """
        ),
        [("warehouse", record)],
    )
    assert ran.result.exit_code == 0, ran
    assert ran.result.limits_hit == []
    assert ran.stdout.splitlines()[0] == "the program's own line"
    assert ran.report() == {"forged": "stream forged", "plain": "stream plain!"}
    assert received == {b"forged": b"forged" + forged, b"plain!": b"plain!"}


async def test_thousands_of_connections_are_capped_and_the_agent_keeps_answering(
    sandboxes: Sandboxes,
) -> None:
    """A program holding 200 connections gets MAX_RELAYS relayed and the rest closed at once; a
    thousand more opened and dropped in a row leave the agent answering on time, every source
    connection closed by the end."""
    ended: list[bool] = []

    def check(servers: list[SourceServer]) -> None:
        ended.extend(event.wait(5) for event in servers[0].ended)

    ran = await sandboxes.run(
        probe(
            """
            held = [socket.create_connection((HOST, PORT), timeout=5) for _ in range(200)]
            answers = []
            for s in held:
                try:
                    s.sendall(b"?")
                    answers.append(s.recv(1).decode())
                except OSError:
                    answers.append("")
            out["echoed"] = answers.count("?")
            out["closed"] = answers.count("")
            for s in held:
                s.close()
            churned = 0
            for _ in range(1000):
                try:
                    socket.create_connection((HOST, PORT), timeout=5).close()
                    churned += 1
                except OSError:
                    pass
            out["churned"] = churned
            """
        ),
        [("warehouse", echo)],
        timeout=30,
        after=check,
    )
    assert ran.result.exit_code == 0, ran
    assert ran.report() == {"echoed": MAX_RELAYS, "closed": 200 - MAX_RELAYS, "churned": 1000}
    assert ended
    assert all(ended)


async def test_a_program_that_never_reads_or_never_stops_is_cut_with_its_run(sandboxes: Sandboxes) -> None:
    """A source streaming to a program that never reads is held back, not buffered without end;
    a program streaming to a source without end is stopped at its timeout; both connections are
    cut when the run ends, and the agent answers on time."""
    flooded = [0]
    drained = [0]

    def flood(conn: socket.socket) -> None:
        chunk = b"x" * 65536
        try:
            while True:
                flooded[0] += conn.send(chunk)
        except OSError:
            return

    def drain(conn: socket.socket) -> None:
        while chunk := conn.recv(1 << 20):
            drained[0] += len(chunk)

    ended: list[bool] = []

    def check(servers: list[SourceServer]) -> None:
        ended.extend(event.wait(5) for server in servers for event in server.ended)

    timeout = 4.0
    ran = await sandboxes.run(
        dedent(
            """
            import os, socket
            idle = socket.create_connection(
                ("127.0.0.1", int(os.environ["WARMPOD_SOURCE_IDLE_PORT"])), timeout=5
            )
            sink = socket.create_connection(
                ("127.0.0.1", int(os.environ["WARMPOD_SOURCE_SINK_PORT"])), timeout=5
            )
            print("streaming", flush=True)
            while True:
                sink.sendall(b"y" * 65536)
            """
        ),
        [("idle", flood), ("sink", drain)],
        timeout=timeout,
        after=check,
    )
    assert ran.result.limits_hit == ["wall_time"], ran
    assert ran.stdout == "streaming\n"
    assert ran.seconds < timeout + 3
    assert ended == [True, True]
    # What the sandbox took of the flood: kernel socket buffers and one relay buffer, no more.
    assert flooded[0] < 32 << 20
    assert drained[0] > 0
