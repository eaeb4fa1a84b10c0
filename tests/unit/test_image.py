"""Unit tests of the runner image's reference and the cheap paths of its build."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from warmpod import image
from warmpod.errors import ImageError
from warmpod.settings import Settings, from_env


@pytest.fixture
def context(tmp_path: Path) -> Path:
    """A fake pool directory holding the three build inputs."""
    path = tmp_path / "pool"
    path.mkdir()
    (path / "Containerfile").write_text("ARG BASE\nFROM ${BASE}\n")
    (path / "agent.py").write_text('"""agent"""\n')
    (path / "requirements.lock").write_text("numpy==2.0.0 --hash=sha256:00\n")
    (path / "README").write_text("not a build input\n")
    return path


def settings_for(context: Path, **image_settings: Any) -> Settings:
    return from_env({}, image={"context": str(context), **image_settings})


def test_ref_is_name_and_short_hash(context: Path) -> None:
    """The reference is the configured repository tagged with 12 hex digits."""
    ref = image.image_ref(settings_for(context, name="localhost/runner"))
    assert re.fullmatch(r"localhost/runner:[0-9a-f]{12}", ref)


def test_ref_is_deterministic_across_copies(context: Path, tmp_path: Path) -> None:
    """Identical inputs in another directory give the same reference."""
    copy = shutil.copytree(context, tmp_path / "copy")
    assert image.image_ref(settings_for(context)) == image.image_ref(settings_for(copy))


@pytest.mark.parametrize("name", image.CONTEXT_FILES)
def test_ref_changes_with_each_input(context: Path, name: str) -> None:
    """Editing any build input, even by one byte, gives a new reference."""
    before = image.image_ref(settings_for(context))
    with (context / name).open("a") as file:
        file.write("\n")
    assert image.image_ref(settings_for(context)) != before


def test_ref_ignores_other_files(context: Path) -> None:
    """Files the build does not read leave the reference alone."""
    before = image.image_ref(settings_for(context))
    (context / "README").write_text("edited\n")
    (context / "seccomp.json").write_text("{}\n")
    assert image.image_ref(settings_for(context)) == before


def test_ref_changes_with_base(context: Path) -> None:
    """A configured base image, or another Debian suite for the local one, gives a new reference."""
    refs = {
        image.image_ref(settings_for(context)),
        image.image_ref(settings_for(context, suite="forky")),
        image.image_ref(settings_for(context, base="registry.example/python:3.13")),
    }
    assert len(refs) == 3


def test_ref_runs_no_tool(context: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Computing the reference starts no process, so callers may use it freely."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("image_ref started a process")

    monkeypatch.setattr(subprocess, "Popen", forbidden)
    monkeypatch.setattr(subprocess, "run", forbidden)
    image.image_ref(settings_for(context))


def test_missing_input_is_an_image_error(context: Path) -> None:
    """A context without agent.py fails with a message naming the file and the setting."""
    (context / "agent.py").unlink()
    with pytest.raises(ImageError, match=r"agent\.py.*WARMPOD_IMAGE__CONTEXT"):
        image.image_ref(settings_for(context))


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
    ref = image.build_image(settings, lines.append)
    assert ref == image.image_ref(settings)
    assert lines == [f"runner image {ref} already built, skipping"]
    assert Path(podman + ".log").read_text().count("\n") == 1


def test_tool_failure_carries_its_output(context: Path, tmp_path: Path) -> None:
    """A failing podman raises ImageError with the step and the tool's last words."""
    podman = fake_podman(tmp_path, 'echo "storage is corrupt" >&2; exit 125')
    settings = from_env({}, image={"context": str(context)}, engine={"podman": podman})
    with pytest.raises(ImageError, match=r"(?s)podman image exists .*125.*storage is corrupt"):
        image.build_image(settings, lambda line: None)
