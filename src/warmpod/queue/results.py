"""Reading runs back: their state, output and files, waiting for a result, and following one live."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Literal

import anyio
import msgspec

from warmpod.errors import NoSuchFile, RunNotFound, ShuttingDown, StoreError
from warmpod.keys import Key
from warmpod.models import Chunk, OutputFile, RunResult, RunStatus
from warmpod.queue.admission import Shutdown
from warmpod.queue.store.base import OUTPUT_PAGE, Record, Store
from warmpod.queue.store.codec import Printed
from warmpod.sandbox.files import with_content, with_url
from warmpod.settings import FileSettings, QueueSettings

log = logging.getLogger(__name__)

# Waiters and streams re-read the store this often even without a local signal.
RECHECK = 1.0
# A stream sends a comment this often when nothing else happens, so proxies keep it open.
KEEPALIVE = 15.0
# A download reads its file from the store in pieces of this size: each piece is what a reader
# that stops reading can hold in memory (with the connection's own 64 KiB buffer), and each is one
# short store call. Smaller costs more CPU: SQLite finds a piece by walking the file's pages from
# its start, so a 16 MiB file read in these pieces takes some 6 times the CPU of reading it whole.
FILE_PIECE = 256 * 1024


@dataclass(frozen=True)
class Update:
    """One step of a run as ``follow`` sees it: a status, a chunk of output, a file it left, the
    result, or nothing new."""

    kind: Literal["status", "output", "file", "result", "keepalive"]
    status: RunStatus = "queued"
    chunk: Chunk | None = None
    file: OutputFile | None = None
    result: RunResult | None = None


class Results:
    """Answers what the store holds of a run, and wakes those who wait on one when it changes."""

    def __init__(
        self, store: Store, settings: QueueSettings, files: FileSettings, shutdown: Shutdown
    ) -> None:
        self._store = store
        self._settings = settings
        self._files = files
        self._shutdown = shutdown
        # One event per run someone waits on, set (and dropped) when the run changes.
        self._changed: dict[str, anyio.Event] = {}
        self._watchers: dict[str, int] = {}

    async def record(self, run_id: str) -> Record:
        """What the store holds of the run.

        Raises:
            RunNotFound: no such run, or its result has expired.
        """
        record = await self._store.get(run_id)
        if record is None or (
            record.finished is not None and record.finished + self._settings.retention < time.time()
        ):
            raise self._not_found(run_id)
        return record

    async def check_owner(self, run_id: str, key: Key | None) -> None:
        """Check the run was submitted with ``key`` (None: with keys off).

        Raises:
            RunNotFound: no such run, or another key's: the answer is the same, so a key cannot
                learn which ids exist.
        """
        if (await self.record(run_id)).key != (None if key is None else key.name):
            raise self._not_found(run_id)

    async def wait(self, run_id: str, timeout: float) -> RunResult | None:
        """The run's result once it is final; None if it is not within ``timeout`` seconds.

        Raises:
            RunNotFound: no such run.
            ShuttingDown: the server is stopping and the run has not started (it stays queued).
        """
        with self._watching(run_id), anyio.move_on_after(timeout):
            while True:
                changed = self._watch(run_id)
                record = await self.record(run_id)
                if record.result is not None:
                    return await self._with_files(record.result)
                if self._shutdown.begun and record.status == "queued":
                    raise ShuttingDown(
                        f"warmpod is shutting down before run {run_id} started: it stays queued and runs "
                        "when the server starts again"
                    )
                with anyio.move_on_after(RECHECK):
                    await changed.wait()
        return None

    async def status(self, run_id: str) -> RunResult:
        """The run's result, or what it printed so far while it is queued or running.

        Raises:
            RunNotFound: no such run, or its result has expired.
        """
        record = await self.record(run_id)
        if record.result is not None:
            return await self._with_files(record.result)
        # From the store, not this node's buffers: what is shown is what a crash would keep.
        printed = Printed()
        async for chunk in self._chunks(run_id, -1):
            printed.add(chunk.stream, chunk.data)
        stdout, stderr = printed.text()
        status: RunStatus = "running" if record.status == "running" else "queued"
        result = RunResult.from_server(
            run_id,
            status,
            stdout=stdout,
            stderr=stderr,
            node=record.node,
            environment=record.environment,
            labels=record.labels,
        )
        result.webhook = record.webhook
        return result

    async def follow(self, run_id: str, after: int = -1) -> AsyncIterator[Update]:
        """The run's status changes, its output chunks after ``after``, then its result; live.

        Raises:
            RunNotFound: no such run, or its result has expired.
        """
        with self._watching(run_id):
            async for update in self._follow(run_id, after):
                yield update

    async def file(self, run_id: str, path: str) -> tuple[OutputFile, int]:
        """A file the run left in ``out/``: its entry in the result and its stored size, for
        ``file_pieces`` to read it by.

        Raises:
            RunNotFound: no such run, or its result has expired.
            NoSuchFile: the run has not ended, or left no file at ``path``.
        """
        record = await self.record(run_id)
        entry = next((f for f in record.result.files if f.path == path), None) if record.result else None
        size = None if entry is None else await self._store.file_size(run_id, path)
        if entry is None or size is None:
            listed = ", ".join(f.path for f in record.result.files[:20]) if record.result else ""
            raise NoSuchFile(
                f"run {run_id} left no file {path[:1024]!r}"
                + (f"; it left {listed}" if listed else " (files are listed once the run has ended)")
            )
        return entry, size

    async def file_pieces(self, run_id: str, path: str, size: int) -> AsyncIterator[bytes]:
        """The first ``size`` bytes of a file the run left, in pieces of at most FILE_PIECE: a
        download holds one piece at a time, however large the file or slow its reader. It ends
        early if the file goes meanwhile (its run expired), short of the length announced."""
        offset = 0
        while offset < size:
            piece = await self._store.file_piece(run_id, path, offset, min(FILE_PIECE, size - offset))
            if not piece:
                return
            yield piece
            offset += len(piece)

    def notify(self, run_id: str) -> None:
        """Wake whoever waits on the run: it changed (called on the event loop, so it never blocks)."""
        event = self._changed.pop(run_id, None)
        if event is not None:
            event.set()

    def notify_all(self) -> None:
        """Wake every waiter: changes may have been missed."""
        for run_id in list(self._changed):
            self.notify(run_id)

    async def purge_expired(self) -> None:
        """Delete the runs whose results have expired, now and then, until cancelled."""
        retention = self._settings.retention
        while True:
            try:
                purged = await self._store.purge(retention)
            except StoreError:
                log.exception("could not purge expired runs")
            else:
                if purged:
                    log.info("purged %d expired run(s)", purged)
            await anyio.sleep(min(retention, 300.0))

    async def _chunks(self, run_id: str, after: int) -> AsyncGenerator[Chunk, None]:
        """The run's output chunks after ``after`` as the store has them now, a page at a time."""
        while True:
            page = await self._store.output(run_id, after, OUTPUT_PAGE)
            for chunk in page:
                yield chunk
            if len(page) < OUTPUT_PAGE:
                return
            after = page[-1].seq

    async def _follow(self, run_id: str, after: int) -> AsyncIterator[Update]:
        status: RunStatus | None = None
        quiet_since = time.monotonic()
        while True:
            changed = self._watch(run_id)
            # Before the output: a final record's output is all stored (``finish`` writes both).
            record = await self.record(run_id)
            if record.result is None and record.status != status:
                status = record.status
                yield Update("status", status=status)
            printed = False
            # A page is sent before the next is read: a slow reader holds one page, not the run.
            async with contextlib.aclosing(self._chunks(run_id, after)) as chunks:
                async for chunk in chunks:
                    after = chunk.seq
                    printed = True
                    yield Update("output", chunk=chunk)
            if record.result is not None:
                for file in record.result.files:
                    yield Update("file", file=file)
                yield Update("result", result=await self._with_files(record.result))
                return
            if printed:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE:
                quiet_since = time.monotonic()
                yield Update("keepalive")
            with anyio.move_on_after(RECHECK):
                await changed.wait()

    async def _with_files(self, result: RunResult) -> RunResult:
        """The result with each file's URL, and the content of small ones inline up to the answer's
        budget: however many files a run left, an answer about it weighs at most that."""
        if not result.files:
            return result
        limits = self._files
        small = await self._store.small_files(result.id, limits.inline_bytes, limits.inline_total_bytes)
        entries = (with_url(result.id, f) for f in result.files)
        files = [
            with_content(f, small[f.path], limits.inline_bytes) if f.path in small else f for f in entries
        ]
        return msgspec.structs.replace(result, files=files)

    def _not_found(self, run_id: str) -> RunNotFound:
        return RunNotFound(
            f"no run has the id {run_id} (results are kept {self._settings.retention:g} s after the run ends)"
        )

    @contextlib.contextmanager
    def _watching(self, run_id: str) -> Iterator[None]:
        # The run's event lives while anyone waits on it: a run waited on and then forgotten
        # must not leave one behind (else every blocking request would leak one).
        self._watchers[run_id] = self._watchers.get(run_id, 0) + 1
        try:
            yield
        finally:
            self._watchers[run_id] -= 1
            if not self._watchers[run_id]:
                del self._watchers[run_id]
                self._changed.pop(run_id, None)

    def _watch(self, run_id: str) -> anyio.Event:
        return self._changed.setdefault(run_id, anyio.Event())
