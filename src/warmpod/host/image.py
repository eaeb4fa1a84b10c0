"""Building the runner image: a Debian base, the locked wheels, and ``podman build`` offline."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from uv import find_uv_bin

from warmpod.environments import DEFAULT, Environments, EnvironmentSpec
from warmpod.errors import ImageError
from warmpod.host.facts import podman_command
from warmpod.settings import Settings

Progress = Callable[[str], None]

PYTHON_VERSION = "3.13"
"""The CPython of the runner image; ``pool/requirements.lock`` is compiled for it."""
GLIBC_MINOR = 39
"""Newest ``manylinux_2_N`` wheel tag accepted (Debian trixie ships glibc 2.41)."""
PIP_REQUIREMENT = "pip==26.3 --hash=sha256:f3b60b20ffaadd4415ed7957212a38ac63fa4c5fa375bd0f4a797777940fad13"
"""The pip that installs the wheels during the build; it runs from its wheel, never installed."""
TIMEOUT = 20 * 60.0
"""Longest any one tool may run, in seconds."""

CONTEXT_FILES = ("Containerfile", "agent.py", "bootstrap.py", "finish_image.py", "requirements.lock")
"""The build inputs taken from the pool directory; the image tag is a hash over them. The lock is
the environment's own instead (``lock_file``) when it has a requirements file."""
LOCK_COMMAND = "warmpod image lock"
"""Regenerates the lock; its header names it."""
_LOCK_STAMP = "# warmpod: resolved from {name} sha256={digest}"
# uv names a requirement without a usable wheel in one of these ways.
_NO_WHEEL = (
    re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:[=<>!~]=?[^\s,]*)? (?:has|have) no usable wheels"),
    re.compile(r"Wheels are required for `([^`]+)`"),
)
_LOCAL_BASE = "localhost/warmpod-base"
_ARCHES = frozenset({"x86_64", "aarch64"})
_TAIL = 25
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Dropped from the locally built base: documentation (copyright notices stay, the image may be
# redistributed), translations, and what apt and debootstrap leave behind.
_STRIP = (
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/log",
)
_DPKG_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)


def context_dir(settings: Settings) -> Path:
    """The directory holding the runner image's Containerfile, agent and lock.

    ``settings.image.context`` when set; otherwise the ``pool`` directory bundled in the installed
    package, or the repository's ``pool/`` in a checkout.
    """
    if settings.image.context:
        return Path(settings.image.context)
    return guest_dir()


def guest_dir() -> Path:
    """The guest code's directory (``pool/``): bundled in the installed package, or the repository's."""
    package = Path(__file__).resolve().parents[1]
    bundled = package / "pool"
    return bundled if bundled.is_dir() else package.parents[1] / "pool"


def image_ref(settings: Settings, environment: EnvironmentSpec) -> str:
    """The runner image reference of ``environment``, tagged with a hash of everything the build reads.

    Cheap and deterministic: the same Containerfile, agent, lock and base name always give the same
    reference, and changing any of them gives a new one. The environment's name is not part of it:
    two environments locked alike share one image.

    Raises:
        ImageError: the context directory lacks one of the build inputs, or the lock is missing or
            older than its requirements (``warmpod image build`` or ``warmpod image lock`` makes it).
    """
    digest = hashlib.sha256()
    for name, data in _inputs(settings, environment):
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    digest.update(f"base\0{_base_ref(settings)}".encode())
    return f"{settings.image.name}:{digest.hexdigest()[:12]}"


def requirements_file(settings: Settings, environment: EnvironmentSpec) -> Path | None:
    """The list of libraries the lock is resolved from, or None for a context holding only a lock.

    An environment's own ``requirements``; for ``default``, ``WARMPOD_IMAGE__REQUIREMENTS`` or the
    image context's ``requirements.in``.

    Raises:
        ImageError: the file named is not there.
    """
    if environment.requirements is not None:
        if not environment.requirements.is_file():
            raise ImageError(f"its requirements {environment.requirements} is not a file")
        return environment.requirements
    if settings.image.requirements:
        path = Path(settings.image.requirements)
        if not path.is_file():
            raise ImageError(f"WARMPOD_IMAGE__REQUIREMENTS names {path}, which is not a file")
        return path
    bundled = context_dir(settings) / "requirements.in"
    return bundled if bundled.is_file() else None


def lock_file(settings: Settings, environment: EnvironmentSpec) -> Path:
    """The hashed lock ``environment``'s image installs: beside its requirements, or the context's own."""
    requirements = requirements_file(settings, environment)
    if requirements is None:
        return context_dir(settings) / "requirements.lock"
    if requirements.suffix == ".in":
        return requirements.with_suffix(".lock")
    return requirements.with_name(requirements.name + ".lock")


def lock_is_current(requirements: Path, lock: Path) -> bool:
    """Whether ``lock`` was resolved from ``requirements`` as they are now (its first line says)."""
    try:
        with lock.open() as file:
            first = file.readline().rstrip("\n")
    except OSError:
        return False
    return first == _stamp(requirements)


def lock_requirements(
    settings: Settings, environment: EnvironmentSpec, progress: Progress, *, upgrade: bool = False
) -> Path:
    """Resolve ``environment``'s requirements file into its hashed lock for the runner's CPython, wheels only.

    Versions already in the lock are kept where they still fit, unless ``upgrade``: then every
    requirement is resolved to the newest version that has a wheel.

    Raises:
        ImageError: there is no requirements file, a requirement has no wheel for the runner
            (the message names it), or uv failed.
    """
    requirements = requirements_file(settings, environment)
    if requirements is None:
        raise ImageError(
            f"no requirements.in in {context_dir(settings)} to resolve: set WARMPOD_IMAGE__REQUIREMENTS"
        )
    lock = lock_file(settings, environment)
    arch = _arch()
    stamp = _stamp(requirements)  # before resolving: an edit meanwhile leaves the lock stale
    progress(f"resolving {requirements} for CPython {PYTHON_VERSION} on manylinux {arch}, wheels only...")
    with tempfile.TemporaryDirectory(prefix="lock-", dir=_cache_dir(settings)) as tmp:
        output = Path(tmp) / lock.name
        if lock.is_file() and not upgrade:
            shutil.copyfile(lock, output)  # uv prefers the versions pinned in its output file
        argv = [
            _uv(),
            "pip",
            "compile",
            requirements.name,
            "--output-file",
            str(output),
            "--python-version",
            PYTHON_VERSION,
            "--python-platform",
            f"{arch}-manylinux_2_{GLIBC_MINOR}",
            # The image is built offline from wheels: a requirement without one fails here, by name.
            "--only-binary",
            ":all:",
            "--generate-hashes",
            "--no-python-downloads",
            "--quiet",
            "--custom-compile-command",
            LOCK_COMMAND,
            *(["--upgrade"] if upgrade else []),
        ]
        try:
            # From the file's directory, so the lock's "via -r" notes do not depend on where it ran.
            _run(argv, what="uv pip compile", progress=progress, cwd=requirements.parent)
        except ImageError as exc:
            raise _resolution_error(requirements, arch, str(exc)) from exc
        resolved = output.read_text()
        staged = lock.with_name(f".{lock.name}.new")
        try:
            staged.write_text(f"{stamp}\n{resolved}")
            staged.replace(lock)
        except OSError as exc:
            raise ImageError(f"cannot write the lock {lock}: {exc}") from exc
    progress(f"locked {requirements} into {lock}")
    return lock


def build_image(settings: Settings, environment: EnvironmentSpec, progress: Progress) -> str:
    """Build ``environment``'s runner image unless Podman already holds it, and return its reference.

    Makes the Debian base first when no base image is configured, then downloads the locked wheels
    (cached between builds), then runs ``podman build`` without network.

    Args:
        settings: warmpod's configuration; ``settings.image`` says how to build.
        environment: the library set to install; its lock is made first if missing or stale.
        progress: called with one human-readable line at a time, including the tools' output.

    Raises:
        ImageError: a build step failed or ran past its time limit; the message holds the last
            lines of the tool's output.
    """
    requirements = requirements_file(settings, environment)
    if requirements is not None and not lock_is_current(requirements, lock_file(settings, environment)):
        lock_requirements(settings, environment, progress)
    ref = image_ref(settings, environment)
    if _image_exists(settings, ref):
        progress(f"runner image {ref} already built, skipping")
        return ref
    started = time.monotonic()
    base = settings.image.base or _build_base(settings, progress)
    wheels = _download_wheels(settings, environment, progress)
    cache = _cache_dir(settings)
    with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
        context = _assemble_context(settings, environment, wheels, Path(tmp))
        progress(f"building runner image {ref} on {base} (about 10 s)...")
        # --layers=false: one layer on top of the base and no build cache, which buildah would
        # reuse even after the bind-mounted wheels or lock changed.
        argv, env = podman_command(
            settings.engine,
            "build",
            "--layers=false",
            "--network=none",
            "--build-arg",
            f"BASE={base}",
            "--tag",
            ref,
            "--file",
            str(context / "Containerfile"),
            str(context),
        )
        _run(argv, what="podman build", progress=progress, env=env)
    progress(f"runner image {ref} built in {time.monotonic() - started:.0f} s")
    return ref


def build_all(settings: Settings, environments: Environments, progress: Progress) -> dict[str, str]:
    """Build every environment's runner image that Podman does not hold yet; return each one's reference.

    With more than ``default``, each progress line and error names its environment.

    Raises:
        ImageError: an environment cannot be locked or built; the message names it and, when a
            requirement has no wheel, the requirement.
    """
    refs = {}
    for environment in environments:
        with naming(environment, environments):
            told = progress if len(environments) == 1 else _prefixed(environment.name, progress)
            refs[environment.name] = build_image(settings, environment, told)
    return refs


@contextlib.contextmanager
def naming(environment: EnvironmentSpec, environments: Environments) -> Iterator[None]:
    """Put ``environment 'name': `` before the message of an ImageError raised inside.

    Not when ``default`` is the only environment: the messages stay those of a one-image server.
    """
    try:
        yield
    except ImageError as exc:
        if len(environments) == 1 and environment.name == DEFAULT:
            raise
        raise ImageError(f"environment {environment.name!r}: {exc}") from exc


def _prefixed(name: str, progress: Progress) -> Progress:
    return lambda line: progress(f"[{name}] {line}")


def _inputs(settings: Settings, environment: EnvironmentSpec) -> list[tuple[str, bytes]]:
    context = context_dir(settings)
    requirements = requirements_file(settings, environment)
    lock = lock_file(settings, environment)
    if requirements is not None and not lock_is_current(requirements, lock):
        state = "is older than" if lock.is_file() else "is not resolved from"
        raise ImageError(
            f"{lock} {state} {requirements}: `warmpod image build` resolves it, or run `{LOCK_COMMAND}`"
        )
    inputs = []
    for name in CONTEXT_FILES:
        path = lock if name == "requirements.lock" else context / name
        try:
            inputs.append((name, path.read_bytes()))
        except OSError as exc:
            raise ImageError(
                f"cannot read {name} of the runner image from {path.parent}: {exc.strerror}; "
                f"set WARMPOD_IMAGE__CONTEXT to a directory holding {', '.join(CONTEXT_FILES)}"
            ) from exc
    return inputs


def _stamp(requirements: Path) -> str:
    try:
        data = requirements.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read the requirements {requirements}: {exc.strerror}") from exc
    return _LOCK_STAMP.format(name=requirements.name, digest=hashlib.sha256(data).hexdigest())


def _resolution_error(requirements: Path, arch: str, output: str) -> ImageError:
    names = sorted({match for pattern in _NO_WHEEL for match in pattern.findall(output)})
    if names:
        return ImageError(
            f"{', '.join(names)} in {requirements} {'has' if len(names) == 1 else 'have'} no wheel for "
            f"CPython {PYTHON_VERSION} on manylinux_2_{GLIBC_MINOR} {arch}: the runner image installs "
            "wheels only, offline; remove it, or pin a version that ships such a wheel.\n" + output
        )
    return ImageError(f"cannot resolve {requirements}: {output}")


def _uv() -> str:
    try:
        return find_uv_bin()
    except FileNotFoundError as exc:
        raise ImageError(f"uv not found ({exc}): reinstall warmpod, which depends on it") from exc


def _arch() -> str:
    arch = platform.machine()
    if arch not in _ARCHES:
        raise ImageError(f"no runner image for {arch!r} hosts: wheels exist for {sorted(_ARCHES)}")
    return arch


def _base_ref(settings: Settings) -> str:
    return settings.image.base or f"{_LOCAL_BASE}:{settings.image.suite}"


def _cache_dir(settings: Settings) -> Path:
    path = Path(settings.image.cache_dir or Path.home() / ".cache" / "warmpod")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create the image cache directory {path}: {exc}") from exc
    return path


def _image_exists(settings: Settings, ref: str) -> bool:
    argv, env = podman_command(settings.engine, "image", "exists", ref)
    return _run(argv, what=f"podman image exists {ref}", env=env, ok=(0, 1), timeout=120) == 0


def _build_base(settings: Settings, progress: Progress) -> str:
    """Make ``localhost/warmpod-base:<suite>``: Debian minbase with python3, minus documentation."""
    image = settings.image
    ref = _base_ref(settings)
    if _image_exists(settings, ref):
        progress(f"base image {ref} already built, skipping")
        return ref
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="base-", dir=_cache_dir(settings)))
    try:
        tarball = tmp / "rootfs.tar"
        if os.geteuid() == 0:
            rootfs = tmp / "rootfs"
            progress(f"building Debian {image.suite} base with debootstrap (about 30 s)...")
            _run(
                [
                    _tool("debootstrap"),
                    "--variant=minbase",
                    "--include=python3",
                    image.suite,
                    str(rootfs),
                    image.mirror,
                ],
                what="debootstrap",
                progress=progress,
            )
            _strip(rootfs)
            _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], what="tar")
        else:
            progress(f"building Debian {image.suite} base with mmdebstrap (about 30 s)...")
            _run(
                [
                    _tool("mmdebstrap"),
                    "--mode=unshare",
                    "--variant=minbase",
                    "--include=python3",
                    *(f"--dpkgopt={option}" for option in _DPKG_EXCLUDES),
                    # Copies of the host's files; Podman mounts its own over them at run time.
                    '--customize-hook=: > "$1/etc/resolv.conf"; : > "$1/etc/hostname"',
                    image.suite,
                    str(tarball),
                    image.mirror,
                ],
                what="mmdebstrap",
                progress=progress,
            )
        progress(f"importing the base as {ref}...")
        argv, env = podman_command(
            settings.engine,
            "import",
            "--change",
            f"ENV PATH={_PATH}",
            "--change",
            "LABEL org.opencontainers.image.title=warmpod-base",
            "--change",
            f"LABEL io.warmpod.base.suite={image.suite}",
            "--message",
            f"Debian {image.suite} minbase with python3 from {image.mirror}",
            str(tarball),
            ref,
        )
        _run(argv, what="podman import", env=env)
    finally:
        _remove_scratch(tmp, progress)
    progress(f"base image {ref} built in {time.monotonic() - started:.0f} s")
    return ref


def _strip(rootfs: Path) -> None:
    for relative in _STRIP:
        _empty(rootfs, rootfs / relative)
    doc = rootfs / "usr/share/doc"
    if doc.is_dir() and not doc.is_symlink():
        for package in doc.iterdir():
            if package.is_dir() and not package.is_symlink():
                for entry in package.iterdir():
                    if entry.name != "copyright":
                        _remove(entry)
    for name in ("etc/resolv.conf", "etc/hostname"):
        # Copies of the host's files; Podman mounts its own over them at run time.
        target = rootfs / name
        if target.is_file() and not target.is_symlink():
            target.write_bytes(b"")


def _remove_scratch(directory: Path, progress: Progress) -> None:
    # debootstrap killed half-way leaves /proc, /sys and device binds mounted in the rootfs:
    # deleting through them would reach the host, so leave the directory to a human instead
    # (and do not raise here, which would hide the error that got us here).
    with open("/proc/self/mountinfo") as mountinfo:
        mounts = [line.split()[4] for line in mountinfo]
    inside = [m for m in mounts if m == str(directory) or m.startswith(f"{directory}/")]
    if inside:
        progress(f"left {directory} in place, {', '.join(inside)} still mounted: unmount, remove")
        return
    shutil.rmtree(directory)


def _empty(rootfs: Path, directory: Path) -> None:
    # The rootfs is full of absolute symlinks that would point into the host: never follow one.
    if directory.is_symlink() or not directory.is_dir():
        return
    if not directory.resolve().is_relative_to(rootfs.resolve()):
        return
    for entry in directory.iterdir():
        _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _download_wheels(settings: Settings, environment: EnvironmentSpec, progress: Progress) -> Path:
    """Fetch the locked wheels and pip's own into a cache directory named by their inputs."""
    lock = lock_file(settings, environment)
    arch = _arch()
    key = hashlib.sha256(dict(_inputs(settings, environment))["requirements.lock"])
    key.update(f"\0{PIP_REQUIREMENT}\0{arch}\0{PYTHON_VERSION}\0{GLIBC_MINOR}".encode())
    cache = _cache_dir(settings)
    target = cache / f"wheels-{key.hexdigest()[:12]}"
    if target.is_dir():
        progress(f"wheels already downloaded to {target}, skipping")
        return target
    # The hint is the bundled report set's; an operator's set may be any size.
    hint = " (140 MB, about 10 s)" if environment.requirements is None else ""
    progress(f"downloading the locked wheels for CPython {PYTHON_VERSION}/{arch}{hint}...")
    with tempfile.TemporaryDirectory(prefix="wheels-", dir=cache) as tmp:
        pip_requirement = Path(tmp) / "pip.txt"
        pip_requirement.write_text(PIP_REQUIREMENT + "\n")
        downloads = Path(tmp) / "wheels"
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--no-input",
                "--progress-bar=off",
                "--only-binary=:all:",
                "--no-deps",
                "--require-hashes",
                "--python-version",
                PYTHON_VERSION,
                "--implementation",
                "cp",
                "--abi",
                "cp" + PYTHON_VERSION.replace(".", ""),
                *(f"--platform={tag}" for tag in _platform_tags(arch)),
                "--requirement",
                str(lock),
                "--requirement",
                str(pip_requirement),
                "--dest",
                str(downloads),
            ],
            what="pip download",
            progress=progress,
        )
        # Renamed only once complete, so an interrupted download is never mistaken for a cache hit.
        try:
            downloads.rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent build that finished first
                raise
    return target


def _platform_tags(arch: str) -> list[str]:
    """Every manylinux tag a glibc ``2.GLIBC_MINOR`` system runs, newest first.

    ``pip download --platform`` matches tags literally: ``manylinux_2_39`` alone would reject the
    ``manylinux_2_28`` wheels numpy ships.
    """
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    oldest = 5 if arch == "x86_64" else 17
    tags = []
    for minor in range(GLIBC_MINOR, oldest - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in legacy:
            tags.append(f"{legacy[minor]}_{arch}")
    return tags


def _assemble_context(settings: Settings, environment: EnvironmentSpec, wheels: Path, context: Path) -> Path:
    for name, data in _inputs(settings, environment):
        (context / name).write_bytes(data)
    (context / "wheels").mkdir()
    for wheel in wheels.iterdir():
        destination = context / "wheels" / wheel.name
        try:
            os.link(wheel, destination)
        except OSError:  # another filesystem
            shutil.copyfile(wheel, destination)
    return context


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ImageError(f"{name} not found: install it (apt-get install {name})")
    return path


def _run(
    argv: Sequence[str],
    *,
    what: str,
    progress: Progress | None = None,
    env: Mapping[str, str] | None = None,
    ok: tuple[int, ...] = (0,),
    timeout: float = TIMEOUT,
    cwd: Path | None = None,
) -> int:
    """Run a tool, streaming its output lines to ``progress``; return its exit status.

    Raises:
        ImageError: the tool could not start, exited with a status not in ``ok``, or ran past
            ``timeout`` seconds.
    """
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL)
    try:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        raise ImageError(f"{what} could not start: {exc}") from exc
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _stop(proc)

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        for raw in proc.stdout or ():
            line = raw.rstrip()
            tail.append(line)
            if progress is not None and line:
                progress(line)
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # progress raised, or we are being interrupted
            _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()
    output = "\n".join(tail)
    if expired.is_set():
        raise ImageError(f"{what} timed out after {timeout:.0f} s; its last output:\n{output}")
    if returncode not in ok:
        raise ImageError(f"{what} failed with exit status {returncode}; its last output:\n{output}")
    return returncode


def _stop(proc: subprocess.Popen[str]) -> None:
    # The tool leads its own process group: end its helpers too (buildah's runc, debootstrap's
    # dpkg). SIGTERM first lets podman remove its working container.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue
        return
