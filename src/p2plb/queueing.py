"""The queueing model behind ``p2plb simulate``: indexers, dispatchers, events.

Rules of this module:

* No I/O, no threads, no clock: time is the simulated time of the event being
  handled, and every random draw comes from a ``random.Random`` seeded from
  the run's seed, one per stream.  The same ``Model``, policy and seed give
  the same ``Outcome``, bit for bit.
* An indexer of capacity c serves up to c requests at once and queues the rest
  behind them, first come first served, without limit.  A request's service
  time is drawn when it arrives; an indexer that is slow when the request
  starts multiplies it by ``slow_factor``.
* Arrivals, service times and report phases come from generators that no
  policy touches, so every policy sees the same requests, at the same times,
  with the same sizes (common random numbers): the differences between
  policies are not buried under the noise of independent runs.
* A product strategy is fed the way the registry feeds it: ``set(id, capacity,
  estimate, service)`` on every report, dispatch and completion, where the
  estimate is the indexer's last reported load plus, if the model counts
  them, the requests this balancer sent there that have not finished, and
  ``service`` is the indexer's recent service time as its answers and reports
  carry it (``p2plb.servicetime``, on the simulated clock).
* Arrivals stop at ``duration`` and the run goes on until every request has
  finished, so no latency is cut short; requests that arrive before ``warmup``
  are served but not measured.
"""

from __future__ import annotations

import heapq
import itertools
import random
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from p2plb import strategies
from p2plb.servicetime import ServiceTime
from p2plb.strategies import Strategy

__all__ = [
    "REFERENCE_POLICIES",
    "Model",
    "Outcome",
    "run",
    "stream",
]

#: Policies that are yardsticks, not strategies of the product.
REFERENCE_POLICIES = ("unweighted_rr", "ideal_jsq", "central_queue")

_ARRIVAL, _DEPARTURE, _REPORT = 0, 1, 2


@dataclass(frozen=True)
class Model:
    """One cluster and its workload, everything a run needs but the policy."""

    capacities: tuple[int, ...]
    rate: float  # mean arrivals per second, bursts included
    service_time: float  # mean, seconds
    report_interval: float
    count_inflight: bool
    duration: float
    warmup: float
    burst_period: float = 0.0  # 0: no bursts
    burst_length: float = 0.0
    burst_factor: float = 1.0  # arrival rate during a burst over the rate outside
    slow: int | None = None  # the indexer that is slow every other period
    slow_period: float = 0.0
    slow_factor: float = 1.0
    load_header: bool = False  # every answer carries the indexer's load


@dataclass(frozen=True)
class Outcome:
    """What one run of one policy measured, after the warm-up."""

    latencies: list[float]  # seconds, sorted
    requests: list[int]  # per indexer
    peak_queues: list[int]  # per indexer: most requests waiting behind the slots
    peak_central: int  # the central queue's, for ``central_queue``
    completed: int  # between warmup and duration


def stream(seed: int, name: str) -> random.Random:
    """The generator of one source of randomness, named ``name``, for ``seed``.

    A string seed is hashed with SHA-512, so streams of the same seed are
    independent of each other and of ``PYTHONHASHSEED``.
    """
    return random.Random(f"p2plb-simulate:{seed}:{name}")


def _streams(seed: int, policy: str) -> dict[str, random.Random]:
    """One generator per source of randomness; only ``choices`` depends on policy."""
    return {name: stream(seed, name) for name in ("arrivals", "service", "reports")} | {
        "choices": stream(seed, f"choices:{policy}")
    }


# dispatchers -------------------------------------------------------------------


class _Dispatcher(ABC):
    """Where the next request goes; told of every dispatch, completion, report.

    Every dispatcher chooses; the hooks do nothing by default, so a dispatcher
    listens only to what it uses.
    """

    wants_reports = False

    @abstractmethod
    def choose(self) -> int:
        """The index of the indexer the next request goes to."""

    def sent(self, index: int) -> None:
        """A request was sent to ``index``."""
        return None  # by default not listened to

    def done(self, index: int, service: float | None) -> None:
        """A request sent to ``index`` finished; its answer says ``service``."""
        return None  # by default not listened to

    def report(self, index: int, load: int, service: float | None) -> None:
        """``index`` reported serving and queueing ``load`` requests."""
        return None  # by default not listened to


class _Balancer(_Dispatcher):
    """A product strategy, holding the balancer's estimate of every indexer."""

    wants_reports = True

    def __init__(
        self, strategy: Strategy, capacities: Sequence[int], count_inflight: bool
    ) -> None:
        self.strategy = strategy
        self.capacities = capacities
        self.count_inflight = count_inflight
        self.ids = [f"i{index}" for index in range(len(capacities))]
        self.where = {id: index for index, id in enumerate(self.ids)}
        self.reported = [0] * len(capacities)
        self.inflight = [0] * len(capacities)
        self.inflight_at_report = [0] * len(capacities)
        self.service: list[float | None] = [None] * len(capacities)
        for index, id in enumerate(self.ids):
            strategy.set(id, capacities[index], 0)

    def choose(self) -> int:
        id = self.strategy.pick()
        if id is None:
            raise RuntimeError(f"{self.strategy!r} picked nothing")
        return self.where[id]

    def sent(self, index: int) -> None:
        self.inflight[index] += 1
        self._tell(index)

    def done(self, index: int, service: float | None) -> None:
        self.inflight[index] -= 1
        self.service[index] = service
        self._tell(index)

    def report(self, index: int, load: int, service: float | None) -> None:
        self.reported[index] = load
        self.inflight_at_report[index] = self.inflight[index]
        self.service[index] = service
        self._tell(index)

    def _tell(self, index: int) -> None:
        # The balancer's estimate, as backends.Entry.load computes it: the
        # report already holds what was in flight when it was taken.
        load = self.reported[index]
        if self.count_inflight:
            others = max(0, load - self.inflight_at_report[index])
            load = others + self.inflight[index]
        id, capacity = self.ids[index], self.capacities[index]
        self.strategy.set(id, capacity, load, self.service[index])


class _UnweightedRoundRobin(_Dispatcher):
    """Every indexer in turn, blind to capacity, from a random starting point."""

    def __init__(self, count: int, rng: random.Random) -> None:
        self.count = count
        self.next = rng.randrange(count)

    def choose(self) -> int:
        index = self.next
        self.next = (index + 1) % self.count
        return index


class _IdealJoinShortestQueue(_Dispatcher):
    """The least expected delay, from the true number of requests at each indexer.

    A new request at an indexer holding n requests on c slots starts at once if
    n < c, and otherwise waits for n - c + 1 of them to finish at rate c / s:
    ordering indexers by (n + 1) / c puts every free slot first and then the
    shortest expected wait.  With equal capacities this is plain join the
    shortest queue.  Its count is exact because this dispatcher is the only
    source of requests.  A heap with lazy deletion keeps the minimum; a random
    second key breaks ties.
    """

    def __init__(self, capacities: Sequence[int], rng: random.Random) -> None:
        self.capacities = capacities
        self.rng = rng
        self.held = [0] * len(capacities)
        self.gen = [0] * len(capacities)
        self.heap: list[tuple[float, float, int, int]] = []
        for index in range(len(capacities)):
            self._push(index)

    def choose(self) -> int:
        while True:
            _, _, gen, index = self.heap[0]
            if gen == self.gen[index]:
                return index
            heapq.heappop(self.heap)

    def sent(self, index: int) -> None:
        self.held[index] += 1
        self._push(index)

    def done(self, index: int, service: float | None) -> None:
        self.held[index] -= 1
        self._push(index)

    def _push(self, index: int) -> None:
        self.gen[index] += 1
        key = (self.held[index] + 1) / self.capacities[index]
        row = (key, self.rng.random(), self.gen[index], index)
        heapq.heappush(self.heap, row)
        if len(self.heap) > 4 * len(self.gen) + 64:
            self.heap = [row for row in self.heap if row[2] == self.gen[row[3]]]
            heapq.heapify(self.heap)


# the event loop ----------------------------------------------------------------


def _arrival_times(model: Model, rng: random.Random) -> Iterator[float]:
    """Poisson arrival times in [0, duration), the rate raised during bursts.

    Thinning (Lewis and Shedler, 1979): candidates come at the peak rate and
    each is kept with probability rate(t) / peak, which yields a Poisson
    process of rate rate(t) exactly.
    """
    bursts = model.burst_period > 0 and model.burst_factor != 1.0
    if bursts:
        busy = model.burst_length / model.burst_period
        base = model.rate / (1.0 + busy * (model.burst_factor - 1.0))
        peak = base * max(1.0, model.burst_factor)
    else:
        base = peak = model.rate

    now = 0.0
    while True:
        now += rng.expovariate(peak)
        if now >= model.duration:
            return
        if bursts:
            bursting = now % model.burst_period < model.burst_length
            rate = base * model.burst_factor if bursting else base
            if rng.random() * peak >= rate:
                continue
        yield now


def run(model: Model, policy: str, seed: int) -> Outcome:
    """Simulate ``policy`` on ``model``: a product strategy or a reference policy.

    The loop below handles three kinds of event, earliest first, ties in the
    order they were scheduled.  An arrival schedules the next one (from a
    generator no policy touches), draws its service time, asks the dispatcher
    for an indexer and either starts there or joins its queue.  A departure
    frees a slot, which the head of that indexer's queue takes at once, and
    tells the dispatcher (with the load left behind, if answers carry a
    ``P2PLB-Load`` header).  A report hands the indexer's true load, serving
    plus queued, to the dispatcher, and comes again ``report_interval`` later.
    ``central_queue`` has no dispatcher: a request takes any free slot of any
    indexer (uniformly among free slots), or waits in one shared FIFO queue
    that the next slot to free up serves, which is the M/M/c system with c the
    total capacity (Harchol-Balter, "Performance Modeling and Design of
    Computer Systems", 2013, chapter 14).
    """
    rngs = _streams(seed, policy)
    capacities = model.capacities
    count = len(capacities)
    dispatcher = _dispatcher(model, policy, rngs["choices"])
    choices = rngs["choices"]
    service = rngs["service"]
    warmup, duration = model.warmup, model.duration
    mean = model.service_time
    slow, slow_period, slow_factor = model.slow, model.slow_period, model.slow_factor

    busy = [0] * count
    queues: list[deque[tuple[float, float]]] = [deque() for _ in range(count)]
    requests = [0] * count
    peak_queues = [0] * count
    waiting: deque[tuple[float, float]] = deque()  # central_queue only
    peak_central = 0
    free = [index for index in range(count) for _ in range(capacities[index])]
    latencies: list[float] = []
    completed = 0
    means = [ServiceTime() for _ in range(count)]  # what each indexer reports

    # (time, order, kind, indexer, born, how long it was served: departures)
    events: list[tuple[float, int, int, int, float, float]] = []
    order = itertools.count()
    arrivals = _arrival_times(model, rngs["arrivals"])
    phases = [rngs["reports"].uniform(0, model.report_interval) for _ in capacities]

    def start(index: int, now: float, born: float, size: float) -> None:
        busy[index] += 1
        if index == slow and int(now / slow_period) % 2:
            size *= slow_factor
        row = (now + size, next(order), _DEPARTURE, index, born, size)
        heapq.heappush(events, row)

    first = next(arrivals, None)
    if first is not None:
        heapq.heappush(events, (first, next(order), _ARRIVAL, -1, first, 0.0))
    if dispatcher is not None and dispatcher.wants_reports:
        for index, phase in enumerate(phases):
            if phase < duration:
                row = (phase, next(order), _REPORT, index, phase, 0.0)
                heapq.heappush(events, row)

    while events:
        now, _, kind, index, born, served = heapq.heappop(events)

        if kind == _ARRIVAL:
            following = next(arrivals, None)
            if following is not None:
                row = (following, next(order), _ARRIVAL, -1, following, 0.0)
                heapq.heappush(events, row)
            size = service.expovariate(1.0 / mean)
            measured = now >= warmup

            if dispatcher is None:  # central_queue
                if free:
                    slot = choices.randrange(len(free))
                    free[slot], free[-1] = free[-1], free[slot]
                    index = free.pop()
                    requests[index] += measured
                    start(index, now, now, size)
                else:
                    waiting.append((now, size))
                    if measured and len(waiting) > peak_central:
                        peak_central = len(waiting)
                continue

            index = dispatcher.choose()
            dispatcher.sent(index)
            requests[index] += measured
            if busy[index] < capacities[index]:
                start(index, now, now, size)
            else:
                queue = queues[index]
                queue.append((now, size))
                if measured and len(queue) > peak_queues[index]:
                    peak_queues[index] = len(queue)

        elif kind == _DEPARTURE:
            busy[index] -= 1
            means[index].add(served, now)
            if born >= warmup:
                latencies.append(now - born)
            if warmup <= now < duration:
                completed += 1

            if dispatcher is None:  # central_queue
                if waiting:
                    head_born, size = waiting.popleft()
                    requests[index] += head_born >= warmup
                    start(index, now, head_born, size)
                else:
                    free.append(index)
            else:
                if queues[index]:
                    head_born, size = queues[index].popleft()
                    start(index, now, head_born, size)
                dispatcher.done(index, means[index].seconds)
                if model.load_header:
                    load = busy[index] + len(queues[index])
                    dispatcher.report(index, load, means[index].seconds)

        elif dispatcher is not None:  # a report: only dispatchers ask for them
            load = busy[index] + len(queues[index])
            dispatcher.report(index, load, means[index].seconds)
            following_report = now + model.report_interval
            if following_report < duration:
                row = (following_report, next(order), _REPORT, index, now, 0.0)
                heapq.heappush(events, row)

    latencies.sort()
    return Outcome(latencies, requests, peak_queues, peak_central, completed)


def _dispatcher(model: Model, policy: str, rng: random.Random) -> _Dispatcher | None:
    """The dispatcher for ``policy``; ``None`` for ``central_queue``, which has none.

    A product strategy is looked up through ``strategies.make_strategy`` at
    every run, so the simulation drives whatever class the balancer would.
    """
    if policy == "unweighted_rr":
        return _UnweightedRoundRobin(len(model.capacities), rng)
    if policy == "ideal_jsq":
        return _IdealJoinShortestQueue(model.capacities, rng)
    if policy == "central_queue":
        return None
    strategy = strategies.make_strategy(policy, rng)
    return _Balancer(strategy, model.capacities, model.count_inflight)
