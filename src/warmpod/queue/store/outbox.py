"""The webhook outbox both stores keep: a row per run that has a webhook, made with the run,
made due in the same transaction that makes the run final, and claimed by any node like a run."""

from __future__ import annotations

import msgspec

from warmpod.models import WebhookState, WebhookStatus

# Statements with ``?`` placeholders and ``{now}`` for the store's clock, which each store fills in
# (SQLite: julianday('now') in unix seconds; PostgreSQL: warmpod_now()).

ADD = "INSERT INTO webhooks (run_id, owner, url, state) VALUES (?, ?, ?, 'waiting')"
"""Kept with the run at its submission: ``(run_id, owner, url)``; not due until the run is final."""

DUE = "UPDATE webhooks SET state = 'pending', due = {now} WHERE run_id = ? AND state = 'waiting'"
"""Run in the transaction that makes the run final (any final status, by whoever writes it)."""

# The claim moves ``due`` on by the lease and counts the try: a node that dies in it leaves the row
# due again once the lease is over, and the count is the fence of the try's outcome. Oldest due
# first; the owners (keys) whose deliveries this node has enough of in flight are skipped.
CLAIM = (
    "UPDATE webhooks SET due = {now} + ?, attempts = attempts + 1 WHERE run_id = ("
    "SELECT run_id FROM webhooks WHERE state = 'pending' AND due <= {now}{skip} ORDER BY due LIMIT 1{lock}"
    ") AND state = 'pending' RETURNING run_id, owner, url, attempts"
)

RECORD = (
    "UPDATE webhooks SET state = ?, due = {now} + ?, last_status = ?, last_error = ?, "
    "delivered = CASE WHEN ? = 'delivered' THEN {now} END "
    "WHERE run_id = ? AND attempts = ? AND state = 'pending'"
)
"""A try's outcome: ``(state, retry_in or NULL, status, error, state, run_id, attempt)``; a try
whose row was claimed again since (its lease ran out) changes nothing."""

COLUMNS = "w.url, w.state, w.attempts, w.last_status, w.last_error, w.delivered, w.due"
"""What ``state`` reads, from ``webhooks w`` joined to the run (NULLs where it has none)."""

PURGE = "DELETE FROM webhooks WHERE run_id IN (SELECT id FROM runs WHERE finished < ?)"


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """A due webhook a node claimed: the run's, to ``url``, its ``attempt``-th try."""

    run_id: str
    key: str | None
    url: str
    attempt: int


class Tried(msgspec.Struct, frozen=True, kw_only=True):
    """How a try went, as the outbox keeps it."""

    state: WebhookStatus
    """``delivered``; ``failed``, given up; or ``pending``, tried again in ``retry_in`` seconds."""
    status: int | None = None
    error: str | None = None
    retry_in: float | None = None

    def params(self, delivery: Delivery) -> tuple[object, ...]:
        """``RECORD``'s parameters."""
        return (
            self.state,
            self.retry_in,
            self.status,
            self.error,
            self.state,
            delivery.run_id,
            delivery.attempt,
        )


def claim_query(skip: int, *, lock: str = "") -> str:
    """``CLAIM`` skipping ``skip`` owners (given as parameters after the lease and ``now``)."""
    owners = f" AND owner NOT IN ({', '.join('?' * skip)})" if skip else ""
    return CLAIM.replace("{skip}", owners).replace("{lock}", lock)


def delivery(row: tuple[object, ...]) -> Delivery:
    """A claim's ``RETURNING`` row."""
    run_id, owner, url, attempt = row
    assert isinstance(run_id, str)
    assert isinstance(owner, str)
    assert isinstance(url, str)
    assert isinstance(attempt, int)
    return Delivery(run_id=run_id, key=owner or None, url=url, attempt=attempt)


def state(columns: tuple[object, ...]) -> WebhookState | None:
    """What ``COLUMNS`` read of a run's webhook; None when it has none."""
    url, kind, attempts, last_status, last_error, delivered, due = columns
    if url is None:
        return None
    return msgspec.convert(
        {
            "url": url,
            "state": kind,
            "attempts": attempts,
            "last_status": last_status,
            "last_error": last_error,
            "delivered_at": delivered,
            "next_attempt_at": due if kind == "pending" else None,
        },
        WebhookState,
    )
