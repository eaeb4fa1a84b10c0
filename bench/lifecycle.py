"""CPU per container lifecycle: a pool container (idle, busy, preloaded) beside ``podman run --rm``.

Usage::

    .venv/bin/python bench/lifecycle.py [--count N] [--rounds N] [--preload numpy,pandas]
                                        [--baseline REV] [--skip-naive]

Each phase makes ``--count`` containers one after another and runs ``print(1)`` in each: the pool's
way (bench/steps.py: create, start, agent ready, the run, remove, through a private Podman service
configured as the server configures it), ``idle`` with the pause and unpause a container gets while
it waits in an idle pool, ``busy`` without them (the pool does not pause while runs wait),
``preloaded`` importing ``--preload`` first; ``baseline`` is bench/steps.py of git revision
``--baseline`` (its agent, image, Podman configuration and runtime; its image is built first);
``naive`` one ``podman run --rm IMAGE python3 -c 'print(1)'`` each, with warmpod's
containers.conf and runtime. The phases take turns ``--rounds`` times and each prints the median.

The figure is the CPU time of the whole machine (/proc/stat, every core, user + system + irq),
per container, the driver's own included. Beside it, where ``perf`` is installed (Debian's
linux-perf), the split by process name from ``perf record -a -e cpu-clock`` samples (process
accounting cannot: it keeps a process's time in 10 ms units, so runc, conmon and short Podman
processes read 0). Run it on an otherwise idle machine, as root.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

from warmpod.environments import Environments
from warmpod.host import image
from warmpod.host.facts import HostFacts, pick_runtime, podman_command
from warmpod.settings import from_env

ROOT = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_HZ = 1999
# A removed container's last processes (conmon, an exit command) end just after the removal.
SETTLE = 2.0


def machine_cpu() -> float:
    """CPU seconds every core has spent busy since boot (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / TICKS


@contextmanager
def sampled() -> Iterator[dict[str, float]]:
    """CPU seconds by process name while the block runs (perf samples), empty without perf."""
    split: dict[str, float] = {}
    if not shutil.which("perf"):
        yield split
        return
    with tempfile.TemporaryDirectory(prefix="wp-perf-") as directory:
        data = Path(directory) / "perf.data"
        recorder = subprocess.Popen(
            ["perf", "record", "-a", "-q", "-e", "cpu-clock", "-F", str(SAMPLE_HZ), "-o", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield split
        finally:
            recorder.send_signal(signal.SIGINT)
            recorder.wait()
        names = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "comm"], capture_output=True, text=True, check=False
        ).stdout.split("\n")
        counts = collections.Counter(name.strip() for name in names if name.strip())
        counts.pop("swapper", None)  # idle
        counts.pop("perf", None)
        split.update({name: count / SAMPLE_HZ for name, count in counts.items()})


def measured(count: int, work: Callable[[], float | None]) -> dict[str, object]:
    """Whole-machine CPU and its split, per container, of ``work`` making ``count`` containers
    (the machine's CPU as ``work`` returns it, where it measures that itself)."""
    with sampled() as split:
        before = machine_cpu()
        own = work()
        time.sleep(SETTLE)
        machine = machine_cpu() - before if own is None else own
    return {
        "machine_ms": machine * 1000 / count,
        "by_process_ms": {name: seconds * 1000 / count for name, seconds in split.items()},
    }


def pool_work(count: int, preload: tuple[str, ...], pause: bool) -> Callable[[], float | None]:
    """bench/steps.py's loop, as the pool makes containers."""
    from steps import measure  # bench/ is this script's directory

    def work() -> None:
        anyio.run(functools.partial(measure, count, preload, pause=pause))

    return work


def baseline_work(count: int, tree: Path) -> Callable[[], float | None]:
    """bench/steps.py of an exported revision, in a process of its own (its modules, its image);
    the machine's CPU measured in there, around the loop alone (not that process's imports)."""
    # Only that revision's modules are importable in there (its warmpod may be laid out otherwise
    # than this one): the machine's CPU is read by a copy of machine_cpu, not an import of it.
    code = (
        "import os, sys, time, anyio; sys.path[:0] = [sys.argv[1]]; from steps import measure\n"
        "def cpu():\n"
        "    f = [int(x) for x in open('/proc/stat').readline().split()[1:8]]\n"
        "    return (f[0] + f[1] + f[2] + f[5] + f[6]) / os.sysconf('SC_CLK_TCK')\n"
        "before = cpu(); anyio.run(measure, int(sys.argv[2]), ()); time.sleep(float(sys.argv[3]))\n"
        "print(cpu() - before)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    argv = [sys.executable, "-c", code, str(tree / "bench"), str(count), str(SETTLE)]

    def work() -> float:
        done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, cwd=tree)
        return float(done.stdout.split()[-1])

    return work


def naive_work(count: int) -> Callable[[], float | None]:
    """``podman run --rm`` of the runner image ``count`` times."""
    settings = from_env()
    ref = image.image_ref(settings, Environments.load(settings).default)
    command, env = podman_command(
        settings.engine, "run", "--rm", "--network=none", ref, "python3", "-c", "print(1)"
    )

    def work() -> None:
        for _ in range(count):
            subprocess.run(command, env=env, check=True, capture_output=True)

    return work


@contextmanager
def exported(revision: str) -> Iterator[Path]:
    """The tree of ``revision`` in a temporary directory, its runner image built."""
    with tempfile.TemporaryDirectory(prefix="wp-baseline-") as directory:
        tree = Path(directory)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        print(f"building the runner image of {revision} ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "warmpod", "image", "build"],
            env=env,
            check=True,
            capture_output=True,
            cwd=tree,
        )
        yield tree


def report(name: str, figures: list[dict[str, object]]) -> float:
    """One phase: the median machine CPU per container over its rounds, and the median split."""
    machine = statistics.median(float(f["machine_ms"]) for f in figures)  # type: ignore[arg-type]
    rounds = ", ".join(f"{float(f['machine_ms']):.0f}" for f in figures)  # type: ignore[arg-type]
    print(f"\n{name}: {machine:.0f} ms of CPU per container (whole machine; rounds: {rounds})")
    names = {n for f in figures for n in f["by_process_ms"]}  # type: ignore[attr-defined]
    split = {n: statistics.median(f["by_process_ms"].get(n, 0.0) for f in figures) for n in names}  # type: ignore[attr-defined]
    for command, ms in sorted(split.items(), key=lambda item: -item[1]):
        if ms >= 0.5:
            print(f"  {command:<28} {ms:6.1f} ms")
    return machine


def main() -> None:
    """Measure each phase in turns and print them one after another."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20, help="containers per phase and round (20)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every phase (3)")
    parser.add_argument("--preload", default="numpy,pandas", help="modules of the preloaded phase")
    parser.add_argument("--baseline", default="", help="git revision whose bench/steps.py to measure too")
    parser.add_argument("--skip-naive", action="store_true", help="leave out podman run --rm")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/lifecycle.py needs root (perf record -a; the pool's rootful Podman)")
    settings = from_env()
    runtime = pick_runtime(settings.engine, HostFacts.read()) or "Podman's default"
    print(f"runtime: {runtime}; {args.count} containers a phase, {args.rounds} rounds", flush=True)
    preload = tuple(name for name in args.preload.split(",") if name)
    phases: dict[str, Callable[[], float | None]] = {
        "pool container, bare, idle (paused while it waits)": pool_work(args.count, (), True),
        "pool container, bare, busy (never paused)": pool_work(args.count, (), False),
    }
    if preload:
        phases[f"pool container, preloading {','.join(preload)}, idle"] = pool_work(args.count, preload, True)
    if not args.skip_naive:
        phases["podman run --rm (naive)"] = naive_work(args.count)
    with exported(args.baseline) if args.baseline else contextlib.nullcontext() as tree:
        if tree is not None:
            phases[f"baseline: bench/steps.py of {args.baseline}"] = baseline_work(args.count, tree)
        figures: dict[str, list[dict[str, object]]] = {name: [] for name in phases}
        for round_ in range(args.rounds):
            for name, work in phases.items():
                print(f"round {round_ + 1}: {name}", file=sys.stderr, flush=True)
                figures[name].append(measured(args.count, work))
    for name, results in figures.items():
        report(name, results)


if __name__ == "__main__":
    main()
