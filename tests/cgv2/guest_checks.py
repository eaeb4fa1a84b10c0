"""Checks of the cgv2 job besides the guest's pytest (run.sh on the host, job.sh in the guest).

Each exits non-zero with the reason when it fails.

python guest_checks.py doctor DOCTOR_TXT   every limit a cgroup can enforce is enforced by one
python guest_checks.py pause OUT_TXT       a real ``warmpod serve`` keeps its idle containers paused
python guest_checks.py unit OUT_TXT        deploy/systemd/warmpod.service under the user's systemd runs
                                           a program, and its stop leaves no container
python guest_checks.py quadlet OUT_TXT     deploy/quadlet/warmpod.container (the server image) likewise
python guest_checks.py latency LATENCY_JSON  one line: warmpod idle p50 beside ``podman run --rm``
python guest_checks.py failed JUNIT_XML    the node ids of the tests that failed, one per line
python guest_checks.py speed OUT_JSON      median ms of a preloading ``podman run --rm`` of the runner image
python guest_checks.py slowness HOST_JSON GUEST_JSON  how many times slower the guest is (rounded up)
python guest_checks.py host-suites SHARE OUT  (host) the unit and API suites on the runner image's Python
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import httpx

from warmpod.environments import Environments
from warmpod.host import facts as host
from warmpod.host import image
from warmpod.settings import from_env

# What `warmpod doctor` must print on a cgroup v2 host with delegation, rootless.
DOCTOR_LINES = [
    ", rootless",
    "cgroups: v2",
    "  memory: cgroup, cgroup memory limit, swap capped at the same value",
    "  pids: cgroup, cgroup pids limit",
    "  cpu_share: cgroup, cgroup cpu quota",
    "Pause idle containers: yes",
]


def doctor(path: Path) -> int:
    """Every cgroup-enforceable limit is enforced by a cgroup, and idle containers pause."""
    text = path.read_text()
    missing = [line for line in DOCTOR_LINES if line not in text]
    for line in missing:
        print(f"FAIL doctor: no line with {line!r}")
    if "NOT ENFORCED" in text or "would refuse" in text:
        print("FAIL doctor: some limit is not enforced")
        return 1
    if not missing:
        print("PASS doctor: memory (swap capped), pids and cpu quota by cgroup; idle containers pause")
    return 1 if missing else 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pause(out: Path) -> int:
    """Start ``warmpod serve`` (pool of 4), wait for a full pool, and list its containers' states."""
    port = _free_port()
    log = out.with_suffix(".server.log")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WARMPOD_POOL__SIZE": "4"}
    with log.open("wb") as sink:
        server = subprocess.Popen(
            [sys.executable, "-m", "warmpod", "serve", "--port", str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    lines: list[str] = []
    failures: list[str] = []
    try:
        health: dict[str, Any] = {}
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    response = client.get("/health")
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code == 200:
                    health = response.json()
                    if health["pool"]["ready"] >= health["pool"]["target"]:
                        break
                time.sleep(0.5)
        time.sleep(2)  # a thaw of the next container in line, if any, has settled
        listed = subprocess.run(
            ["podman", "ps", "-a", "--filter", f"label=io.warmpod.pid={server.pid}", "--format", "json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        states = [str(c["State"]) for c in json.loads(listed or "[]")]
        lines.append(f"health: paused_idle={health.get('paused_idle')} pool={health.get('pool')}")
        lines.append(f"pool container states: {sorted(states)}")
        if health.get("paused_idle") is not True:
            failures.append(f"/health says paused_idle={health.get('paused_idle')}")
        # The container next in line may be thawed ahead of demand; every other idle one is paused.
        paused = states.count("paused")
        if paused < max(1, len(states) - 1) or len(states) < 4:
            failures.append(f"{paused} of {len(states)} idle containers paused")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=40)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    lines += [f"FAIL pause: {failure}" for failure in failures] or ["PASS pause: idle containers are paused"]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


def _user_systemctl(*args: str) -> str:
    env = {**os.environ}
    env.setdefault("DBUS_SESSION_BUS_ADDRESS", f"unix:path={os.environ['XDG_RUNTIME_DIR']}/bus")
    done = subprocess.run(
        ["systemctl", "--user", *args], capture_output=True, text=True, env=env, timeout=120
    )
    if done.returncode != 0 and args[0] not in ("is-active", "show"):
        raise RuntimeError(f"systemctl --user {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def unit(out: Path) -> int:
    """The systemd user unit as shipped, with a drop-in for this guest's venv and a free port:
    start it, run a program through it, stop it, and find none of its containers left."""
    repo = Path(__file__).resolve().parents[2]
    units = Path.home() / ".config" / "systemd" / "user"
    dropin = units / "warmpod.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (units / "warmpod.service").write_text((repo / "deploy" / "systemd" / "warmpod.service").read_text())
    port = _free_port()
    (dropin / "guest.conf").write_text(
        "[Service]\n"
        f"WorkingDirectory={repo}\n"
        "ExecStart=\n"
        f"ExecStart={Path(sys.executable).parent / 'warmpod'} serve\n"
        f"Environment=WARMPOD_SERVER__PORT={port}\n"
        "Environment=WARMPOD_POOL__SIZE=2\n"
    )
    lines: list[str] = []
    failures: list[str] = []
    try:
        _serve_and_stop("warmpod.service", port, lines, failures)
    finally:
        (units / "warmpod.service").unlink(missing_ok=True)
        (dropin / "guest.conf").unlink(missing_ok=True)
        _user_systemctl("daemon-reload")
    lines += [f"FAIL unit: {failure}" for failure in failures] or ["PASS unit: started, ran, stopped clean"]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


SERVER_IMAGE = "localhost/warmpod-server:cgv2"
"""The server image run.sh built from the snapshot and the guest loaded (job.sh)."""


def _serve_and_stop(service: str, port: int, lines: list[str], failures: list[str]) -> None:
    """Start the user unit ``service``, wait for /health on ``port``, run a program, stop it, and
    fail if a pool container it made is left."""
    before = set(_podman_names("label=io.warmpod.instance"))
    try:
        _user_systemctl("daemon-reload")
        _user_systemctl("start", service)
        lines.append(f"started {service}")
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            while time.monotonic() < deadline:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if _user_systemctl("is-active", service) not in ("active", "activating"):
                    failures.append(f"the unit stopped: {_user_systemctl('status', '--no-pager', service)}")
                    return
                time.sleep(0.5)
            else:
                failures.append(
                    f"no healthy server within 300 s: {_user_systemctl('status', '--no-pager', service)}"
                )
                return
            result = client.post("/run-json/", json={"code": "print(6 * 7)"}).json()
            lines.append(f"run: status={result.get('status')} stdout={result.get('stdout')!r}")
            if result.get("stdout") != "42\n":
                failures.append(f"the run answered {result}")
    except RuntimeError as exc:
        failures.append(str(exc))
    finally:
        try:
            _user_systemctl("stop", service)
        except RuntimeError as exc:
            failures.append(str(exc))
        state = _user_systemctl("is-active", service)
        lines.append(
            f"after stop: {state}, result {_user_systemctl('show', '-p', 'Result', '--value', service)}"
        )
        if state not in ("inactive", "failed"):
            failures.append(f"still {state} after stop")
        left = [name for name in _podman_names("label=io.warmpod.instance") if name not in before]
        lines.append(f"pool containers left: {left}")
        if left:
            failures.append(f"its stop left {left}")


def _podman_names(*filters: str) -> list[str]:
    argv = ["podman", "ps", "-a", "--format", "{{.Names}}"]
    for condition in filters:
        argv += ["--filter", condition]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()


def quadlet(out: Path) -> int:
    """The Quadlet unit as shipped, its image and port pointed at this guest's (as an operator
    edits them): it starts the server container, serves a run, and its stop leaves no container."""
    repo = Path(__file__).resolve().parents[2]
    units = Path.home() / ".config" / "containers" / "systemd"
    units.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    shipped = (repo / "deploy" / "quadlet" / "warmpod.container").read_text().splitlines()
    edited = [
        f"Image={SERVER_IMAGE}"
        if line.startswith("Image=")
        else f"PublishPort=127.0.0.1:{port}:8000"
        if line.startswith("PublishPort=")
        else line
        for line in shipped
    ]
    unit_file = units / "warmpod.container"
    unit_file.write_text("\n".join(edited) + "\n")
    lines: list[str] = [f"installed {unit_file} (image {SERVER_IMAGE}, port {port})"]
    failures: list[str] = []
    try:
        _serve_and_stop("warmpod.service", port, lines, failures)
    finally:
        server = _podman_names("name=systemd-warmpod")
        lines.append(f"server container left: {server}")
        if server:
            failures.append(f"its stop left {server}")
        unit_file.unlink(missing_ok=True)
        _user_systemctl("daemon-reload")
    lines += [f"FAIL quadlet: {failure}" for failure in failures] or [
        "PASS quadlet: started, ran, stopped clean"
    ]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


def latency(path: Path) -> int:
    """Print warmpod's idle p50 beside the naive ``podman run --rm`` p50, from bench/latency.py."""
    results = json.loads(path.read_text())
    idle = results["series"]["idle"]["summary"]["p50"]
    naive = results["series"]["naive"]["summary"]["p50"]
    ratio = results.get("naive_over_warmpod_idle_p50")
    print(
        f"guest latency p50: warmpod /run-json/ idle {idle:.1f} ms, podman run --rm {naive:.1f} ms"
        + (f" ({ratio:.1f}x)" if ratio else "")
    )
    return 0


def failed(path: Path) -> int:
    """Print the node id of every test that failed or errored in a junit file (module-level tests)."""
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            module = (case.get("classname") or "").replace(".", "/")
            print(f"{module}.py::{case.get('name')}")
    return 0


# What a pool refill costs: a container of the runner image that imports the preloaded modules.
SPEED_PROBE = ["run", "--rm", "--network", "none"]
SPEED_CODE = "import numpy, pandas"
SPEED_RUNS = 3


def speed(path: Path) -> int:
    """Time a preloading ``podman run --rm`` of the runner image (one warm-up, median of three)."""
    settings = from_env(dict(os.environ))
    ref = image.image_ref(settings, Environments.load(settings).default)
    times: list[float] = []
    for _ in range(SPEED_RUNS + 1):
        argv, env = host.podman_command(settings.engine, *SPEED_PROBE, ref, "python3", "-I", "-c", SPEED_CODE)
        started = time.perf_counter()
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=600)
        times.append((time.perf_counter() - started) * 1000)
    median = sorted(times[1:])[SPEED_RUNS // 2]
    result = {
        "probe": f"podman {' '.join(SPEED_PROBE)} IMAGE python3 -I -c {SPEED_CODE!r}",
        "ms": times,
        "median_ms": median,
    }
    path.write_text(json.dumps(result) + "\n")
    print(f"speed: {result['probe']}: median {median:.0f} ms of {[round(t) for t in times[1:]]}")
    return 0


def host_suites(share: Path, out: Path) -> int:
    """Run the unit and API suites under the runner image's Python (3.13) in a container on the host.

    They need no Podman, so they need no guest: the share's wheels for 3.13 (the guest's) install
    into a tmpfs, the snapshot is mounted read-only, and each suite writes junit-<suite>-py3.13.xml.
    """
    settings = from_env(dict(os.environ))
    ref = image.image_ref(settings, Environments.load(settings).default)
    out.mkdir(parents=True, exist_ok=True)
    script = (
        "set -eu; set -- /share/wheels/pip-*.whl; "
        'python3 "$1/pip" install --quiet --disable-pip-version-check --no-index --root-user-action=ignore '
        "--find-links /share/wheels --target /tmp/site -r /share/requirements.txt "
        "/share/wheels/warmpod-*.whl; "
        "rc=0; for suite in unit api; do "
        "PYTHONPATH=/tmp/site python3 -m pytest -p no:cacheprovider -q -rfEs --basetemp /tmp/pytest-$suite "
        "--junitxml /out/junit-$suite-py3.13.xml -o junit_family=xunit2 tests/$suite || rc=$?; done; exit $rc"
    )
    argv, env = host.podman_command(
        settings.engine,
        *("run", "--rm", "--network", "none", "--workdir", "/share/repo"),
        *("--env", "PYTHONDONTWRITEBYTECODE=1"),
        *("--volume", f"{share}:/share:ro", "--volume", f"{out}:/out", "--tmpfs", "/tmp:rw,exec,size=2g"),
        *(ref, "sh", "-c", script),
    )
    return subprocess.run(argv, env=env, check=False, timeout=1800).returncode


def slowness(host: Path, guest: Path) -> int:
    """Print how many times slower the guest made the speed probe than the host, rounded up, at least 1."""
    ratio = json.loads(guest.read_text())["median_ms"] / json.loads(host.read_text())["median_ms"]
    print(max(1, math.ceil(ratio)))
    return 0


def main(argv: list[str]) -> int:
    """Dispatch one check."""
    checks = {
        "doctor": doctor,
        "pause": pause,
        "unit": unit,
        "quadlet": quadlet,
        "latency": latency,
        "failed": failed,
        "speed": speed,
    }
    if len(argv) == 3 and argv[0] in ("slowness", "host-suites"):
        two = {"slowness": slowness, "host-suites": host_suites}[argv[0]]
        return two(Path(argv[1]), Path(argv[2]))
    if len(argv) != 2 or argv[0] not in checks:
        print(__doc__, file=sys.stderr)
        return 2
    return checks[argv[0]](Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
