"""The backlog: the runs waiting in the shared queue, by id, as the store's notices and readings tell them."""

from __future__ import annotations

from typing import cast

import anyio

from warmpod.queue.admission import Backlog
from warmpod.queue.store.base import Store


class SlowQueue:
    """A store whose reading of the queue waits until let go, and answers ``queued``."""

    def __init__(self, queued: list[str]) -> None:
        self.queued_ids = queued
        self.reading = anyio.Event()
        self.answer = anyio.Event()

    async def queued(self) -> list[str]:
        self.reading.set()
        await self.answer.wait()
        return self.queued_ids


def test_a_run_is_counted_once_however_often_it_is_heard_of() -> None:
    """A run announced twice counts once; one that leaves twice, or leaves unannounced, never takes
    the count below what waits."""
    backlog = Backlog()
    backlog.heard("queued", "a")
    backlog.heard("queued", "a")
    backlog.heard("queued", "b")
    assert len(backlog) == 2
    backlog.heard("changed", "a")
    backlog.heard("changed", "a")
    backlog.heard("changed", "never-queued")
    assert len(backlog) == 1
    backlog.heard("changed", "b")
    assert len(backlog) == 0


async def test_a_reading_replaces_what_was_known_and_what_was_heard_meanwhile_goes_over_it() -> None:
    """A run known but gone from the store is dropped by a reading; runs queued or claimed while it
    was read count as those notices say, whichever way the reading saw them."""
    backlog = Backlog()
    backlog.heard("queued", "stale")
    store = SlowQueue(["a", "b"])
    async with anyio.create_task_group() as tg:

        async def read() -> None:
            assert await backlog.read(cast(Store, store)) == 2

        tg.start_soon(read)
        await store.reading.wait()
        backlog.heard("changed", "a")  # claimed after the reading saw it queued
        backlog.heard("queued", "c")  # queued after the reading looked
        store.answer.set()
    assert len(backlog) == 2
    backlog.heard("changed", "b")
    backlog.heard("changed", "c")
    assert len(backlog) == 0


def test_the_one_environment_of_the_waiting_runs_is_known_only_when_this_node_queued_them_all() -> None:
    """Runs this node queued, all of one environment: that one; a run of another, or one heard of
    from another node (its environment unknown), or an empty queue: None; a run that leaves or was
    never added drops out."""
    backlog = Backlog()
    assert backlog.only_environment() is None
    backlog.expect("a", "bare")
    backlog.heard("queued", "a")
    backlog.expect("b", "bare")
    backlog.heard("queued", "b")
    assert backlog.only_environment() == "bare"
    backlog.expect("c", "default")
    backlog.heard("queued", "c")
    assert backlog.only_environment() is None
    backlog.heard("changed", "c")
    assert backlog.only_environment() == "bare"
    backlog.heard("queued", "elsewhere")
    assert backlog.only_environment() is None
    backlog.heard("changed", "elsewhere")
    backlog.expect("refused", "default")
    backlog.forget("refused")
    assert backlog.only_environment() == "bare"
