"""Host secrets: the server's environment, the agent's files, engine sockets and host files stay hidden."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path
from textwrap import dedent
from typing import Any

import httpx
import pytest
from support.hostile import CANARY_NAME, CANARY_VALUE, assert_still_serves, run
from support.live import WarmpodServer, containers, podman

from warmpod.sandbox.pool import LABEL_INSTANCE

pytestmark = pytest.mark.security

HOST_HOSTS = Path("/etc/hosts")
EACCES = errno.errorcode[errno.EACCES]
ENOENT = errno.errorcode[errno.ENOENT]


def test_environment_is_the_fixed_minimal_list(client: httpx.Client) -> None:
    """The program's environment is exactly the agent's nine variables: nothing of the server or host."""
    attempt = run(client, "import json, os\nprint(json.dumps(dict(os.environ)))\n")
    assert attempt.status == "succeeded", attempt.result
    assert attempt.report() == {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": "/work",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        # WARMPOD_LIMITS__CPUS is 1.0 by default: one thread for numpy's BLAS.
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "JE_ARROW_MALLOC_CONF": "background_thread:false",
    }
    assert_still_serves(client)


def test_server_environment_canary_is_invisible(server: WarmpodServer, client: httpx.Client) -> None:
    """A variable of the server's environment appears nowhere the program can read, nor in its container."""
    assert server.env[CANARY_NAME] == CANARY_VALUE
    code = dedent(
        f"""
        import errno, json, os
        needles = ({CANARY_NAME.encode()!r}, {CANARY_VALUE.encode()!r})
        found, read = [], 0
        paths = ["/run/.containerenv", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf",
                 "/proc/self/mountinfo", "/proc/cmdline"]
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            paths += [f"/proc/{{pid}}/{{name}}" for name in ("environ", "cmdline", "status", "mountinfo")]
        for path in paths:
            try:
                with open(path, "rb") as f:
                    data = f.read(1 << 20)
            except OSError:
                continue
            read += 1
            if any(needle in data for needle in needles):
                found.append(path)
        found += [name for name, value in os.environ.items() if "CANARY" in name or "canary" in value]
        try:
            open("/proc/1/environ", "rb").close()
            agent_environ = "readable"
        except OSError as exc:
            agent_environ = errno.errorcode[exc.errno]
        print(json.dumps({{"found": found, "read": read, "agent_environ": agent_environ}}))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    seen = attempt.report()
    assert seen["found"] == []
    assert seen["agent_environ"] == EACCES
    assert seen["read"] >= 6, "the scan read almost nothing, so it proves nothing"
    # The agent's own environment, which the program cannot read, is the container's: check it on the host.
    inspected: dict[str, Any] | None = None
    for listed in containers(f"{LABEL_INSTANCE}={server.instance()}"):
        try:
            (inspected,) = json.loads(podman("container", "inspect", listed["Id"]))
            break
        except subprocess.CalledProcessError:
            continue  # the container of the run just ended, removed since the listing
    assert inspected is not None, "no pool container to inspect"
    env = inspected["Config"]["Env"]
    assert not [entry for entry in env if CANARY_NAME in entry or CANARY_VALUE in entry], env
    assert_still_serves(client)


def test_agent_and_engine_are_out_of_reach(client: httpx.Client) -> None:
    """The agent's /proc entries, its socket directory, /etc/shadow and engine sockets are unreachable."""
    code = dedent(
        """
        import errno, json, os
        out = {}
        def attempt(name, action):
            try:
                action()
                out[name] = "reached"
            except OSError as exc:
                out[name] = errno.errorcode[exc.errno]
        attempt("/proc/1/environ", lambda: open("/proc/1/environ", "rb").close())
        attempt("/proc/1/fd", lambda: os.listdir("/proc/1/fd"))
        attempt("/proc/1/mem", lambda: open("/proc/1/mem", "rb").close())
        attempt("/proc/1/root", lambda: os.listdir("/proc/1/root"))
        attempt("/run/warmpod", lambda: os.listdir("/run/warmpod"))
        attempt("/etc/shadow", lambda: open("/etc/shadow", "rb").close())
        for path in ("/run/podman", "/var/run/podman", "/run/docker.sock", "/var/run/docker.sock",
                     "/run/containerd", "/run/crio", "/run/user", "/var/lib/containers"):
            out[path] = os.path.lexists(path)
        print(json.dumps(out))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    assert attempt.report() == {
        "/proc/1/environ": EACCES,
        "/proc/1/fd": EACCES,
        "/proc/1/mem": EACCES,
        "/proc/1/root": EACCES,
        "/run/warmpod": EACCES,
        "/etc/shadow": EACCES,
        "/run/podman": False,
        "/var/run/podman": False,
        "/run/docker.sock": False,
        "/var/run/docker.sock": False,
        "/run/containerd": False,
        "/run/crio": False,
        "/run/user": False,
        "/var/lib/containers": False,
    }
    assert_still_serves(client)


def test_hosts_file_names_only_the_sandbox(client: httpx.Client) -> None:
    """/etc/hosts names localhost and the sandbox itself, nothing copied from the host's /etc/hosts."""
    code = dedent(
        """
        import json, socket
        names = set()
        with open("/etc/hosts") as f:
            for line in f:
                fields = line.split("#")[0].split()
                names.update(fields[1:])
        print(json.dumps({"hostname": socket.gethostname(), "names": sorted(names)}))
        """
    )
    attempt = run(client, code)
    assert attempt.status == "succeeded", attempt.result
    seen = attempt.report()
    # Podman adds host.containers.internal itself; with no network it names an address nobody has.
    allowed = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", seen["hostname"]}
    allowed |= {"host.containers.internal", "host.docker.internal"}
    extra = set(seen["names"]) - allowed
    from_host = {name for line in HOST_HOSTS.read_text().splitlines() for name in line.split("#")[0].split()}
    assert not extra, f"/etc/hosts names {sorted(extra)}, of which the host's: {sorted(extra & from_host)}"
    assert_still_serves(client)
