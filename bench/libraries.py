"""What a library set costs: image size and idle pooled-container memory, two sets side by side.

Usage::

    .venv/bin/python bench/libraries.py [--before REQUIREMENTS_IN] [--after REQUIREMENTS_IN]
                                        [--pool-size N] [--output PATH]

``before`` is numpy and pandas alone (the libraries warmpod preloads), ``after`` the bundled
``pool/requirements.in``; either may be any operator's requirements file. Each set is locked (beside
its file, as ``WARMPOD_IMAGE__REQUIREMENTS`` would be), built with the same Containerfile and
agent (offline, as ``warmpod image build`` does; an image already built is reused), then served by
a fresh ``warmpod serve`` in each preload mode (``preload``: numpy and pandas, the default;
``bare``: nothing), whose full, idle, paused pool is measured (the cgroup of each container). It
prints one table and writes the figures to a JSON file. A measurement: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from common import ROOT, Server, free_port, podman, section, wait_pool_full
from run import memory

from warmpod.environments import Environments
from warmpod.host import image
from warmpod.settings import Settings, from_env

DEFAULT_OUTPUT = ROOT / "bench" / "results" / "libraries.json"
BEFORE = "numpy\npandas\n"
MODES = {"preload": "numpy,pandas", "bare": ""}
MIB = 1024 * 1024


def settings_for(requirements: Path) -> Settings:
    """warmpod's settings from this environment, with ``requirements`` as the library set."""
    return from_env({**os.environ, "WARMPOD_IMAGE__REQUIREMENTS": str(requirements)})


def image_size(settings: Settings, ref: str) -> int:
    """The image's size in bytes, as Podman reports it (its layers, base included)."""
    return int(podman(settings, "image", "inspect", "--format", "{{.Size}}", ref).stdout.strip() or 0)


def idle_memory(requirements: Path, preload: str, pool_size: int, log: Path) -> dict[str, Any]:
    """The memory of each container of a full, idle, paused pool of a fresh server."""
    settings = settings_for(requirements)
    env = {"WARMPOD_IMAGE__REQUIREMENTS": str(requirements), "WARMPOD_POOL__PRELOAD": preload}
    server = Server(pool_size, free_port(), log, env)
    try:
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            server.wait_healthy(client)
            wait_pool_full(client, timeout=300)
            # One run and its refill first, then a pause: the paused containers are what stays.
            client.post("/run-json/", json={"code": "print(1)"})
            wait_pool_full(client, timeout=300)
            time.sleep(2)
            return memory(server, settings)
    finally:
        server.stop()


def measure(label: str, requirements: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Lock, build and measure one library set."""
    settings = settings_for(requirements)
    default = Environments.load(settings).default
    with section(f"[{label}] building the image of {requirements}"):
        ref = image.build_image(settings, default, lambda line: print(f"  {line}", file=sys.stderr))
    lock = image.lock_file(settings, default)
    facts: dict[str, Any] = {
        "requirements": str(requirements),
        "image": ref,
        "image_mib": round(image_size(settings, ref) / MIB, 1),
        "base_mib": round(image_size(settings, settings.image.base or image._base_ref(settings)) / MIB, 1),
        "pinned": sum(1 for line in lock.read_text().splitlines() if "==" in line and line[0].isalpha()),
    }
    for mode, preload in MODES.items():
        with section(f"[{label}] idle pool of {args.pool_size}, {mode}"):
            log = args.output.with_name(f"{args.output.stem}.{label}.{mode}.server.log")
            facts[mode] = idle_memory(requirements, preload, args.pool_size, log)
    return facts


def median(values: Sequence[float]) -> str:
    """The median, or a dash when there is nothing to take it of."""
    return f"{statistics.median(values):.1f}" if values else "-"


def report(results: dict[str, dict[str, Any]]) -> str:
    """One table: each figure, before and after, side by side."""
    before, after = results["before"], results["after"]
    rows = [
        ("pinned distributions", str(before["pinned"]), str(after["pinned"])),
        ("image size, MiB", f"{before['image_mib']:.1f}", f"{after['image_mib']:.1f}"),
        (
            "  of which libraries and agent, MiB",
            f"{before['image_mib'] - before['base_mib']:.1f}",
            f"{after['image_mib'] - after['base_mib']:.1f}",
        ),
    ]
    for mode in MODES:
        for key, what in (("container_usage_mib", "cgroup usage"), ("container_anon_mib", "anonymous")):
            rows.append(
                (
                    f"idle container ({mode}), {what}, MiB (median)",
                    median(before[mode][key]),
                    median(after[mode][key]),
                )
            )
    width = max(len(row[0]) for row in rows)
    lines = [f"{'':{width}}  {'before':>10}  {'after':>10}"]
    lines += [f"{name:{width}}  {old:>10}  {new:>10}" for name, old, new in rows]
    lines.append(f"before: {before['requirements']} ({before['image']})")
    lines.append(f"after:  {after['requirements']} ({after['image']})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", type=Path, help="requirements file (default: numpy and pandas)")
    parser.add_argument("--after", type=Path, default=ROOT / "pool" / "requirements.in")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure both sets and print them side by side."""
    args = parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    before = args.before
    if before is None:
        # Beside the results, so its lock (and so its image) is reused by the next run.
        before = args.output.with_name("libraries-before") / "requirements.in"
        before.parent.mkdir(exist_ok=True)
        if not before.is_file() or before.read_text() != BEFORE:
            before.write_text(BEFORE)
    results = {
        "before": measure("before", before.resolve(), args),
        "after": measure("after", args.after, args),
    }
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))
    print(f"figures in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
