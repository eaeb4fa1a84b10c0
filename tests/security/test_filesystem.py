"""Files: full and inode-starved tmpfs, read-only paths, nothing kept between runs, links and devices."""

from __future__ import annotations

import errno
from textwrap import dedent

import httpx
import pytest
from support.hostile import BOMB_TIMEOUT, MEMORY_MB, OPEN_FILES, SHM_MB, TMPFS_MB, assert_still_serves, run

pytestmark = pytest.mark.security

ENOSPC = errno.errorcode[errno.ENOSPC]
EFBIG = errno.errorcode[errno.EFBIG]


@pytest.mark.parametrize("directory", ["/tmp", "/work"])
def test_filling_a_working_directory_hits_the_disk_limit(client: httpx.Client, directory: str) -> None:
    """Writing 4 MB files into /tmp or /work until an error stops at the tmpfs size and reports disk."""
    code = dedent(
        f"""
        import errno
        chunk = b"x" * 10**6
        n = 0
        try:
            while True:
                with open(f"{directory}/fill{{n}}", "wb") as f:
                    for _ in range(4):
                        f.write(chunk)
                n += 1
        except OSError as exc:
            print(n, errno.errorcode[exc.errno])
        """
    )
    fill = run(client, code)
    assert fill.status == "succeeded", fill.result
    assert fill.limits_hit == ["disk"], fill.result
    files, error = fill.stdout.split()
    assert error in {ENOSPC, EFBIG}
    assert int(files) == TMPFS_MB * 1024 * 1024 // (4 * 10**6)
    assert_still_serves(client)


def test_filling_dev_shm_stops_at_its_size(client: httpx.Client) -> None:
    """Writing one file into /dev/shm until an error stops with ENOSPC at the 16 MiB shm size."""
    code = dedent(
        """
        import errno, os
        chunk = b"x" * (1 << 16)
        try:
            with open("/dev/shm/fill", "wb", buffering=0) as f:
                while True:
                    f.write(chunk)
        except OSError as exc:
            print(os.path.getsize("/dev/shm/fill"), errno.errorcode[exc.errno])
        """
    )
    fill = run(client, code)
    assert fill.status == "succeeded", fill.result
    size, error = fill.stdout.split()
    assert error == ENOSPC
    assert int(size) == SHM_MB * 1024 * 1024
    assert_still_serves(client)


def test_file_size_limit_signal_is_reported_as_disk(client: httpx.Client) -> None:
    """A program that restores SIGXFSZ and writes past RLIMIT_FSIZE is killed by it and reported as disk."""
    code = dedent(
        """
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        with open("/tmp/big", "wb") as f:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        """
    )
    fill = run(client, code)
    assert fill.status == "failed", fill.result
    assert fill.exit_code == -25, fill.result  # SIGXFSZ
    assert fill.limits_hit == ["disk"], fill.result
    assert_still_serves(client)


def test_inode_exhaustion_is_contained(client: httpx.Client) -> None:
    """Creating empty files without end is stopped by a limit (the tmpfs has no inode cap: memory)."""
    code = dedent(
        """
        import errno, os
        pad = "n" * 200  # long names: each file costs more kernel memory, so this ends sooner
        n = 0
        try:
            while True:
                os.close(os.open(f"/tmp/{n}{pad}", os.O_CREAT | os.O_WRONLY, 0o600))
                n += 1
        except OSError as exc:
            print(n, errno.errorcode[exc.errno])
        """
    )
    # Its own memory limit, half the suite's: at 256 MiB the bomb made some 170,000 files in about
    # 2.3 of its 3 CPU seconds, and a slow moment ran out of CPU first (cpu_time, not memory).
    bomb = run(client, code, timeout=BOMB_TIMEOUT, memory_mb=MEMORY_MB // 2)
    assert bomb.status in {"failed", "succeeded"}, bomb.result
    assert {"memory", "disk"} & set(bomb.limits_hit), bomb.result
    assert_still_serves(client)


def test_open_files_are_limited(client: httpx.Client) -> None:
    """Opening files without end fails with EMFILE at RLIMIT_NOFILE, which the program cannot raise."""
    code = dedent(
        """
        import errno, json, os, resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard * 4, hard * 4))
            raised = "raised"
        except ValueError:
            raised = "refused"
        fds = []
        try:
            while True:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            error = errno.errorcode[exc.errno]
        print(json.dumps({"limit": [soft, hard], "raise": raised, "opened": len(fds), "error": error}))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    # Three descriptors are the standard streams.
    assert attempt.report() == {
        "limit": [OPEN_FILES, OPEN_FILES],
        "raise": "refused",
        "opened": OPEN_FILES - 3,
        "error": errno.errorcode[errno.EMFILE],
    }
    assert_still_serves(client)


def test_read_only_paths_refuse_writes(client: httpx.Client) -> None:
    """The root filesystem, system files and the agent's code cannot be created, changed or replaced."""
    code = dedent(
        """
        import errno, json, os
        out = {}
        for path in ("/evil", "/usr/evil", "/etc/passwd", "/etc/evil", "/opt/warmpod/agent.py",
                     "/opt/warmpod/evil", "/usr/lib/python3/dist-packages/evil.py", "/var/tmp/evil",
                     "/proc/sys/kernel/hostname", "/sys/fs/cgroup/evil", "/run/warmpod/evil"):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644))
                out[path] = "writable"
            except OSError as exc:
                out[path] = errno.errorcode[exc.errno]
        for name, attempt in (
            ("rename agent", lambda: os.rename("/opt/warmpod/agent.py", "/opt/warmpod/old.py")),
            ("chmod passwd", lambda: os.chmod("/etc/passwd", 0o666)),
            ("unlink python", lambda: os.unlink("/usr/bin/python3")),
        ):
            try:
                attempt()
                out[name] = "done"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        print(json.dumps(out))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    refused = {errno.errorcode[e] for e in (errno.EROFS, errno.EACCES, errno.EPERM)}
    outcomes = attempt.report()
    assert len(outcomes) == 14
    assert {path: outcome for path, outcome in outcomes.items() if outcome not in refused} == {}
    assert_still_serves(client)


def test_nothing_persists_between_runs(client: httpx.Client) -> None:
    """Files left in /tmp, /work, /dev/shm and $HOME by one run are absent from the next run."""
    write = dedent(
        """
        import os
        home = os.environ["HOME"]
        for directory in ("/tmp", "/work", "/dev/shm", home):
            with open(os.path.join(directory, "left-behind"), "w") as f:
                f.write("secret")
            os.makedirs(os.path.join(directory, "nested", "dir"), exist_ok=True)
        print(home)
        """
    )
    first = run(client, write)
    assert first.status == "succeeded", first.result
    home = first.stdout.strip()
    look = dedent(
        f"""
        import json, os
        places = ("/tmp", "/work", "/work/out", "/dev/shm", {home!r})
        print(json.dumps({{d: sorted(os.listdir(d)) for d in places}}))
        """
    )
    second = run(client, look)
    assert second.status == "succeeded", second.result
    # /work holds the program and the empty out/ for the files it makes, /tmp the agent's fresh
    # MPLCONFIGDIR (links to the image's font cache), and nothing else.
    assert second.report() == {
        "/tmp": ["matplotlib"],
        "/work": ["main.py", "out"],
        "/work/out": [],
        "/dev/shm": [],
        home: ["main.py", "out"],
    }
    assert_still_serves(client)


def test_links_do_not_reach_the_agent_or_host(client: httpx.Client) -> None:
    """Symlinks to the agent's socket and PID 1's root, and hard links to /etc/shadow, reach nothing."""
    code = dedent(
        """
        import errno, json, os, socket
        out = {}
        def attempt(name, action):
            try:
                action()
                out[name] = "reached"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        def connect(path):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(path)
        os.symlink("/run/warmpod/agent.sock", "/tmp/sock")
        os.symlink("/proc/1/root", "/tmp/root")
        os.symlink("/run/warmpod", "/tmp/agent-dir")
        attempt("socket via link", lambda: connect("/tmp/sock"))
        attempt("socket", lambda: connect("/run/warmpod/agent.sock"))
        attempt("agent dir via link", lambda: os.listdir("/tmp/agent-dir"))
        attempt("pid 1 root via link", lambda: os.listdir("/tmp/root"))
        attempt("pid 1 file via link", lambda: open("/tmp/root/opt/warmpod/agent.py").close())
        attempt("pid 1 cwd", lambda: os.listdir("/proc/1/cwd"))
        attempt("hard link shadow", lambda: os.link("/etc/shadow", "/tmp/shadow"))
        print(json.dumps(out))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    eacces = errno.errorcode[errno.EACCES]
    assert attempt.report() == {
        "socket via link": eacces,
        "socket": eacces,
        "agent dir via link": eacces,
        "pid 1 root via link": eacces,
        "pid 1 file via link": eacces,
        "pid 1 cwd": eacces,
        # /tmp is a file system of its own; within / it would be EPERM (protected_hardlinks) or EROFS.
        "hard link shadow": errno.errorcode[errno.EXDEV],
    }
    assert_still_serves(client)


def test_no_devices_to_reach_hardware(client: httpx.Client) -> None:
    """/dev holds no block devices, /dev/mem and /dev/kmsg, and device nodes cannot be made."""
    code = dedent(
        """
        import errno, json, os, stat
        out = {"dev": sorted(os.listdir("/dev"))}
        out["block"] = [n for n in out["dev"] if stat.S_ISBLK(os.lstat("/dev/" + n).st_mode)]
        for name, mode, device in (("char", stat.S_IFCHR, os.makedev(1, 1)),
                                   ("block", stat.S_IFBLK, os.makedev(8, 0))):
            try:
                os.mknod(f"/tmp/{name}", mode | 0o666, device)
                out["mknod " + name] = "made"
            except OSError as exc:
                out["mknod " + name] = errno.errorcode[exc.errno]
        print(json.dumps(out))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    seen = attempt.report()
    assert seen["block"] == []
    assert not {"mem", "kmem", "port", "kmsg", "sda", "vda", "nvme0", "vsock", "kvm"} & set(seen["dev"]), seen
    assert seen["mknod char"] == errno.errorcode[errno.EPERM]
    assert seen["mknod block"] == errno.errorcode[errno.EPERM]
    assert_still_serves(client)


def test_program_inherits_only_its_standard_streams(client: httpx.Client) -> None:
    """The program starts with file descriptors 0, 1 and 2 only: no agent socket or pipe leaks to it."""
    code = dedent(
        """
        import json, os
        listed = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        # The listing's own descriptor is in the list, and closed by now.
        fds = [fd for fd in listed if os.path.exists(f"/proc/self/fd/{fd}")]
        print(json.dumps({fd: os.readlink(f"/proc/self/fd/{fd}") for fd in fds}))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    fds = attempt.report()
    assert sorted(fds) == ["0", "1", "2"], fds
    assert all(target.startswith("pipe:") for target in fds.values()), fds
    assert_still_serves(client)


def test_landlock_confines_writes_to_the_work_directories(client: httpx.Client) -> None:
    """Where Landlock is active, files the program owns outside /work, /tmp and /dev/shm refuse writes."""
    health = client.get("/health").json()
    if not health["landlock_abi"]:
        pytest.skip("this kernel (or the seccomp profile) offers no Landlock")
    code = dedent(
        """
        import errno
        try:
            with open("/proc/self/comm", "w") as f:  # owned by the program itself
                f.write("renamed")
            print("written")
        except OSError as exc:
            print(errno.errorcode[exc.errno])
        with open("/tmp/ok", "w") as f, open("/dev/null", "w") as null:
            f.write("fine")
            null.write("fine")
        print("allowed")
        """
    )
    probe = run(client, code)
    assert probe.stdout == "EACCES\nallowed\n", probe.result
    assert_still_serves(client)
