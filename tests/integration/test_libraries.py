"""The libraries user code gets: the default report set, an operator's own set, and GET /environment."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import httpx
import pytest
from support.environments import warmpod_cli
from support.live import MAX_TIMEOUT, SLOWNESS, ServerFactory, podman, run_json
from support.offline import add_pip_wheel, index_settings, write_sdist, write_wheel

from warmpod.environments import Environments
from warmpod.host import image
from warmpod.settings import from_env

pytestmark = pytest.mark.integration

# Under UML (tests/cgv2) importing matplotlib took 8 s, and the report script over 20.
RUN_TIMEOUT = min(MAX_TIMEOUT, 10 * SLOWNESS)
LOCK = Path(__file__).resolve().parents[2] / "pool" / "requirements.lock"
REPORT_LIBRARIES = ("numpy", "pandas", "matplotlib", "scipy", "pyarrow")
TEST_IMAGE = "localhost/warmpod-test-libraries"
# A small pure-Python package, in no default set, made here: the tests resolve and download from
# a local directory only (no traffic leaves this machine).
EXTRA = "warmpod-report-helper"
MODULE = "warmpod_report_helper"
HELPER_SOURCE = (
    b'def tabulate(rows, headers):\n    return "\\n".join(" ".join(map(str, r)) for r in [headers, *rows])\n'
)


def pins(lock: Path) -> dict[str, str]:
    """The name and version of every requirement a lock pins."""
    return dict(re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", lock.read_text(), re.MULTILINE))


def test_environment_is_the_default_lock(client: httpx.Client) -> None:
    """GET /environment names the runner's Python 3.13 and every library pinned in the default lock."""
    response = client.get("/environment")
    assert response.status_code == 200, response.text
    body = response.json()
    assert re.fullmatch(r"3\.13\.\d+", body["python"])
    assert set(REPORT_LIBRARIES) <= set(body["packages"])
    for name, version in pins(LOCK).items():
        assert body["packages"][name] == version, name
    code = "import importlib.metadata, json, platform\nprint(json.dumps([platform.python_version(), "
    code += "{d.metadata['Name'].lower(): d.version for d in importlib.metadata.distributions()}]))"
    result = run_json(client, code)
    python, packages = json.loads(result["stdout"])
    assert python == body["python"]
    assert packages["numpy"] == body["packages"]["numpy"]


def test_a_report_script_runs(client: httpx.Client) -> None:
    """pandas to and from parquet (pyarrow), scipy and a matplotlib figure (Agg, no display) all work."""
    code = dedent(
        """
        import io
        import numpy as np, pandas as pd, scipy.stats
        import matplotlib
        import matplotlib.pyplot as plt
        frame = pd.DataFrame({"g": ["a", "b"] * 50, "x": np.arange(100.0)})
        buffer = io.BytesIO()
        frame.to_parquet(buffer)
        back = pd.read_parquet(io.BytesIO(buffer.getvalue()))
        print(back.groupby("g")["x"].sum().to_dict())
        print(round(float(scipy.stats.pearsonr(back["x"], back["x"] * 2)[0]), 6))
        fig, ax = plt.subplots()
        ax.plot(back["x"])
        ax.set_title("report")
        png = io.BytesIO()
        fig.savefig(png, format="png")
        print(matplotlib.get_backend().lower(), png.getvalue()[:4] == b"\\x89PNG")
        """
    )
    result = run_json(client, code, timeout=RUN_TIMEOUT)
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "{'a': 2450.0, 'b': 2500.0}\n1.0\nagg True\n"
    assert result["stderr"] == ""


FONT_CACHE_PROBE = dedent(
    """
    import json, logging, os, time
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logging.getLogger("matplotlib").addHandler(Keep())
    logging.getLogger("matplotlib").setLevel(logging.INFO)
    started = time.perf_counter()
    import matplotlib, matplotlib.pyplot
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "cachedir": matplotlib.get_cachedir(), "log": records,
                      "work": sorted(os.listdir("/work"))}))
    """
)


def test_matplotlib_uses_the_font_cache_built_into_the_image(client: httpx.Client) -> None:
    """A run imports matplotlib.pyplot quickly, building no font cache and writing nothing in /work."""
    result = run_json(client, FONT_CACHE_PROBE, timeout=RUN_TIMEOUT)
    assert result["status"] == "succeeded", result
    report = json.loads(result["stdout"])
    assert report["cachedir"] == "/tmp/matplotlib"
    assert not [line for line in report["log"] if "font" in line.lower()], report["log"]
    assert "building the font cache" not in result["stderr"]
    assert not {".cache", ".config", "matplotlib"} & set(report["work"]), report["work"]
    assert report["seconds"] < 5.0 * SLOWNESS


@pytest.fixture
def offline_index(tmp_path: Path) -> dict[str, str]:
    """Settings that make uv and pip resolve and download from a local directory only, holding the
    helper's wheel and a source-only package."""
    links = tmp_path / "links"
    links.mkdir()
    write_wheel(links, EXTRA, MODULE, "1.0", HELPER_SOURCE)
    write_sdist(links, "nowheel", "1.0")
    return index_settings(links)


@pytest.fixture
def test_image() -> Iterator[str]:
    """A runner image repository of this test module's own; its images are removed before and after."""

    def remove() -> None:
        listed = podman("images", "--noheading", "--format", "{{.Repository}}:{{.Tag}}", TEST_IMAGE)
        for ref in listed.split():
            podman("rmi", ref)

    remove()
    yield TEST_IMAGE
    remove()


def test_an_operator_s_own_set_is_built_offline_and_served(
    test_image: str, start_server: ServerFactory, tmp_path: Path, offline_index: dict[str, str]
) -> None:
    """A custom requirements.in is locked beside itself, built into an image of its own, imported by runs
    and listed by /environment; an unchanged set is not resolved or built again."""
    # The build downloads pip's own wheel too (the guest of tests/cgv2 has none, and no network: it skips).
    add_pip_wheel(Path(offline_index["PIP_FIND_LINKS"]))
    requirements = tmp_path / "libraries" / "requirements.in"
    requirements.parent.mkdir()
    requirements.write_text(f"# a report helper\n{EXTRA}\n")
    settings = {
        "WARMPOD_IMAGE__REQUIREMENTS": str(requirements),
        "WARMPOD_IMAGE__NAME": test_image,
        "WARMPOD_IMAGE__CACHE_DIR": str(tmp_path / "cache"),
        **offline_index,
    }
    live = start_server(WARMPOD_POOL__PRELOAD="", **settings)
    health = live.wait_healthy(timeout=240.0 * SLOWNESS)
    lock = requirements.with_suffix(".lock")
    assert image.lock_is_current(requirements, lock)
    assert set(pins(lock)) == {EXTRA}
    expected = image.image_ref(from_env(settings), Environments.load(from_env(settings)).default)
    assert health["image"] == expected
    assert (
        expected.split(":")[1]
        != image.image_ref(from_env({}), Environments.load(from_env({})).default).split(":")[1]
    )
    with httpx.Client(base_url=live.url, timeout=60) as client:
        environment = client.get("/environment").json()
        assert environment["packages"][EXTRA] == pins(lock)[EXTRA]
        assert "numpy" not in environment["packages"]
        code = f"import {MODULE}\nprint({MODULE}.tabulate([[1, 2]], headers=['a', 'b']))\nimport numpy"
        result = run_json(client, code)
    assert result["stdout"].splitlines()[0].split() == ["a", "b"]
    assert "No module named 'numpy'" in result["stderr"]
    stamp = lock.stat().st_mtime_ns
    again = warmpod_cli("image", "build", settings=settings)
    assert again.returncode == 0, again.stderr
    assert f"runner image {expected} already built, skipping" in again.stderr
    assert "resolving" not in again.stderr
    assert lock.stat().st_mtime_ns == stamp


def test_a_requirement_without_a_wheel_is_refused_by_name(
    tmp_path: Path, offline_index: dict[str, str]
) -> None:
    """Locking a set with a source-only package fails naming it, and writes no lock."""
    requirements = tmp_path / "requirements.in"
    requirements.write_text("nowheel\n")  # a source distribution only
    result = warmpod_cli(
        "image", "lock", settings={"WARMPOD_IMAGE__REQUIREMENTS": str(requirements), **offline_index}
    )
    assert result.returncode == 1
    assert f"warmpod: nowheel in {requirements} has no wheel for CPython 3.13" in result.stderr
    assert not requirements.with_suffix(".lock").exists()
