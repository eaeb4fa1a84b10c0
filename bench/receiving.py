"""The receiving side of bench/webhooks.py: loopback receivers (tests/support/receivers.py), one
that answers slowly, and what they took: each run's webhook by its id, delivery latency, repeats
and signatures."""

from __future__ import annotations

import sys
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from common import ROOT, Series
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

sys.path.insert(0, str(ROOT / "tests"))
from support.receivers import Received, Receiver

ARRIVAL_TIMEOUT = 60.0
"""Seconds to wait for the webhooks of runs that ended; one not there by then counts as missing."""


class SlowReceiver(Receiver):
    """A :class:`Receiver` that takes ``delay`` seconds over each answer, its arrival kept first."""

    def __init__(self, delay: float) -> None:
        """Listen on a free port of 127.0.0.1."""
        self.delay = delay
        super().__init__()

    def _record(self, request: Received) -> None:
        # The handler records a request before it answers: a sleep here delays the answer alone.
        super()._record(request)
        time.sleep(self.delay)


@dataclass
class Hook:
    """A receiver, the ``callback_url`` runs name to reach it, and the secret its webhooks are signed with."""

    receiver: Receiver
    url: str
    secret: str

    def arrivals(self, ids: Collection[str]) -> dict[str, list[Received]]:
        """The requests taken for each run of ``ids`` (by ``webhook-id``, the run's id), in order."""
        got: dict[str, list[Received]] = {}
        for request in self.receiver.received:
            if request.webhook_id in ids:
                got.setdefault(request.webhook_id, []).append(request)
        return got

    def wait(self, ids: Collection[str], timeout: float = ARRIVAL_TIMEOUT) -> None:
        """Block until a webhook of each run of ``ids`` arrived, or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        while len(self.arrivals(ids)) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.01)

    def deliveries(self, name: str, answered: dict[str, float]) -> Series:
        """Each run's delivery latency (its first webhook's arrival after its answer, ``answered``
        by id); missing webhooks are failures, repeats and bad signatures counted in ``extra``."""
        series = Series(name, "the 200 answer to the webhook's arrival")
        got = self.arrivals(answered)
        for run_id, at in answered.items():
            if run_id in got:
                series.samples_ms.append((got[run_id][0].at - at) * 1000)
            else:
                series.failures.append(f"{run_id}: no webhook in {ARRIVAL_TIMEOUT:.0f} s")
        everything = [request for requests in got.values() for request in requests]
        series.extra = {
            "repeats": len(everything) - len(got),
            "badly_signed": sum(not signed(request, self.secret) for request in everything),
            "tail_ms": tail_ms(answered.values(), [request.at for request in everything]),
        }
        return series


def signed(request: Received, secret: str) -> bool:
    """Whether ``request`` carries a valid, fresh Standard Webhooks signature by ``secret``."""
    try:
        Webhook(secret).verify(request.body, request.headers)
    except WebhookVerificationError:
        return False
    return True


def tail_ms(answers: Iterable[float], arrivals: Iterable[float]) -> float | None:
    """Milliseconds from the last answer to the last arrival (None without either)."""
    last_answer, last_arrival = max(answers, default=None), max(arrivals, default=None)
    if last_answer is None or last_arrival is None:
        return None
    return round((last_arrival - last_answer) * 1000, 1)
