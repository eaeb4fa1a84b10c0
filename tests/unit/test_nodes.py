"""Two nodes on one PostgreSQL store, each with its queue: where runs go, cancels across nodes, and
what a node that loses its lease does (fake sandboxes, the real store and queue)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
import pytest
from support.fakes import FakeLeaser, RecordingRunner
from support.waiting import until

from warmpod.errors import StoreError
from warmpod.models import RunResult, RunSpec
from warmpod.queue.node import QueueNode
from warmpod.queue.store.base import Beat, Fence, Owner
from warmpod.queue.store.postgres import PostgresStore
from warmpod.sandbox.protocol import Output
from warmpod.settings import LimitSettings, NodeSettings, QueueSettings

LEASE = 1.5
SPEC = RunSpec(code=b"pass", stdin=b"", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=1 << 20)


@dataclass
class Node:
    """One node: its store connection, queue, sandboxes and runner."""

    store: PostgresStore
    queue: QueueNode
    leaser: FakeLeaser
    runner: RecordingRunner


@pytest.fixture
async def nodes(postgres_db: str) -> AsyncIterator[tuple[Node, Node]]:
    """Nodes ``a`` and ``b``, started, on one fresh database; stopped after the test."""
    made: list[Node] = []
    async with anyio.create_task_group() as tg:
        for name in ("a", "b"):
            store = await PostgresStore.open(postgres_db)
            leaser = FakeLeaser()
            runner = RecordingRunner(leaser, LimitSettings())
            queue = QueueNode(
                store, leaser, runner, QueueSettings(), 2, node=NodeSettings(name=name, lease=LEASE)
            )
            await tg.start(queue.serve)
            made.append(Node(store, queue, leaser, runner))
        yield made[0], made[1]
        tg.cancel_scope.cancel()
    for node in made:
        await node.store.aclose()


async def running_on(node: Node, run_id: str) -> None:
    """Wait until ``run_id`` runs, on ``node``."""

    seen: list[RunResult] = []

    async def running() -> bool:
        seen.append(await node.queue.results.status(run_id))
        return seen[-1].status == "running"

    await until(running, 10, interval=0.02)
    assert seen[-1].node == node.queue.membership.owner.node


def lost(caplog: pytest.LogCaptureFixture, run_id: str) -> bool:
    """Whether a node has logged that it lost ``run_id``."""
    return any(f"lost run {run_id}" in r.getMessage() for r in caplog.records)


async def test_a_run_submitted_where_no_sandbox_is_free_runs_on_the_node_that_has_one(
    nodes: tuple[Node, Node],
) -> None:
    """Node a has no sandbox; what it takes is run by b, and a answers with b's result."""
    a, b = nodes
    a.leaser.failures = 10**6
    run_ids = [await a.queue.admission.submit(SPEC) for _ in range(5)]
    for run_id in run_ids:
        result = await a.queue.results.wait(run_id, 10)
        assert result is not None
        assert (result.status, result.node) == ("succeeded", "b")
    assert len(b.runner.calls) == 5
    assert a.runner.calls == []
    assert {n.name for n in a.queue.membership.nodes} <= {"a", "b"}


async def test_a_cancel_sent_to_one_node_stops_the_run_on_the_other(nodes: tuple[Node, Node]) -> None:
    """DELETE at a stops a run b executes, promptly, with what it printed."""
    a, b = nodes
    a.leaser.failures = 10**6
    b.runner.streamed = [Output(stream="stdout", data=b"started\n")]
    b.runner.hold = anyio.Event()
    run_id = await a.queue.admission.submit(SPEC)
    await running_on(b, run_id)
    with anyio.fail_after(5):
        result = await a.queue.workers.cancel(run_id)
    assert (result.status, result.stdout, result.node) == ("cancelled", "started\n", "b")


async def test_a_node_out_of_reach_of_the_store_stops_its_runs_and_another_reports_them(
    nodes: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """b cannot renew its lease: past it b stops the run itself (nothing more written), and a's
    reaper reports it error with the output it had printed, naming b; it never runs again."""
    a, b = nodes
    a.leaser.failures = 10**6
    b.runner.streamed = [Output(stream="stdout", data=b"partial\n")]
    b.runner.hold = anyio.Event()

    async def unreachable(
        owner: Owner, lease: float, fences: list[Fence], environments: Sequence[str] = ()
    ) -> Beat:
        raise StoreError("connection refused")

    run_id = await a.queue.admission.submit(SPEC)
    await running_on(b, run_id)
    monkeypatch.setattr(b.store, "heartbeat", unreachable)
    with caplog.at_level(logging.WARNING, "warmpod.queue.workers"):
        result = await a.queue.results.wait(run_id, LEASE * 4)
        await until(lambda: lost(caplog, run_id), LEASE * 2)
    assert result is not None
    assert (result.status, result.stdout, result.node) == ("error", "partial\n", "b")
    assert result.error == "node b stopped while this run was executing; it was not retried"
    assert b.queue.workers.running == 0
    assert len(b.runner.calls) == 1


async def test_a_store_that_hangs_while_reaping_does_not_hold_back_the_lease_check(
    nodes: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """b's look for other nodes' lost runs never returns (a partition that drops packets, met just
    after a renewal): b's next renewals still run, fail, and past its lease b stops its run."""
    a, b = nodes
    a.leaser.failures = 10**6
    b.runner.hold = anyio.Event()

    stuck = anyio.Event()

    async def hangs(message: str) -> list[str]:
        stuck.set()
        await anyio.sleep_forever()
        raise AssertionError

    async def unreachable(
        owner: Owner, lease: float, fences: list[Fence], environments: Sequence[str] = ()
    ) -> Beat:
        raise StoreError("connection timed out")

    run_id = await a.queue.admission.submit(SPEC)
    await running_on(b, run_id)
    monkeypatch.setattr(b.store, "reap", hangs)
    with anyio.fail_after(LEASE * 2):
        await stuck.wait()  # b's reaper is now stuck in the store
    monkeypatch.setattr(b.store, "heartbeat", unreachable)
    with caplog.at_level(logging.WARNING, "warmpod.queue.workers"):
        await until(lambda: lost(caplog, run_id), LEASE * 2)
    await until(lambda: b.queue.workers.running == 0, 2)


async def test_a_zombie_node_finds_its_writes_refused_and_stops_the_run(
    nodes: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """b stops renewing (as if frozen) while its run keeps printing: once a reports the run, b's
    next output write is refused and b stops the run; the reported output stays as it was."""
    a, b = nodes
    a.leaser.failures = 10**6
    b.runner.streamed = [Output(stream="stdout", data=f"{i}\n".encode()) for i in range(1000)]
    b.runner.pause = 0.05

    async def frozen(
        owner: Owner, lease: float, fences: list[Fence], environments: Sequence[str] = ()
    ) -> Beat:
        await anyio.sleep_forever()
        raise AssertionError

    run_id = await a.queue.admission.submit(SPEC)
    await running_on(b, run_id)
    monkeypatch.setattr(b.store, "heartbeat", frozen)
    with caplog.at_level(logging.WARNING, "warmpod.queue.workers"):
        result = await a.queue.results.wait(run_id, LEASE * 4)
        assert result is not None
        await until(lambda: b.queue.workers.running == 0, 2)
    assert (result.status, result.node) == ("error", "b")
    assert lost(caplog, run_id)
    kept = await a.queue.results.status(run_id)
    assert kept == result
    assert b.runner.ended == []  # stopped, not left to finish
