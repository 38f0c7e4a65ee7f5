"""The backends of a balancer: each indexer as the registry knows it.

Rules of this module:

* No I/O and no decisions about health or picks: the registry drives these
  classes, with the time it is given.
* The *effective load* of an entry (design.md, "Load") is its freshest reported
  load, plus the proxied requests in flight to it, plus the ``/v1/route``
  answers still counted as load (the registry says which): ``Entry.load``.
* A ``Flight`` holds the very entry it was counted on, so that finishing it
  never touches an entry that replaced it.

Named for the strategies' word, *backend*, to stay apart from ``indexer`` (the
indexer's server) and ``entries`` (how the indexer stores an item).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from p2plb.health import Health

__all__ = ["STATES", "Entry", "Flight", "LatencyWindow"]

# What an indexer may report itself as: caught up, or still catching up.
STATES = ("serving", "syncing")


class LatencyWindow:
    """The last 1024 latencies of successful requests, for p50 and p99.

    Fixed memory (a ring); the percentiles sort a copy, which costs a few
    microseconds and happens only when someone asks for status.
    """

    SIZE = 1024

    def __init__(self) -> None:
        self._samples: list[float] = []
        self._next = 0

    def add(self, seconds: float) -> None:
        if len(self._samples) < self.SIZE:
            self._samples.append(seconds)
        else:
            self._samples[self._next] = seconds
            self._next = (self._next + 1) % self.SIZE

    def percentiles(self) -> tuple[float | None, float | None]:
        """``(p50, p99)`` in ms by nearest rank; ``None`` with no samples."""
        if not self._samples:
            return None, None
        ordered = sorted(self._samples)

        def rank(q: float) -> float:
            index = max(0, math.ceil(q * len(ordered)) - 1)
            return round(ordered[index] * 1000.0, 2)

        return rank(0.50), rank(0.99)

    def __len__(self) -> int:
        return len(self._samples)


@dataclass(eq=False)
class Entry:
    """One registered indexer and what the balancer knows about it."""

    id: str
    address: str
    capacity: int
    zone: str | None
    instance: str | None
    state: str
    reported_load: int
    registered_at: float
    last_report: float | None
    health: Health
    requests: int = 0  # served, as the indexer reports it (any path)
    routed: int = 0  # proxied or answered on /v1/route by this balancer
    errors: int = 0  # proxied requests that failed
    inflight: int = 0  # proxied requests not finished yet
    inflight_at_report: int = 0  # of those, the ones the last load figure included
    # /v1/route answers still counted as load, oldest first: (number, when).
    lookaside: deque[tuple[int, float]] = field(default_factory=deque)
    served_seen: int | None = None  # last cumulative "served" counter
    # From the state file and not heard from since: address and instance are
    # what the file says, not what the indexer told this balancer process.
    restored: bool = False
    service: float | None = None  # recent service time in seconds, as reported
    latency: LatencyWindow = field(default_factory=LatencyWindow)

    @property
    def load(self) -> int:
        """Effective load: reported + in flight + recent lookaside answers.

        The reported figure already holds the requests this balancer had in
        flight when it was taken; counting them again made the estimate run
        high by up to the in-flight count (found by the simulator: +16% mean
        latency for least_load with 10 s reports).
        """
        others = max(0, self.reported_load - self.inflight_at_report)
        return others + self.inflight + self.recent

    @property
    def recent(self) -> int:
        """How many ``/v1/route`` answers still count as load."""
        return len(self.lookaside)

    @property
    def load_percentage(self) -> float:
        return round(min(100.0, 100.0 * self.load / self.capacity), 1)

    def status(self, now: float) -> dict[str, Any]:
        """This indexer as ``GET /v1/status`` shows it (design.md)."""
        age = None if self.last_report is None else round(now - self.last_report, 1)
        p50, p99 = self.latency.percentiles()
        return {
            "id": self.id,
            "address": self.address,
            "zone": self.zone,
            "capacity": self.capacity,
            "current_load": self.load,
            "load_percentage": self.load_percentage,
            "healthy": self.health.healthy,
            "state": self.state,
            "health_reason": self.health.describe(now),
            "last_report_age_s": age,
            "requests": self.requests,
            "routed": self.routed,
            "errors": self.errors,
            "latency_ms": {"p50": p50, "p99": p99},
        }

    def route_row(self) -> dict[str, Any]:
        """This indexer as a row of ``GET /v1/routing-table``."""
        return {
            "id": self.id,
            "address": self.address,
            "capacity": self.capacity,
            "load": self.load,
            "state": self.state,
            "healthy": self.health.healthy,
            "zone": self.zone,
            "service_ms": self.service_ms,
        }

    @property
    def service_ms(self) -> float | None:
        return None if self.service is None else round(self.service * 1000.0, 3)


class Flight:
    """A proxied request in flight, from ``Registry.begin`` to ``finish``.

    It remembers the very entry it was counted on, so finishing it twice, or
    after the indexer was removed or replaced, cannot push a count below zero
    or onto the wrong entry.
    """

    __slots__ = ("done", "entry")

    def __init__(self, entry: Entry | None) -> None:
        self.entry = entry
        self.done = entry is None

    @property
    def id(self) -> str | None:
        return None if self.entry is None else self.entry.id
