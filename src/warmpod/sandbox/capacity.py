"""How many sandboxes of each environment the pool aims for, and which to make or remove next."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from warmpod.backoff import Backoff
from warmpod.environments import EnvironmentSpec
from warmpod.models import EnvironmentPoolCounts
from warmpod.sandbox.sandbox import Sandbox
from warmpod.settings import PoolSettings

# Seconds since a run last found the pool empty before new containers are preloaded again.
PRELOAD_CALM = 5.0
# How fast the pool's view of the runs' mix follows the runs claimed (the weight of the latest).
DEMAND_WEIGHT = 1 / 8


@dataclass
class Kind:
    """One environment's sandboxes in the pool: those ready, busy and starting, the runs waiting
    for one, and how its runs ask (preloaded or not; its share of all the runs claimed)."""

    spec: EnvironmentSpec
    image: str
    share: float
    """Its share of the runs claimed, weighted toward the latest (``Pool.note_demand``)."""
    retry: Backoff
    """One delay for all its refill slots: failures in parallel slow them all down together."""
    ready: deque[Sandbox] = field(default_factory=deque)
    busy: set[Sandbox] = field(default_factory=set)
    starting: int = 0
    starting_warm: int = 0
    queue: deque[object] = field(default_factory=deque)
    """Leases waiting for one of its sandboxes, first come first served."""
    demand: float = 0.0
    """The share of its claimed runs that wanted a preloaded sandbox, weighted toward the latest."""
    serving: bool = False
    """One of its sandboxes was made."""
    failing: int = 0
    """Attempts to make one that failed in a row."""
    preload_failed: list[str] = field(default_factory=list)
    memory_floor: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def coming(self) -> int:
        """Ready and starting: what a lease may soon get."""
        return len(self.ready) + self.starting

    def counts(self, target: int) -> EnvironmentPoolCounts:
        return EnvironmentPoolCounts(
            ready=len(self.ready),
            busy=len(self.busy),
            starting=self.starting,
            target=target,
            min_warm=self.spec.min_warm,
            waiting=len(self.queue),
        )


class Capacity:
    """The pool's sizes: a ready target between the floor (``min_size``, or the environments'
    ``min_warm`` together if more) and ``max_size``, doubled when a run finds no sandbox of its
    environment and halved after ``shrink_after`` without; each environment's part of it (its
    ``min_warm``, plus its share of the rest, following the runs claimed); and whether a new
    sandbox preloads. The pool starts and removes containers; this says how many, of which kind.
    """

    def __init__(self, settings: PoolSettings, environments: Sequence[tuple[EnvironmentSpec, str]]) -> None:
        self.kinds = {
            spec.name: Kind(
                spec, image, share=1 / len(environments), retry=Backoff(0.5, settings.backoff_max)
            )
            for spec, image in environments
        }
        """Each environment's sandboxes, by name: the state the pool keeps, once."""
        self.closing = 0
        """Containers being removed: they may still run, and count toward ``max_size``."""
        floor, self.ceiling = settings.bounds
        self._min_warm = sum(kind.spec.min_warm for kind in self.kinds.values())
        self.floor = min(max(floor, self._min_warm), self.ceiling)
        self.target = self.floor
        """How many containers the pool keeps ready now."""
        self._last_shortage = self.resized = -math.inf

    def live(self) -> int:
        """Containers that exist or are being made: what ``max_size`` bounds."""
        return sum(kind.coming + len(kind.busy) for kind in self.kinds.values()) + self.closing

    def of(self, kind: Kind) -> int:
        """Ready containers ``kind`` aims for: its ``min_warm``, and its share of the rest."""
        extra = max(0, self.target - self._min_warm)
        return kind.spec.min_warm + math.floor(extra * kind.share + 0.5)

    def neediest(self) -> Kind | None:
        """The environment the next container is made for: one a run waits for first, then the
        one furthest below its target; None when each has what it aims for."""
        best, best_gap = None, (False, 0)
        for kind in self.kinds.values():
            # One of each is made at start whatever its target: the self-test probes every one.
            want = max(self.of(kind), len(kind.queue), 0 if kind.serving else 1)
            gap = (len(kind.queue) > kind.coming, want - kind.coming)
            if gap[1] > 0 and gap > best_gap:
                best, best_gap = kind, gap
        return best

    def spare(self) -> Kind | None:
        """With the pool full, the environment one of whose idle containers (above its
        ``min_warm``) should make room for a run that waits with none of its own sandboxes coming.
        Only for a waiting run: a container removed unused is a start wasted, so shares that
        move do not move containers by themselves (shrinking and refills do)."""
        if self.closing or self.live() < self.ceiling:
            return None  # room is coming, or there already is some
        needy = self.neediest()
        if needy is None or len(needy.queue) <= needy.coming:
            return None
        spare = [
            other
            for other in self.kinds.values()
            if other is not needy and len(other.ready) > other.spec.min_warm
        ]
        return max(spare, key=lambda other: len(other.ready) - self.of(other)) if spare else None

    def grow(self) -> None:
        """A run found no sandbox of its environment ready."""
        self.target = min(self.target * 2, self.ceiling)
        self._last_shortage = self.resized = anyio.current_time()

    def shrink(self) -> None:
        """``shrink_after`` passed without a shortage: halve the target."""
        self.target = max(self.target // 2, self.floor)
        self.resized = anyio.current_time()

    def preload_next(self, kind: Kind) -> bool:
        """Whether the next container of ``kind`` should preload."""
        # After a failed start the next one is bare, so a preload that crashes or hangs the
        # interpreter cannot keep the pool empty.
        if not kind.spec.preload or kind.failing:
            return False
        # While the pool keeps up, CPU is to spare and every run is served warm.
        if anyio.current_time() - self._last_shortage > PRELOAD_CALM and not kind.queue:
            return True
        # Once CPU is the limit, preloading serves only the runs that import libraries: keep the
        # preloaded share of the containers coming in step with theirs.
        warm = sum(sandbox.warm for sandbox in kind.ready) + kind.starting_warm
        return warm < round(kind.demand * (kind.coming + 1))

    def note_demand(self, environment: str, warm: bool) -> bool:
        """A run of ``environment`` was claimed: ``warm``, whether it wanted a preloaded sandbox.
        Whether that moved an environment's target (the pool then has containers to move)."""
        claimed = self.kinds[environment]
        claimed.demand += (float(warm) - claimed.demand) * DEMAND_WEIGHT
        if len(self.kinds) == 1:
            return False
        before = [self.of(kind) for kind in self.kinds.values()]
        for kind in self.kinds.values():
            kind.share += (float(kind is claimed) - kind.share) * DEMAND_WEIGHT
        return before != [self.of(kind) for kind in self.kinds.values()]
