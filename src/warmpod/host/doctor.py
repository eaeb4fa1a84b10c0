"""``warmpod doctor``: what this host and its Podman offer, and which limits they enforce, in plain words."""

from __future__ import annotations

import ctypes
import shutil

import anyio
import msgspec

from warmpod.environments import Environments
from warmpod.errors import WarmpodError
from warmpod.host import image, podman_service
from warmpod.host.enforcement import check, enforcement
from warmpod.host.facts import USERNS_SIZE, HostFacts, own_user_namespaces
from warmpod.host.podman_api import EngineInfo, PodmanApi
from warmpod.settings import Settings

CAP_SYS_RESOURCE = 24


def main(settings: Settings) -> int:
    """Ask Podman what it offers, as the server would, and say it; 1 if ``warmpod serve`` would fail."""
    try:
        info = anyio.run(engine_info, settings)
    except WarmpodError as exc:
        print(f"Podman: not usable ({exc}). Install it: apt-get install podman")
        return 1
    return report(settings, info)


async def engine_info(settings: Settings) -> EngineInfo:
    """What the engine the server would use says about itself: ``settings.engine.url``'s, or a
    private ``podman system service`` started for the question.

    Raises:
        EngineError: Podman is missing, its service did not start, or it did not answer.
    """
    # Always a fresh directory: a configured state_dir may be a running server's, and starting a
    # service there would take over its socket.
    engine = msgspec.structs.replace(settings.engine, state_dir="")
    state = podman_service.state_dir(engine)
    try:
        async with podman_service.running(engine, state) as podman:
            podman_api = PodmanApi(podman.url, 1)
            try:
                return await podman_api.info()
            finally:
                podman_api.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def report(settings: Settings, info: EngineInfo) -> int:
    """Print what ``info`` and this host offer; 1 if ``warmpod serve`` would fail or refuse to start."""
    facts = HostFacts.read()
    mode = "rootless" if info.rootless else "rootful"
    hybrid = " (hybrid: v1 controllers with a v2 mount)" if facts.hybrid else ""
    print(f"Podman {info.version}, {mode}")
    print(f"cgroups: v{info.cgroup_version}{hybrid}, manager {info.cgroup_manager or '?'}")
    version = info.oci_runtime_version.splitlines()
    print(f"OCI runtime: {info.oci_runtime or '?'} ({version[0] if version else 'version unknown'})")
    absent: list[str] = []
    if info.rootless and info.cgroup_version == 2:
        # Rootless limits need the controllers delegated to the user's systemd manager; without
        # them container creation (and so `warmpod serve`'s self-test) fails.
        have = set(info.cgroup_controllers)
        absent = [name for name in ("cpu", "memory", "pids") if name not in have]
        if absent:
            print(
                f"Delegated cgroup controllers: {', '.join(sorted(have)) or 'none'}; missing "
                f"{', '.join(absent)}: set Delegate=cpu memory pids for user@.service (systemd) and "
                "loginctl enable-linger this user"
            )
    _print_images(settings)
    print("Limits (limit: layer, mechanism):")
    rows = enforcement(cgroups=info.can_limit)
    for row in rows:
        print(f"  {row.limit}: {row.layer or 'NOT ENFORCED'}, {row.mechanism}")
    cannot_pause = "no: rootless Podman on cgroup v1 cannot pause"
    print(f"Pause idle containers: {'yes' if info.can_pause else cannot_pause}")
    userns_error = ""
    if info.rootless:
        print("User namespace: rootless Podman's: container root is this user, the program a subordinate uid")
    else:
        try:
            own = own_user_namespaces(settings, rootless=False)
        except WarmpodError as exc:
            own, userns_error = False, str(exc)
        if own:
            print(
                f"User namespace: one per container (userns=auto, {USERNS_SIZE} uids from the `containers` "
                "range): container root is not host root, and no two sandboxes share a host uid"
            )
        else:
            why = userns_error or "WARMPOD_ENGINE__USERNS=host"
            print(f"User namespace: none ({why}): container root is host root")
    if not _has_cap_sys_resource():
        # Lowering the agent's oom_score_adj from the host (sandbox.connect) needs CAP_SYS_RESOURCE there.
        print(
            "OOM score: warmpod cannot shield the agents (no CAP_SYS_RESOURCE); "
            "the program's 1000 still makes it the OOM killer's first pick"
        )
    profile = (image.context_dir(settings) / "seccomp.json").resolve()
    print(f"Seccomp profile: {profile}")
    abi = _landlock_abi()
    allowed = "landlock_restrict_self" in profile.read_text()
    if abi and allowed:
        print(f"Landlock: active (ABI {abi}): the program may write only under /work, /tmp, /dev/shm")
    else:
        why = "the kernel has no Landlock" if not abi else "the seccomp profile blocks it"
        print(f"Landlock: not active ({why}); the other layers still apply")
    if absent:
        print(f"warmpod serve would fail: Podman cannot set the {', '.join(absent)} limits for this user")
        return 1
    if userns_error:
        print(f"warmpod serve would refuse to start: {userns_error}")
        return 1
    try:
        check(rows, allow_unenforced=settings.limits.allow_unenforced)
    except WarmpodError as exc:
        print(f"warmpod serve would refuse to start: {exc}")
        return 1
    return 0


def _print_images(settings: Settings) -> None:
    try:
        environments = Environments.load(settings)
    except WarmpodError as exc:
        print(f"Runner image: not known ({exc})")
        return
    for environment in environments:
        label = "Runner image" if len(environments) == 1 else f"Runner image of {environment.name}"
        try:
            print(f"{label}: {image.image_ref(settings, environment)}")
        except WarmpodError as exc:  # a requirements file not resolved yet: `warmpod serve` resolves it
            print(f"{label}: not known yet ({exc})")


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as f:
        caps = next((line.split()[1] for line in f if line.startswith("CapEff:")), "0")
    return bool(int(caps, 16) >> CAP_SYS_RESOURCE & 1)


def _landlock_abi() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    version = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # create_ruleset
    return max(int(version), 0)
