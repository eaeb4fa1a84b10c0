"""deploy/compose.yaml for real: podman-compose starts the server image against the host's rootful
Podman socket, a program runs through it, and ``down -v`` leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.live import SLOWNESS, containers, free_port, podman, run_json, wait_for_health, wait_until

from warmpod.sandbox.pool import LABEL_HOST, LABEL_INSTANCE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "compose.yaml"
SERVER_IMAGE = "localhost/warmpod-server"
ROOTFUL_SOCKET = Path("/run/podman/podman.sock")
PROJECT_LABEL = "io.podman.compose.project"
# The server image's first build downloads its wheels; later ones reuse the layer cache.
BUILD_TIMEOUT = 900.0
COMPOSE_TIMEOUT = 120.0
# Health waits for the pool's first sandbox and the self-test: seconds here, longer on slow hosts.
HEALTH_TIMEOUT = 120.0 * SLOWNESS
# Hashes every file of the installed warmpod package, as the image holds it.
_IMAGE_HASHES = """
import hashlib, json, pathlib, warmpod
root = pathlib.Path(warmpod.__file__).parent
print(json.dumps({str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}))
"""


def _checkout_hashes() -> dict[str, str]:
    """The files the wheel takes from this checkout (src/warmpod, and pool/ as warmpod/pool)."""
    trees = {"": REPO / "src" / "warmpod", "pool/": REPO / "pool"}
    return {
        f"{prefix}{path.relative_to(root)}": hashlib.sha256(path.read_bytes()).hexdigest()
        for prefix, root in trees.items()
        for path in root.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def _server_image_current() -> bool:
    """Whether the server image exists and holds this checkout's code."""
    if subprocess.run(["podman", "image", "exists", SERVER_IMAGE], check=False, timeout=60).returncode:
        return False
    # Explicit limits: the image's user may not take Podman's default ones (see compose.yaml).
    out = podman(
        "run", "--rm", "--network=none", "--ulimit=nofile=1024", "--ulimit=nproc=1024",
        "--entrypoint", "python3", SERVER_IMAGE, "-c", _IMAGE_HASHES,
    )  # fmt: skip
    installed: dict[str, str] = json.loads(out)
    return all(installed.get(name) == digest for name, digest in _checkout_hashes().items())


@pytest.fixture(scope="module")
def images() -> None:
    """The runner image and a server image of this checkout, built where missing or stale.

    A build downloads wheels from PyPI; CI builds both images before the tests, so it never
    has to here.
    """
    if shutil.which("podman") is None:
        pytest.skip("podman is not on PATH: deploy/compose.yaml needs a real Podman")
    subprocess.run(
        [sys.executable, "-m", "warmpod", "image", "build"], check=True, timeout=BUILD_TIMEOUT, cwd=REPO
    )
    if not _server_image_current():
        subprocess.run(["bash", "deploy/build-server-image.sh"], check=True, timeout=BUILD_TIMEOUT, cwd=REPO)
        assert _server_image_current(), "deploy/build-server-image.sh built an image without this checkout"


def _compose_command() -> list[str]:
    """podman-compose: the project environment's, else the one on PATH."""
    beside = Path(sys.executable).with_name("podman-compose")
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if found is None:
        pytest.fail("podman-compose is neither in the virtual environment nor on PATH")
    return [found]


def _pings(path: Path) -> bool:
    """Whether a Podman API service answers on the unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
    except OSError:
        return False
    return status_line.startswith(b"HTTP/1.") and status_line.split()[1:2] == [b"200"]


@pytest.fixture(scope="module")
def rootful_socket() -> Iterator[Path]:
    """The host's rootful Podman socket; a ``podman system service`` is started there if none answers."""
    if os.geteuid() != 0:
        pytest.skip("tests the rootful deployment (CI runs as root); the rootless one needs keep-id")
    if _pings(ROOTFUL_SOCKET):
        yield ROOTFUL_SOCKET
        return
    ROOTFUL_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    ROOTFUL_SOCKET.unlink(missing_ok=True)  # a dead service's: a new one could not bind
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{ROOTFUL_SOCKET}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _pings(ROOTFUL_SOCKET), timeout=30), "podman system service did not answer"
        yield ROOTFUL_SOCKET
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


@dataclass
class Stack:
    """One compose project of deploy/compose.yaml on a free port, with a state directory of its own."""

    socket: Path
    project: str = field(default_factory=lambda: f"wpcompose{uuid.uuid4().hex[:8]}")
    port: int = field(default_factory=free_port)
    state_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="wpc-")))
    hostname: str = ""

    @property
    def url(self) -> str:
        """Where the stack publishes the server: the host's loopback."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def volume(self) -> str:
        """The state volume's name: compose prefixes it with the project."""
        return f"{self.project}_warmpod-state"

    def compose(self, *args: str) -> subprocess.CompletedProcess[str]:
        """One podman-compose command on this project; fails with its output if it fails."""
        env = {
            **os.environ,
            "WARMPOD_PODMAN_SOCKET": str(self.socket),
            "WARMPOD_STATE_DIR": str(self.state_dir),
            "WARMPOD_PORT": str(self.port),
        }
        done = subprocess.run(
            [*_compose_command(), "-p", self.project, "-f", str(COMPOSE_FILE), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=COMPOSE_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, f"podman-compose {' '.join(args)}: {done.returncode}\n{done.stderr}"
        return done

    def server(self) -> dict[str, Any]:
        """The server container, as ``podman inspect`` shows it."""
        (names,) = [c["Names"] for c in containers(f"{PROJECT_LABEL}={self.project}")]
        inspected: list[dict[str, Any]] = json.loads(podman("inspect", names[0]))
        return inspected[0]

    def logs(self) -> str:
        """The end of the server's output, for assertion messages."""
        listed = containers(f"{PROJECT_LABEL}={self.project}")
        if not listed:
            return "(no server container)"
        done = subprocess.run(
            ["podman", "logs", "--tail", "60", listed[0]["Id"]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return done.stdout + done.stderr

    def wait_healthy(self) -> dict[str, Any]:
        """Wait, bounded, until GET /health answers 200 on the published port; return its body."""
        return wait_for_health(self.url, HEALTH_TIMEOUT, self.logs, interval=0.5)

    def remove_all(self) -> None:
        """Remove by force whatever of the stack is left, its pool's containers included."""
        labels = [f"{PROJECT_LABEL}={self.project}"]
        if self.hostname:
            labels.append(f"{LABEL_HOST}={self.hostname}")
        for label in labels:
            for container in containers(label):
                subprocess.run(["podman", "rm", "-f", "-t", "0", container["Id"]], check=False, timeout=60)
        for kind, name in (("volume", self.volume), ("network", f"{self.project}_default")):
            subprocess.run(["podman", kind, "rm", "-f", name], capture_output=True, check=False, timeout=60)
        shutil.rmtree(self.state_dir, ignore_errors=True)


@pytest.fixture
def stack(images: None, rootful_socket: Path) -> Iterator[Stack]:
    """A compose project that is removed at the end whatever the test did or asserted."""
    project = Stack(rootful_socket)
    try:
        yield project
    finally:
        project.remove_all()


def _processes(container: str) -> list[tuple[int, str, str]]:
    """PID (in the container), host user and command line of each process in ``container``."""
    lines = podman("top", container, "pid", "huser", "args").splitlines()[1:]
    processes = []
    for line in lines:
        pid, huser, args = line.split(maxsplit=2)
        processes.append((int(pid), huser, args.strip()))
    return processes


def test_compose_up_runs_code_and_down_leaves_nothing(stack: Stack) -> None:
    """compose up serves runs as a non-root user under an init; down -v removes it, its pool, its volume."""
    stack.compose("up", "-d")
    health = stack.wait_healthy()
    assert health["status"] == "ok", health
    assert health["rootless"] is False, health

    with httpx.Client(base_url=stack.url, timeout=120) as client:
        result = run_json(client, "print(6*7)")
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "42\n", result

    server = stack.server()
    name = server["Name"]
    stack.hostname = server["Config"]["Hostname"]
    assert server["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped", server["HostConfig"]
    processes = _processes(name)
    # podman's --init (compose `init: true`) is catatonit, mounted at /run/podman-init.
    assert processes[0][0] == 1, processes
    assert processes[0][2].startswith("/run/podman-init "), processes
    assert any("warmpod serve" in args for _, _, args in processes), processes
    assert all(huser not in {"0", "root"} for _, huser, _ in processes), processes
    # The image's health check (python3 -c urllib on /health) passes in the container.
    check = subprocess.run(["podman", "healthcheck", "run", name], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, f"health check failed: {check.stdout}{check.stderr}\n{stack.logs()}"

    # The server's own pool, in the same (rootful) storage the socket serves.
    pool = containers(f"{LABEL_HOST}={stack.hostname}")
    instances = {str(c["Labels"][LABEL_INSTANCE]) for c in pool}
    assert len(instances) == 1, f"pool containers: {[(c['Names'], c['Labels']) for c in pool]}"

    stack.compose("down", "-v")
    left = containers(f"{PROJECT_LABEL}={stack.project}")
    assert not left, f"project containers left: {[c['Names'] for c in left]}"
    (instance,) = instances
    left_pool = containers(f"{LABEL_INSTANCE}={instance}")
    assert not left_pool, f"pool containers left: {[c['Names'] for c in left_pool]}"
    volume = subprocess.run(["podman", "volume", "exists", stack.volume], check=False, timeout=60)
    assert volume.returncode == 1, f"volume {stack.volume} left behind"
