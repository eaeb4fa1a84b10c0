"""CPU per container lifecycle: a pool container (bare, then preloaded) beside ``podman run --rm``.

Usage::

    .venv/bin/python bench/lifecycle.py [--count N] [--preload numpy,pandas] [--skip-naive]

Each phase makes ``--count`` containers one after another and runs ``print(1)`` in each: the pool's
way (bench/steps.py's create, start, agent ready, pause, unpause, run, remove, through a private
Podman service), once bare and once preloading ``--preload``; and the naive way, one
``podman run --rm IMAGE python3 -c 'print(1)'`` each. For each it prints the CPU time per
container of the whole machine (/proc/stat, every core, user + system + irq) and its split by
process name from Linux process accounting (Debian's ``acct``: ``accton FILE`` ... ``accton off``,
read back with ``dump-acct``), plus the private Podman service's own CPU (it does not exit during a
phase, so accounting cannot see it: read from /proc/PID/stat). Run it on an otherwise idle machine.
Needs root (accton) and the runner image.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
from steps import measure

from warmpod import image
from warmpod.host import podman_command
from warmpod.settings import from_env

TICKS = os.sysconf("SC_CLK_TCK")
# Conmon's exit command (`podman container cleanup`) runs after a container is removed: give it
# time to end inside the accounting window.
SETTLE = 3.0


def machine_cpu() -> float:
    """CPU seconds every core has spent busy since boot (user, nice, system, irq, softirq, steal)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def service_cpu(marker: str) -> float:
    """CPU seconds of the live processes whose command line holds ``marker`` (the private
    ``podman system service`` of the phase: its socket path is under the phase's directory)."""
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if marker.encode() in cmdline and b"service" in cmdline:
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


def exited(path: Path) -> dict[str, float]:
    """CPU seconds by command name of the processes that ended while accounting wrote ``path``."""
    out = subprocess.run(["dump-acct", str(path)], check=True, capture_output=True, text=True).stdout
    cpu: dict[str, float] = collections.defaultdict(float)
    for line in out.splitlines():
        parts = [part.strip() for part in line.split("|")]
        if len(parts) > 3:
            # dump-acct: command | version | user time | system time | elapsed | ...
            cpu[parts[0]] += (float(parts[2]) + float(parts[3])) / TICKS
    return dict(cpu)


@contextmanager
def accounted() -> Iterator[dict[str, object]]:
    """Process accounting and machine CPU around the block; the figures land in the dict."""
    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="wp-acct-") as directory:
        path = Path(directory) / "pacct"
        path.touch()
        subprocess.run(["accton", str(path)], check=True, capture_output=True)
        before = machine_cpu()
        try:
            yield figures
            time.sleep(SETTLE)
        finally:
            figures["machine"] = machine_cpu() - before
            subprocess.run(["accton", "off"], check=True, capture_output=True)
        figures["by_process"] = exited(path)


def pool_phase(count: int, preload: tuple[str, ...]) -> dict[str, object]:
    """The pool's lifecycle ``count`` times, bench/steps.py's way."""
    with accounted() as figures:
        # The service's start and stop fall in the window too (a fixed cost, not per container,
        # small beside 20 containers); its CPU during the loop is read live.
        _, figures["service"] = anyio.run(measure, count, preload, lambda state: service_cpu(str(state)))
    return figures


def naive_phase(count: int) -> dict[str, object]:
    """``podman run --rm`` of the runner image ``count`` times."""
    settings = from_env()
    ref = image.image_ref(settings)
    command, env = podman_command(
        settings.engine, "run", "--rm", "--network=none", ref, "python3", "-c", "print(1)"
    )
    with accounted() as figures:
        for _ in range(count):
            subprocess.run(command, env=env, check=True, capture_output=True)
    return figures


def report(name: str, figures: dict[str, object], count: int) -> None:
    """One phase: machine CPU per container and the split by process, largest first."""
    machine = float(figures["machine"]) * 1000 / count  # type: ignore[arg-type]
    service = float(figures.get("service", 0.0)) * 1000 / count  # type: ignore[arg-type]
    by_process: dict[str, float] = figures["by_process"]  # type: ignore[assignment]
    print(f"\n{name}: {machine:.0f} ms of CPU per container (whole machine, {count} containers)")
    if service:
        print(f"  {'podman service (live)':<28} {service:6.1f} ms")
    for command, seconds in sorted(by_process.items(), key=lambda item: -item[1]):
        share = seconds * 1000 / count
        if share >= 0.5:
            print(f"  {command:<28} {share:6.1f} ms")


def main() -> None:
    """Measure each phase and print them one after another."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20, help="containers per phase (20)")
    parser.add_argument("--preload", default="numpy,pandas", help="modules of the preloaded phase")
    parser.add_argument("--skip-naive", action="store_true", help="leave out podman run --rm")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("accton"):
        sys.exit("bench/lifecycle.py needs root and Debian's acct package (apt install acct)")
    preload = tuple(name for name in args.preload.split(",") if name)
    report("pool container, bare", pool_phase(args.count, ()), args.count)
    if preload:
        report(f"pool container, preloading {','.join(preload)}", pool_phase(args.count, preload), args.count)
    if not args.skip_naive:
        report("podman run --rm (naive)", naive_phase(args.count), args.count)


if __name__ == "__main__":
    main()
