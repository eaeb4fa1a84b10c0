"""What the client says and how it reads the answers: request bodies, problems, retries, resumed streams."""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack, cast
from urllib.parse import quote

import httpx
import msgspec
from httpx_sse import ServerSentEvent

from warmpod.models import (
    BatchRequest,
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

DEFAULT_URL = "http://127.0.0.1:8000"
REQUEST_TIMEOUT = 30.0
"""Seconds for one request; a stream has no read timeout (a run may print nothing for minutes)."""
RETRY_FOR = 120.0
"""How long, in all, a 429 or 503 answer is retried after its ``Retry-After``."""
RESUME_FOR = 60.0
"""How long a dropped stream is resumed (``Last-Event-ID``) before the connection error is raised."""
_MAX_RETRY_AFTER = 30.0

DEFAULT_ENTRYPOINT = "main.py"
"""What a run without code runs, when it names no entrypoint (the server's default too)."""
DEFAULT_ENVIRONMENT = "default"
"""The environment of a run that names none (the server's ``environments.DEFAULT``)."""

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


def connection(url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The server's base URL and the headers every request carries (the key as a bearer token)."""
    base = (url or os.environ.get("WARMPOD_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("WARMPOD_API_KEY")
    headers = {"User-Agent": "warmpod-client"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return base, headers


class RunOptions(TypedDict, total=False):
    """What a run may say beside its code, as ``submit`` and ``run`` take it (all optional)."""

    stdin: str | bytes | None
    """What the program reads on standard input (UTF-8 text)."""
    files: Sequence[FileArg] | None
    """Input files: local paths, sent under their names, or ``(path, bytes)`` (``project_files``)."""
    entrypoint: str | None
    """The path the program runs as; one of ``files`` when there is no code (``main.py`` unless named)."""
    args: Sequence[str] | None
    """``sys.argv[1:]``."""
    env: Mapping[str, str] | None
    """Environment variables for the run."""
    secrets: Sequence[str] | None
    """Names of the operator's secrets, handed to the program as variables (the key must be granted them)."""
    sources: Sequence[str] | None
    """Names of the operator's data sources the program may connect to, through the server's relay
    (its address is in ``WARMPOD_SOURCE_<NAME>``; the key must be granted them)."""
    environment: str | None
    """The library set it runs with, one of ``Client.environments()`` (``default`` unless named)."""
    timeout: float | None
    """Wall-time limit in seconds."""
    cpu_time: int | None
    """CPU-time limit in seconds."""
    memory_mb: int | None
    """Memory limit in MiB."""
    max_output_bytes: int | None
    """Output kept per stream."""
    labels: Mapping[str, str] | None
    """Names and values kept with the run, returned with it and filterable in ``Client.runs``."""
    callback_url: str | None
    """Where the server posts the run's result, signed, once it ends (within the server's allow-list);
    None for no webhook even if the key has an endpoint; absent, the key's endpoint if any."""


class BatchRun(RunOptions, total=False):
    """One run of ``submit_batch``: its ``code`` and what else ``submit`` takes (all optional)."""

    code: str | None
    """The program's source; None (or absent) when the entrypoint is one of ``files``."""


def request_body(code: str | None, **options: Unpack[RunOptions]) -> bytes:
    """The JSON body of a submit (``wait`` false: the client follows the run's stream).

    Raises:
        ValueError: as ``run_request``.
        TypeError: as ``run_request``.
    """
    return msgspec.json.encode(run_request(code, **options))


def batch_body(runs: Sequence[str | BatchRun]) -> bytes:
    """The JSON body of a batch: each run its source alone, or a ``BatchRun``.

    Raises:
        ValueError: as ``run_request``.
        TypeError: as ``run_request``, or a run that is neither.
    """
    requests = []
    for run in runs:
        if isinstance(run, str):
            requests.append(run_request(run))
        elif isinstance(run, Mapping):
            options = cast(RunOptions, {name: value for name, value in run.items() if name != "code"})
            requests.append(run_request(run.get("code"), **options))
        else:
            raise TypeError(f"each run of a batch is its code or a BatchRun dict, not {type(run).__name__}")
    return msgspec.json.encode(BatchRequest(runs=requests))


def run_request(code: str | None, **options: Unpack[RunOptions]) -> RunRequest:
    """What a submit asks for (``wait`` false: the client follows the run's stream).

    Without ``code`` the program is ``entrypoint``, one of the files (``main.py`` unless named).

    Raises:
        ValueError: ``stdin`` is bytes that are not UTF-8.
        TypeError: an option ``RunOptions`` does not have, or ``args``, ``secrets`` or ``sources`` given as a
            single string instead of a list of them.
    """
    unknown = sorted(set(options) - RunOptions.__optional_keys__)
    if unknown:
        raise TypeError(
            f"unknown run options {unknown}: the options are {sorted(RunOptions.__optional_keys__)}"
        )
    stdin = options.get("stdin")
    if isinstance(stdin, bytes):
        try:
            stdin = stdin.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("stdin must be UTF-8 text: the run's JSON carries it as a string") from None
    entrypoint = options.get("entrypoint")
    return RunRequest(
        code=msgspec.UNSET if code is None else code,
        entrypoint=DEFAULT_ENTRYPOINT if code is None and entrypoint is None else entrypoint,
        stdin=stdin or "",
        files=[input_file(item) for item in options.get("files") or ()],
        args=_strings(options.get("args"), "args"),
        env=dict(options.get("env") or {}),
        secrets=_strings(options.get("secrets"), "secrets"),
        sources=_strings(options.get("sources"), "sources"),
        timeout=options.get("timeout"),
        cpu_time=options.get("cpu_time"),
        memory_mb=options.get("memory_mb"),
        max_output_bytes=options.get("max_output_bytes"),
        environment=options.get("environment") or DEFAULT_ENVIRONMENT,
        labels=dict(options.get("labels") or {}),
        callback_url=options.get("callback_url", msgspec.UNSET),
        wait=False,
    )


def _strings(values: Sequence[str] | None, name: str) -> list[str]:
    # A str is a sequence of str too: "2026-11" would go as seven arguments.
    if isinstance(values, str):
        raise TypeError(f"{name} is a list of strings, not a string: {name}=[{values!r}]")
    return list(values or ())


def input_file(item: FileArg) -> InputFile:
    """``item`` as the request carries it: its path in the sandbox and its bytes in base64."""
    if isinstance(item, tuple):
        path, data = item
    else:
        local = Path(item)
        path, data = local.name, local.read_bytes()
    return InputFile(path=path, content=base64.b64encode(data).decode("ascii"))


Since = float | datetime | str
"""A time for ``Client.runs``: unix seconds, an aware datetime, or RFC 3339 text."""


def runs_query(
    status: str | Sequence[str] | None,
    label: Mapping[str, str] | Sequence[str] | None,
    environment: str | None,
    since: Since | None,
    until: Since | None,
    page_size: int,
) -> list[tuple[str, str]]:
    """The query of ``GET /runs`` for ``Client.runs``'s filters (without its cursor)."""
    params = [("limit", str(page_size))]
    params += [("status", value) for value in ([status] if isinstance(status, str) else status or ())]
    if isinstance(label, Mapping):
        params += [("label", f"{name}={value}") for name, value in label.items()]
    else:
        params += [("label", part) for part in _strings(label, "label")]
    if environment is not None:
        params.append(("environment", environment))
    for name, moment in (("since", since), ("until", until)):
        if moment is not None:
            params.append((name, moment.isoformat() if isinstance(moment, datetime) else str(moment)))
    return params


def problem_of(response: httpx.Response) -> ProblemError:
    """The error an answer that is not a success stands for."""
    try:
        problem = msgspec.json.decode(response.content, type=Problem)
    except msgspec.DecodeError:
        # Not warmpod's own answer (a proxy's, say): its status and the start of its text.
        text = response.text[:500].strip()
        return ProblemError(response.status_code, response.reason_phrase, text or "(no body)")
    return ProblemError(problem.status, problem.title, problem.detail, problem.type)


def decoded(response: httpx.Response, type_: type[T]) -> T:
    """The answer's body as ``type_``; a problem answer raises its ProblemError."""
    if not response.is_success:
        raise problem_of(response)
    try:
        return msgspec.json.decode(response.content, type=type_)
    except msgspec.DecodeError as exc:
        raise ProblemError(
            response.status_code, "Unexpected answer", f"not a {type_.__name__}: {exc}"
        ) from None


def health_of(response: httpx.Response) -> Health:
    """The health answer, a 503 one included."""
    # 503 while the service cannot take runs, with the same body saying why.
    if response.status_code == 503:
        try:
            return msgspec.json.decode(response.content, type=Health)
        except msgspec.DecodeError:
            pass
    return decoded(response, Health)


def content_of(response: httpx.Response) -> bytes:
    """The answer's raw bytes; a problem answer raises its ProblemError."""
    if not response.is_success:
        raise problem_of(response)
    return response.content


def retry_wait(response: httpx.Response, deadline: float) -> float | None:
    """Seconds to wait before sending the request again, or None to take this answer."""
    if response.status_code not in (429, 503):
        return None
    try:
        wait = min(max(float(response.headers.get("Retry-After", "1")), 0.1), _MAX_RETRY_AFTER)
    except ValueError:  # an HTTP date: not what warmpod sends
        wait = 1.0
    return wait if time.monotonic() + wait < deadline else None


def submit_headers() -> dict[str, str]:
    """The headers of one submit, sent again with each of its retries."""
    # A fresh Idempotency-Key per submit, sent again by each of its retries: a retry of a run the
    # server stored (its answer lost, or a 503 after it) is answered with that run, never runs twice.
    return {"Content-Type": "application/json", "Idempotency-Key": f'"{uuid.uuid4()}"'}


def run_path(run_id: str, tail: str = "") -> str:
    """The URL path of a run, or of ``tail`` under it."""
    return f"/status/{quote(run_id, safe='')}{tail}"


def file_path(run_id: str, path: str) -> str:
    """The URL path of the file ``path`` a run left."""
    return run_path(run_id, "/files/" + quote(path))


class Follow:
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


def check_stream(response: httpx.Response, body: bytes) -> None:
    """Raise the ProblemError of a stream's answer that is not a success (its body read)."""
    if not response.is_success:
        raise problem_of(httpx.Response(response.status_code, headers=response.headers, content=body))


def callback_for(
    event: StreamEvent,
    on_stdout: TextCallback | None,
    on_stderr: TextCallback | None,
    on_file: FileCallback | None,
) -> tuple[Callable[[Any], object], object] | None:
    """The callback ``event`` goes to and its argument, or None when no callback wants it."""
    if isinstance(event, OutputEvent):
        callback = on_stdout if event.stream == "stdout" else on_stderr
        return None if callback is None else (callback, event.text)
    if isinstance(event, FileEvent) and on_file is not None:
        return on_file, event
    return None
