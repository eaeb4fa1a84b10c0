"""Unit tests of the runner image's reference and the cheap paths of its build."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from warmpod.environments import Environments
from warmpod.errors import ImageError
from warmpod.host import image
from warmpod.settings import Settings, from_env

DEFAULT = Environments.load(from_env({})).default
"""The default environment: ``WARMPOD_IMAGE__REQUIREMENTS`` or the context's own lock."""


@pytest.fixture
def context(tmp_path: Path) -> Path:
    """A fake pool directory holding the build inputs (a lock, but no requirements.in to resolve)."""
    path = tmp_path / "pool"
    path.mkdir()
    (path / "Containerfile").write_text("ARG BASE\nFROM ${BASE}\n")
    (path / "agent.py").write_text('"""agent"""\n')
    (path / "bootstrap.py").write_text('"""bootstrap"""\n')
    (path / "finish_image.py").write_text('"""finish"""\n')
    (path / "requirements.lock").write_text("numpy==2.0.0 --hash=sha256:00\n")
    (path / "README").write_text("not a build input\n")
    return path


def settings_for(context: Path, **image_settings: Any) -> Settings:
    return from_env({}, image={"context": str(context), **image_settings})


def test_ref_is_name_and_short_hash(context: Path) -> None:
    """The reference is the configured repository tagged with 12 hex digits."""
    ref = image.image_ref(settings_for(context, name="localhost/runner"), DEFAULT)
    assert re.fullmatch(r"localhost/runner:[0-9a-f]{12}", ref)


def test_ref_is_deterministic_across_copies(context: Path, tmp_path: Path) -> None:
    """Identical inputs in another directory give the same reference."""
    copy = shutil.copytree(context, tmp_path / "copy")
    assert image.image_ref(settings_for(context), DEFAULT) == image.image_ref(settings_for(copy), DEFAULT)


@pytest.mark.parametrize("name", image.CONTEXT_FILES)
def test_ref_changes_with_each_input(context: Path, name: str) -> None:
    """Editing any build input, even by one byte, gives a new reference."""
    before = image.image_ref(settings_for(context), DEFAULT)
    with (context / name).open("a") as file:
        file.write("\n")
    assert image.image_ref(settings_for(context), DEFAULT) != before


def test_ref_ignores_other_files(context: Path) -> None:
    """Files the build does not read leave the reference alone."""
    before = image.image_ref(settings_for(context), DEFAULT)
    (context / "README").write_text("edited\n")
    (context / "seccomp.json").write_text("{}\n")
    assert image.image_ref(settings_for(context), DEFAULT) == before


def test_ref_changes_with_base(context: Path) -> None:
    """A configured base image, or another Debian suite for the local one, gives a new reference."""
    refs = {
        image.image_ref(settings_for(context), DEFAULT),
        image.image_ref(settings_for(context, suite="forky"), DEFAULT),
        image.image_ref(settings_for(context, base="registry.example/python:3.13"), DEFAULT),
    }
    assert len(refs) == 3


def test_ref_runs_no_tool(context: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Computing the reference starts no process, so callers may use it freely."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("image_ref started a process")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(subprocess, "run", forbidden)
    image.image_ref(settings_for(context), DEFAULT)


def test_missing_input_is_an_image_error(context: Path) -> None:
    """A context without agent.py fails with a message naming the file and the setting."""
    (context / "agent.py").unlink()
    with pytest.raises(ImageError, match=r"agent\.py.*WARMPOD_IMAGE__CONTEXT"):
        image.image_ref(settings_for(context), DEFAULT)


def test_default_context_holds_the_inputs() -> None:
    """Without a configured context the bundled pool directory is used, and it is complete."""
    context = image.context_dir(from_env({}))
    assert all((context / name).is_file() for name in image.CONTEXT_FILES)


def test_platform_tags_reach_older_manylinux() -> None:
    """pip matches --platform literally, so the tags go down through every older manylinux."""
    tags = image._platform_tags("x86_64")
    assert tags[0] == f"manylinux_2_{image.GLIBC_MINOR}_x86_64"
    assert {"manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_17_aarch64" in image._platform_tags("aarch64")


def fake_podman(tmp_path: Path, script: str) -> str:
    path = tmp_path / "podman"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


def test_build_skips_an_existing_image(context: Path, tmp_path: Path) -> None:
    """When Podman already holds the reference, the build says so and does nothing else."""
    podman = fake_podman(tmp_path, 'echo "$@" >> "$0.log"; exit 0')
    settings = from_env({}, image={"context": str(context)}, engine={"podman": podman})
    lines: list[str] = []
    ref = image.build_image(settings, DEFAULT, lines.append)
    assert ref == image.image_ref(settings, DEFAULT)
    assert lines == [f"runner image {ref} already built, skipping"]
    assert Path(podman + ".log").read_text().count("\n") == 1


def test_tool_failure_carries_its_output(context: Path, tmp_path: Path) -> None:
    """A failing podman raises ImageError with the step and the tool's last words."""
    podman = fake_podman(tmp_path, 'echo "storage is corrupt" >&2; exit 125')
    settings = from_env({}, image={"context": str(context)}, engine={"podman": podman})
    with pytest.raises(ImageError, match=r"(?s)podman image exists .*125.*storage is corrupt"):
        image.build_image(settings, DEFAULT, lambda line: None)


POOL = Path(__file__).resolve().parents[2] / "pool"
NO_WHEEL = """\
error: No solution found when resolving dependencies
  cause: Because all versions of docopt have no usable wheels and you require docopt, we can conclude \
that your requirements are unsatisfiable.

hint: Wheels are required for `docopt` because building from source is disabled for all packages"""


def fake_uv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    """Put a shell script where warmpod looks for uv; it logs its working directory and arguments."""
    path = tmp_path / "uv"
    path.write_text(f'#!/bin/sh\n{{ pwd; printf "%s\\n" "$@"; }} > "$0.log"\n{script}\n')
    path.chmod(0o755)
    monkeypatch.setattr(image, "find_uv_bin", lambda: str(path))
    return path


# Writes a lock to the path after --output-file, as uv pip compile does.
WRITE_LOCK = r"""
while [ "$1" != --output-file ]; do shift; done
printf 'tabulate==0.9.0 --hash=sha256:01\n' > "$2"
"""


@pytest.fixture
def requirements(tmp_path: Path) -> Path:
    """An operator's requirements file, in a directory of its own."""
    path = tmp_path / "operator" / "requirements.in"
    path.parent.mkdir()
    path.write_text("numpy\ntabulate\n")
    return path


def test_bundled_lock_is_resolved_from_the_bundled_requirements() -> None:
    """pool/requirements.lock is current for pool/requirements.in: an edit to the list needs a relock."""
    assert image.lock_is_current(POOL / "requirements.in", POOL / "requirements.lock"), (
        "pool/requirements.in changed: run `warmpod image lock`"
    )


def test_operator_lock_sits_beside_the_requirements(requirements: Path, context: Path) -> None:
    """The lock of ``x.in`` is ``x.lock`` in the same directory; any other name gets ``.lock`` added."""
    assert image.lock_file(settings_for(context, requirements=str(requirements)), DEFAULT) == (
        requirements.with_name("requirements.lock")
    )
    other = requirements.with_name("libs.txt")
    other.write_text("numpy\n")
    assert image.lock_file(settings_for(context, requirements=str(other)), DEFAULT) == other.with_name(
        "libs.txt.lock"
    )


def test_missing_requirements_file_names_the_setting(context: Path, tmp_path: Path) -> None:
    """A requirements setting naming no file fails with the setting and the path."""
    with pytest.raises(ImageError, match=r"WARMPOD_IMAGE__REQUIREMENTS.*nothing\.in"):
        image.image_ref(settings_for(context, requirements=str(tmp_path / "nothing.in")), DEFAULT)


def test_ref_refuses_requirements_not_resolved_yet(requirements: Path, context: Path) -> None:
    """Without a lock made from the requirements as they are, the reference is unknown, saying how to lock."""
    settings = settings_for(context, requirements=str(requirements))
    with pytest.raises(ImageError, match=r"not resolved from .*warmpod image lock"):
        image.image_ref(settings, DEFAULT)
    requirements.with_suffix(".lock").write_text("numpy==1.0 --hash=sha256:00\n")
    with pytest.raises(ImageError, match="warmpod image lock"):
        image.image_ref(settings, DEFAULT)


def test_lock_resolves_for_the_runner_with_wheels_only(
    requirements: Path, context: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uv resolves the file from its own directory for CPython 3.13 on manylinux, wheels only, with hashes."""
    uv = fake_uv(tmp_path, monkeypatch, WRITE_LOCK)
    settings = settings_for(context, requirements=str(requirements), cache_dir=str(tmp_path / "cache"))
    lines: list[str] = []
    lock = image.lock_requirements(settings, DEFAULT, lines.append)
    assert lock == requirements.with_suffix(".lock")
    cwd, *argv = Path(str(uv) + ".log").read_text().splitlines()
    assert cwd == str(requirements.parent)
    assert argv[:3] == ["pip", "compile", "requirements.in"]
    joined = " ".join(argv)
    for option in (
        f"--python-version {image.PYTHON_VERSION}",
        f"--python-platform x86_64-manylinux_2_{image.GLIBC_MINOR}",
        "--only-binary :all:",
        "--generate-hashes",
        "--no-python-downloads",
        "--custom-compile-command warmpod image lock",
    ):
        assert option in joined
    assert "--upgrade" not in argv
    assert lock.read_text().endswith("\ntabulate==0.9.0 --hash=sha256:01\n")
    assert image.lock_is_current(requirements, lock)
    assert lines[-1] == f"locked {requirements} into {lock}"


def test_a_changed_list_makes_a_new_image_and_an_unchanged_one_keeps_it(
    requirements: Path, context: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference follows the lock: relocking the same list keeps it, a changed list changes it."""
    fake_uv(tmp_path, monkeypatch, WRITE_LOCK + 'sed "s/^/# via /" requirements.in >> "$2"')
    settings = settings_for(context, requirements=str(requirements), cache_dir=str(tmp_path / "cache"))
    image.lock_requirements(settings, DEFAULT, lambda line: None)
    first = image.image_ref(settings, DEFAULT)
    assert image.image_ref(settings_for(context), DEFAULT) != first  # the context's own lock is not used
    image.lock_requirements(settings, DEFAULT, lambda line: None)
    assert image.image_ref(settings, DEFAULT) == first
    requirements.write_text("numpy\ntabulate\nsix\n")
    with pytest.raises(ImageError, match="older than"):
        image.image_ref(settings, DEFAULT)
    image.lock_requirements(settings, DEFAULT, lambda line: None)
    assert image.image_ref(settings, DEFAULT) != first


def test_upgrade_resolves_afresh(
    requirements: Path, context: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``warmpod image lock`` asks uv for the newest versions instead of the pinned ones."""
    uv = fake_uv(tmp_path, monkeypatch, WRITE_LOCK)
    settings = settings_for(context, requirements=str(requirements), cache_dir=str(tmp_path / "cache"))
    image.lock_requirements(settings, DEFAULT, lambda line: None, upgrade=True)
    assert "--upgrade" in Path(str(uv) + ".log").read_text().splitlines()


def test_a_requirement_without_a_wheel_is_named(
    requirements: Path, context: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requirement without a wheel for the runner fails the lock, naming it; no lock is left."""
    fake_uv(tmp_path, monkeypatch, f"cat >&2 <<'EOF'\n{NO_WHEEL}\nEOF\nexit 1")
    settings = settings_for(context, requirements=str(requirements), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ImageError) as raised:
        image.lock_requirements(settings, DEFAULT, lambda line: None)
    message = str(raised.value)
    assert message.startswith(f"docopt in {requirements} has no wheel for CPython {image.PYTHON_VERSION}")
    assert "wheels only" in message
    assert "Because all versions of docopt have no usable wheels" in message
    assert not requirements.with_suffix(".lock").exists()


@pytest.mark.parametrize(
    ("output", "start"),
    [
        (
            "Because docopt==0.6.2 has no usable wheels and you require docopt==0.6.2, ...",
            "docopt in r.in has",
        ),
        (
            "Because all versions of a-b have no usable wheels and c.d>=1 has no usable wheels",
            "a-b, c.d in r.in have",
        ),
    ],
)
def test_every_wheelless_requirement_is_named(output: str, start: str) -> None:
    """Each requirement uv reports without a usable wheel is named, whichever way uv words it."""
    message = str(image._resolution_error(Path("r.in"), "x86_64", output))
    assert message.startswith(f"{start} no wheel")


def test_other_resolution_failures_carry_uv_s_words(
    requirements: Path, context: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requirement uv cannot find fails with uv's own explanation and the file's path."""
    fake_uv(tmp_path, monkeypatch, 'echo "nonexistent-zz was not found in the package registry" >&2; exit 1')
    settings = settings_for(context, requirements=str(requirements), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ImageError, match=r"(?s)cannot resolve .*requirements\.in.*not found in the package"):
        image.lock_requirements(settings, DEFAULT, lambda line: None)


def test_build_resolves_a_stale_lock_before_anything_else(
    requirements: Path, context: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``warmpod image build`` locks requirements that changed, then builds (here: finds) its image."""
    fake_uv(tmp_path, monkeypatch, WRITE_LOCK)
    podman = fake_podman(tmp_path, "exit 0")
    settings = from_env(
        {},
        image={"context": str(context), "requirements": str(requirements), "cache_dir": str(tmp_path / "c")},
        engine={"podman": podman},
    )
    lines: list[str] = []
    ref = image.build_image(settings, DEFAULT, lines.append)
    assert image.lock_is_current(requirements, requirements.with_suffix(".lock"))
    assert ref == image.image_ref(settings, DEFAULT)
    assert lines[-1] == f"runner image {ref} already built, skipping"
    lines.clear()
    image.build_image(settings, DEFAULT, lines.append)
    assert lines == [f"runner image {ref} already built, skipping"]  # no second resolution


def test_build_is_offline_from_the_operator_lock(
    requirements: Path, context: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image is built with no network from a context holding the operator's lock as requirements.lock."""
    fake_uv(tmp_path, monkeypatch, WRITE_LOCK)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "tabulate-0.9.0-py3-none-any.whl").write_bytes(b"wheel")
    monkeypatch.setattr(image, "_download_wheels", lambda settings, environment, progress: wheels)
    # `image exists` says no; `build` logs its arguments and the lock and wheels it was given.
    podman = fake_podman(
        tmp_path,
        'case "$*" in *"image exists"*) exit 1;; esac\n'
        'echo "$@" > "$0.log"; for last; do :; done\n'
        'cat "$last/requirements.lock" >> "$0.log"; ls "$last/wheels" >> "$0.log"; ls "$last" >> "$0.log"',
    )
    settings = from_env(
        {},
        image={
            "context": str(context),
            "requirements": str(requirements),
            "cache_dir": str(tmp_path / "cache"),
            "base": "localhost/some-base:1",
        },
        engine={"podman": podman},
    )
    ref = image.build_image(settings, DEFAULT, lambda line: None)
    argv, *given = Path(podman + ".log").read_text().splitlines()
    assert "build --layers=false --network=none --build-arg BASE=localhost/some-base:1" in argv
    assert f"--tag {ref}" in argv
    assert "tabulate==0.9.0 --hash=sha256:01" in given
    assert "tabulate-0.9.0-py3-none-any.whl" in given
    assert set(image.CONTEXT_FILES) <= set(given)
