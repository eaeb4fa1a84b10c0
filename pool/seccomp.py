"""Writes pool/seccomp.json: Podman's default seccomp profile plus the denials in DENIALS."""

from __future__ import annotations

import argparse
import json
from errno import EAFNOSUPPORT, ENOSYS, EPERM, errorcode
from pathlib import Path
from typing import Any

DEFAULT_PROFILE = Path("/usr/share/containers/seccomp.json")
OUTPUT = Path(__file__).with_name("seccomp.json")

# Linux ABI values, spelled out so the profile does not depend on the generating host's Python.
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_PACKET = 1, 2, 3, 10
SOCK_FLAGS = 0o4000 | 0o2000000  # SOCK_NONBLOCK | SOCK_CLOEXEC, or-ed into the type
IPPROTO_TCP, IPPROTO_UDP = 6, 17
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET (clone's first argument on
# x86_64 and aarch64, the only architectures this profile keeps).
CLONE_NEW = [0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000]

# socket() succeeds only for these (family, type, protocol); None matches anything.
SOCKETS = [
    (AF_UNIX, None, None),
    *(
        (family, type_, protocol)
        for family in (AF_INET, AF_INET6)
        for type_, protocols in ((SOCK_STREAM, (0, IPPROTO_TCP)), (SOCK_DGRAM, (0, IPPROTO_UDP)))
        for protocol in protocols
    ),
]

# The rules that need arguments; DENIALS names them and the functions below build them.
CLONE_NS = "clone with CLONE_NEW* flags"
SOCKET_FAMILY = "socket, family not AF_UNIX/AF_INET/AF_INET6"
SOCKET_RAW = "socket, AF_INET/AF_INET6 SOCK_RAW/SOCK_PACKET"
SOCKET_OTHER = "socket, AF_INET/AF_INET6 not TCP/UDP"

# Everything this profile takes away from Podman's default: syscall or rule -> errno -> why.
# ENOSYS where libraries probe a syscall and fall back to an older one, EPERM otherwise.
DENIALS = [
    ("ptrace", EPERM, "reads and controls other processes"),
    ("process_vm_readv", EPERM, "reads another process's memory"),
    ("process_vm_writev", EPERM, "writes another process's memory"),
    ("pidfd_getfd", EPERM, "steals file descriptors from another process"),
    ("kcmp", EPERM, "compares other processes' kernel objects"),
    ("process_madvise", EPERM, "advises on another process's memory"),
    ("keyctl", EPERM, "kernel keyrings are not namespaced: keys reach past the container"),
    ("add_key", EPERM, "kernel keyrings are not namespaced: keys reach past the container"),
    ("request_key", EPERM, "kernel keyrings are not namespaced: keys reach past the container"),
    ("bpf", EPERM, "eBPF verifier and maps: a large kernel attack surface"),
    ("userfaultfd", EPERM, "stalls kernel page faults at will, a kernel exploit primitive"),
    ("perf_event_open", EPERM, "kernel profiling: side channels and a history of kernel bugs"),
    ("io_uring_setup", ENOSYS, "large kernel attack surface whose operations bypass seccomp"),
    ("io_uring_enter", ENOSYS, "large kernel attack surface whose operations bypass seccomp"),
    ("io_uring_register", ENOSYS, "large kernel attack surface whose operations bypass seccomp"),
    ("unshare", EPERM, "new namespaces: a user namespace opens root-only kernel code to the program"),
    ("setns", EPERM, "joins other namespaces"),
    (CLONE_NS, EPERM, "new namespaces, as unshare"),
    ("clone3", ENOSYS, "its flags sit in a struct seccomp cannot read; glibc falls back to clone"),
    ("mount", EPERM, "changes the mount table"),
    ("umount2", EPERM, "changes the mount table"),
    ("pivot_root", EPERM, "changes the mount table"),
    ("open_tree", ENOSYS, "new mount API (libmount falls back to mount)"),
    ("move_mount", ENOSYS, "new mount API (libmount falls back to mount)"),
    ("fsopen", ENOSYS, "new mount API (libmount falls back to mount)"),
    ("fsmount", ENOSYS, "new mount API (libmount falls back to mount)"),
    ("fspick", ENOSYS, "new mount API (libmount falls back to mount)"),
    ("fsconfig", ENOSYS, "new mount API (libmount falls back to mount)"),
    ("mount_setattr", ENOSYS, "new mount API (libmount falls back to mount)"),
    ("open_by_handle_at", EPERM, "opens files by handle, past the container's root"),
    ("name_to_handle_at", EPERM, "makes the handles open_by_handle_at takes"),
    ("kexec_load", EPERM, "loads a new kernel"),
    ("kexec_file_load", EPERM, "loads a new kernel"),
    ("init_module", EPERM, "loads kernel code"),
    ("finit_module", EPERM, "loads kernel code"),
    ("delete_module", EPERM, "unloads kernel code"),
    ("acct", EPERM, "host-wide process accounting"),
    ("swapon", EPERM, "host-wide swap"),
    ("swapoff", EPERM, "host-wide swap"),
    ("reboot", EPERM, "reboots the host or kills the container's init"),
    ("syslog", EPERM, "the kernel log: host messages and kernel addresses"),
    ("quotactl", EPERM, "host filesystem quotas"),
    ("quotactl_fd", EPERM, "host filesystem quotas"),
    ("lookup_dcookie", EPERM, "kernel profiling paths"),
    ("modify_ldt", EPERM, "16-bit segments for DOS emulators, with a history of kernel bugs"),
    ("memfd_create", ENOSYS, "fileless binaries: the only executable file left, /work and /tmp are noexec"),
    (SOCKET_FAMILY, EAFNOSUPPORT, "vsock reaches the VM host; packet, netlink, alg... are kernel surface"),
    (SOCKET_RAW, EPERM, "forges packets (the kernel's own answer without CAP_NET_RAW)"),
    (SOCKET_OTHER, ENOSYS, "SCTP, L2TP, ping... autoload protocol modules (the default action)"),
]

# Why only native architectures stay: nothing in the image is 32-bit, the compat syscall table
# doubles the kernel surface, and its socketcall() takes socket()'s arguments by pointer, where
# seccomp cannot see them, so it would bypass the socket rules. A 32-bit syscall kills the thread
# here, and the process through the agent's own filter (agent.py, kill_foreign_syscalls).
ARCHES = {"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"}


def rule(
    names: list[str], action: str, errno: int | None = None, args: list[Any] | None = None
) -> dict[str, Any]:
    """One entry of a profile's syscalls list."""
    entry: dict[str, Any] = {
        "names": names,
        "action": action,
        "args": args or [],
        "includes": {},
        "excludes": {},
    }
    if errno is not None:
        entry["errnoRet"] = errno
    return entry


def arg(index: int, op: str, value: int, value_two: int = 0) -> dict[str, int | str]:
    """A comparison of one syscall argument; SCMP_CMP_MASKED_EQ tests (arg & value) == value_two."""
    return {"index": index, "op": f"SCMP_CMP_{op}", "value": value, "valueTwo": value_two}


def clone_rules(errno: int) -> list[dict[str, Any]]:
    """clone is allowed without namespace flags; with any of them it fails."""
    no_flags = arg(0, "MASKED_EQ", sum(CLONE_NEW), 0)
    denied = [rule(["clone"], "SCMP_ACT_ERRNO", errno, [arg(0, "MASKED_EQ", f, f)]) for f in CLONE_NEW]
    return [rule(["clone"], "SCMP_ACT_ALLOW", args=[no_flags]), *denied]


def socket_allowed() -> list[dict[str, Any]]:
    """The allow rules of SOCKETS."""
    rules = []
    for family, type_, protocol in SOCKETS:
        args = [arg(0, "EQ", family)]
        if type_ is not None:
            args.append(arg(1, "MASKED_EQ", 0xFFFFFFFF & ~SOCK_FLAGS, type_))
        if protocol is not None:
            args.append(arg(2, "EQ", protocol))
        rules.append(rule(["socket"], "SCMP_ACT_ALLOW", args=args))
    return rules


def socket_family_rules(errno: int) -> list[dict[str, Any]]:
    """Every family below the highest allowed one that is not allowed, then everything above it.

    One comparison per argument and rule: libseccomp cannot express "not in a set" otherwise.
    """
    families = {family for family, _, _ in SOCKETS}
    top = max(families)
    args = [[arg(0, "EQ", f)] for f in range(top) if f not in families] + [[arg(0, "GT", top)]]
    return [rule(["socket"], "SCMP_ACT_ERRNO", errno, a) for a in args]


def socket_raw_rules(errno: int) -> list[dict[str, Any]]:
    """Raw types of the inet families."""
    mask = 0xFFFFFFFF & ~SOCK_FLAGS
    return [
        rule(["socket"], "SCMP_ACT_ERRNO", errno, [arg(0, "EQ", family), arg(1, "MASKED_EQ", mask, type_)])
        for family in (AF_INET, AF_INET6)
        for type_ in (SOCK_RAW, SOCK_PACKET)
    ]


def build(default: dict[str, Any]) -> dict[str, Any]:
    """The default profile with the denials of DENIALS, winning whatever capabilities are granted."""
    # libseccomp keeps the broader of two rules for one syscall whatever their actions (so the
    # default's own EPERM for setns without CAP_SYS_ADMIN loses to its plain allow of setns): a
    # denial only holds once every default rule naming its syscall is gone.
    ours: list[dict[str, Any]] = []
    touched: set[str] = set()
    for what, errno, _why in DENIALS:
        if what == CLONE_NS:
            touched.add("clone")
            ours += clone_rules(errno)
        elif what == SOCKET_FAMILY:
            touched.add("socket")
            ours += socket_allowed() + socket_family_rules(errno)
        elif what == SOCKET_RAW:
            touched.add("socket")
            ours += socket_raw_rules(errno)
        elif what == SOCKET_OTHER:
            # No rule: what the allow rules leave out falls to the profile's default action.
            if default["defaultAction"] != "SCMP_ACT_ERRNO" or default.get("defaultErrnoRet") != errno:
                raise ValueError(f"{what!r} expects the default action to fail with {errno}")
        else:
            touched.add(what)
            ours.append(rule([what], "SCMP_ACT_ERRNO", errno))
    kept = []
    for entry in default["syscalls"]:
        if "name" in entry:
            raise ValueError("the default profile uses 'name'; only 'names' is handled")
        names = [n for n in entry["names"] if n not in touched]
        if names:
            kept.append({**entry, "names": names})
    arch_map = [{**a, "subArchitectures": []} for a in default["archMap"] if a["architecture"] in ARCHES]
    return {**default, "archMap": arch_map, "syscalls": kept + ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("default", nargs="?", type=Path, default=DEFAULT_PROFILE, help="Podman's profile")
    parser.add_argument("-o", "--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    profile = build(json.loads(args.default.read_text()))
    args.output.write_text(json.dumps(profile, indent=2, sort_keys=True) + "\n")
    print(f"{args.output}: {args.default} plus {len(DENIALS)} denials")
    for what, errno, why in DENIALS:
        print(f"  {what:<46} {errorcode[errno]:<12} {why}")
    arches = ", ".join(a["architecture"] for a in profile["archMap"])
    print(f"  architectures: {arches} (no 32-bit compat ABI)")


if __name__ == "__main__":
    main()
