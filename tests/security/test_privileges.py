"""Privilege: the program is nobody, without capabilities, under no_new_privs and the seccomp profile."""

from __future__ import annotations

import errno
import platform
import struct
import subprocess
from pathlib import Path
from textwrap import dedent

import httpx
import pytest
from support.hostile import assert_still_serves, run

pytestmark = pytest.mark.security

x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 system call numbers")


def kernel_runs_32_bit_code(directory: Path) -> bool:
    """Whether this kernel runs i386 programs: execs a static one that exits 42 through int 0x80.

    False where the kernel has no 32-bit entry point at all (no IA32 emulation compiled in or booted
    with ``ia32_emulation=false``, or User-Mode Linux), so there is nothing for seccomp to deny.
    """
    base = 0x08048000
    code = bytes([0xB8, 1, 0, 0, 0, 0xBB, 42, 0, 0, 0, 0xCD, 0x80])  # exit(42) via int 0x80
    size = 52 + 32 + len(code)
    elf_header = struct.pack(
        "<4s5B7x2H5I6H", b"\x7fELF", 1, 1, 1, 0, 0, 2, 3, 1, base + 84, 52, 0, 0, 52, 32, 1, 0, 0, 0
    )
    program_header = struct.pack("<8I", 1, 0, base, base, size, size, 5, 0x1000)
    binary = directory / "exit42-i386"
    binary.write_bytes(elf_header + program_header + code)
    binary.chmod(0o755)
    try:
        return subprocess.run([binary], check=False, timeout=10).returncode == 42
    except OSError:  # ENOEXEC: the kernel does not know the format
        return False


EPERM = errno.errorcode[errno.EPERM]
ENOSYS = errno.errorcode[errno.ENOSYS]
# Linux capability numbers, in order (include/uapi/linux/capability.h).
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
]


def capability_names(mask: str) -> set[str]:
    """The capability names of a hexadecimal mask from /proc/<pid>/status."""
    bits = int(mask, 16)
    numbers = [number for number in range(bits.bit_length()) if bits >> number & 1]
    return {CAPABILITIES[n] if n < len(CAPABILITIES) else f"capability {n}" for n in numbers}


def test_program_is_unprivileged(client: httpx.Client) -> None:
    """The program runs as 65534 without capabilities, under no_new_privs and seccomp, and stays so."""
    code = dedent(
        """
        import errno, json, os, resource
        with open("/proc/self/status") as f:
            status = dict(line.rstrip("\\n").split(":\\t", 1) for line in f if ":\\t" in line)
        out = {key: status[key].strip() for key in
               ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")}
        out["ids"] = [os.getuid(), os.geteuid(), os.getgid(), os.getegid(), os.getgroups()]
        out["priority"] = os.getpriority(os.PRIO_PROCESS, 0)
        out["nice_limit"] = resource.getrlimit(resource.RLIMIT_NICE)
        for name, action in (
            ("setuid", lambda: os.setuid(0)),
            ("setgid", lambda: os.setgid(0)),
            ("setgroups", lambda: os.setgroups([0])),
            ("setresuid", lambda: os.setresuid(0, 0, 0)),
            ("nice", lambda: os.nice(-5)),
            ("setpriority", lambda: os.setpriority(os.PRIO_PROCESS, 0, 0)),
            ("chown", lambda: os.chown("/work/main.py", 0, 0)),
            ("chroot", lambda: os.chroot("/tmp")),
            ("sethostname", lambda: __import__("socket").sethostname("pwned")),
        ):
            try:
                action()
                out[name] = "done"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        print(json.dumps(out))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    seen = attempt.report()
    assert seen["ids"] == [65534, 65534, 65534, 65534, []]
    # Below the agent's priority, for good: it still gets the CPU to stop a program that spins.
    assert seen["priority"] == 19
    assert seen["nice_limit"] == [0, 0]
    assert seen["setpriority"] == "EACCES"
    for key in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert capability_names(seen[key]) == set(), key
    # The agent empties the program's bounding set: no capability can ever come back.
    assert capability_names(seen["CapBnd"]) == set()
    assert seen["NoNewPrivs"] == "1"
    assert seen["Seccomp"] == "2"
    for name in ("setuid", "setgid", "setgroups", "setresuid", "nice", "chown", "chroot", "sethostname"):
        assert seen[name] == EPERM, f"{name}: {seen[name]}"
    assert_still_serves(client)


@x86_64_only
def test_kernel_attack_surface_is_denied(client: httpx.Client) -> None:
    """Namespaces, mounts, ptrace, keyrings, bpf, io_uring, perf and modules fail with the profile's errno."""
    code = dedent(
        """
        import ctypes, errno, json
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        buf = ctypes.create_string_buffer(256)
        calls = {
            "unshare(CLONE_NEWUSER)": lambda: libc.unshare(0x10000000),
            "unshare(CLONE_NEWNS)": lambda: libc.unshare(0x00020000),
            "clone(CLONE_NEWUSER)": lambda: libc.syscall(56, 0x10000000 | 17, None, None, None, 0),
            "clone3": lambda: libc.syscall(435, None, 0),
            "setns": lambda: libc.syscall(308, 0, 0),
            "mount": lambda: libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None),
            "umount2": lambda: libc.umount2(b"/proc", 2),
            "pivot_root": lambda: libc.syscall(155, b"/tmp", b"/tmp"),
            "fsopen": lambda: libc.syscall(430, b"tmpfs", 0),
            "open_tree": lambda: libc.syscall(428, -100, b"/", 0),
            "ptrace(TRACEME)": lambda: libc.ptrace(0, 0, None, None),
            "ptrace(ATTACH, 1)": lambda: libc.ptrace(16, 1, None, None),
            "process_vm_readv": lambda: libc.syscall(310, 1, buf, 1, buf, 1, 0),
            "keyctl": lambda: libc.syscall(250, 0, -3, 0, 0, 0),
            "add_key": lambda: libc.syscall(248, b"user", b"k", b"v", 1, -3),
            "bpf": lambda: libc.syscall(321, 0, buf, 48),
            "userfaultfd": lambda: libc.syscall(323, 0),
            "perf_event_open": lambda: libc.syscall(298, buf, 0, -1, -1, 0),
            "io_uring_setup": lambda: libc.syscall(425, 1, buf),
            "open_by_handle_at": lambda: libc.syscall(304, -100, buf, 0),
            "init_module": lambda: libc.syscall(175, buf, 0, b""),
            "kexec_load": lambda: libc.syscall(246, 0, 0, None, 0),
            "modify_ldt": lambda: libc.syscall(154, 0, buf, 16),
            "syslog": lambda: libc.syscall(103, 3, buf, 256),
            "memfd_create": lambda: libc.syscall(319, b"payload", 0),
        }
        out = {}
        for name, call in calls.items():
            ctypes.set_errno(0)
            result = call()
            out[name] = [result, errno.errorcode.get(ctypes.get_errno(), ctypes.get_errno())]
        print(json.dumps(out))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    expected_errno = {
        "unshare(CLONE_NEWUSER)": EPERM,
        "unshare(CLONE_NEWNS)": EPERM,
        "clone(CLONE_NEWUSER)": EPERM,
        "clone3": ENOSYS,
        "setns": EPERM,
        "mount": EPERM,
        "umount2": EPERM,
        "pivot_root": EPERM,
        "fsopen": ENOSYS,
        "open_tree": ENOSYS,
        "ptrace(TRACEME)": EPERM,
        "ptrace(ATTACH, 1)": EPERM,
        "process_vm_readv": EPERM,
        "keyctl": EPERM,
        "add_key": EPERM,
        "bpf": EPERM,
        "userfaultfd": EPERM,
        "perf_event_open": EPERM,
        "io_uring_setup": ENOSYS,
        "open_by_handle_at": EPERM,
        "init_module": EPERM,
        "kexec_load": EPERM,
        "modify_ldt": EPERM,
        "syslog": EPERM,
        "memfd_create": ENOSYS,
    }
    assert attempt.report() == {name: [-1, code] for name, code in expected_errno.items()}
    assert_still_serves(client)


def test_setuid_and_setgid_binaries_do_not_elevate(client: httpx.Client) -> None:
    """Setuid and setgid binaries do not elevate: chage cannot read /etc/shadow and mount refuses."""
    code = dedent(
        """
        import json, os, stat, subprocess
        elevating = sorted(
            entry.path for entry in os.scandir("/usr/bin")
            if entry.is_file(follow_symlinks=False) and entry.stat().st_mode & (stat.S_ISUID | stat.S_ISGID)
        )
        def execute(*argv):
            done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=5)
            return [done.returncode, done.stdout, done.stderr.splitlines()[:1]]
        print(json.dumps({
            "elevating": elevating,
            "chage": execute("chage", "-l", "nobody"),
            "mount": execute("mount", "-t", "tmpfs", "none", "/tmp"),
        }))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    seen = attempt.report()
    # Only meaningful with the binaries to try: chage is setgid shadow, mount setuid root.
    assert {"/usr/bin/chage", "/usr/bin/mount"} <= set(seen["elevating"]), seen["elevating"]
    assert seen["chage"] == [1, "", ["chage: cannot open /etc/shadow"]]
    assert seen["mount"][0] != 0
    assert "must be superuser" in seen["mount"][2][0]
    assert_still_serves(client)


@x86_64_only
def test_32_bit_system_calls_kill_the_program(client: httpx.Client, tmp_path: Path) -> None:
    """A system call through the 32-bit entry point (int 0x80) kills the program with SIGSYS."""
    if not kernel_runs_32_bit_code(tmp_path):
        pytest.skip("this kernel cannot run 32-bit x86 code at all (no IA32 emulation): nothing to deny")
    code = dedent(
        """
        import ctypes, mmap
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(bytes([0xB8, 0x14, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20 (getpid); int 0x80; ret
        getpid32 = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
        print("calling", flush=True)
        print("returned", getpid32(), flush=True)
        """
    )
    attempt = run(client, code)
    assert attempt.status == "failed", attempt.result
    assert attempt.exit_code == -31, attempt.result  # SIGSYS
    assert attempt.stdout == "calling\n"
    assert_still_serves(client)
