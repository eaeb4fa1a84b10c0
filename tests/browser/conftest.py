"""A real server and a real browser: headless Chromium from Debian, driven through its chromedriver."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from support.live import MAX_TIMEOUT, WarmpodServer, serving

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("WARMPOD_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))
"""Where the screenshots go (kept as the tests' artifacts; git ignores the folder)."""


@pytest.fixture(scope="session", autouse=True)
def _needs_podman_and_chromium() -> None:
    """Skip without Podman or Chromium; `deploy/setup.sh --test` installs Chromium, and CI sets
    WARMPOD_TEST_BROWSER=required so that a missing browser fails instead."""
    missing = [
        name for name, path in (("podman", shutil.which("podman")), ("chromium", CHROMIUM)) if not path
    ]
    missing += [
        f"{path} (apt-get install chromium chromium-driver)"
        for path in (CHROMIUM, CHROMEDRIVER)
        if not Path(path).exists()
    ]
    if missing:
        if os.environ.get("WARMPOD_TEST_BROWSER") == "required":
            pytest.fail(f"the browser tests need {', '.join(missing)}")
        pytest.skip(f"the browser tests need {', '.join(missing)}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmpodServer]:
    """A real server with a pool of two; it must stop cleanly at the end."""
    settings = {"WARMPOD_POOL__SIZE": "2", "WARMPOD_LIMITS__MAX_TIMEOUT": str(MAX_TIMEOUT)}
    with serving(tmp_path_factory.mktemp("warmpod"), settings) as live:
        yield live


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with an empty profile, no background traffic, and names resolving to
    nothing but loopback (the pages must need nothing else)."""
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def screenshot(browser: webdriver.Chrome) -> Callable[[str], Path]:
    """``screenshot(NAME)`` saves what the browser shows as ``test-artifacts/NAME.png``."""

    def save(name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        assert browser.save_screenshot(str(path)), path
        print(f"screenshot: {path}")
        return path

    return save
