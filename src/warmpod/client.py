"""The Python client: ``Client`` and ``AsyncClient`` on httpx and httpx-sse, typed by the server's models."""

from __future__ import annotations

import base64
import contextlib
import inspect
import os
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import httpx
import msgspec
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from warmpod.models import (
    Accepted,
    Environment,
    FileEvent,
    Health,
    InputFile,
    OutputEvent,
    Problem,
    RunRequest,
    RunResult,
    StatusEvent,
    StreamEvent,
)

__all__ = [
    "AsyncClient",
    "Client",
    "FileEvent",
    "OutputEvent",
    "ProblemError",
    "RunResult",
    "StatusEvent",
    "StreamEvent",
]

DEFAULT_URL = "http://127.0.0.1:8000"
REQUEST_TIMEOUT = 30.0
"""Seconds for one request; a stream has no read timeout (a run may print nothing for minutes)."""
RETRY_FOR = 120.0
"""How long, in all, a 429 or 503 answer is retried after its ``Retry-After``."""
RESUME_FOR = 60.0
"""How long a dropped stream is resumed (``Last-Event-ID``) before the connection error is raised."""
_MAX_RETRY_AFTER = 30.0

FileArg = str | os.PathLike[str] | tuple[str, bytes]
"""An input file: a local path, sent under its file name, or ``(path in the sandbox, bytes)``."""
T = TypeVar("T")
TextCallback = Callable[[str], object]
FileCallback = Callable[[FileEvent], object]


class ProblemError(Exception):
    """An error answer from warmpod, with its RFC 9457 problem's fields."""

    def __init__(self, status: int, title: str, detail: str, type: str = "about:blank") -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type


def _connection(url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    base = (url or os.environ.get("WARMPOD_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("WARMPOD_API_KEY")
    headers = {"User-Agent": "warmpod-client"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return base, headers


def _request_body(
    code: str,
    stdin: str | bytes | None,
    files: Sequence[FileArg] | None,
    timeout: float | None,
    cpu_time: int | None,
    memory_mb: int | None,
    max_output_bytes: int | None,
) -> bytes:
    if isinstance(stdin, bytes):
        try:
            stdin = stdin.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("stdin must be UTF-8 text: the run's JSON carries it as a string") from None
    request = RunRequest(
        code=code,
        stdin=stdin or "",
        files=[_input_file(item) for item in files or ()],
        timeout=timeout,
        cpu_time=cpu_time,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        wait=False,
    )
    return msgspec.json.encode(request)


def _input_file(item: FileArg) -> InputFile:
    if isinstance(item, tuple):
        path, data = item
    else:
        local = Path(item)
        path, data = local.name, local.read_bytes()
    return InputFile(path=path, content=base64.b64encode(data).decode("ascii"))


def _problem(response: httpx.Response) -> ProblemError:
    try:
        problem = msgspec.json.decode(response.content, type=Problem)
    except msgspec.DecodeError:
        # Not warmpod's own answer (a proxy's, say): its status and the start of its text.
        text = response.text[:500].strip()
        return ProblemError(response.status_code, response.reason_phrase, text or "(no body)")
    return ProblemError(problem.status, problem.title, problem.detail, problem.type)


def _decoded(response: httpx.Response, type_: type[T]) -> T:
    if not response.is_success:
        raise _problem(response)
    try:
        return msgspec.json.decode(response.content, type=type_)
    except msgspec.DecodeError as exc:
        raise ProblemError(
            response.status_code, "Unexpected answer", f"not a {type_.__name__}: {exc}"
        ) from None


def _health(response: httpx.Response) -> Health:
    # 503 while the service cannot take runs, with the same body saying why.
    if response.status_code == 503:
        try:
            return msgspec.json.decode(response.content, type=Health)
        except msgspec.DecodeError:
            pass
    return _decoded(response, Health)


def _content(response: httpx.Response) -> bytes:
    if not response.is_success:
        raise _problem(response)
    return response.content


def _retry_wait(response: httpx.Response, deadline: float) -> float | None:
    """Seconds to wait before sending the request again, or None to take this answer."""
    if response.status_code not in (429, 503):
        return None
    try:
        wait = min(max(float(response.headers.get("Retry-After", "1")), 0.1), _MAX_RETRY_AFTER)
    except ValueError:  # an HTTP date: not what warmpod sends
        wait = 1.0
    return wait if time.monotonic() + wait < deadline else None


def _submit_headers() -> dict[str, str]:
    # A fresh Idempotency-Key per submit, sent again by each of its retries: a retry of a run the
    # server stored (its answer lost, or a 503 after it) is answered with that run, never runs twice.
    return {"Content-Type": "application/json", "Idempotency-Key": f'"{uuid.uuid4()}"'}


def _run_path(run_id: str, tail: str = "") -> str:
    return f"/status/{quote(run_id, safe='')}{tail}"


class _Follow:
    """Where a stream is: the last output seen (to resume after it) and the files already told."""

    def __init__(self, after: int | None) -> None:
        self.last = after
        self.files: set[str] = set()
        self.failing_since: float | None = None
        self.attempts = 0

    def headers(self) -> dict[str, str]:
        return {} if self.last is None else {"Last-Event-ID": str(self.last)}

    def event(self, sse: ServerSentEvent) -> StreamEvent | None:
        """The typed event, or None for one already told before a resume (or of an unknown kind)."""
        self.failing_since, self.attempts = None, 0
        kind: type[StreamEvent]
        if sse.event in ("stdout", "stderr"):
            kind = OutputEvent
        elif sse.event == "file":
            kind = FileEvent
        elif sse.event == "result":
            kind = RunResult
        elif sse.event == "status":
            kind = StatusEvent
        else:
            return None
        event = msgspec.json.decode(sse.data, type=kind)
        if isinstance(event, OutputEvent):
            if self.last is not None and event.seq <= self.last:
                return None
            self.last = event.seq
        elif isinstance(event, FileEvent):
            if event.path in self.files:
                return None
            self.files.add(event.path)
        return event

    def backoff(self, error: Exception) -> float:
        """Seconds to wait before resuming after ``error``; raises it once resuming has gone on too long."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        if now - self.failing_since > RESUME_FOR:
            raise error
        self.attempts += 1
        return min(0.1 * 2.0 ** min(self.attempts, 6), 5.0)


def _check_stream(response: httpx.Response, body: bytes) -> None:
    if not response.is_success:
        raise _problem(httpx.Response(response.status_code, headers=response.headers, content=body))


def _callback(
    event: StreamEvent,
    on_stdout: TextCallback | None,
    on_stderr: TextCallback | None,
    on_file: FileCallback | None,
) -> tuple[Callable[[Any], object], object] | None:
    if isinstance(event, OutputEvent):
        callback = on_stdout if event.stream == "stdout" else on_stderr
        return None if callback is None else (callback, event.text)
    if isinstance(event, FileEvent) and on_file is not None:
        return on_file, event
    return None


class Client:
    """A blocking client of one warmpod server.

    ``url`` and ``api_key`` default to ``WARMPOD_URL`` (else http://127.0.0.1:8000) and
    ``WARMPOD_API_KEY``; ``transport`` is httpx's, for tests or a proxy.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
        retry_for: float = RETRY_FOR,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        base, headers = _connection(url, api_key)
        self.url = base
        self._retry_for = retry_for
        self._timeout = timeout
        self._http = httpx.Client(base_url=base, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def _send(self, method: str, path: str, *, retry: bool = True, **kwargs: Any) -> httpx.Response:
        deadline = time.monotonic() + self._retry_for
        while True:
            response = self._http.request(method, path, **kwargs)
            wait = _retry_wait(response, deadline) if retry else None
            if wait is None:
                return response
            time.sleep(wait)

    def submit(
        self,
        code: str,
        *,
        stdin: str | bytes | None = None,
        files: Sequence[FileArg] | None = None,
        timeout: float | None = None,
        cpu_time: int | None = None,
        memory_mb: int | None = None,
        max_output_bytes: int | None = None,
    ) -> Accepted:
        """Queue a run and answer at once with its id and URLs."""
        body = _request_body(code, stdin, files, timeout, cpu_time, memory_mb, max_output_bytes)
        response = self._send("POST", "/run-json/", content=body, headers=_submit_headers())
        return _decoded(response, Accepted)

    def status(self, run_id: str) -> RunResult:
        """The run's state: ``queued`` or ``running`` with the output so far, or how it ended."""
        return _decoded(self._send("GET", _run_path(run_id)), RunResult)

    def cancel(self, run_id: str) -> RunResult:
        """Stop a queued or running run; it ends ``cancelled``."""
        return _decoded(self._send("DELETE", _run_path(run_id)), RunResult)

    def file(self, run_id: str, path: str) -> bytes:
        """The bytes of a file the run left (``out/...``), inline in its result or not."""
        return _content(self._send("GET", _run_path(run_id, "/files/" + quote(path))))

    def health(self) -> Health:
        """The service's state; a server that cannot take runs answers it too (``status`` says so)."""
        return _health(self._send("GET", "/health", retry=False))

    def environment(self) -> Environment:
        """The runner's Python version and installed distributions."""
        return _decoded(self._send("GET", "/environment"), Environment)

    def stream(self, run_id: str, *, after: int | None = None) -> Generator[StreamEvent, None, None]:
        """The run's events as they happen (a finished run's replayed), ending with its RunResult;
        a dropped connection is resumed after the last output seen."""
        follow = _Follow(after)
        deadline = time.monotonic() + self._retry_for
        timeout = httpx.Timeout(self._timeout, read=None)
        while True:
            try:
                with connect_sse(
                    self._http, "GET", _run_path(run_id, "/stream"), headers=follow.headers(), timeout=timeout
                ) as source:
                    response = source.response
                    if not response.is_success:
                        body = response.read()
                        wait = _retry_wait(response, deadline)
                        if wait is None:
                            _check_stream(response, body)
                        time.sleep(wait or 0)
                        continue
                    for sse in source.iter_sse():
                        event = follow.event(sse)
                        if event is not None:
                            yield event
                            if isinstance(event, RunResult):
                                return
            except httpx.TransportError as exc:
                time.sleep(follow.backoff(exc))
            else:  # the server closed the stream before the result: resume
                time.sleep(follow.backoff(ProblemError(502, "Stream ended", "no result event")))

    def run(
        self,
        code: str,
        *,
        stdin: str | bytes | None = None,
        files: Sequence[FileArg] | None = None,
        timeout: float | None = None,
        cpu_time: int | None = None,
        memory_mb: int | None = None,
        max_output_bytes: int | None = None,
        on_stdout: Callable[[str], object] | None = None,
        on_stderr: Callable[[str], object] | None = None,
        on_file: Callable[[FileEvent], object] | None = None,
    ) -> RunResult:
        """Run ``code`` and return how it ended; the callbacks see output and files as they come."""
        accepted = self.submit(
            code,
            stdin=stdin,
            files=files,
            timeout=timeout,
            cpu_time=cpu_time,
            memory_mb=memory_mb,
            max_output_bytes=max_output_bytes,
        )
        # Closed on the way out, a callback's exception included: its connection goes back at once.
        with contextlib.closing(self.stream(accepted.id)) as events:
            for event in events:
                if isinstance(event, RunResult):
                    return event
                call = _callback(event, on_stdout, on_stderr, on_file)
                if call is not None:
                    call[0](call[1])
        raise AssertionError("unreachable: a stream ends with its result")

    def run_file(self, path: str | os.PathLike[str], **options: Any) -> RunResult:
        """``run`` the UTF-8 script at ``path``; ``options`` are ``run``'s."""
        return self.run(Path(path).read_text(encoding="utf-8"), **options)


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
        base, headers = _connection(url, api_key)
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
            wait = _retry_wait(response, deadline) if retry else None
            if wait is None:
                return response
            await anyio.sleep(wait)

    async def submit(
        self,
        code: str,
        *,
        stdin: str | bytes | None = None,
        files: Sequence[FileArg] | None = None,
        timeout: float | None = None,
        cpu_time: int | None = None,
        memory_mb: int | None = None,
        max_output_bytes: int | None = None,
    ) -> Accepted:
        """Queue a run and answer at once with its id and URLs."""
        body = _request_body(code, stdin, files, timeout, cpu_time, memory_mb, max_output_bytes)
        response = await self._send("POST", "/run-json/", content=body, headers=_submit_headers())
        return _decoded(response, Accepted)

    async def status(self, run_id: str) -> RunResult:
        """The run's state: ``queued`` or ``running`` with the output so far, or how it ended."""
        return _decoded(await self._send("GET", _run_path(run_id)), RunResult)

    async def cancel(self, run_id: str) -> RunResult:
        """Stop a queued or running run; it ends ``cancelled``."""
        return _decoded(await self._send("DELETE", _run_path(run_id)), RunResult)

    async def file(self, run_id: str, path: str) -> bytes:
        """The bytes of a file the run left (``out/...``), inline in its result or not."""
        return _content(await self._send("GET", _run_path(run_id, "/files/" + quote(path))))

    async def health(self) -> Health:
        """The service's state; a server that cannot take runs answers it too (``status`` says so)."""
        return _health(await self._send("GET", "/health", retry=False))

    async def environment(self) -> Environment:
        """The runner's Python version and installed distributions."""
        return _decoded(await self._send("GET", "/environment"), Environment)

    async def stream(self, run_id: str, *, after: int | None = None) -> AsyncGenerator[StreamEvent, None]:
        """The run's events as they happen (a finished run's replayed), ending with its RunResult;
        a dropped connection is resumed after the last output seen."""
        follow = _Follow(after)
        deadline = time.monotonic() + self._retry_for
        timeout = httpx.Timeout(self._timeout, read=None)
        while True:
            try:
                async with aconnect_sse(
                    self._http, "GET", _run_path(run_id, "/stream"), headers=follow.headers(), timeout=timeout
                ) as source:
                    response = source.response
                    if not response.is_success:
                        body = await response.aread()
                        wait = _retry_wait(response, deadline)
                        if wait is None:
                            _check_stream(response, body)
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
        code: str,
        *,
        stdin: str | bytes | None = None,
        files: Sequence[FileArg] | None = None,
        timeout: float | None = None,
        cpu_time: int | None = None,
        memory_mb: int | None = None,
        max_output_bytes: int | None = None,
        on_stdout: Callable[[str], object | Awaitable[object]] | None = None,
        on_stderr: Callable[[str], object | Awaitable[object]] | None = None,
        on_file: Callable[[FileEvent], object | Awaitable[object]] | None = None,
    ) -> RunResult:
        """Run ``code`` and return how it ended; the callbacks see output and files as they come."""
        accepted = await self.submit(
            code,
            stdin=stdin,
            files=files,
            timeout=timeout,
            cpu_time=cpu_time,
            memory_mb=memory_mb,
            max_output_bytes=max_output_bytes,
        )
        async with contextlib.aclosing(self.stream(accepted.id)) as events:
            async for event in events:
                if isinstance(event, RunResult):
                    return event
                call = _callback(event, on_stdout, on_stderr, on_file)
                if call is not None:
                    returned = call[0](call[1])
                    if inspect.isawaitable(returned):
                        await returned
        raise AssertionError("unreachable: a stream ends with its result")

    async def run_file(self, path: str | os.PathLike[str], **options: Any) -> RunResult:
        """``run`` the UTF-8 script at ``path``; ``options`` are ``run``'s."""
        code = await anyio.Path(path).read_text(encoding="utf-8")
        return await self.run(code, **options)
