"""The HTTP surface of the real server: file uploads, problem details for bad input, and /health."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import httpx
import pytest
from support.live import MAX_BODY_BYTES, MAX_TIMEOUT, POOL_SIZE, SLOWNESS, WarmpodServer, podman

pytestmark = pytest.mark.integration

CLIENT_ERRORS = {400, 422}


def assert_problem(response: httpx.Response, statuses: set[int], detail: str) -> None:
    """The response is an RFC 9457 problem with one of ``statuses`` and a detail matching ``detail``."""
    assert response.status_code in statuses, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == response.status_code
    assert isinstance(problem["detail"], str)
    assert re.search(detail, problem["detail"]), f"detail {problem['detail']!r} does not match {detail!r}"


def test_run_file_with_stdin(client: httpx.Client) -> None:
    """An uploaded file runs as the program, fed the form's stdin field."""
    script = b"import sys\nprint(sys.stdin.read()[::-1])\n"
    response = client.post(
        "/run-file/", files={"file": ("main.py", script, "text/x-python")}, data={"stdin": "abc"}
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "cba\n"


def test_run_file_timeout_field_is_honoured(client: httpx.Client) -> None:
    """The form's timeout field limits the uploaded program's wall time."""
    script = b"import time\nprint('started', flush=True)\ntime.sleep(30)\n"
    started = time.monotonic()
    response = client.post("/run-file/", files={"file": ("main.py", script)}, data={"timeout": "1"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "timeout"
    assert result["limits_hit"] == ["wall_time"]
    assert result["stdout"] == "started\n"
    # One second of run, plus the wait for a container if the pool is still refilling.
    assert elapsed < 5 * SLOWNESS


def test_run_file_honours_a_coding_cookie(client: httpx.Client) -> None:
    """A latin-1 file with a coding cookie runs with its text decoded as latin-1."""
    script = "# -*- coding: latin-1 -*-\ns = 'café'\nprint(len(s), s == 'caf\\u00e9', ascii(s))\n"
    response = client.post("/run-file/", files={"file": ("main.py", script.encode("latin-1"))})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "succeeded", result
    assert result["stdout"] == "4 True 'caf\\xe9'\n"


@pytest.mark.parametrize(
    ("body", "statuses", "detail"),
    [
        pytest.param(b'{"code": ', {400}, r"(?i)json|truncated", id="truncated-json"),
        pytest.param(b"{code: 1}", {400}, r"(?i)json", id="malformed-json"),
        pytest.param(b"", {400}, r"(?i)json|empty|body", id="empty-body"),
        pytest.param(b'{"stdin": "x"}', {400}, r"\bcode\b", id="missing-code"),
        pytest.param(b'{"code": 5}', {400}, r"\bcode\b", id="code-not-string"),
        pytest.param(b'{"code": "pass", "bogus": 1}', {400}, r"\bbogus\b", id="unknown-field"),
        pytest.param(b'{"code": "pass", "timeout": 0}', CLIENT_ERRORS, r"\btimeout\b", id="timeout-zero"),
        pytest.param(
            b'{"code": "pass", "timeout": -1}', CLIENT_ERRORS, r"\btimeout\b", id="timeout-negative"
        ),
        pytest.param(
            b'{"code": "pass", "timeout": "1"}', CLIENT_ERRORS, r"\btimeout\b", id="timeout-not-number"
        ),
        pytest.param(
            json.dumps({"code": "pass", "timeout": MAX_TIMEOUT + 1}).encode(),
            CLIENT_ERRORS,
            rf"\btimeout\b.*\b{MAX_TIMEOUT}\b",
            id="timeout-above-max",
        ),
    ],
)
def test_bad_json_request_is_a_problem(
    client: httpx.Client, body: bytes, statuses: set[int], detail: str
) -> None:
    """A bad /run-json/ body gets a 4xx problem whose detail names what is wrong, never a 500."""
    response = client.post("/run-json/", content=body, headers={"content-type": "application/json"})
    assert_problem(response, statuses, detail)


SCRIPT = ("main.py", b"pass")


@pytest.mark.parametrize(
    ("fields", "statuses", "detail"),
    [
        pytest.param({"stdin": (None, b"x")}, {400}, r"\bfile\b", id="no-file"),
        pytest.param({"file": (None, b"print(1)")}, {400}, r"\bfile\b", id="file-as-plain-field"),
        pytest.param({"file": SCRIPT, "bogus": (None, b"1")}, {400}, r"\bbogus\b", id="unknown-field"),
        pytest.param(
            {"file": SCRIPT, "timeout": (None, b"0")}, CLIENT_ERRORS, r"\btimeout\b", id="timeout-0"
        ),
        pytest.param(
            {"file": SCRIPT, "timeout": (None, b"soon")}, CLIENT_ERRORS, r"\btimeout\b", id="timeout-text"
        ),
        pytest.param(
            {"file": SCRIPT, "timeout": (None, str(MAX_TIMEOUT + 1).encode())},
            CLIENT_ERRORS,
            rf"\btimeout\b.*\b{MAX_TIMEOUT}\b",
            id="timeout-above-max",
        ),
    ],
)
def test_bad_file_request_is_a_problem(
    client: httpx.Client, fields: dict[str, tuple[str | None, bytes]], statuses: set[int], detail: str
) -> None:
    """A bad /run-file/ form gets a 4xx problem whose detail names what is wrong, never a 500."""
    # Every field goes through `files` so that httpx sends multipart even when no file is in it.
    response = client.post("/run-file/", files=fields)
    assert_problem(response, statuses, detail)


def test_json_body_over_the_limit_is_413(client: httpx.Client) -> None:
    """A /run-json/ body past max_body_bytes is refused with 413."""
    body = json.dumps({"code": "pass", "stdin": "x" * (MAX_BODY_BYTES + 40_000)}).encode()
    response = client.post("/run-json/", content=body, headers={"content-type": "application/json"})
    assert_problem(response, {413}, r"(?i)too large|exceeds")


def test_upload_over_the_limit_is_413(client: httpx.Client) -> None:
    """A /run-file/ upload past max_body_bytes is refused with 413."""
    script = b"#" * (MAX_BODY_BYTES + 40_000)
    response = client.post("/run-file/", files={"file": ("main.py", script)})
    assert_problem(response, {413}, r"(?i)too large|exceeds")


def test_health_describes_the_service(server: WarmpodServer, client: httpx.Client) -> None:
    """GET /health answers 200 with the runner image's reference, Podman's version and the pool's counts."""
    response = client.get("/health")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    health = response.json()
    assert health["status"] == "ok"
    ref = subprocess.run(
        [sys.executable, "-m", "warmpod", "image", "ref"],
        env=server.env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert health["image"] == ref
    assert health["podman_version"] == podman("version", "--format", "{{.Client.Version}}").strip()
    pool = health["pool"]
    # The target adapts to demand between the minimum (POOL_SIZE) and the default maximum, 16.
    assert POOL_SIZE <= pool["target"] <= 16
    assert all(
        isinstance(pool[key], int) and pool[key] >= 0 for key in ("ready", "busy", "starting", "closing")
    )
    assert pool["ready"] + pool["starting"] + pool["busy"] + pool["closing"] <= 16
