"""Servers with several environments: an environments file declaring ``default`` and a small ``extra``.

``declare`` writes the file and a local find-links directory holding ``extra``'s one hand-made wheel,
then builds every environment's image offline with ``warmpod image build``. The wheel's bytes are
fixed, so its lock and image reference are too: a later call finds the image built and returns at
once. Pass ``Declared.settings`` to a server (``start_server(**declared.settings)``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support.offline import add_pip_wheel, index_settings, write_wheel

EXTRA = "extra"
"""The second environment's name."""
EXTRA_PACKAGE = "warmpod-extra-helper"
"""The one distribution ``extra`` installs; the default image does not have it."""
EXTRA_MODULE = "warmpod_extra_helper"
"""What a run in ``extra`` imports: ``greet(name)`` returns ``"hello " + name``."""
EXTRA_SOURCE = b'def greet(name):\n    return "hello " + name\n'
BUILD_TIMEOUT = 900.0
"""A first build of both images: the default one's wheels are downloaded unless cached."""


@dataclass(frozen=True)
class Declared:
    """An environments file whose images are built."""

    file: Path
    """The environments file (TOML)."""
    settings: dict[str, str]
    """``WARMPOD_ENVIRONMENTS__FILE`` and the offline index's variables: what a server needs."""
    refs: dict[str, str]
    """Each environment's runner image reference, ``default`` first."""


def declare(directory: Path, *, tables: str = "") -> Declared:
    """Write an environments file of ``default`` and ``extra`` in ``directory`` and build its images.

    ``tables``: more TOML appended to the file, such as ``[extra]``'s ``limits`` or further
    environments (whose requirements, relative to ``directory``, the caller writes).

    Skips the test when no pip wheel is cached to build offline with (run `warmpod image build` once).
    """
    links = directory / "links"
    links.mkdir(parents=True, exist_ok=True)
    write_wheel(links, EXTRA_PACKAGE, EXTRA_MODULE, "1.0", EXTRA_SOURCE)
    add_pip_wheel(links)
    requirements = directory / EXTRA / "requirements.in"
    requirements.parent.mkdir(exist_ok=True)
    requirements.write_text(f"{EXTRA_PACKAGE}\n")
    file = directory / "environments.toml"
    file.write_text(f'[default]\n\n[{EXTRA}]\nrequirements = "{EXTRA}/requirements.in"\n\n{tables}')
    settings = {"WARMPOD_ENVIRONMENTS__FILE": str(file), **index_settings(links)}
    built = warmpod_cli("image", "build", settings=settings, timeout=BUILD_TIMEOUT)
    assert built.returncode == 0, built.stderr
    listed = warmpod_cli("image", "ref", settings=settings)
    assert listed.returncode == 0, listed.stderr
    refs = dict(line.split() for line in listed.stdout.splitlines())
    return Declared(file=file, settings=settings, refs=refs)


def warmpod_cli(
    *args: str, settings: dict[str, str], timeout: float = 600.0
) -> subprocess.CompletedProcess[str]:
    """Run the ``warmpod`` command with extra settings; its output is returned, not checked."""
    return subprocess.run(
        [sys.executable, "-m", "warmpod", *args],
        env={**os.environ, **settings},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
