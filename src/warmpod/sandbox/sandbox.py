"""One sandbox: the locked-down spec its container is made from, its agent connection, and its life."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import anyio
from anyio.abc import AsyncResource

from warmpod.backoff import Backoff
from warmpod.errors import EngineError, InvalidRun, ProtocolError, WarmpodError
from warmpod.host.facts import USERNS_SIZE
from warmpod.sandbox.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    AgentMessage,
    Channel,
    FileChunk,
    Hello,
    Job,
    Output,
)
from warmpod.sandbox.unix_stream import UnixStream
from warmpod.settings import LimitSettings

log = logging.getLogger(__name__)

# From bytecode: its start-up is every container's. Not -S: the program, its fork, needs site.
AGENT_COMMAND = ["python3", "-I", "/opt/warmpod/agent.pyc"]
AGENT_DIR = "/run/warmpod"
SOCKET_NAME = "agent.sock"
CPU_PERIOD = 100_000
SHM_MB = 16
NPROC_WITH_CGROUPS = 4096
# The agent needs exactly these to start the program as an unprivileged user and to kill it.
# CAP_SYS_RESOURCE makes the program's OOM score of 1000 a floor (only without a user namespace:
# the kernel checks it on the host), CAP_SETPCAP empties the program's bounding set (the program
# loses every capability when it changes uid).
AGENT_CAPS = ["CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_SYS_RESOURCE", "CAP_SETPCAP"]
# Room above a sandbox's memory at rest for writing main.py and starting the program.
MEMORY_HEADROOM = 4 * 1024 * 1024
DESTROY_TIMEOUT = 30.0
# An answered agent exits within a few milliseconds; past this its container is killed.
AGENT_EXIT_WAIT = 0.25
# The wait between looks for the agent's socket doubles from the first to the second: a bare
# agent listens within tens of ms when idle, a preloading one or any under load only after 0.3-2 s,
# which at a fixed 5 ms cost the server a few hundred event-loop wake-ups per container.
SOCKET_POLL = (0.005, 0.02)
# Podman 4.3 refuses tmpfs nr_inodes: inode exhaustion is bounded by the memory cgroup instead.
# notmpcopyup: otherwise Podman copies the image directory's (root-owned 0755) mode onto the tmpfs.
_TMPFS_OPTS = ["rw", "nosuid", "nodev", "noexec", "notmpcopyup", "mode=1777"]


def container_spec(
    *,
    image: str,
    seccomp_profile: Path,
    name: str,
    labels: dict[str, str],
    agent_dir: Path,
    limits: LimitSettings,
    cgroup_limits: bool,
    userns: bool = False,
    preload: Sequence[str] = (),
) -> dict[str, Any]:
    """The spec of one pool container.

    Args:
        image: runner image reference.
        name: container name, also its hostname.
        labels: labels that tie the container to its server instance.
        seccomp_profile: absolute host path of the seccomp profile (``pool/seccomp.json``).
        agent_dir: host directory bind-mounted at /run/warmpod for the agent's socket.
        limits: the server's limits.
        cgroup_limits: whether the engine can apply cgroup limits (it cannot rootless on v1).
        userns: a user namespace with a uid range of its own (Podman's ``auto``; rootful only).
        preload: modules the program's interpreter imports before the container is paused.
    """
    tmpfs_size = f"size={limits.tmpfs_mb}m"
    spec: dict[str, Any] = {
        "image": image,
        "name": name,
        "hostname": name,
        "labels": labels,
        "command": AGENT_COMMAND,
        "user": "0:0",
        # The agent reads these and applies them to the program only; the program's own
        # environment is a fixed minimal list built by the agent.
        "env": {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "WARMPOD_CPU_SECONDS": str(limits.cpu_time),
            "WARMPOD_FSIZE_BYTES": str(limits.tmpfs_mb * 1024 * 1024),
            "WARMPOD_PRELOAD": ",".join(preload),
            # The program's thread pools (OpenBLAS, OpenMP): its whole CPUs, at least one.
            "WARMPOD_THREADS": str(max(1, int(limits.cpus))),
        },
        "env_host": False,
        "httpproxy": False,
        # The image's own minimal /etc/hosts and empty resolv.conf: Podman's would copy the
        # host's entries in.
        "use_image_hosts": True,
        "use_image_resolve_conf": True,
        # Every namespace the sandbox relies on, pinned: an engine default (containers.conf's
        # pidns = "host", say) must not loosen it. The agent's kill(-1) needs its own PID namespace.
        "netns": {"nsmode": "none"},
        "ipcns": {"nsmode": "private"},
        "pidns": {"nsmode": "private"},
        "utsns": {"nsmode": "private"},
        "cgroupns": {"nsmode": "private"},
        "read_only_filesystem": True,
        "read_write_tmpfs": False,
        "cap_drop": ["ALL"],
        "cap_add": AGENT_CAPS,
        "no_new_privileges": True,
        "seccomp_profile_path": str(seccomp_profile),
        "stop_timeout": 0,
        "mounts": [
            {
                "destination": AGENT_DIR,
                "source": str(agent_dir),
                "type": "bind",
                # U: Podman chowns it to the container's root, which under a user namespace is
                # not host root and could not create its socket in a root-owned 0700 directory.
                "options": ["rw", "nosuid", "nodev", "noexec", *(["U"] if userns else [])],
            },
            {
                "destination": "/work",
                "source": "tmpfs",
                "type": "tmpfs",
                "options": [*_TMPFS_OPTS, tmpfs_size],
            },
            {
                # Explicit: Podman 5 mounts /dev/shm read-only in a read-only container, which
                # breaks multiprocessing's semaphores; Podman 4 mounted it writable.
                "destination": "/dev/shm",  # noqa: S108  (inside the container)
                "source": "shm",
                "type": "tmpfs",
                "options": [*_TMPFS_OPTS, f"size={SHM_MB}m"],
            },
            {
                "destination": "/tmp",  # noqa: S108  (inside the container)
                "source": "tmpfs",
                "type": "tmpfs",
                "options": [*_TMPFS_OPTS, tmpfs_size],
            },
        ],
        "r_limits": [
            {"type": "nofile", "soft": limits.open_files, "hard": limits.open_files},
            {"type": "core", "soft": 0, "hard": 0},
            # Whatever the host allows: the program must not climb back above the agent's priority.
            {"type": "nice", "soft": 0, "hard": 0},
        ],
    }
    # RLIMIT_NPROC counts per uid across every container sharing a user namespace, so it is
    # only the tight fallback where the pids cgroup is missing; it must be set either way, since
    # Podman's default copies a host limit the runtime may not be allowed to apply.
    nproc = limits.pids if not cgroup_limits else NPROC_WITH_CGROUPS
    spec["r_limits"].append({"type": "nproc", "soft": nproc, "hard": nproc})
    memory = limits.memory_mb * 1024 * 1024
    if not cgroup_limits:
        spec["env"]["WARMPOD_AS_BYTES"] = str(memory)
        # No cgroup of its own: the counters the agent would read (CPU use, OOM kills, pids.max
        # hits) are a parent's, shared with the whole host, and would stop or blame runs falsely.
        spec["env"]["WARMPOD_CGROUP_COUNTERS"] = "0"
    else:
        spec["resource_limits"] = {
            "memory": {"limit": memory, "swap": memory},
            "pids": {"limit": limits.pids},
            "cpu": {"quota": int(limits.cpus * CPU_PERIOD), "period": CPU_PERIOD},
        }
    if userns:
        # Both halves are needed over the REST API: the CLI fills idmappings from --userns=auto.
        spec["userns"] = {"nsmode": "auto", "value": f"size={USERNS_SIZE}"}
        spec["idmappings"] = {"AutoUserNs": True, "AutoUserNsOpts": {"Size": USERNS_SIZE}}
    return spec


class Engine(Protocol):
    """The container calls a sandbox and its pool need (``host.podman_api.PodmanApi``, or a fake in tests)."""

    async def create(self, spec: dict[str, object]) -> str: ...
    async def start(self, container_id: str) -> None: ...
    async def pause(self, container_id: str) -> None: ...
    async def unpause(self, container_id: str) -> None: ...
    async def destroy(self, container_id: str) -> None: ...
    async def oom_killed(self, container_id: str) -> bool: ...
    async def update_memory(self, container_id: str, limit_bytes: int) -> None: ...
    async def list_labelled(self, label: str) -> list[tuple[str, dict[str, str]]]: ...


class Sandbox(AsyncResource):
    """One pool container and the server's end of its agent connection, from start to removal.

    ``start`` makes one; the pool keeps it while it rests (``rest``, ``watch``), thaws it and hands
    it to one run (``take``), whose job it exchanges (``limit_memory``, ``send``, ``receive``,
    ``oom_killed``); ``aclose`` (or leaving ``async with``) hangs up and removes it. Its state
    flags change only through these.
    """

    def __init__(
        self,
        container_id: str,
        name: str,
        directory: Path,
        channel: Channel,
        engine: Engine,
        *,
        memory: int = 0,
        can_limit: bool = False,
        preload: Sequence[str] = (),
        landlock: int = 0,
        preload_failed: Sequence[str] = (),
    ) -> None:
        self.container_id = container_id
        self.name = name
        self.directory = directory
        self._channel = channel
        self._engine = engine
        self.memory = memory
        """Bytes the container held before its run, as its agent reported."""
        self.can_limit = can_limit
        """Whether the engine applies cgroup limits to it (and so can lower its memory limit)."""
        self.preload = tuple(preload)
        """The modules its interpreter imported before the run."""
        self.landlock = landlock
        """The Landlock ABI its agent confines the program with (0: none)."""
        self.preload_failed = list(preload_failed)
        """Preload modules its interpreter could not import."""
        self._paused = False
        self._used = False
        self._answered = False
        self._lock = anyio.Lock()
        # Scope of ``watch`` while it rests in the pool; ``take`` cancels it.
        self._resting = anyio.CancelScope()

    @classmethod
    async def start(
        cls,
        engine: Engine,
        *,
        image: str,
        seccomp_profile: Path,
        name: str,
        labels: dict[str, str],
        directory: Path,
        limits: LimitSettings,
        can_limit: bool,
        userns: bool = False,
        preload: Sequence[str] = (),
        timeout: float,
    ) -> Sandbox:
        """Create and start a container (``container_spec``), connect to its agent and take its greeting.

        ``directory``, made empty for the agent's socket, is the sandbox's from here: it goes
        with the container, on a failure here (before the error is raised) as on ``aclose``.

        Raises:
            ProtocolError: the agent did not greet within ``timeout`` seconds, or greeted wrongly.
            EngineError: the engine could not create or start the container.
        """
        spec = container_spec(
            image=image,
            seccomp_profile=seccomp_profile,
            name=name,
            labels=labels,
            agent_dir=directory,
            limits=limits,
            cgroup_limits=can_limit,
            userns=userns,
            preload=preload,
        )
        container_id = ""
        try:
            container_id = await engine.create(spec)
            await engine.start(container_id)
            with anyio.fail_after(timeout):
                channel = await connect(directory / SOCKET_NAME, MAX_FRAME)
            try:
                with anyio.fail_after(timeout):
                    hello = await channel.receive()
                if not isinstance(hello, Hello) or hello.version != PROTOCOL_VERSION:
                    raise ProtocolError(f"agent greeted with {hello!r}")
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await channel.aclose()
                raise
        except TimeoutError as exc:
            await remove(engine, container_id, directory)
            raise ProtocolError(f"agent of {name} did not answer in time") from exc
        except BaseException:
            await remove(engine, container_id, directory)
            raise
        return cls(
            container_id,
            name,
            directory,
            channel,
            engine,
            memory=hello.memory,
            can_limit=can_limit,
            preload=preload,
            landlock=hello.landlock,
            preload_failed=hello.preload_failed,
        )

    @property
    def warm(self) -> bool:
        """Whether its interpreter preloaded modules (``pool.preload``)."""
        return bool(self.preload)

    @property
    def paused(self) -> bool:
        """Whether its processes are frozen (``pause``) and not yet thawed."""
        return self._paused

    @property
    def thawing(self) -> bool:
        """Whether a ``thaw`` is under way."""
        return self._lock.locked()

    @property
    def used(self) -> bool:
        """Something was done to it for a run (a limit lowered, a job sent): it can serve no other."""
        return self._used

    @property
    def answered(self) -> bool:
        """Its agent sent a run's last frame, after which it exits by itself."""
        return self._answered

    @property
    def memory_floor(self) -> int:
        """The lowest memory limit it takes, in bytes: what it holds at rest and ``MEMORY_HEADROOM``
        (0, any, where cgroups limit nothing here)."""
        return self.memory + MEMORY_HEADROOM if self.can_limit else 0

    async def pause(self) -> None:
        """Freeze it while it waits; one the engine cannot freeze keeps running (and serves as well)."""
        try:
            await self._engine.pause(self.container_id)
        except EngineError as exc:
            # runc thaws what it could not freeze (cgroup v1's freezer gives up on a busy host:
            # seen with 16 containers starting at once): a running container serves as well,
            # only idling costs a little CPU.
            log.warning("could not pause %s, keeping it running: %s", self.name, exc)
            with contextlib.suppress(EngineError):
                await self._engine.unpause(self.container_id)  # in case it stayed half frozen
        else:
            self._paused = True

    async def thaw(self) -> None:
        """Unpause, once, however many tasks ask."""
        async with self._lock:
            if self._paused:
                await self._engine.unpause(self.container_id)
                self._paused = False

    def rest(self) -> None:
        """It waits in the pool (again): ``watch`` watches it from now until ``take``."""
        self._resting = anyio.CancelScope()

    def take(self) -> None:
        """Leased for a run: it rests no more, and ``watch`` returns."""
        self._resting.cancel()

    async def watch(self) -> bool:
        """Wait while it rests: True once its agent hangs up (its container died or broke; an idle
        agent says nothing until it has a job), False once ``take`` ends the rest."""
        with self._resting:
            await self._channel.wait_hangup()
            return True
        return False

    async def limit_memory(self, limit_bytes: int) -> bool:
        """Lower the memory cgroup limit (swap included); False where cgroups limit nothing here.

        Asked, it serves no other run, even if it refuses.

        Raises:
            InvalidRun: the limit is below what the sandbox holds before the program starts
                (preloaded modules), which the kernel would refuse or answer with an OOM kill.
        """
        self._used = True
        if not self.can_limit:
            return False
        check_memory_floor(limit_bytes, self.memory_floor, self.preload)
        await self._engine.update_memory(self.container_id, limit_bytes)
        return True

    async def send(self, job: Job) -> None:
        """Hand its agent the one job it will ever run.

        Raises:
            ProtocolError: the agent's connection is lost.
        """
        self._used = True
        await self._channel.send(job)

    async def receive(self) -> AgentMessage:
        """The agent's next message about the job: output and files, then its last frame.

        Raises:
            ProtocolError: the agent hung up, or sent an oversized or invalid frame.
        """
        message = await self._channel.receive()
        if not isinstance(message, (Output, FileChunk)):
            self._answered = True
        return message

    async def oom_killed(self) -> bool:
        """Whether the OOM killer ended the container (its agent, PID 1); False if that is unknown."""
        try:
            return await self._engine.oom_killed(self.container_id)
        except WarmpodError as exc:
            log.warning("could not inspect %s: %s", self.name, exc)
            return False

    async def aclose(self) -> None:
        """Hang up on the agent, then remove the container and its directory (shielded, bounded).

        An agent that has answered is given ``AGENT_EXIT_WAIT`` to exit first: Podman removes a
        stopped container with two runtime processes fewer than a running one (no kill, no state
        query) and without waiting for it to die."""
        with anyio.CancelScope(shield=True):
            if self._answered:
                with anyio.move_on_after(AGENT_EXIT_WAIT):
                    await self._channel.wait_hangup()
            await self._channel.aclose()
        await remove(self._engine, self.container_id, self.directory)


def check_memory_floor(limit_bytes: int, floor: int, preload: Sequence[str]) -> None:
    """Refuse a memory limit below ``floor``, a sandbox's ``memory_floor`` (0 takes any).

    Raises:
        InvalidRun: the limit is below the floor; the message names the minimum.
    """
    if limit_bytes < floor:
        mib = 1024 * 1024
        raise InvalidRun(
            f"memory_mb must be at least {-(-floor // mib)} MiB here: a sandbox holds "
            f"{(floor - MEMORY_HEADROOM) / mib:.0f} MiB before the program starts (preloaded: "
            f"{', '.join(preload) or 'nothing'}; WARMPOD_POOL__PRELOAD)"
        )


async def remove(engine: Engine, container_id: str, directory: Path) -> None:
    """Destroy a container (none if ``container_id`` is empty), retrying, and remove its directory.

    Shielded from cancellation and bounded by ``DESTROY_TIMEOUT``: a container given up on would
    hold its memory until the server stops.
    """
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(DESTROY_TIMEOUT) as scope:
            retry = Backoff(0.2, 5.0)
            while container_id:
                try:
                    await engine.destroy(container_id)
                    break
                except WarmpodError as exc:
                    # E.g. while the engine's service restarts.
                    log.warning("could not remove container %s (retrying): %s", container_id[:12], exc)
                    await retry.sleep()
        if scope.cancelled_caught:
            log.error("gave up removing container %s after %.0f s", container_id[:12], DESTROY_TIMEOUT)
        shutil.rmtree(directory, ignore_errors=True)


async def connect(path: Path, max_frame: int) -> Channel:
    """The server's end of the agent's connection on ``path``, once the agent listens there."""
    # Polling a stat is cheaper than a thread hop, and runs off any request's critical path.
    poll = Backoff(*SOCKET_POLL)
    while True:
        if os.path.exists(path):  # noqa: ASYNC240  (a stat, as the comment above says)
            try:
                stream = await UnixStream.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                pass  # an older agent may still be between bind and listen
            else:
                _shield_from_oom(stream.peer_pid())
                return Channel(stream, max_frame=max_frame)
        await poll.sleep()


def _shield_from_oom(pid: int) -> None:
    # The OOM killer must never pick the agent: its death would turn the program's memory kill
    # into a lost result. Lowering a score takes CAP_SYS_RESOURCE on the host, which the agent
    # never has in a user namespace and the server has when it is root. Without it (rootless, or
    # a root that lacks it) the program's own score of 1000 still makes it the first pick.
    # The pid is the listening agent's, read before any program code ran; 0 if it is not visible.
    if pid <= 0:
        return
    try:
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass
