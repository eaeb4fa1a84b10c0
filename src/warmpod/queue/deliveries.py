"""This node's share of the webhook outbox: it claims due webhooks from the store, tries each once
and keeps how it went, so every final run's webhook is delivered at least once by some node."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable

import anyio
import httpx
import msgspec
from standardwebhooks.webhooks import Webhook

from warmpod import metrics
from warmpod.errors import StoreError
from warmpod.keys import Key
from warmpod.models import RunResult
from warmpod.queue.store.base import Store
from warmpod.queue.store.outbox import Delivery, Tried
from warmpod.sandbox.files import with_url
from warmpod.settings import WebhookSettings
from warmpod.webhooks import sender
from warmpod.webhooks.destinations import Destinations

log = logging.getLogger(__name__)
JITTER = 0.25
"""Each wait between tries is its doubling's, give or take this share, at random: receivers that
failed together are not all tried again at the same instant."""
# A claim's lease outlasts its try (bounded by the timeout) by this much: a try still going when
# its row is due again could deliver twice.
LEASE_MARGIN = 30.0
# How long a stopping node tries to hand back the webhooks it was trying.
RELEASE_TIMEOUT = 2.0


class Deliveries:
    """Claims due webhooks and tries them, ``settings.concurrency`` at once, a quarter of those
    at most for one key, so a key whose receiver hangs does not hold back another key's webhooks."""

    def __init__(
        self,
        store: Store,
        settings: WebhookSettings,
        destinations: Destinations,
        key: Callable[[str], Key | None] | None = None,
    ) -> None:
        """``key`` finds an API key by name (its ``webhook_secret=`` signs its runs' webhooks);
        None where keys are off, and every run is one client's.

        Raises:
            SettingsError: a secret of ``WARMPOD_WEBHOOKS__SECRETS`` is malformed.
        """
        self._store = store
        self._settings = settings
        self._destinations = destinations
        self._key = key
        self._signers = sender.signers(settings.secrets, "WARMPOD_WEBHOOKS__SECRETS")
        self._per_key = settings.concurrency if key is None else max(1, settings.concurrency // 4)
        self._in_flight: Counter[str | None] = Counter()
        self._wake = anyio.Event()

    def wake(self) -> None:
        """Look for due webhooks now: a run may have become final (called on the event loop)."""
        self._wake.set()

    async def serve(self) -> None:
        """Deliver due webhooks until cancelled."""
        slots = anyio.Semaphore(self._settings.concurrency)
        async with sender.client(self._settings.timeout) as client, anyio.create_task_group() as tg:
            while True:
                await slots.acquire()
                try:
                    delivery = await self._claim()
                except BaseException:
                    slots.release()
                    raise
                if delivery is None:
                    slots.release()
                    await self._idle()
                    continue
                self._in_flight[delivery.key] += 1
                tg.start_soon(self._try, client, delivery, slots)

    async def _claim(self) -> Delivery | None:
        busy = [key for key, count in self._in_flight.items() if count >= self._per_key]
        try:
            return await self._store.claim_webhook(self._settings.timeout + LEASE_MARGIN, busy)
        except StoreError as exc:
            log.warning("could not look for due webhooks: %s", exc)
            return None

    async def _idle(self) -> None:
        with anyio.move_on_after(self._settings.poll):
            await self._wake.wait()
        self._wake = anyio.Event()

    async def _try(self, client: httpx.AsyncClient, delivery: Delivery, slots: anyio.Semaphore) -> None:
        try:
            try:
                tried = await self._send(client, delivery)
            except anyio.get_cancelled_exc_class():
                # The node is stopping: the webhook is due again at once, for whichever node is
                # still up (or this one's next start), not only when the claim's lease is over.
                stopped = Tried(state="pending", error="the node stopped during the try", retry_in=0.0)
                shielded = anyio.CancelScope(shield=True)
                with shielded, anyio.move_on_after(RELEASE_TIMEOUT), contextlib.suppress(StoreError):
                    await self._store.record_webhook(delivery, stopped)
                raise
            try:
                if not await self._store.record_webhook(delivery, tried):
                    log.warning(
                        "webhook of run %s: its try outlived its lease; another node retries it",
                        delivery.run_id,
                    )
            except StoreError as exc:
                # The row comes due again once the claim's lease is over: it is tried again then.
                log.warning("webhook of run %s: its outcome could not be kept: %s", delivery.run_id, exc)
        finally:
            self._in_flight[delivery.key] -= 1
            if not self._in_flight[delivery.key]:
                del self._in_flight[delivery.key]
            slots.release()
            # A slot (or a key's share) is free: a due webhook it held back may go now.
            self.wake()

    async def _send(self, client: httpx.AsyncClient, delivery: Delivery) -> Tried:
        try:
            record = await self._store.get(delivery.run_id)
        except StoreError as exc:
            return self._failed(
                delivery, sender.Sent("unreachable", error=f"the run could not be read: {exc}")
            )
        if record is None or record.result is None:
            # Purged (past the store's retention) before its webhook went: there is nothing to send.
            return Tried(state="failed", error="the run is no longer stored")
        payload = sender.body(_payload(record.result))
        headers = sender.headers(delivery.run_id, payload, self._signing(delivery.key))
        started = time.perf_counter()
        sent = await sender.send(
            client, self._destinations, delivery.url, headers, payload, self._settings.timeout
        )
        metrics.WEBHOOK_SECONDS.observe(time.perf_counter() - started)
        metrics.WEBHOOK_ATTEMPTS.labels(outcome=sent.outcome).inc()
        if sent.outcome == "delivered":
            return Tried(state="delivered", status=sent.status)
        return self._failed(delivery, sent)

    def _failed(self, delivery: Delivery, sent: sender.Sent) -> Tried:
        """A try that did not deliver: tried again after a doubled, jittered wait, or given up."""
        log.info("webhook of run %s, try %d: %s", delivery.run_id, delivery.attempt, sent.error)
        if delivery.attempt >= self._settings.attempts:
            metrics.WEBHOOKS_FAILED.inc()
            log.warning(
                "webhook of run %s given up after %d tries: %s", delivery.run_id, delivery.attempt, sent.error
            )
            return Tried(state="failed", status=sent.status, error=sent.error)
        wait = self._settings.first_retry * 2 ** (delivery.attempt - 1)
        wait *= random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311  (spreading retries, not a secret)
        return Tried(state="pending", status=sent.status, error=sent.error, retry_in=wait)

    def _signing(self, key_name: str | None) -> tuple[Webhook, ...]:
        """The key's own secrets if it has some, else the server's."""
        key = None if key_name is None or self._key is None else self._key(key_name)
        if key is not None and key.webhook_secrets:
            return sender.signers(key.webhook_secrets, f"the key {key.name!r}'s webhook_secret")
        return self._signers


def _payload(result: RunResult) -> RunResult:
    """What a webhook carries of a run: its result, files as metadata (their URL, no content), and
    no webhook state (it would be stale by the time it arrives)."""
    files = [msgspec.structs.replace(with_url(result.id, entry), content=None) for entry in result.files]
    return msgspec.structs.replace(result, files=files, webhook=None)
