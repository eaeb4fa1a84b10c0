"""What the benchmarks share: a ``warmpod serve`` child process, timed series and their summary,
the host's facts, and the table and progress lines they print."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from warmpod.environments import Environments
from warmpod.host import facts as host
from warmpod.host import image
from warmpod.settings import Settings, from_env

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = "print(1)"
"""The trivial program ``run_once`` times."""
EXPECTED = "1\n"
HEALTH_POLL = 0.01
START_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0


@dataclass
class Series:
    """The samples of one way of running the program."""

    name: str
    description: str
    samples_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int | None]:
        """p50/p95/p99/min/mean/max of the samples, in milliseconds."""
        data = sorted(self.samples_ms)
        if not data:
            return {"n": 0, "p50": None, "p95": None, "p99": None, "min": None, "mean": None, "max": None}
        return {
            "n": len(data),
            "p50": percentile(data, 50),
            "p95": percentile(data, 95),
            "p99": percentile(data, 99),
            "min": data[0],
            "mean": statistics.fmean(data),
            "max": data[-1],
        }


def percentile(data: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile of sorted ``data``, linearly interpolated between closest ranks."""
    if len(data) == 1:
        return data[0]
    rank = (len(data) - 1) * pct / 100
    low = int(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def podman(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the podman CLI the way warmpod does (its containers.conf and OCI runtime)."""
    argv, env = host.podman_command(settings.engine, *args)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def built_image(settings: Settings) -> str | None:
    """The runner image's reference, or None (with a message) when it is not built yet."""
    ref = image.image_ref(settings, Environments.load(settings).default)
    # warmpod serve builds a missing image, which downloads packages: a benchmark must not.
    if podman(settings, "image", "exists", ref).returncode != 0:
        print(f"runner image {ref} is missing: run `warmpod image build` first", file=sys.stderr)
        return None
    return ref


def setup(output: Path) -> tuple[Settings, str, dict[str, Any]] | None:
    """The settings, the built runner image and the host's facts for a benchmark writing ``output``;
    None (with a message) when the image is not built yet."""
    settings = from_env()
    ref = built_image(settings)
    if ref is None:
        return None
    output.parent.mkdir(parents=True, exist_ok=True)
    return settings, ref, host_facts(settings, ref)


def cgroup_memory(container_id: str, settings: Settings) -> dict[str, int]:
    """Memory charged to a container's cgroup (v1 or v2): what its limit counts, and the anonymous part."""
    path = podman(settings, "inspect", "--format", "{{.State.CgroupPath}}", container_id).stdout.strip()
    for base, usage_file, anon_key in (
        (Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.usage_in_bytes", "total_rss"),
        (Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.current", "anon"),
    ):
        try:
            usage = int((base / usage_file).read_text())
            stat = dict(line.split() for line in (base / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        return {
            "usage": usage,
            "anon": int(stat.get(anon_key, 0)),
            "file": int(stat.get("total_cache", stat.get("file", 0))),
        }
    return {}


def index_settings(links: Path) -> dict[str, str]:
    """Settings that make uv and pip resolve and download from ``links`` only (an offline image build)."""
    return {"UV_OFFLINE": "1", "UV_FIND_LINKS": str(links), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links)}


def add_pip_wheel(links: Path) -> bool:
    """Copy the pip wheel an image build runs into ``links``, from warmpod's wheel cache where building
    the default image put it; False (with a message) when it was never built here."""
    version = image.PIP_REQUIREMENT.split()[0].split("==")[1]
    cached = sorted((Path.home() / ".cache" / "warmpod").glob(f"wheels-*/pip-{version}-py3-none-any.whl"))
    if not cached:
        print("no pip wheel in warmpod's wheel cache: run `warmpod image build` once", file=sys.stderr)
        return False
    shutil.copy(cached[0], links)
    return True


class Server:
    """``warmpod serve`` as a child process on a private port."""

    def __init__(
        self, pool_size: int, port: int, log_path: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        env = dict(os.environ)
        env.update(
            {
                "WARMPOD_SERVER__HOST": "127.0.0.1",
                "WARMPOD_SERVER__PORT": str(port),
                "WARMPOD_POOL__SIZE": str(pool_size),
                # Its own run store: another server may hold the default one.
                "WARMPOD_QUEUE__STORE_PATH": str(log_path.with_suffix(".sqlite3")),
                **(extra_env or {}),
            }
        )
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warmpod", "serve"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def wait_healthy(self, client: httpx.Client) -> dict[str, Any]:
        """Block until /health is 200; return its body."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"warmpod serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                response = client.get("/health")
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    return body
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"warmpod did not become healthy in {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self) -> dict[str, Any]:
        """SIGTERM the server, wait for it to exit, and say how that went."""
        report: dict[str, Any] = {"pid": self.proc.pid}
        if self.proc.poll() is None:
            started = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
                report["stop_seconds"] = round(time.monotonic() - started, 3)
            except subprocess.TimeoutExpired:
                report["killed"] = True
                self.proc.kill()
                self.proc.wait()
        # uvicorn re-raises the signal after a graceful shutdown, so -15 is the normal exit status.
        report["exit_code"] = self.proc.returncode
        report["exited"] = self.proc.poll() is not None
        self._log.close()
        report["graceful"] = "Application shutdown complete." in self.log_tail(size=2000)
        return report

    def log_tail(self, size: int = 3000) -> str:
        """The end of the server's log."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-size:]


def pool_ready(client: httpx.Client) -> tuple[int, int]:
    """The pool's ready count and target, from /health (0 ready while it answers 503)."""
    body = client.get("/health").json()
    pool = body.get("pool") or {}
    return int(pool.get("ready", 0)), int(pool.get("target", 0))


def wait_pool_full(client: httpx.Client, timeout: float = 120.0) -> float:
    """Block until the pool is at its target ready count; return how long that took, in seconds."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, target = pool_ready(client)
        if target and ready >= target:
            return time.perf_counter() - started
        time.sleep(HEALTH_POLL)
    raise SystemExit(f"the pool did not refill within {timeout:.0f} s")


def run_once(
    client: httpx.Client, series: Series, body: dict[str, Any] | None = None, expected: str = EXPECTED
) -> dict[str, Any] | None:
    """One POST /run-json/ of ``body`` (the trivial program by default), timed and its stdout checked;
    the RunResult when it succeeded as expected, else None (the failure counted in ``series``)."""
    started = time.perf_counter()
    try:
        response = client.post("/run-json/", json=body or {"code": PROGRAM})
    except httpx.HTTPError as exc:
        series.failures.append(f"{type(exc).__name__}: {exc}")
        return None
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        series.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
        return None
    result: dict[str, Any] = response.json()
    if result.get("status") != "succeeded" or result.get("stdout") != expected:
        series.failures.append(f"{result.get('status')}: {result.get('error') or result.get('stderr')}"[:300])
        return None
    series.samples_ms.append(elapsed)
    series.extra.setdefault("program_ms", []).append(result["duration_ms"])
    return result


def time_process(argv: list[str], env: dict[str, str] | None, series: Series, expected: str) -> None:
    """One run of a process, timed around subprocess.run and checked."""
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    elapsed = (time.perf_counter() - started) * 1000
    if proc.returncode != 0 or proc.stdout != expected:
        series.failures.append(f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return
    series.samples_ms.append(elapsed)


def repeat(count: int, label: str, step: Callable[[], object]) -> None:
    """Call ``step`` ``count`` times with a one-line progress report (what it returns is dropped)."""
    for done in range(1, count + 1):
        step()
        if done == count or done % 10 == 0:
            print(f"\r  {label}: {done}/{count}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


@contextmanager
def section(title: str) -> Iterator[None]:
    """Say what is being measured, and how long it took."""
    print(f"{title} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    yield
    print(f"  done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def fmt(value: float | int | None) -> str:
    """A milliseconds figure for the table."""
    return "-" if value is None else f"{value:.1f}"


def table(series: Sequence[Series]) -> str:
    """The results as a plain-text table."""
    header = f"{'':<11} {'n':>4} {'fail':>4} {'p50':>8} {'p95':>8} {'p99':>8} {'min':>8} {'mean':>8}  (ms)"
    lines = [header, "-" * len(header)]
    for item in series:
        s = item.summary()
        lines.append(
            f"{item.name:<11} {s['n']:>4} {len(item.failures):>4} {fmt(s['p50']):>8} {fmt(s['p95']):>8} "
            f"{fmt(s['p99']):>8} {fmt(s['min']):>8} {fmt(s['mean']):>8}"
        )
    return "\n".join(lines)


def host_facts(settings: Settings, ref: str) -> dict[str, Any]:
    """What the figures were measured on."""
    version = podman(settings, "version", "--format", "{{.Client.Version}}").stdout.strip()
    runtime = host.pick_runtime(settings.engine, host.HostFacts.read()) or "podman default"
    load = os.getloadavg()
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in load],
        "podman": version,
        "oci_runtime": runtime,
        "rootless": os.geteuid() != 0,
        "runner_image": ref,
        "python": platform.python_version(),
    }
