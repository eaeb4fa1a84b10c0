"""Running hostile programs against the security suite's server, and the check that ends every test."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from textwrap import dedent
from typing import Any

import httpx

from support.live import SLOWNESS, run_json

# The suite's limits: small, so that every limit is cheap to reach on a 2-core machine.
POOL_SIZE = 2
MEMORY_MB = 256
PIDS = 64
# The one limit whose right size depends on the host's speed: the memory, disk and recursion bombs
# must reach their own limits before this many CPU seconds. 3 s is ample on real hardware; where
# page faults cost ~50x more (the User-Mode Linux guest of tests/cgv2), job.sh raises it.
CPU_TIME = int(os.environ.get("WARMPOD_TEST_CPU_TIME", "3"))
# When a spin is answered: the limit, its hard limit a second later, and the reply (6 s with the
# default). Where the host is slower (SLOWNESS, measured in the guest of tests/cgv2), the spin shares
# its CPU with the refill that replaces its container, which costs SLOWNESS times more there.
CPU_REPLY_SECONDS = CPU_TIME + 3.0 * SLOWNESS
# A timeout the CPU-time limit beats by a margin (10 s with the default), for the busy loops.
SPIN_TIMEOUT = CPU_TIME + 7.0 * SLOWNESS
# Wall time for the bombs that must reach a memory, disk or recursion limit first (15 s with the
# default): a host that needs more CPU seconds for them needs more wall time, twice as many where
# the CPU is shared with the rest of the guest.
BOMB_TIMEOUT = max(15, 2 * CPU_TIME)
# How long a trivial run may take beside busy neighbours holding the whole pool, so that it waits
# for a refill: creating a container takes ~0.2 s on real hardware, SLOWNESS times more elsewhere.
REFILL_WAIT_SECONDS = float(os.environ.get("WARMPOD_TEST_REFILL_WAIT", str(2.0 * SLOWNESS)))
MAX_OUTPUT_BYTES = 65536
TMPFS_MB = 32
SHM_MB = 16  # sandbox.py's shm_size, not a setting
MAX_TIMEOUT = max(20, math.ceil(SPIN_TIMEOUT), BOMB_TIMEOUT)
OPEN_FILES = 256  # the default of WARMPOD_LIMITS__OPEN_FILES

# In the server's environment only: no sandbox may ever see either half of it.
CANARY_NAME = "SECRET_CANARY"
CANARY_VALUE = "warmpod-canary-7f3e9b2c51d84a06"

SETTINGS = {
    "WARMPOD_POOL__SIZE": str(POOL_SIZE),
    "WARMPOD_LIMITS__MEMORY_MB": str(MEMORY_MB),
    "WARMPOD_LIMITS__PIDS": str(PIDS),
    "WARMPOD_LIMITS__CPU_TIME": str(CPU_TIME),
    "WARMPOD_LIMITS__MAX_OUTPUT_BYTES": str(MAX_OUTPUT_BYTES),
    "WARMPOD_LIMITS__TMPFS_MB": str(TMPFS_MB),
    "WARMPOD_LIMITS__MAX_TIMEOUT": str(MAX_TIMEOUT),
    CANARY_NAME: CANARY_VALUE,
}

# A trivial run takes well under a second; this leaves room for a pool refill on a busy host. Under
# UML a refill that imports numpy and pandas takes seconds of its single CPU: SLOWNESS scales the
# bounds on prompt answers, never the limits.
TRIVIAL_SECONDS = 5.0 * SLOWNESS
# A 10 MB flood is cut at the cap and answered within this.
FLOOD_SECONDS = 5.0 * SLOWNESS


@dataclass(frozen=True)
class Run:
    """The result of one run and how long the HTTP request took."""

    result: dict[str, Any]
    seconds: float

    @property
    def status(self) -> str:
        """succeeded, failed, timeout or error."""
        return str(self.result["status"])

    @property
    def exit_code(self) -> int | None:
        """The program's exit status, -N for signal N."""
        code: int | None = self.result["exit_code"]
        return code

    @property
    def stdout(self) -> str:
        """What the program printed, decoded with replacement characters."""
        return str(self.result["stdout"])

    @property
    def stderr(self) -> str:
        """What the program wrote to stderr."""
        return str(self.result["stderr"])

    @property
    def limits_hit(self) -> list[str]:
        """The limits the service says stopped the run."""
        return list(self.result["limits_hit"])

    def report(self) -> Any:
        """The JSON document the program printed as the last line of its stdout."""
        assert self.stdout.strip(), f"the program printed nothing: {self.result}"
        return json.loads(self.stdout.strip().splitlines()[-1])


def run(
    client: httpx.Client, code: str, *, timeout: float = 10.0, stdin: str = "", memory_mb: int | None = None
) -> Run:
    """Run ``code`` through /run-json/ (which must answer 200) and time the request; ``memory_mb``
    below the suite's MEMORY_MB as the run's own limit."""
    started = time.monotonic()
    limit = {} if memory_mb is None else {"memory_mb": memory_mb}
    result = run_json(client, code, timeout=timeout, stdin=stdin, **limit)
    return Run(result=result, seconds=time.monotonic() - started)


def assert_still_serves(client: httpx.Client) -> None:
    """The service still runs a trivial program, promptly and successfully, after whatever came before."""
    trivial = run(client, "print(1)", timeout=5)
    assert trivial.status == "succeeded", trivial.result
    assert trivial.stdout == "1\n", trivial.result
    assert trivial.limits_hit == [], trivial.result
    assert trivial.seconds < TRIVIAL_SECONDS, f"a trivial run took {trivial.seconds:.1f} s"


def chatty_program(seconds: float) -> str:
    """A program that writes one byte per write(2) for ``seconds``, with a 1 ms sleep every 16
    bytes: its output is small, but every byte comes on its own (tests/security/test_tenants.py
    and bench/abuse.py)."""
    return dedent(
        f"""
        import os, time
        end = time.monotonic() + {seconds}
        written = 0
        while time.monotonic() < end:
            os.write(1, b"x")
            written += 1
            if written % 16 == 0:
                time.sleep(0.001)
        """
    )


def paced_program(seconds: float) -> str:
    """One byte per write(2), 0.1 ms apart, for ``seconds``: one pipe read, and so one chunk
    before merging, per byte (tests/security/test_output.py and bench/output.py)."""
    return dedent(
        f"""
        import os, time
        end = time.monotonic() + {seconds}
        while time.monotonic() < end:
            os.write(1, b"x")
            time.sleep(0.0001)
        """
    )


def alternating_program(seconds: float) -> str:
    """As ``paced_program``, switching stream at every byte: no chunk can merge with the one
    before it without losing their order."""
    return dedent(
        f"""
        import os, time
        end = time.monotonic() + {seconds}
        while time.monotonic() < end:
            os.write(1, b"o")
            time.sleep(0.0001)
            os.write(2, b"e")
            time.sleep(0.0001)
        """
    )


FILE_COUNT = 16
FILE_SIZE = 1_000_000


def file_heavy_program() -> str:
    """A program that leaves FILE_COUNT files of FILE_SIZE random bytes in out/: its result holds
    them inline, some 21 MB of JSON."""
    return dedent(
        f"""
        import os
        os.makedirs("out", exist_ok=True)
        for i in range({FILE_COUNT}):
            with open(f"out/f{{i:02d}}.bin", "wb") as f:
                f.write(os.urandom({FILE_SIZE}))
        """
    )
