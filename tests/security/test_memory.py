"""Memory: bombs fast and slow, memory parked in tmpfs, fileless memory and decompression bombs."""

from __future__ import annotations

import errno
import zlib
from pathlib import Path
from textwrap import dedent
from typing import Any

import httpx
import pytest
from support.hostile import BOMB_TIMEOUT, MEMORY_MB, SHM_MB, TMPFS_MB, assert_still_serves, run

pytestmark = pytest.mark.security

FAST_BOMB = "held = []\nwhile True:\n    held.append(bytearray(10**7))\n"
SLOW_BOMB = "import time\nheld = []\nwhile True:\n    held.append(bytearray(10**6))\n    time.sleep(0.001)\n"


@pytest.mark.parametrize("code", [FAST_BOMB, SLOW_BOMB], ids=["fast", "slow"])
def test_memory_bomb_is_stopped_by_the_memory_limit(client: httpx.Client, code: str) -> None:
    """Allocating without end, in 10 MB or 1 MB steps, is killed by the cgroup memory limit."""
    bomb = run(client, code, timeout=BOMB_TIMEOUT)
    assert bomb.status == "failed", bomb.result
    assert bomb.exit_code == -9, bomb.result
    assert bomb.limits_hit == ["memory"], bomb.result
    # conmon writes an empty 'oom' file into its working directory at an OOM kill: the server's
    # directory (here the checkout's) must not be it (an 'oom' file got committed twice).
    assert not Path("oom").exists(), f"an OOM kill left {Path('oom').resolve()}"
    assert_still_serves(client)


def test_memory_parked_in_tmpfs_counts(client: httpx.Client) -> None:
    """Filling every writable tmpfs to its size and then allocating ends at the disk and memory limits."""
    code = dedent(
        """
        import errno
        chunk = b"x" * (1 << 20)
        for directory in ("/dev/shm", "/tmp", "/work"):
            n = 0
            try:
                while True:
                    with open(f"{directory}/park{n}", "wb") as f:
                        f.write(chunk)
                    n += 1
            except OSError as exc:
                print(directory, n, errno.errorcode[exc.errno], flush=True)
        held = []
        while True:
            held.append(bytearray(1 << 20))
        """
    )
    bomb = run(client, code, timeout=BOMB_TIMEOUT)
    assert bomb.status == "failed", bomb.result
    assert bomb.exit_code == -9, bomb.result
    assert set(bomb.limits_hit) == {"memory", "disk"}, bomb.result
    parked = {}
    for line in bomb.stdout.splitlines():
        directory, megabytes, error = line.split()
        assert error == errno.errorcode[errno.ENOSPC], line
        parked[directory] = int(megabytes)
    # Each tmpfs stops at its size (main.py takes a little of /work).
    assert set(parked) == {"/dev/shm", "/tmp", "/work"}, bomb.stdout
    assert SHM_MB - 1 <= parked["/dev/shm"] <= SHM_MB, parked
    assert TMPFS_MB - 1 <= parked["/tmp"] <= TMPFS_MB, parked
    assert TMPFS_MB - 1 <= parked["/work"] <= TMPFS_MB, parked
    assert sum(parked.values()) < MEMORY_MB
    assert_still_serves(client)


def test_program_cannot_make_the_oom_killer_pick_the_agent(client: httpx.Client) -> None:
    """A program that lowers its OOM score and fills unowned memory is the OOM victim, not the agent."""
    code = dedent(
        """
        import errno, os
        # Memory no process owns: tmpfs pages now, then dentries, which no kill frees.
        chunk = b"x" * (1 << 20)
        for directory in ("/dev/shm", "/tmp", "/work"):
            n = 0
            try:
                while True:
                    with open(f"{directory}/park{n}", "wb") as f:
                        f.write(chunk)
                    n += 1
            except OSError:
                pass
        # The agent set 1000 so the OOM killer picks the program; 0 is the agent's own score.
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("0")
            print("lowered", flush=True)
        except OSError as exc:
            print(errno.errorcode[exc.errno], flush=True)
        # A shell has a smaller footprint than the agent's interpreter: with equal scores, the agent would go.
        pad = "n" * 240
        os.execv("/bin/sh", ["sh", "-c", f"i=0; while :; do : > /tmp/${{i}}{pad}; i=$((i+1)); done"])
        """
    )
    bomb = run(client, code, timeout=BOMB_TIMEOUT)
    # Were the agent killed, its container would die with it and the run would end in "error".
    assert bomb.status == "failed", bomb.result
    assert bomb.exit_code == -9, bomb.result
    assert "memory" in bomb.limits_hit, bomb.result
    assert bomb.stdout in {"lowered\n", f"{errno.errorcode[errno.EACCES]}\n"}, bomb.result
    assert_still_serves(client)


def test_memfd_create_is_denied(client: httpx.Client) -> None:
    """memfd_create, the way to fileless executables, fails with ENOSYS."""
    code = dedent(
        """
        import os
        try:
            os.memfd_create("payload")
        except OSError as exc:
            print(exc.errno)
        else:
            print("created")
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    assert attempt.stdout == f"{errno.ENOSYS}\n"
    assert_still_serves(client)


def inflated_size(bomb: bytes) -> int:
    """How many bytes a raw deflate stream inflates to, counted in bounded steps."""
    inflater = zlib.decompressobj(-15)
    total = 0
    pending = bomb
    while pending:
        total += len(inflater.decompress(pending, 1 << 24))
        pending = inflater.unconsumed_tail
    return total + len(inflater.flush())


def test_decompression_bomb_is_contained(client: httpx.Client) -> None:
    """Inflating 1 GiB of zeros from a 1 MB deflate stream in one call is stopped by the memory limit."""
    build = dedent(
        """
        import zlib
        # After a full flush the compressor starts afresh: the same block again compresses to the
        # same bytes, so 1024 copies of one 1 MiB block's output are a 1 GiB raw deflate stream.
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        zeros = b"\\0" * (1 << 20)
        block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
        assert block == compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
        bomb = block * 1024 + compressor.flush()
        """
    )
    # The sandbox builds its own bomb, so nothing large is uploaded; the same code here proves it is one.
    built: dict[str, Any] = {}
    exec(build, built)
    assert len(built["bomb"]) < 2 * 1024 * 1024
    assert inflated_size(built["bomb"]) == 1 << 30
    code = build + "print(len(bomb), flush=True)\ndata = zlib.decompress(bomb, -15)\nprint(len(data))\n"
    bomb = run(client, code, timeout=BOMB_TIMEOUT)
    assert bomb.status == "failed", bomb.result
    assert "memory" in bomb.limits_hit or "MemoryError" in bomb.stderr, bomb.result
    assert bomb.stdout == f"{len(built['bomb'])}\n", "the bomb was not built, or was inflated whole"
    assert_still_serves(client)
