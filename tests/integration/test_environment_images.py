"""Environments' runner images: each library set built offline into an image of its own, or refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from support.environments import EXTRA, EXTRA_MODULE, EXTRA_PACKAGE, declare, warmpod_cli
from support.live import podman
from support.offline import add_pip_wheel, index_settings, write_sdist

from warmpod.host import image

pytestmark = pytest.mark.integration

BARE = "bare"
BROKEN = "broken"
DEFAULT_LIBRARIES = ("numpy", "pandas")
READ_RECORD = "import json; print(json.dumps(json.load(open('/opt/warmpod/environment.json'))))"


def in_image(ref: str, code: str) -> str:
    """What ``python3 -c code`` prints in a container of ``ref``, with no network."""
    # Explicit ulimits: Podman's defaults copy the host's, which may exceed what this process may set.
    limits = ("--ulimit=nofile=1024", "--ulimit=nproc=1024")
    return podman("run", "--rm", "--network=none", *limits, ref, "python3", "-I", "-c", code)


def installed(ref: str) -> dict[str, Any]:
    """The image's record of what is installed (/opt/warmpod/environment.json)."""
    record: dict[str, Any] = json.loads(in_image(ref, READ_RECORD))
    return record


def test_a_second_environment_has_its_library_and_not_the_default_s(tmp_path: Path) -> None:
    """``extra`` is locked beside its requirements.in and built offline into an image holding its one
    package and none of the default set; the default environment keeps the default image."""
    declared = declare(tmp_path)
    assert list(declared.refs) == ["default", EXTRA]
    lock = tmp_path / EXTRA / "requirements.lock"
    assert image.lock_is_current(tmp_path / EXTRA / "requirements.in", lock)
    default = warmpod_cli("image", "ref", "default", settings=declared.settings)
    assert (
        default.stdout.strip()
        == declared.refs["default"]
        == warmpod_cli("image", "ref", settings={}).stdout.strip()
    )
    assert declared.refs[EXTRA] != declared.refs["default"]
    packages = installed(declared.refs[EXTRA])["packages"]
    assert packages[EXTRA_PACKAGE] == "1.0"
    assert not set(DEFAULT_LIBRARIES) & set(packages)
    code = f"import {EXTRA_MODULE}; print({EXTRA_MODULE}.greet('extra'))"
    assert in_image(declared.refs[EXTRA], code) == "hello extra\n"
    assert set(DEFAULT_LIBRARIES) <= set(installed(declared.refs["default"])["packages"])


def test_an_environment_without_libraries_builds_a_bare_interpreter(tmp_path: Path) -> None:
    """An empty requirements.in locks to nothing and builds an image whose Python has no library at all."""
    (tmp_path / f"{BARE}.in").write_text("# nothing: the standard library only\n")
    declared = declare(tmp_path, tables=f'[{BARE}]\nrequirements = "{BARE}.in"\n')
    lock = (tmp_path / f"{BARE}.lock").read_text()
    assert not [line for line in lock.splitlines() if line and not line.startswith("#")], lock
    record = installed(declared.refs[BARE])
    assert record["python"].startswith(image.PYTHON_VERSION)
    assert not {*DEFAULT_LIBRARIES, "pip", EXTRA_PACKAGE} & set(record["packages"]), record
    assert (
        in_image(declared.refs[BARE], "import importlib.util; print(importlib.util.find_spec('numpy'))")
        == "None\n"
    )


def test_an_unbuildable_environment_stops_the_server_naming_it_and_the_requirement(tmp_path: Path) -> None:
    """``warmpod serve`` refuses to start when an environment's requirement has no wheel, saying which
    environment and which requirement; no lock is written."""
    links = tmp_path / "links"
    links.mkdir()
    write_sdist(links, "nowheel", "1.0")
    add_pip_wheel(links)
    requirements = tmp_path / f"{BROKEN}.in"
    requirements.write_text("nowheel\n")
    file = tmp_path / "environments.toml"
    file.write_text(f'[{BROKEN}]\nrequirements = "{BROKEN}.in"\n')
    settings = {"WARMPOD_ENVIRONMENTS__FILE": str(file), "WARMPOD_SERVER__PORT": "9", **index_settings(links)}
    for command in (("image", "build"), ("serve",)):
        result = warmpod_cli(*command, settings=settings)
        assert result.returncode == 1, result.stderr
        assert f"warmpod: environment {BROKEN!r}: nowheel in {requirements} has no wheel" in result.stderr
    assert not requirements.with_suffix(".lock").exists()
