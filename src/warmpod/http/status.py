"""``GET``/``DELETE /status/{id}``: a run's state, its files and live output, and cancelling it."""

from __future__ import annotations

import codecs
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

import msgspec
from litestar import Controller, HttpMethod, Request, Response, delete, get, route
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage, Stream

from warmpod.errors import RunNotFound
from warmpod.http.auth import key_of
from warmpod.http.openapi import KEYED, problems
from warmpod.models import FileEvent, OutputEvent, RunResult, StatusEvent
from warmpod.queue.results import Results
from warmpod.service import Service

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_RASTER_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})


async def owned_run(
    request: Request[Any, Any, Any], run_id: FromPath[str], service: NamedDependency[Service]
) -> str:
    """The path's run id, checked, once it is a run of the request's key (another key's is 404)."""
    checked = _checked_id(run_id)
    await service.queue.results.check_owner(checked, key_of(request))
    return checked


class StatusController(Controller):
    """Runs taken into the queue: their state, live output, and cancelling them."""

    path = "/status/{run_id:str}"
    tags = ["runs"]  # noqa: RUF012  (Litestar reads it as a class attribute)
    security = KEYED
    dependencies = {"run": Provide(owned_run)}  # noqa: RUF012  (as tags)

    @get("/", summary="A run's state and result", responses=problems(400, 401, 404, 429, 503))
    async def status(self, run: NamedDependency[str], service: NamedDependency[Service]) -> RunResult:
        """The RunResult: ``queued`` or ``running`` (with the output so far) until the run ends."""
        return await service.queue.results.status(run)

    @delete("/", status_code=200, summary="Cancel a run", responses=problems(400, 401, 404, 409, 429, 503))
    async def cancel(self, run: NamedDependency[str], service: NamedDependency[Service]) -> RunResult:
        """Stop a queued or running run (its container is killed); it ends ``cancelled``."""
        return await service.queue.workers.cancel(run)

    @route(
        "/", http_method=HttpMethod.OPTIONS, status_code=204, include_in_schema=False, sync_to_thread=False
    )
    def allowed(self) -> Response[None]:
        """What a run's URL allows. Litestar 2's own answer lists the methods of its first handler
        only (https://github.com/litestar-org/litestar/issues/4169, fixed in 3): GET and OPTIONS,
        without DELETE. tests/unit/test_upstream.py fails once Litestar answers it right, and this
        handler can go."""
        return Response(None, status_code=204, headers={"Allow": "DELETE, GET, OPTIONS"})

    @get(
        "/files/{path:path}",
        summary="A file the run left in out/, as raw bytes",
        media_type="application/octet-stream",
        responses={
            200: ResponseSpec(bytes, description="The file's bytes", media_type="application/octet-stream"),
            **problems(400, 401, 404, 429, 503),
        },
    )
    async def file(
        self, run: NamedDependency[str], path: FromPath[str], service: NamedDependency[Service]
    ) -> Stream:
        """The bytes of ``out/...`` as the run left it, with the media type its name suggests."""
        entry, size = await service.queue.results.file(run, path.lstrip("/"))
        # Streamed from the store a piece at a time: a reader who never reads pins one piece,
        # not the whole file, for as long as its request stays open.
        return Stream(
            service.queue.results.file_pieces(run, entry.path, size),
            headers={
                # As headers, not ``media_type``: a Stream takes the handler's media type over its own.
                "Content-Type": _download_type(entry.media_type),
                "Content-Length": str(size),
                # What a program made is hostile: a browser must neither sniff it into HTML nor
                # run what it holds as this origin's page.
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "sandbox; default-src 'none'",
                "Content-Disposition": _attachment(entry.path),
            },
        )

    @get(
        "/stream",
        summary="A run's output as Server-Sent Events",
        responses={
            200: ResponseSpec(str, description="The run's events", media_type="text/event-stream"),
            **problems(400, 401, 404, 429, 503),
        },
    )
    async def stream(
        self,
        run: NamedDependency[str],
        service: NamedDependency[Service],
        last_event_id: Annotated[int | None, HeaderParameter(name="Last-Event-ID", ge=-1)] = None,
    ) -> ServerSentEvent:
        """``status`` events while it waits and starts, ``stdout``/``stderr`` events (``{"text"}``, in
        print order, ``id`` their sequence number) as the program prints, a ``file`` event
        (``{"path", "size", "media_type"}``) per file it left, then one ``result`` event with the
        RunResult. A finished run replays what was kept."""
        after = -1 if last_event_id is None else last_event_id
        # Buffering proxies (nginx) would hold the events back; this asks them not to.
        return ServerSentEvent(
            _events(service.queue.results, run, after), headers={"X-Accel-Buffering": "no"}
        )


async def _events(results: Results, run_id: str, after: int) -> AsyncIterator[ServerSentEventMessage]:
    decoders = {stream: codecs.getincrementaldecoder("utf-8")("replace") for stream in ("stdout", "stderr")}
    async for update in results.follow(run_id, after):
        if update.chunk is not None:
            chunk = update.chunk
            text = decoders[chunk.stream].decode(chunk.data)
            event = OutputEvent(stream=chunk.stream, text=text, seq=chunk.seq)
            yield ServerSentEventMessage(data=_json(event), event=chunk.stream, id=str(chunk.seq))
        elif update.file is not None:
            entry = FileEvent(path=update.file.path, size=update.file.size, media_type=update.file.media_type)
            yield ServerSentEventMessage(data=_json(entry), event="file")
        elif update.result is not None:
            yield ServerSentEventMessage(data=_json(update.result), event="result")
        elif update.kind == "status":
            yield ServerSentEventMessage(data=_json(StatusEvent(status=update.status)), event="status")
        else:
            # data=None: Litestar would add an empty "data:" line, which a browser turns into an
            # empty message event (and a JSON client into a parse error).
            yield ServerSentEventMessage(data=None, comment="keepalive")


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def _checked_id(run_id: str) -> str:
    if not _RUN_ID.fullmatch(run_id):
        raise RunNotFound(f"no run has the id {run_id[:64]!r}: ids are 32 hexadecimal digits")
    return run_id


def _download_type(media_type: str) -> str:
    # Only raster images, which a browser merely decodes, keep their type: anything else a page
    # could open (HTML, SVG, XML, PDF, scripts) is served as bytes to save.
    return media_type if media_type in _RASTER_TYPES else "application/octet-stream"


def _attachment(path: str) -> str:
    # RFC 6266: an ASCII fallback and the UTF-8 name, percent-encoded.
    name = path.rpartition("/")[2]
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\%' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
