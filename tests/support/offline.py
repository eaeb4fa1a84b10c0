"""A local package index for image builds: hand-made wheels in a find-links directory, no traffic out."""

from __future__ import annotations

import base64
import hashlib
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from warmpod.host import image

# Fixed, so a wheel made again has the same bytes, hence the same lock and image reference.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def write_wheel(directory: Path, name: str, module: str, version: str, source: bytes) -> Path:
    """A pure-Python wheel of one module, written by hand (building one needs setuptools from PyPI)."""
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}.py": source,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: warmpod-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
        for path, data in files.items()
    ]
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,", ""]).encode()
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name_in_zip, data in files.items():
            wheel.writestr(zipfile.ZipInfo(name_in_zip, _ZIP_TIME), data)
    return path


def write_sdist(directory: Path, name: str, version: str) -> Path:
    """A source distribution only (no wheel): what the runner image refuses."""
    source = directory / f".{name}-{version}"
    source.mkdir()
    (source / "PKG-INFO").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    path = directory / f"{name}-{version}.tar.gz"
    with tarfile.open(path, "w:gz") as sdist:
        sdist.add(source, arcname=f"{name}-{version}")
    shutil.rmtree(source)
    return path


def index_settings(links: Path) -> dict[str, str]:
    """Settings that make uv and pip resolve and download from ``links`` only."""
    return {"UV_OFFLINE": "1", "UV_FIND_LINKS": str(links), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links)}


def add_pip_wheel(links: Path) -> None:
    """Put the pip wheel an image build runs into ``links``, from warmpod's wheel cache where building
    the default image put it; skip the test if it was never built here (the guest of tests/cgv2 has
    none, and no network)."""
    version = image.PIP_REQUIREMENT.split()[0].split("==")[1]
    cached = sorted((Path.home() / ".cache" / "warmpod").glob(f"wheels-*/pip-{version}-py3-none-any.whl"))
    if not cached:
        pytest.skip(
            "no pip wheel in warmpod's wheel cache to build offline with: run `warmpod image build` once"
        )
    shutil.copy(cached[0], links)
