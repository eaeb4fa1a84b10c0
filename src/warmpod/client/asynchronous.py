"""``AsyncClient``: the client for asyncio and trio (anyio)."""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Unpack

import anyio
import httpx
from httpx_sse import aconnect_sse

from warmpod.client.wire import (
    REQUEST_TIMEOUT,
    RETRY_FOR,
    BatchRun,
    Follow,
    ProblemError,
    RunOptions,
    Since,
    batch_body,
    callback_for,
    check_stream,
    connection,
    content_of,
    decoded,
    file_path,
    health_of,
    request_body,
    retry_wait,
    run_path,
    runs_query,
    submit_headers,
)
from warmpod.models import (
    Accepted,
    BatchAccepted,
    Environment,
    EnvironmentInfo,
    FileEvent,
    Health,
    RunPage,
    RunResult,
    RunSummary,
    StreamEvent,
)


class AsyncClient:
    """``Client`` for asyncio and trio (anyio); its callbacks may be plain or async."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
        retry_for: float = RETRY_FOR,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        base, headers = connection(url, api_key)
        self.url = base
        self._retry_for = retry_for
        self._timeout = timeout
        self._http = httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _send(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> httpx.Response:
        deadline = time.monotonic() + self._retry_for
        while True:
            response = await self._http.request(method, path, **kwargs)
            wait = retry_wait(response, deadline) if retry else None
            if wait is None:
                return response
            await anyio.sleep(wait)

    async def submit(self, code: str | None = None, **options: Unpack[RunOptions]) -> Accepted:
        """Queue a run and answer at once with its id and URLs.

        Args:
            code: the program's source, written as the entrypoint; None when the entrypoint is one
                of ``files`` (``main.py`` unless ``entrypoint`` names another).
            **options: what else the run says (``RunOptions``): stdin, files, entrypoint, args, env,
                secrets, sources, environment and limits.

        Raises:
            ProblemError: the server refused the run (a 422 names the rule or lists the
                environments, a 403 the secret, source or environment its key may not use).
        """
        body = request_body(code, **options)
        response = await self._send("POST", "/run-json/", content=body, headers=submit_headers())
        return decoded(response, Accepted)

    async def submit_batch(self, runs: Sequence[str | BatchRun]) -> list[Accepted]:
        """Queue several runs in one request, all of them or none, and answer at once with their
        ids and URLs, in the order given; each run then lives on its own (``status``, ``stream``,
        ``cancel``).

        Args:
            runs: each a program's source, or a ``BatchRun``: its ``code`` and any of ``submit``'s
                options. At most the server's ``WARMPOD_QUEUE__MAX_BATCH`` (20 unless set).

        Raises:
            ProblemError: the server refused the batch, and queued none of it: a 422 or a 403 names
                the run that broke a rule by its place (``runs[3]: ...``); a 429 still there after
                the retries means the queue or the key's quota had no room for all of them.
        """
        response = await self._send("POST", "/runs/batch", content=batch_body(runs), headers=submit_headers())
        return decoded(response, BatchAccepted).runs

    async def runs(
        self,
        *,
        status: str | Sequence[str] | None = None,
        label: Mapping[str, str] | Sequence[str] | None = None,
        environment: str | None = None,
        since: Since | None = None,
        until: Since | None = None,
        page_size: int = 100,
    ) -> AsyncGenerator[RunSummary, None]:
        """The caller's runs, newest first, a page of ``page_size`` fetched at a time as the
        iteration goes (another key's runs are never answered).

        Args:
            status: only runs in this status, or in any of these.
            label: only runs with every one of these labels (``{name: value}`` or ``"name=value"`` texts).
            environment: only runs of this environment.
            since: only runs created at or after it (unix seconds, an aware datetime, RFC 3339).
            until: only runs created before it.
            page_size: runs per request, 1-500.

        Raises:
            ProblemError: the server refused a filter (a 422 names it).
        """
        params = runs_query(status, label, environment, since, until, page_size)
        cursor: str | None = None
        while True:
            query = params if cursor is None else [*params, ("cursor", cursor)]
            page = decoded(await self._send("GET", "/runs", params=query), RunPage)
            for summary in page.runs:
                yield summary
            if page.next is None:
                return
            cursor = page.next

    async def status(self, run_id: str) -> RunResult:
        """The run's state: ``queued`` or ``running`` with the output so far, or how it ended."""
        return decoded(await self._send("GET", run_path(run_id)), RunResult)

    async def cancel(self, run_id: str) -> RunResult:
        """Stop a queued or running run; it ends ``cancelled``."""
        return decoded(await self._send("DELETE", run_path(run_id)), RunResult)

    async def file(self, run_id: str, path: str) -> bytes:
        """The bytes of a file the run left (``out/...``), inline in its result or not."""
        return content_of(await self._send("GET", file_path(run_id, path)))

    async def health(self) -> Health:
        """The service's state; a server that cannot take runs answers it too (``status`` says so)."""
        return health_of(await self._send("GET", "/health", retry=False))

    async def environment(self) -> Environment:
        """The runner's Python version and installed distributions (the ``default`` environment's)."""
        return decoded(await self._send("GET", "/environment"), Environment)

    async def environments(self) -> list[EnvironmentInfo]:
        """The environments a run may name (``environment=``), those this key may use, ``default`` first."""
        return decoded(await self._send("GET", "/environments"), list[EnvironmentInfo])

    async def stream(self, run_id: str, *, after: int | None = None) -> AsyncGenerator[StreamEvent, None]:
        """The run's events as they happen (a finished run's replayed), ending with its RunResult;
        a dropped connection is resumed after the last output seen."""
        follow = Follow(after)
        deadline = time.monotonic() + self._retry_for
        timeout = httpx.Timeout(self._timeout, read=None)
        while True:
            try:
                async with aconnect_sse(
                    self._http, "GET", run_path(run_id, "/stream"), headers=follow.headers(), timeout=timeout
                ) as source:
                    response = source.response
                    if not response.is_success:
                        body = await response.aread()
                        wait = retry_wait(response, deadline)
                        if wait is None:
                            check_stream(response, body)
                        await anyio.sleep(wait or 0)
                        continue
                    async for sse in source.aiter_sse():
                        event = follow.event(sse)
                        if event is not None:
                            yield event
                            if isinstance(event, RunResult):
                                return
            except httpx.TransportError as exc:
                await anyio.sleep(follow.backoff(exc))
            else:  # the server closed the stream before the result: resume
                await anyio.sleep(follow.backoff(ProblemError(502, "Stream ended", "no result event")))

    async def run(
        self,
        code: str | None = None,
        *,
        on_stdout: Callable[[str], object | Awaitable[object]] | None = None,
        on_stderr: Callable[[str], object | Awaitable[object]] | None = None,
        on_file: Callable[[FileEvent], object | Awaitable[object]] | None = None,
        **options: Unpack[RunOptions],
    ) -> RunResult:
        """Run a program and return how it ended; the callbacks see output and files as they come.

        ``code`` and ``options`` are ``submit``'s: ``run(files=project_files("report"),
        entrypoint="report/run.py", args=["2026-11"])`` runs a project.
        """
        accepted = await self.submit(code, **options)
        async with contextlib.aclosing(self.stream(accepted.id)) as events:
            async for event in events:
                if isinstance(event, RunResult):
                    return event
                call = callback_for(event, on_stdout, on_stderr, on_file)
                if call is not None:
                    returned = call[0](call[1])
                    if inspect.isawaitable(returned):
                        await returned
        raise AssertionError("unreachable: a stream ends with its result")

    async def run_file(self, path: str | os.PathLike[str], **options: Any) -> RunResult:
        """``run`` the UTF-8 script at ``path``; ``options`` are ``run``'s."""
        code = await anyio.Path(path).read_text(encoding="utf-8")
        return await self.run(code, **options)
