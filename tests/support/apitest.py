"""The API suites' settings (small numbers an operator could set), their check of a problem answer, and
a secrets file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from support.fakes import ROOTFUL_V1

MAX_BODY = 4096
MAX_QUEUED = 5
IN_COUNT = 4
IN_FILE_BYTES = 600
IN_BYTES = 1000
INLINE = 16
POOL_SIZE = 3
NODE = "api-node"
IMAGE = "localhost/warmpod-runner:0123456789ab"
PROBLEMS = "https://warmpod.dev/problems/"
INFO = ROOTFUL_V1


def assert_problem(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    """Check ``response`` is an RFC 9457 problem of ``status`` (application/problem+json: status, title,
    detail and, but for HTTP's own problems, a type) whose detail mentions each of ``words``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert set(body) - {"type"} == {"status", "title", "detail"}, body
    assert body["status"] == status
    for field in ("title", "detail"):
        assert isinstance(body[field], str), body
        assert body[field], body
    for word in words:
        assert word.lower() in body["detail"].lower(), body["detail"]
    return body


def write_secrets(path: Path, values: dict[str, str]) -> Path:
    """Write an operator's secrets file at ``path`` (``NAME=value`` lines, mode 0600) and return it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.writelines(f"{name}={value}\n" for name, value in values.items())
    return path
