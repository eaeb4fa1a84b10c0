"""The start-up self-test's probe (warmpod.sandbox.selftest): run as a program in a real sandbox, it prints
one JSON report of what the program sees of its sandbox, and the image's record of what it installed.

The server sends this file's text as the program; it is not part of the image.
"""

import json
import os
import resource


def read(*paths: str) -> str | None:
    """The first of ``paths`` that can be read, stripped; None if none can."""
    for path in paths:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            pass
    return None


with open("/proc/self/status") as status_file:
    status = dict(line.split(":", 1) for line in status_file if ":" in line)
try:
    open("/usr/warmpod-probe", "w").close()
    root_writable = True
except OSError:
    root_writable = False
try:
    with open("/proc/1/cmdline", "rb") as cmdline:
        pid1 = cmdline.read().split(b"\0")
except OSError:
    pid1 = []
environment: object
try:
    with open("/opt/warmpod/environment.json") as f:  # environment.ENVIRONMENT_FILE
        environment = json.load(f)
except (OSError, ValueError):
    environment = None
print(
    json.dumps(
        {
            "pid1": [part.decode(errors="replace") for part in pid1 if part],
            "hostname": os.uname().nodename,
            "uid": os.getuid(),
            "uid_map": read("/proc/self/uid_map"),
            "interfaces": sorted(os.listdir("/sys/class/net")),
            "root_writable": root_writable,
            "seccomp": status["Seccomp"].strip(),
            "no_new_privs": status["NoNewPrivs"].strip(),
            "cap_eff": status["CapEff"].strip(),
            "rlimit_cpu": resource.getrlimit(resource.RLIMIT_CPU)[0],
            "cpu_used": sum(os.times()[:2]),
            "memory_max": read("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
            "pids_max": read("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
            "environment": environment,
        }
    )
)
