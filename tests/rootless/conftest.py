"""Fixtures of the rootless suite: the ordinary user, a copy of the code it reads, the image, the server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.live import GRACEFUL_EXIT, WarmpodServer, wait_until

from warmpod.environments import Environments
from warmpod.host.image import image_ref
from warmpod.sandbox.pool import LABEL_PID
from warmpod.settings import from_env

from .asuser import CACHE, REPO, SETTINGS, SITE_PACKAGES, TOOLS, Tree, User, ensure_user, start_server


@pytest.fixture(scope="session")
def user() -> User:
    """The ordinary user, created if missing; skips where the suite cannot act as one."""
    if os.geteuid() != 0:
        pytest.skip("the rootless suite creates and acts as an ordinary user, which needs root (CI is root)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: the rootless suite needs them (deploy/setup.sh)")
    return ensure_user()


@pytest.fixture(scope="session")
def tree(user: User) -> Iterator[Tree]:
    """The sources, pool, deploy files and venv packages, copied where the user can read them."""
    major_minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    # The venv's own interpreter may live under root's home; any of the same version will do
    # (the compiled packages match its ABI).
    candidates = [str(Path(sys.executable).resolve()), f"/usr/bin/python{major_minor}", "/usr/bin/python3"]
    check = "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')"
    usable = [
        python
        for python in candidates
        if Path(python).exists() and user.run(python, "-c", check, check=False).stdout.strip() == major_minor
    ]
    if not usable:
        pytest.skip(f"no Python {major_minor} the user {user.name} may run (tried {', '.join(candidates)})")
    root = Path(tempfile.mkdtemp(prefix="warmpod-rootless-"))
    try:
        root.chmod(0o755)
        skip = shutil.ignore_patterns("__pycache__", "*.pyc", "_editable_impl_*", "__editable__*")
        for name in ("src", "pool", "deploy"):
            shutil.copytree(REPO / name, root / name, ignore=skip)
        shutil.copytree(SITE_PACKAGES, root / "site-packages", ignore=skip)
        subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
        yield Tree(python=usable[0], root=root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def image(user: User) -> str:
    """The runner image, built rootful if needed and loaded into the user's storage from a cached save."""
    settings = from_env()
    ref = image_ref(settings, Environments.load(settings).default)
    if subprocess.run(["podman", "image", "exists", ref], check=False).returncode != 0:
        subprocess.run([sys.executable, "-m", "warmpod", "image", "build"], check=True, timeout=900)
    if user.run("podman", "image", "exists", ref, check=False).returncode != 0:
        CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
        CACHE.chmod(0o755)
        tarball = CACHE / f"runner-{ref.rsplit(':', 1)[1]}.tar"
        if not tarball.exists():
            for old in CACHE.glob("runner-*.tar*"):  # one image at a time: 200 MB each
                old.unlink()
            partial = tarball.with_suffix(".tar.partial")
            subprocess.run(
                ["podman", "save", "--quiet", "--format", "docker-archive", "--output", str(partial), ref],
                check=True,
                timeout=300,
            )
            partial.chmod(0o644)
            partial.rename(tarball)
        user.run("podman", "load", "--quiet", "--input", str(tarball), timeout=300)
    assert user.run("podman", "image", "exists", ref, check=False).returncode == 0, f"{ref} not loaded"
    return ref


@pytest.fixture(scope="session")
def server(
    user: User, tree: Tree, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WarmpodServer]:
    """The suite's server; at the end it must stop gracefully and leave none of its containers."""
    live = start_server(user, tree, tmp_path_factory.mktemp("warmpod-rootless"), SETTINGS)
    try:
        live.wait_healthy()
        yield live
    except BaseException:
        live.close()
        raise
    status = live.stop(signal.SIGTERM)
    assert status in GRACEFUL_EXIT[signal.SIGTERM], f"exit status {status}:\n{live.log_tail()}"
    label = f"{LABEL_PID}={live.pid}"
    assert wait_until(lambda: not user.containers(label), timeout=10), user.containers(label)


@pytest.fixture(scope="session")
def client(server: WarmpodServer) -> Iterator[httpx.Client]:
    """An HTTP client for the suite's server; a run may wait for a pool refill."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="session")
def health(server: WarmpodServer) -> dict[str, Any]:
    """The server's ``/health`` body once it serves."""
    return server.wait_healthy()
