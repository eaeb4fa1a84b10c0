"""The API suites' app: the real Litestar app and queue over a real SQLite store, with a fake pool."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from support.absent import NoEngine, NoStore
from support.apitest import (
    IMAGE,
    IN_BYTES,
    IN_COUNT,
    IN_FILE_BYTES,
    INFO,
    INLINE,
    MAX_BODY,
    MAX_QUEUED,
    NODE,
    POOL_SIZE,
    served,
)
from support.fakes import FakeLeaser, RecordingRunner, mark_serving

from warmpod.environments import Environments
from warmpod.http.app import create_app
from warmpod.queue.node import QueueNode
from warmpod.queue.store.sqlite import SqliteStore
from warmpod.sandbox.pool import Pool
from warmpod.service import Service
from warmpod.settings import Settings, from_env


@pytest.fixture
def settings() -> Settings:
    """Settings with a small body limit, pool and queue, as an operator could set them."""
    return from_env(
        {},
        server={"max_body_bytes": MAX_BODY},
        pool={"size": POOL_SIZE},
        queue={"max_queued": MAX_QUEUED},
        node={"name": NODE},
        files={
            "in_count": IN_COUNT,
            "in_file_bytes": IN_FILE_BYTES,
            "in_bytes": IN_BYTES,
            "inline_bytes": INLINE,
        },
    )


@pytest.fixture
def leaser() -> FakeLeaser:
    """Where the queue's workers get their (placeholder) sandboxes."""
    return FakeLeaser()


@pytest.fixture
def service(settings: Settings, tmp_path: Path, leaser: FakeLeaser) -> Service:
    """A service whose pool (over an engine never called) reports itself serving; its queue is
    started by the app's lifespan."""
    pool = Pool(
        settings,
        NoEngine(),
        environments=[(Environments.load(settings).default, IMAGE)],
        state_dir=tmp_path,
        instance="api-tests",
        can_pause=True,
        can_limit=True,
    )
    mark_serving(pool)
    runner = RecordingRunner(leaser, settings.limits, settings.files)
    # Replaced by a started one in the app's lifespan; unstarted, it is what /health sees before.
    queue = QueueNode(NoStore(), leaser, runner, settings.queue, workers=POOL_SIZE)
    return Service(settings, IMAGE, INFO, pool, runner, queue)


@pytest.fixture
def app(settings: Settings, service: Service, leaser: FakeLeaser, tmp_path: Path) -> Litestar:
    """The real app, with a service factory that yields the fake service and runs a real queue
    over a real SQLite store."""

    @contextlib.asynccontextmanager
    async def factory(given: Settings) -> AsyncIterator[Service]:
        assert given is settings
        store = await SqliteStore.open(tmp_path / "runs.sqlite3")
        try:
            async with anyio.create_task_group() as tg:
                queue = QueueNode(
                    store,
                    leaser,
                    service.runner,
                    settings.queue,
                    workers=POOL_SIZE,
                    files=settings.files,
                    node=settings.node,
                )
                service.queue = queue
                await tg.start(queue.serve)
                yield service
                await queue.workers.drain(1.0)
                tg.cancel_scope.cancel()
        finally:
            await store.aclose()

    return create_app(settings, service_factory=factory)


@pytest.fixture
async def client(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """A client of the started app (its lifespan has run)."""
    async with AsyncTestClient(app) as client:
        yield client


@pytest.fixture
async def anonymous(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    """A client of the started app that sends no key of its own (for suites with keys on)."""
    async with AsyncTestClient(app) as client:
        yield client


@pytest.fixture
def runner(service: Service) -> RecordingRunner:
    """The fake service's runner."""
    assert isinstance(service.runner, RecordingRunner)
    return service.runner


@pytest.fixture
def live(app: Litestar) -> Iterator[str]:
    """The app served by uvicorn on a loopback port in a thread of its own: its URL. Streams arrive
    as they are sent, which a test client's transport does not promise."""
    with served(app) as url:
        yield url


@pytest.fixture(autouse=True)
def _no_blocking(blocking_guard: None) -> None:
    """Every test here runs under tests/conftest.py's blocking guard: the app's handlers, the
    queue and the store never block the event loop."""
