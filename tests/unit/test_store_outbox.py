"""The webhook outbox of both run stores: a row made with the run, due once the run is final
(whoever ends it), claimed once at a time under a lease, fenced outcomes, and purged with the run."""

from __future__ import annotations

import anyio
import msgspec

from warmpod.models import Chunk, RunResult, RunSpec
from warmpod.queue.store.base import Notice, Owner, Store
from warmpod.queue.store.outbox import Tried

SPEC = RunSpec(code=b"print(1)", stdin=b"", timeout=5.0, cpu_time=3, memory_mb=64, max_output_bytes=99)
HOOKED = msgspec.structs.replace(SPEC, callback_url="http://127.0.0.1:9/hook")
NODE = Owner(node="a", incarnation="a-1")
LEASE = 15.0


async def finish(store: Store, run_id: str) -> None:
    """Claim ``run_id`` and end it ``succeeded``."""
    claim = await store.claim(NODE, LEASE)
    assert claim is not None
    assert claim.fence.run_id == run_id
    result = RunResult.from_server(run_id, "succeeded", exit_code=0)
    assert await store.finish(run_id, result, fence=claim.fence)


async def test_a_webhook_waits_for_its_run_then_is_claimed_once(store: Store) -> None:
    """No webhook is due while its run is queued or running; once it is final, one claim takes it,
    the next finds none (leased), and the run's record shows it ``pending`` with one try."""
    assert await store.add("r1", HOOKED, max_queued=10, key="alice") == "added"
    assert await store.add("r2", SPEC, max_queued=10) == "added"
    assert await store.claim_webhook(LEASE) is None
    record = await store.get("r1")
    assert record is not None
    assert record.webhook is not None
    assert (record.webhook.state, record.webhook.attempts) == ("waiting", 0)
    await finish(store, "r1")
    delivery = await store.claim_webhook(LEASE)
    assert delivery is not None
    assert (delivery.run_id, delivery.key, delivery.url, delivery.attempt) == (
        "r1",
        "alice",
        HOOKED.callback_url,
        1,
    )
    assert await store.claim_webhook(LEASE) is None
    record = await store.get("r1")
    assert record is not None
    assert record.result is not None
    assert record.result.webhook is not None
    assert (record.result.webhook.state, record.result.webhook.attempts) == ("pending", 1)
    other = await store.get("r2")
    assert other is not None
    assert other.webhook is None


async def test_outcomes_are_kept_and_fenced(store: Store) -> None:
    """A failed try comes due again after its wait with the next attempt number; a stale try's
    outcome (its row claimed again since) changes nothing; a delivered one is never due again."""
    await store.add("r1", HOOKED, max_queued=10)
    await finish(store, "r1")
    first = await store.claim_webhook(LEASE)
    assert first is not None
    assert await store.record_webhook(first, Tried(state="pending", status=500, error="500", retry_in=0.05))
    await anyio.sleep(0.1)
    second = await store.claim_webhook(LEASE)
    assert second is not None
    assert second.attempt == 2
    assert not await store.record_webhook(first, Tried(state="delivered", status=204))
    assert await store.record_webhook(second, Tried(state="delivered", status=204))
    record = await store.get("r1")
    assert record is not None
    assert record.webhook is not None
    state = record.webhook
    assert (state.state, state.attempts, state.last_status, state.next_attempt_at) == (
        "delivered",
        2,
        204,
        None,
    )
    assert state.delivered_at is not None
    assert await store.claim_webhook(0.0) is None


async def test_a_lease_that_runs_out_lets_another_claim_it(store: Store) -> None:
    """A node lost in a try: once the claim's lease is over the webhook is due again."""
    await store.add("r1", HOOKED, max_queued=10)
    await finish(store, "r1")
    assert await store.claim_webhook(0.05) is not None
    await anyio.sleep(0.1)
    again = await store.claim_webhook(LEASE)
    assert again is not None
    assert again.attempt == 2


async def test_every_final_state_makes_it_due(store: Store) -> None:
    """A run cancelled while queued and one a lost node held both get their webhook."""
    await store.add("cancelled", HOOKED, max_queued=10)
    assert await store.cancel("cancelled", RunResult.from_server("cancelled", "cancelled")) == "cancelled"
    await store.add("lost", HOOKED, max_queued=10)
    assert await store.claim(NODE, LEASE) is not None
    assert await store.join(Owner(node="a", incarnation="a-2"), LEASE, "lost by {node}") == ["lost"]
    due = {(await store.claim_webhook(LEASE)) for _ in range(2)}
    assert {delivery.run_id for delivery in due if delivery is not None} == {"cancelled", "lost"}


async def test_claims_skip_busy_keys_and_go_oldest_due_first(store: Store) -> None:
    """A key this node has enough of in flight is skipped; the others' come in due order."""
    for run_id, key in (("a1", "alice"), ("b1", "bob"), ("a2", "alice")):
        await store.add(run_id, HOOKED, max_queued=10, key=key)
        await finish(store, run_id)
        await anyio.sleep(0.01)
    skipped = await store.claim_webhook(LEASE, ["alice"])
    assert skipped is not None
    assert skipped.run_id == "b1"
    assert await store.claim_webhook(LEASE, ["alice", "bob"]) is None
    first = await store.claim_webhook(LEASE, [None])
    assert first is not None
    assert first.run_id == "a1"


async def test_purge_takes_the_webhook_with_its_run(store: Store) -> None:
    """A purged run leaves no outbox row behind."""
    await store.add("r1", HOOKED, max_queued=10)
    await finish(store, "r1")
    await anyio.sleep(0.05)
    assert await store.purge(0.0) == 1
    assert await store.claim_webhook(LEASE) is None


async def test_a_due_webhook_is_announced_to_every_listener(store: Store) -> None:
    """Finishing or cancelling a run with a webhook gives a ``webhook`` notice, which wakes every
    node's deliveries at once (no poll waited for); output notices do not."""
    notices: list[tuple[Notice, str]] = []
    async with anyio.create_task_group() as tg:
        await tg.start(store.listen, lambda n, i: notices.append((n, i)))
        await store.add("r1", HOOKED, max_queued=10)
        await store.add("r2", HOOKED, max_queued=10)
        claim = await store.claim(NODE, LEASE)
        assert claim is not None
        assert await store.add_output(claim.fence, [Chunk(seq=0, stream="stdout", data=b"x")])
        assert await store.finish("r1", RunResult.from_server("r1", "succeeded"), fence=claim.fence)
        assert await store.cancel("r2", RunResult.from_server("r2", "cancelled")) == "cancelled"
        with anyio.fail_after(5):
            while not {("webhook", "r1"), ("webhook", "r2")} <= set(notices):
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert [n for n in notices if n[0] == "webhook"] == [("webhook", "r1"), ("webhook", "r2")]
