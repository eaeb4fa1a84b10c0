"""The API suites' settings (small numbers an operator could set), their key header, their check of a
problem answer, their look at a run's status, their app served by uvicorn, and a secrets file."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from litestar import Litestar
from litestar.testing import AsyncTestClient

from support.fakes import ROOTFUL_V1
from support.live import free_port, wait_until

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


def bearer(key: str) -> dict[str, str]:
    """The headers that send API key ``key``."""
    return {"Authorization": f"Bearer {key}"}


async def has_status(
    client: AsyncTestClient[Litestar], url: str, status: str, headers: Mapping[str, str] | None = None
) -> bool:
    """Whether the run whose status URL is ``url`` has ``status`` now (to wait for with ``until``)."""
    response = await client.get(url, headers=headers)
    assert response.status_code == 200, response.text
    current: str = response.json()["status"]
    return current == status


@contextlib.contextmanager
def served(app: Litestar, **options: Any) -> Iterator[str]:
    """``app`` served by uvicorn (``options`` are uvicorn.Config's) on a free loopback port, in a
    thread of its own: its URL, until the server is told to exit."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", **options)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started or not thread.is_alive(), 30, interval=0.01), (
            "uvicorn did not start in 30 s"
        )
        assert server.started, "uvicorn stopped before it started"
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def write_secrets(path: Path, values: dict[str, str]) -> Path:
    """Write an operator's secrets file at ``path`` (``NAME=value`` lines, mode 0600) and return it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        file.writelines(f"{name}={value}\n" for name, value in values.items())
    return path
