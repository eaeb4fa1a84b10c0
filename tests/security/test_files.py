"""Files: hostile input paths refused, and nothing but regular files from out/ ever collected."""

from __future__ import annotations

import base64
import json
import time
from textwrap import dedent
from typing import Any

import httpx
import pytest
from support.hostile import BOMB_TIMEOUT, TRIVIAL_SECONDS, assert_still_serves, run

from .test_memory import FAST_BOMB

pytestmark = pytest.mark.security

# The server's defaults (FileSettings): the suite's server keeps them.
OUT_COUNT = 100
PASSWD_LINE = "root:x:0:0"


def files_of(result: dict[str, Any]) -> dict[str, bytes]:
    """The collected files of a result by path, their inline content decoded."""
    return {f["path"]: base64.b64decode(f["content"] or "") for f in result["files"]}


@pytest.mark.parametrize(
    "path",
    ["../escape", "/etc/cron.d/x", "a/../../x", "main.py", "out/x", "a\\b", "", ".", "a//b", "\x00"],
)
def test_bad_input_paths_never_reach_a_sandbox(client: httpx.Client, path: str) -> None:
    """Every input path that could leave /work, or clobber the program or out/, is a 422 problem."""
    body = {"code": "print('ran')", "files": [{"path": path, "content": "eA=="}]}
    response = client.post("/run-json/", json=body)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"


def test_input_files_are_the_programs_own(client: httpx.Client) -> None:
    """Input files land under /work, as the program's user, writable by it, and nowhere else."""
    code = dedent(
        """
        import json, os
        st = os.stat("data/deep/in.csv")
        open("data/deep/in.csv", "a").write("more")
        print(json.dumps({"uid": st.st_uid, "me": os.getuid(), "text": open("data/deep/in.csv").read(),
                          "out": os.listdir("out"), "cwd": sorted(os.listdir("."))}))
        """
    )
    files = [{"path": "data/deep/in.csv", "content": base64.b64encode(b"a,b\n").decode()}]
    response = client.post("/run-json/", json={"code": code, "files": files})
    assert response.status_code == 200, response.text
    report = run_report(response.json())
    assert report["uid"] == report["me"]
    assert report["text"] == "a,b\nmore"
    assert report["out"] == []
    assert report["cwd"] == ["data", "main.py", "out"]


def run_report(result: dict[str, Any]) -> Any:
    """The JSON the program printed last."""
    assert result["status"] == "succeeded", result
    return json.loads(result["stdout"].strip().splitlines()[-1])


def test_links_in_out_return_nothing_of_their_targets(client: httpx.Client) -> None:
    """Symlinks to /etc/passwd and /etc, a symlink loop and a hard link attempt give back none of
    /etc: only the one regular file, with the rest flagged as left behind."""
    code = dedent(
        """
        import os
        os.symlink("/etc/passwd", "out/passwd")
        os.symlink("/etc", "out/etc")
        os.symlink("loop", "out/loop")
        os.makedirs("out/sub")
        os.symlink("../../../etc/shadow", "out/sub/shadow")
        try:
            os.link("/etc/passwd", "out/hard")
        except OSError as exc:
            print("link:", exc.errno)
        open("out/real.txt", "w").write("mine")
        """
    )
    linked = run(client, code)
    assert linked.status == "succeeded", linked.result
    assert files_of(linked.result) == {"out/real.txt": b"mine"}
    assert linked.result["files_truncated"] is True
    assert PASSWD_LINE not in str(linked.result)


def test_out_replaced_by_a_link_returns_nothing(client: httpx.Client) -> None:
    """A program that swaps out/ itself for a symlink to /etc gets no files back."""
    code = 'import os\nos.rmdir("out")\nos.symlink("/etc", "out")\n'
    swapped = run(client, code)
    assert swapped.status == "succeeded", swapped.result
    assert swapped.result["files"] == []
    assert swapped.result["files_truncated"] is True


def test_fifos_sockets_and_unreadable_files_are_skipped(client: httpx.Client) -> None:
    """A FIFO (which would block a reader), a socket and a file the program made unreadable are left
    behind, flagged, and the run answers promptly."""
    code = dedent(
        """
        import os, socket
        os.mkfifo("out/fifo")
        s = socket.socket(socket.AF_UNIX)
        s.bind("out/sock")
        open("out/locked", "w").write("x")
        os.chmod("out/locked", 0)
        os.mkdir("out/closed")
        open("out/closed/inside", "w").write("x")
        os.chmod("out/closed", 0)
        open("out/ok", "w").write("ok")
        """
    )
    odd = run(client, code)
    assert odd.status == "succeeded", odd.result
    assert files_of(odd.result) == {"out/ok": b"ok"}
    assert odd.result["files_truncated"] is True
    assert odd.seconds < TRIVIAL_SECONDS, f"the run took {odd.seconds:.1f} s"


def test_hostile_names_and_deep_trees_are_bounded(client: httpx.Client) -> None:
    """Names that are not UTF-8 or hold a backslash, paths past 1024 characters and a tree 100
    directories deep are left behind, flagged; ordinary files beside them come back."""
    code = dedent(
        """
        import os
        open(b"out/\\xff\\xfe.bin", "wb").write(b"x")
        open("out/back\\\\slash", "w").write("x")
        open("out/ünïcode.txt", "w").write("ü")
        path = "out"
        for _ in range(100):
            path += "/d"
            os.mkdir(path)
        open(path + "/bottom", "w").write("x")
        long = "out/" + "/".join(["n" * 200] * 6)
        os.makedirs(long)
        open(long + "/f", "w").write("x")
        """
    )
    hostile = run(client, code)
    assert hostile.status == "succeeded", hostile.result
    assert files_of(hostile.result) == {"out/ünïcode.txt": "ü".encode()}
    assert hostile.result["files_truncated"] is True


def test_thousands_of_files_are_capped_and_prompt(client: httpx.Client) -> None:
    """5000 small files in out/ give the first 100 in path order, flagged, and the run answers in
    about the time the program took to make them."""
    code = "for i in range(5000):\n    open(f'out/f{i:05}.txt', 'w').write(str(i))\n"
    many = run(client, code)
    assert many.status == "succeeded", many.result
    paths = [f["path"] for f in many.result["files"]]
    assert paths == [f"out/f{i:05}.txt" for i in range(OUT_COUNT)]
    assert many.result["files_truncated"] is True
    program = many.result["duration_ms"] / 1000
    assert many.seconds < program + TRIVIAL_SECONDS, f"{many.seconds:.1f} s for a {program:.1f} s program"
    assert_still_serves(client)


def test_files_are_collected_after_a_timeout_and_a_memory_kill(client: httpx.Client) -> None:
    """What a program left in out/ comes back whatever ended it: its wall time or the memory limit."""
    slow = run(client, "open('out/partial.txt', 'w').write('so far')\nwhile True:\n    pass\n", timeout=1)
    assert slow.status == "timeout", slow.result
    assert files_of(slow.result) == {"out/partial.txt": b"so far"}
    bomb = "open('out/before.txt', 'w').write('kept')\n" + FAST_BOMB
    killed = run(client, bomb, timeout=BOMB_TIMEOUT)
    assert killed.limits_hit == ["memory"], killed.result
    assert files_of(killed.result) == {"out/before.txt": b"kept"}


def test_a_daemon_cannot_swap_files_during_collection(client: httpx.Client) -> None:
    """A forked child that keeps swapping a file in out/ for a link to /etc/passwd is dead before
    collection starts: nothing of /etc comes back."""
    code = dedent(
        """
        import os
        if os.fork() == 0:
            os.setsid()
            while True:
                try:
                    open("out/swap.tmp", "w").write("mine")
                    os.replace("out/swap.tmp", "out/swap")
                    os.symlink("/etc/passwd", "out/swap.lnk")
                    os.replace("out/swap.lnk", "out/swap")
                except OSError:
                    pass
        import time
        time.sleep(0.3)
        """
    )
    for _ in range(3):
        raced = run(client, code)
        assert raced.status == "succeeded", raced.result
        assert PASSWD_LINE not in str(raced.result)
        assert set(files_of(raced.result)) <= {"out/swap", "out/swap.tmp"}
        # Killed between creating the file and writing to it, it may be empty.
        for content in files_of(raced.result).values():
            assert content in (b"", b"mine")
    started = time.monotonic()
    assert_still_serves(client)
    assert time.monotonic() - started < TRIVIAL_SECONDS
