"""The runner image's last build step, once the wheels are installed: trim, set matplotlib up, record."""

# Runs in `podman build` (pool/Containerfile) under the image's python3, stdlib only, no network.
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import sysconfig
from pathlib import Path

WARMPOD_DIR = Path("/opt/warmpod")
ENVIRONMENT_FILE = WARMPOD_DIR / "environment.json"
"""What is installed, read by the server's start-up probe and served at GET /environment."""
MATPLOTLIB_DIR = WARMPOD_DIR / "matplotlib"
"""matplotlib's font cache, built here once; the agent links it into each run's MPLCONFIGDIR."""
# Packages whose test suites ship in their wheels: nobody imports them, and they weigh tens of MB.
TEST_SUITES = ("numpy", "pandas", "scipy", "matplotlib", "mpl_toolkits", "pyarrow")


def drop_test_suites(site: Path) -> None:
    """Remove the ``tests`` directories of the packages known to ship them."""
    for package in TEST_SUITES:
        root = site / package
        if not root.is_dir():
            continue
        for tests in sorted(root.rglob("tests"), reverse=True):
            if tests.is_dir() and not tests.is_symlink():
                shutil.rmtree(tests)


def set_up_matplotlib() -> None:
    """Make Agg its default backend and build its font cache into ``MATPLOTLIB_DIR``.

    Containers have no display; the font cache would otherwise be rebuilt by every run's first
    ``import matplotlib.pyplot``, into a home directory that is the program's working directory.
    """
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return
    rc = Path(spec.origin).parent / "mpl-data" / "matplotlibrc"
    with rc.open("a") as file:
        file.write("\n## warmpod: containers have no display (pool/finish_image.py)\nbackend: Agg\n")
    MATPLOTLIB_DIR.mkdir(parents=True, exist_ok=True)
    os.environ["MPLCONFIGDIR"] = str(MATPLOTLIB_DIR)
    import matplotlib.font_manager
    import matplotlib.pyplot

    backend = matplotlib.pyplot.get_backend()
    if backend.lower() != "agg":
        sys.exit(f"matplotlib's backend is {backend}, not Agg")
    caches = list(MATPLOTLIB_DIR.glob("fontlist-v*.json"))
    if not caches:
        sys.exit(f"matplotlib wrote no font cache into {MATPLOTLIB_DIR}")
    fonts = len(matplotlib.font_manager.fontManager.ttflist)
    print(f"matplotlib {matplotlib.__version__}: backend Agg, font cache of {fonts} fonts in {caches[0]}")


def record_environment() -> dict[str, str]:
    """Write every installed distribution (normalised name: version) and the Python version as JSON."""
    packages = {
        re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(): dist.version
        for dist in importlib.metadata.distributions()
    }
    packages = dict(sorted(packages.items()))
    ENVIRONMENT_FILE.parent.mkdir(parents=True, exist_ok=True)
    environment = {"python": platform.python_version(), "packages": packages}
    ENVIRONMENT_FILE.write_text(json.dumps(environment, indent=1) + "\n")
    return packages


def main() -> None:
    """Trim the installed libraries, set matplotlib up, then record what is installed."""
    site = Path(sysconfig.get_path("platlib"))
    drop_test_suites(site)
    set_up_matplotlib()
    packages = record_environment()
    print(f"recorded {len(packages)} distributions in {ENVIRONMENT_FILE}")


if __name__ == "__main__":
    main()
