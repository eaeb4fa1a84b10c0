"""Acting, from root, as an ordinary user that runs ``warmpod serve`` against its own rootless Podman.

The suite runs as root (as CI does) and acts as the user ``warmpod-ci`` through ``setpriv``: it
creates the user when missing, with subordinate uid and gid ranges, a runtime directory and an
overlay storage configuration; copies what the server needs where the user can read it (CI clones
may live under a private home); loads the runner image from root's storage into the user's; and
starts ``warmpod serve``, which starts the user's private ``podman system service`` itself.
Everything is idempotent: a second session reuses the user, its storage and the image.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sysconfig
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support.live import WarmpodServer

NAME = "warmpod-ci"
SUBID_COUNT = 65536
# Root-owned and world-readable: the runner image saved from root's storage for the user to load.
CACHE = Path("/var/tmp/warmpod-rootless")
REPO = Path(__file__).resolve().parents[2]
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])  # the venv's packages
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = ("podman", "setpriv", "useradd", "usermod", "newuidmap", "newgidmap")

# The suite's server: limits small enough to reach quickly on a 2-core machine.
POOL_SIZE = 2
CPU_TIME = 2
MEMORY_MB = 256
PIDS = 64
MAX_OUTPUT_BYTES = 65536
MAX_TIMEOUT = 20
SETTINGS = {
    "WARMPOD_POOL__SIZE": str(POOL_SIZE),
    "WARMPOD_LIMITS__CPU_TIME": str(CPU_TIME),
    "WARMPOD_LIMITS__MEMORY_MB": str(MEMORY_MB),
    "WARMPOD_LIMITS__PIDS": str(PIDS),
    "WARMPOD_LIMITS__MAX_OUTPUT_BYTES": str(MAX_OUTPUT_BYTES),
    "WARMPOD_LIMITS__MAX_TIMEOUT": str(MAX_TIMEOUT),
    # Rootless Podman on cgroup v1 applies no cgroup limits: without this the service refuses.
    "WARMPOD_LIMITS__ALLOW_UNENFORCED": "true",
}


@dataclass(frozen=True)
class User:
    """The ordinary user the suite acts as, and how to run things as that user."""

    name: str
    uid: int
    gid: int
    home: Path
    subuid_start: int

    @property
    def runtime_dir(self) -> Path:
        """``XDG_RUNTIME_DIR``: Podman keeps its run root there, so it must not change between sessions."""
        return Path(f"/run/user/{self.uid}")

    def environ(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A login-like environment of the user's own, nothing of root's."""
        env = {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": PATH,
            "LANG": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.runtime_dir),
        }
        env.update(extra or {})
        return env

    def argv(self, *argv: str, cwd: Path | None = None) -> list[str]:
        """``argv`` run as the user (``setpriv`` execs it: same pid), in ``cwd`` or the user's home."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--",
            "env",
            f"--chdir={cwd or self.home}",
            *argv,
        ]

    def run(
        self, *argv: str, env: Mapping[str, str] | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` as the user and return what it printed."""
        done = subprocess.run(
            self.argv(*argv),
            env=self.environ(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"{argv} as {self.name} exited {done.returncode}:\n{done.stderr[-3000:]}")
        return done

    def podman(self, *args: str) -> str:
        """The output of one podman CLI call on the user's rootless storage."""
        return self.run("podman", *args).stdout

    def containers(self, label: str) -> list[dict[str, Any]]:
        """The user's containers, running or not, that carry ``label``."""
        listed: list[dict[str, Any]] = json.loads(
            self.podman("ps", "-a", "--filter", f"label={label}", "--format", "json") or "[]"
        )
        return listed


@dataclass(frozen=True)
class Tree:
    """A copy of the code the server runs, readable by the user, and the interpreter to run it."""

    python: str
    root: Path

    def environ(self) -> dict[str, str]:
        """``PYTHONPATH`` for the copy: the sources first, then the venv's packages."""
        return {"PYTHONPATH": f"{self.root / 'src'}:{self.root / 'site-packages'}"}


def _subid_ranges(path: Path) -> dict[str, list[tuple[int, int]]]:
    ranges: dict[str, list[tuple[int, int]]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            ranges.setdefault(parts[0], []).append((int(parts[1]), int(parts[2])))
    return ranges


def _ensure_subids(name: str, uid: int) -> int:
    """Give ``name`` subordinate uid and gid ranges unless it has some; return the first subuid."""
    for kind in ("uid", "gid"):
        ranges = _subid_ranges(Path(f"/etc/sub{kind}"))
        if not (ranges.get(name) or ranges.get(str(uid))):
            start = max([100000] + [first + count for spans in ranges.values() for first, count in spans])
            flag = f"--add-sub{kind}s"
            subprocess.run(["usermod", flag, f"{start}-{start + SUBID_COUNT - 1}", name], check=True)
    spans = _subid_ranges(Path("/etc/subuid"))
    return (spans.get(name) or spans[str(uid)])[0][0]


def ensure_user() -> User:
    try:
        entry = pwd.getpwnam(NAME)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/usr/sbin/nologin", "--comment", "warmpod CI", NAME],
            check=True,
        )
        entry = pwd.getpwnam(NAME)
    user = User(
        name=NAME,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        home=Path(entry.pw_dir),
        subuid_start=_ensure_subids(NAME, entry.pw_uid),
    )
    # No login session makes /run/user/UID here (no systemd-logind on CI machines): make it.
    user.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(user.runtime_dir, user.uid, user.gid)
    user.runtime_dir.chmod(0o700)
    # Without a storage.conf (Debian's podman does not ship one) rootless Podman picks vfs, which
    # copies the whole image for every container; the kernel's native rootless overlay is the
    # driver a real deployment uses. A storage made with another driver must be reset once.
    storage_conf = user.home / ".config/containers/storage.conf"
    if not storage_conf.exists():
        user.run("mkdir", "-p", str(storage_conf.parent))
        user.run("podman", "system", "reset", "--force")
        user.run("sh", "-c", f"printf '[storage]\\ndriver = \"overlay\"\\n' > {storage_conf}")
    return user


def start_server(user: User, tree: Tree, directory: Path, settings: Mapping[str, str]) -> WarmpodServer:
    """``warmpod serve`` as the user, from the copied tree, with its private rootless Podman service."""
    # The run store must be the user's to write: a fresh one under its home.
    store = user.home / ".local/state/warmpod-ci" / f"runs-{uuid.uuid4().hex}.sqlite3"
    return WarmpodServer(
        directory,
        {"WARMPOD_QUEUE__STORE_PATH": str(store), **settings},
        python=user.argv(tree.python, cwd=tree.root),
        environ=user.environ(tree.environ()),
    )
