"""Unit tests of each environment's lock and image reference, build_all, and ``warmpod image ... [NAME]``."""

from __future__ import annotations

from pathlib import Path

import pytest

from warmpod import cli
from warmpod.environments import Environments, EnvironmentSpec
from warmpod.errors import ImageError
from warmpod.host import image
from warmpod.settings import Settings, from_env


@pytest.fixture
def context(tmp_path: Path) -> Path:
    """A fake pool directory holding the build inputs and the default set's lock (no requirements.in)."""
    path = tmp_path / "pool"
    path.mkdir()
    for name in image.CONTEXT_FILES:
        (path / name).write_text(f"# {name}\n")
    (path / "requirements.lock").write_text("numpy==2.0.0 --hash=sha256:00\n")
    return path


def write_set(path: Path, requirements: str, locked: str | None) -> Path:
    """A requirements file and, unless ``locked`` is None, its current lock pinning ``locked``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(requirements)
    if locked is not None:
        lock = image.lock_file(from_env({}), spec_of(path))
        lock.write_text(f"{image._stamp(path)}\n{locked}")
    return path


def spec_of(requirements: Path) -> EnvironmentSpec:
    """An environment resolved from ``requirements``, declared in a file beside it."""
    file = requirements.parent / f".{requirements.name}.toml"
    file.write_text(f'[x]\nrequirements = "{requirements.name}"\n')
    return Environments.load(from_env({}, environments={"file": str(file)}))["x"]


def declare(tmp_path: Path, context: Path, tables: str, **engine: str) -> tuple[Settings, Environments]:
    """Settings naming an environments file of ``tables`` (relative to ``tmp_path``), and its environments."""
    file = tmp_path / "environments.toml"
    file.write_text(tables)
    settings = from_env(
        {},
        image={"context": str(context), "cache_dir": str(tmp_path / "cache")},
        environments={"file": str(file)},
        engine=engine,
    )
    return settings, Environments.load(settings)


def fake_tool(tmp_path: Path, script: str, name: str = "podman") -> str:
    """A shell script standing in for podman (or ``name``)."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)
    return str(path)


SETS = '[a]\nrequirements = "a/requirements.in"\n\n[b]\nrequirements = "b/requirements.in"\n'


@pytest.fixture
def two_sets(tmp_path: Path) -> None:
    """Two operator sets, ``a`` and ``b``, locked to the same single pin."""
    write_set(tmp_path / "a" / "requirements.in", "tabulate\n", "tabulate==0.9.0 --hash=sha256:01\n")
    write_set(tmp_path / "b" / "requirements.in", "tabulate\n", "tabulate==0.9.0 --hash=sha256:01\n")


@pytest.mark.usefixtures("two_sets")
def test_an_environment_s_lock_sits_beside_its_requirements(tmp_path: Path, context: Path) -> None:
    """Each environment's lock is its requirements file's neighbour (``x.in`` -> ``x.lock``, else ``.lock``
    added); the default keeps the context's."""
    settings, environments = declare(tmp_path, context, SETS)
    assert image.requirements_file(settings, environments["a"]) == tmp_path / "a" / "requirements.in"
    assert image.lock_file(settings, environments["a"]) == tmp_path / "a" / "requirements.lock"
    assert image.lock_file(settings, environments["b"]) == tmp_path / "b" / "requirements.lock"
    other = write_set(tmp_path / "c" / "libs.txt", "six\n", None)
    assert image.lock_file(settings, spec_of(other)) == tmp_path / "c" / "libs.txt.lock"
    assert image.requirements_file(settings, environments.default) is None
    assert image.lock_file(settings, environments.default) == context / "requirements.lock"


@pytest.mark.usefixtures("two_sets")
def test_environments_locked_alike_share_an_image(tmp_path: Path, context: Path) -> None:
    """The reference hashes the lock, not the name: equal locks give one image, a different lock another."""
    settings, environments = declare(tmp_path, context, SETS)
    a, b = (image.image_ref(settings, environments[name]) for name in ("a", "b"))
    assert a == b
    assert a.startswith(f"{settings.image.name}:")
    assert image.image_ref(settings, environments.default) != a
    write_set(tmp_path / "b" / "requirements.in", "tabulate\nsix\n", "six==1.17.0 --hash=sha256:02\n")
    assert image.image_ref(settings, environments["b"]) != a
    assert image.image_ref(settings, environments["a"]) == a


def test_an_unlocked_environment_is_named(tmp_path: Path, context: Path) -> None:
    """A set not resolved yet, or a requirements file gone since it was declared, fails naming its
    environment."""
    write_set(tmp_path / "a" / "requirements.in", "tabulate\n", None)
    settings, environments = declare(tmp_path, context, SETS.split("\n\n")[0])
    with (
        pytest.raises(ImageError, match=r"^environment 'a': .*not resolved from .*warmpod image lock"),
        image.naming(environments["a"], environments),
    ):
        image.image_ref(settings, environments["a"])
    (tmp_path / "a" / "requirements.in").unlink()
    with (
        pytest.raises(
            ImageError, match=r"^environment 'a': its requirements .*requirements\.in is not a file"
        ),
        image.naming(environments["a"], environments),
    ):
        image.image_ref(settings, environments["a"])


def test_the_default_alone_keeps_its_messages(context: Path) -> None:
    """Without an environments file, errors read as on a server of one image: no environment named."""
    settings = from_env({}, image={"context": str(context)})
    environments = Environments.load(settings)
    (context / "agent.py").unlink()
    with (
        pytest.raises(ImageError, match=r"^cannot read agent\.py"),
        image.naming(environments.default, environments),
    ):
        image.image_ref(settings, environments.default)


@pytest.mark.usefixtures("two_sets")
def test_build_all_returns_every_reference_and_names_each_line(tmp_path: Path, context: Path) -> None:
    """build_all builds (here: finds) each environment's image and says which environment each line is of."""
    podman = fake_tool(tmp_path, "exit 0")
    settings, environments = declare(tmp_path, context, SETS, podman=podman)
    lines: list[str] = []
    refs = image.build_all(settings, environments, lines.append)
    assert list(refs) == ["default", "a", "b"]
    assert refs == {environment.name: image.image_ref(settings, environment) for environment in environments}
    assert lines == [f"[{name}] runner image {ref} already built, skipping" for name, ref in refs.items()]


@pytest.mark.usefixtures("two_sets")
def test_build_all_stops_at_an_environment_it_cannot_build_naming_it(
    tmp_path: Path, context: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A set that cannot be resolved stops the build with ImageError naming the environment and the
    requirement, and nothing after it is built."""
    podman = fake_tool(tmp_path, 'echo "$@" >> "$0.log"; exit 0')
    uv = fake_tool(tmp_path, "echo 'Because docopt==0.6.2 has no usable wheels' >&2; exit 1", "uv")
    monkeypatch.setattr(image, "find_uv_bin", lambda: uv)
    settings, environments = declare(tmp_path, context, SETS, podman=podman)
    requirements = tmp_path / "a" / "requirements.in"
    requirements.write_text("tabulate\ndocopt\n")  # its lock is now stale
    with pytest.raises(ImageError, match=rf"^environment 'a': docopt in {requirements} has no wheel"):
        image.build_all(settings, environments, lambda line: None)
    assert Path(podman + ".log").read_text().count("image exists") == 1  # the default's only


@pytest.fixture
def declared(tmp_path: Path, context: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``WARMPOD_*`` variables naming an environments file of ``default``, ``a`` and ``b``."""
    write_set(tmp_path / "a" / "requirements.in", "tabulate\n", "tabulate==0.9.0 --hash=sha256:01\n")
    write_set(tmp_path / "b" / "requirements.in", "six\n", "six==1.17.0 --hash=sha256:02\n")
    file = tmp_path / "environments.toml"
    file.write_text(SETS)
    monkeypatch.setenv("WARMPOD_ENVIRONMENTS__FILE", str(file))
    monkeypatch.setenv("WARMPOD_IMAGE__CONTEXT", str(context))
    return file


@pytest.mark.usefixtures("declared")
def test_image_ref_lists_every_environment_or_prints_the_one_asked_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``warmpod image ref`` prints ``name ref`` lines; ``warmpod image ref NAME`` one reference alone."""
    settings = from_env()
    environments = Environments.load(settings)
    refs = {environment.name: image.image_ref(settings, environment) for environment in environments}
    assert cli.main(["image", "ref"]) == 0
    assert capsys.readouterr().out == "".join(f"{name} {ref}\n" for name, ref in refs.items())
    assert cli.main(["image", "ref", "b"]) == 0
    assert capsys.readouterr().out == f"{refs['b']}\n"


def test_image_ref_alone_prints_the_default_s(
    context: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without an environments file ``warmpod image ref`` prints one bare reference, as scripts expect."""
    monkeypatch.setenv("WARMPOD_IMAGE__CONTEXT", str(context))
    monkeypatch.delenv("WARMPOD_ENVIRONMENTS__FILE", raising=False)
    assert cli.main(["image", "ref"]) == 0
    settings = from_env()
    assert capsys.readouterr().out == f"{image.image_ref(settings, Environments.load(settings).default)}\n"


@pytest.mark.usefixtures("declared")
def test_an_unknown_environment_is_refused_listing_the_known(capsys: pytest.CaptureFixture[str]) -> None:
    """``warmpod image build NAME`` for a name not declared exits 1 naming those that are."""
    assert cli.main(["image", "build", "nope"]) == 1
    assert "no environment named 'nope'; this server has default, a, b" in capsys.readouterr().err


def test_a_bad_environments_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An environments file that is not TOML stops every image command with its path, exit status 1."""
    file = tmp_path / "environments.toml"
    file.write_text("[a\n")
    monkeypatch.setenv("WARMPOD_ENVIRONMENTS__FILE", str(file))
    for command in ("ref", "build", "lock"):
        assert cli.main(["image", command]) == 1
        assert f"warmpod: {file} is not valid TOML" in capsys.readouterr().err


def test_image_lock_resolves_each_environment_that_has_requirements(
    declared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``warmpod image lock`` resolves every set with a requirements file (the default's context has
    none, so it is left alone), ``warmpod image lock NAME`` that one, both with ``--upgrade``."""
    calls: list[tuple[str, bool]] = []

    def lock(
        settings: Settings, environment: EnvironmentSpec, progress: object, *, upgrade: bool = False
    ) -> Path:
        calls.append((environment.name, upgrade))
        return image.lock_file(settings, environment)

    monkeypatch.setattr(image, "lock_requirements", lock)
    assert cli.main(["image", "lock"]) == 0
    assert calls == [("a", True), ("b", True)]
    calls.clear()
    assert cli.main(["image", "lock", "b"]) == 0
    assert calls == [("b", True)]


def test_image_lock_of_a_default_without_requirements_says_so(
    declared: Path, context: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Asked by name to lock a default that has only a lock, the command fails naming the environment."""
    assert cli.main(["image", "lock", "default"]) == 1
    assert f"warmpod: environment 'default': no requirements.in in {context}" in capsys.readouterr().err
