"""Open-loop load for ``p2plb bench``: Poisson arrivals, latency from the schedule.

Rules of this module:

* The whole schedule is drawn before the run: ``arrivals`` gives the offsets,
  in seconds from the start, of a Poisson process at ``rate``, raised during
  bursts.  Nothing about the run changes it, so every contender of a bench can
  face the same requests at the same moments (same seed, same schedule).
* ``OpenLoop.run`` starts request ``i`` at ``start + offset[i]`` whether or not
  earlier requests have finished.  At most ``limit`` are in flight (one
  connection each); the rest wait for a free one, first come first served.
* A request's latency runs from its *scheduled* arrival to its answer.  Time
  spent waiting for a connection, or because the generator itself fell
  behind, counts as latency: it is queueing the system under test caused, or
  a generator too slow to tell, and either way it must not vanish.
* ``send`` answers ``True`` for a good answer and ``False`` for an error; it
  must not raise.  The clock and the sleep are passed in, so tests run the
  scheduler on a fake clock.

Why open loop.  A closed-loop generator (N workers, each sending its next
request when the last one answers) slows down exactly when the system does:
while a server stalls, the requests that would have arrived are simply never
sent, so the stall shows up in one sample instead of in every request that
would have queued behind it.  This is the *coordinated omission* Gil Tene
describes ("How NOT to Measure Latency", 2015), and it flatters tail latency
most when balancing is worst.  Users of a P2P index arrive independently of
one another, which is what a Poisson schedule models; measuring from the
scheduled time keeps the queueing they would meet in the figures.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "Bursts",
    "OpenLoop",
    "Sample",
    "arrivals",
    "percentile",
]

Send = Callable[[], Awaitable[bool]]


@dataclass(frozen=True)
class Bursts:
    """For ``length`` seconds in every ``period`` the rate is ``factor`` times."""

    period: float
    length: float
    factor: float

    def base(self, mean_rate: float) -> float:
        """The rate outside bursts that keeps the mean at ``mean_rate``."""
        busy = self.length / self.period
        return mean_rate / (1.0 + busy * (self.factor - 1.0))


def arrivals(
    rate: float,
    duration: float,
    rng: random.Random,
    bursts: Bursts | None = None,
) -> list[float]:
    """Poisson arrival offsets in ``[0, duration)``, ``rate`` per second on average.

    With bursts the process is inhomogeneous; it is drawn by thinning (Lewis and
    Shedler, 1979): candidates at the peak rate, each kept with probability
    rate(t) / peak.
    """
    if rate <= 0 or duration <= 0:
        return []
    if bursts is None:
        base = peak = rate
    else:
        base = bursts.base(rate)
        peak = base * max(1.0, bursts.factor)

    offsets: list[float] = []
    now = 0.0
    while True:
        now += rng.expovariate(peak)
        if now >= duration:
            return offsets
        if bursts is not None:
            bursting = now % bursts.period < bursts.length
            here = base * bursts.factor if bursting else base
            if rng.random() * peak >= here:
                continue
        offsets.append(now)


@dataclass(frozen=True)
class Sample:
    """One request: when it was due (seconds from the start), how it went."""

    scheduled: float
    latency: float  # seconds, from ``scheduled`` to the answer
    ok: bool


class OpenLoop:
    """Sends one request per scheduled arrival, never waiting for answers."""

    def __init__(
        self,
        send: Send,
        *,
        limit: int = 256,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.send = send
        self.limit = limit
        self.clock = clock
        self.sleep = sleep
        self.late = 0.0  # the furthest behind schedule a request was started, s

    async def run(self, schedule: Sequence[float]) -> list[Sample]:
        """Every arrival of ``schedule``, sent on time; the samples in order sent."""
        connections = asyncio.Semaphore(self.limit)
        samples: list[Sample] = []
        pending: set[asyncio.Task[None]] = set()
        start = self.clock()

        async def one(offset: float) -> None:
            async with connections:
                ok = await self.send()
            samples.append(Sample(offset, self.clock() - (start + offset), ok))

        for offset in schedule:
            delay = start + offset - self.clock()
            if delay > 0:
                await self.sleep(delay)
            self.late = max(self.late, self.clock() - (start + offset))
            task = asyncio.create_task(one(offset))
            pending.add(task)
            task.add_done_callback(pending.discard)

        # Let the slowest requests answer: cutting them off would hide the tail.
        while pending:
            await asyncio.gather(*pending)
        return samples


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted values; NaN when there are none."""
    if not ordered:
        return math.nan
    rank = math.ceil(fraction * len(ordered))
    return ordered[min(len(ordered), max(rank, 1)) - 1]
