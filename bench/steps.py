"""What one pool container costs, step by step: create, start, agent ready, pause, unpause, run, remove.

Usage::

    .venv/bin/python bench/steps.py [--count N] [--preload numpy,pandas]

Drives a private Podman service the way the pool does, one container at a time, and prints the
median and minimum of each step in milliseconds. Under load these steps, not the run, set the pace.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio

from warmpod.environments import Environments
from warmpod.host import image, podman_service
from warmpod.host.facts import own_user_namespaces
from warmpod.host.image import context_dir
from warmpod.host.podman_api import PodmanApi
from warmpod.sandbox import protocol
from warmpod.sandbox.sandbox import AGENT_EXIT_WAIT, SOCKET_NAME, connect, container_spec
from warmpod.settings import from_env

STEPS = ("create", "start", "ready", "pause", "unpause", "run", "remove")


async def measure(
    count: int,
    preload: tuple[str, ...],
    probe: Callable[[Path], float] | None = None,
    *,
    pause: bool = True,
) -> tuple[dict[str, list[float]], float]:
    """Seconds each step took, for ``count`` containers made and removed one after another, and
    what ``probe(state_dir)`` (bench/lifecycle.py: the private service's CPU) grew by meanwhile.

    Containers are made as the pool makes them (a user namespace of their own where it gives
    them one); ``pause=False`` leaves out pause and unpause, as the pool does while runs wait."""
    settings = from_env()
    userns = own_user_namespaces(settings, rootless=os.geteuid() != 0)
    state = Path(tempfile.mkdtemp(prefix="wp-steps-", dir="/tmp"))
    times: dict[str, list[float]] = {step: [] for step in STEPS}
    probed = 0.0
    try:
        async with podman_service.running(settings.engine, state) as podman:
            podman_api = PodmanApi(podman.url, settings.engine.api_concurrency)
            seccomp = (context_dir(settings) / "seccomp.json").resolve()
            try:
                probed = -probe(state) if probe else 0.0
                for index in range(count):
                    directory = state / str(index)
                    directory.mkdir()
                    spec = container_spec(
                        image=image.image_ref(settings, Environments.load(settings).default),
                        seccomp_profile=seccomp,
                        name=f"warmpod-steps-{uuid.uuid4().hex[:8]}",
                        labels={"io.warmpod.bench": "steps"},
                        agent_dir=directory,
                        limits=settings.limits,
                        cgroup_limits=True,
                        userns=userns,
                        preload=preload,
                    )
                    started = time.perf_counter()

                    def lap(step: str) -> None:
                        nonlocal started
                        now = time.perf_counter()
                        times[step].append(now - started)
                        started = now

                    container_id = await podman_api.create(spec)
                    lap("create")
                    await podman_api.start(container_id)
                    lap("start")
                    channel = await connect(directory / SOCKET_NAME, 1 << 20)
                    await channel.receive()
                    lap("ready")
                    if pause:
                        await podman_api.pause(container_id)
                        lap("pause")
                        await podman_api.unpause(container_id)
                        lap("unpause")
                    job = protocol.Job(code=b"print(1)", stdin=b"", timeout=5, max_output_bytes=1024)
                    await channel.send(job)
                    while not isinstance(await channel.receive(), protocol.Result):
                        pass
                    lap("run")
                    # As the pool does (Sandbox.aclose): let the agent that answered exit first.
                    with anyio.move_on_after(AGENT_EXIT_WAIT):
                        await channel.wait_hangup()
                    await channel.aclose()
                    started = time.perf_counter()
                    await podman_api.destroy(container_id)
                    lap("remove")
                probed += probe(state) if probe else 0.0
            finally:
                podman_api.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return times, probed


def main() -> None:
    """Measure and print one line per step."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=10, help="containers (10)")
    parser.add_argument("--preload", default="", help="modules to preload, comma-separated (none)")
    args = parser.parse_args()
    preload = tuple(name for name in args.preload.split(",") if name)
    times, _ = anyio.run(measure, args.count, preload)
    print(f"preload: {', '.join(preload) or 'none'}; {args.count} containers, one at a time (ms)")
    for step, samples in times.items():
        if not samples:
            continue
        print(f"{step:<8} median {statistics.median(samples) * 1000:7.1f}   min {min(samples) * 1000:7.1f}")


if __name__ == "__main__":
    main()
