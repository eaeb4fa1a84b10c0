"""The playground at / and the OpenAPI UI in headless Chromium, against real sandboxes."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from support.live import SLOWNESS, WarmpodServer

# A run's answer arrives within this: its container may be starting, and a plotting script
# imports matplotlib (a wall-time bound on a prompt answer, so it may scale with the platform).
ANSWER = 60.0 * SLOWNESS

LINES = """import time
print("first line", flush=True)
time.sleep(2)
print("second line")
"""

CHART = """import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(5, 3))
ax.bar(["north", "south", "east", "west"], [12, 7, 9, 4], color="#c2410c")
ax.set_title("sales by region")
fig.tight_layout()
fig.savefig("out/chart.png", dpi=80)
print("chart written")
"""


def text(browser: webdriver.Chrome, element_id: str) -> str:
    """The text of the element with ``element_id`` (its textContent, laid out or not)."""
    return browser.find_element(By.ID, element_id).get_attribute("textContent") or ""


def type_script(browser: webdriver.Chrome, source: str) -> None:
    """Replace the editor's script by ``source``, typed key by key, and click Run."""
    editor = browser.find_element(By.ID, "code")
    editor.clear()
    editor.send_keys(source)
    assert editor.get_attribute("value") == source
    browser.find_element(By.ID, "run").click()


def wait_for(browser: webdriver.Chrome, what: Callable[[], object], message: str) -> None:
    WebDriverWait(browser, ANSWER, poll_frequency=0.05).until(lambda _: what(), message)


def test_output_appears_as_it_is_printed(
    server: WarmpodServer, browser: webdriver.Chrome, screenshot: Callable[[str], Path]
) -> None:
    browser.get(server.url + "/")
    type_script(browser, LINES)
    wait_for(browser, lambda: "first line" in text(browser, "stdout"), "the first line never showed")
    first_seen = time.monotonic()
    # The program sleeps 2 s before the second line exists: live output shows the first alone.
    assert "second line" not in text(browser, "stdout")
    wait_for(browser, lambda: "second line" in text(browser, "stdout"), "the second line never showed")
    assert time.monotonic() - first_seen > 1.0
    wait_for(browser, lambda: "status succeeded" in text(browser, "summary"), "no exit status shown")
    assert "exit 0" in text(browser, "result-line")
    assert text(browser, "stdout") == "first line\nsecond line\n"
    assert text(browser, "stderr") == ""
    screenshot("playground-lines")


def test_a_chart_is_shown_as_an_image(
    server: WarmpodServer, browser: webdriver.Chrome, screenshot: Callable[[str], Path]
) -> None:
    browser.get(server.url + "/")
    type_script(browser, CHART)
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#outfiles img"), "no image shown")
    image = browser.find_element(By.CSS_SELECTOR, "#outfiles img")
    wait_for(
        browser, lambda: browser.execute_script("return arguments[0].complete", image), "image not loaded"
    )
    # Decoded as a picture of the figure's size (5 x 3 inches at 80 dpi), not a broken image.
    size = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
    assert size == [400, 240]
    assert image.get_attribute("alt") == "out/chart.png"
    assert "chart written" in text(browser, "stdout")
    assert "status succeeded" in text(browser, "summary")
    link = browser.find_element(By.CSS_SELECTOR, "#outfiles figcaption a")
    assert link.get_attribute("download") == "chart.png"
    screenshot("playground-chart")


HOSTILE_FILES = """open("out/page.html", "w").write("<script>document.title = 'owned'</script>")
open("out/drawing.svg", "w").write(
    '<svg xmlns="http://www.w3.org/2000/svg"><script>document.title = "owned"</script></svg>'
)
print("written")
"""


def test_a_runs_html_and_svg_are_downloads_never_pages(
    server: WarmpodServer, browser: webdriver.Chrome
) -> None:
    """The playground links a run's HTML and SVG files as octet-stream blobs to save, and shows
    neither inline: no file a program made can open as a page of warmpod's origin."""
    browser.get(server.url + "/")
    # The page's CSP lets no script fetch a blob: URL back: note each blob's type as it is made.
    browser.execute_script(
        "window.blobTypes = [];"
        "const make = URL.createObjectURL;"
        "URL.createObjectURL = (blob) => { window.blobTypes.push(blob.type); return make(blob); };"
    )
    type_script(browser, HOSTILE_FILES)
    selector = "#outfiles figcaption a[href]"
    wait_for(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, selector)) == 2, "no file links")
    assert browser.find_elements(By.CSS_SELECTOR, "#outfiles img") == []
    links = browser.find_elements(By.CSS_SELECTOR, selector)
    assert sorted(link.get_attribute("download") or "" for link in links) == ["drawing.svg", "page.html"]
    assert all((link.get_attribute("href") or "").startswith("blob:") for link in links)
    assert browser.execute_script("return window.blobTypes") == ["application/octet-stream"] * 2
    assert browser.title != "owned"


def test_arguments_go_one_per_line(server: WarmpodServer, browser: webdriver.Chrome) -> None:
    """Each line of the arguments field is one of sys.argv[1:], its spaces kept, blank lines none."""
    browser.get(server.url + "/")
    browser.find_element(By.ID, "args").send_keys("2026-11\n\nnorth region\n")
    type_script(browser, "import sys\nprint(sys.argv[1:])\n")
    wait_for(browser, lambda: "status succeeded" in text(browser, "summary"), "no result shown")
    assert text(browser, "stdout") == "['2026-11', 'north region']\n"


def test_cancel_stops_a_running_script(server: WarmpodServer, browser: webdriver.Chrome) -> None:
    browser.get(server.url + "/")
    type_script(browser, 'import time\nprint("started", flush=True)\ntime.sleep(40)\n')
    wait_for(browser, lambda: "started" in text(browser, "stdout"), "the script never started")
    browser.find_element(By.ID, "cancel").click()
    wait_for(browser, lambda: "status cancelled" in text(browser, "summary"), "not cancelled")


def test_a_refused_run_shows_the_problem(server: WarmpodServer, browser: webdriver.Chrome) -> None:
    browser.get(server.url + "/")
    browser.find_element(By.ID, "timeout").send_keys("100000")
    type_script(browser, "print(1)")
    wait_for(browser, lambda: "422 Limit out of range" in text(browser, "summary"), "no problem shown")


def test_no_page_loads_anything_from_elsewhere(server: WarmpodServer, browser: webdriver.Chrome) -> None:
    for path, ready in (("/", "#run"), ("/schema/swagger", ".swagger-ui .info .title")):
        browser.get(server.url + path)
        shown = functools.partial(browser.find_elements, By.CSS_SELECTOR, ready)
        wait_for(browser, shown, f"{path} did not render")
        loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded, path
        assert [url for url in loaded if not url.startswith(server.url + "/")] == [], path
        # A blocked load (the page's policy allows this origin only) is logged as refused.
        log = browser.get_log("browser")  # type: ignore[no-untyped-call]
        refused = [entry["message"] for entry in log if "Refused" in entry["message"]]
        assert refused == [], path
    assert "warmpod" in browser.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
