"""The library bugs warmpod works around, each exercised directly in the library and expected to fail:
the day one of these passes, upstream fixed it (strict xfail turns that into a failure) and the
workaround its reason names can go."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from anyio.abc import UNIXSocketStream
from litestar import Controller, Litestar, delete, get
from litestar.testing import TestClient
from support.fakes import watched_pair

ANYIO_CANCEL_RACE = "https://github.com/agronholm/anyio/issues/1267"
LITESTAR_OPTIONS = "https://github.com/litestar-org/litestar/issues/4169"


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=f"{ANYIO_CANCEL_RACE}: anyio's unix stream resolves a read cancelled in the loop pass in "
    "which its socket became readable; warmpod.sandbox.unix_stream.UnixStream exists for this",
)
async def test_anyio_unix_stream_survives_a_cancel_as_data_arrives() -> None:
    """anyio's own unix stream takes a cancelled receive and a readable socket in one loop pass
    without an error in the loop (tests/unit/test_unix_stream.py runs the same race on ours)."""
    ours, theirs = watched_pair()
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        with theirs:
            async with await UNIXSocketStream.from_socket(ours) as stream:
                for _ in range(20):
                    scope = anyio.CancelScope()

                    async def receive(scope: anyio.CancelScope = scope) -> None:
                        with scope:
                            await stream.receive()

                    async with anyio.create_task_group() as tg:
                        since = ours.empty_reads
                        tg.start_soon(receive)
                        await ours.read_in_vain(since)
                        theirs.sendall(b"x")
                        loop.call_soon(scope.cancel)
                    assert await stream.receive() == b"x"
    finally:
        loop.set_exception_handler(previous)
    assert errors == []


class Resource(Controller):
    """One path with two methods, as a run's status URL has (GET and DELETE)."""

    path = "/resource"

    @get("/", sync_to_thread=False)
    def read(self) -> str:
        """Any answer."""
        return "read"

    @delete("/", sync_to_thread=False)
    def remove(self) -> None:
        """Any answer."""


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=f"{LITESTAR_OPTIONS}: Litestar 2's own OPTIONS answer lists the methods of one handler "
    "of a path; warmpod.http.status.StatusController.allowed answers it itself",
)
def test_litestar_answers_options_with_every_method_of_a_path() -> None:
    """Litestar's automatic OPTIONS answer of a path with a GET and a DELETE handler allows both."""
    with TestClient(Litestar([Resource])) as client:
        response = client.options("/resource")
    assert response.status_code == 204
    assert set(response.headers["allow"].split(", ")) == {"DELETE", "GET", "OPTIONS"}
