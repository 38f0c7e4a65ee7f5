"""The five ways of picking an indexer, each sublinear in the number of indexers.

Rules of this module:

* A strategy holds the *eligible* backends only; the caller (the registry, the
  routed client) adds and removes them as health and state change, and calls
  ``set`` again whenever a backend's capacity, load or service time changes.
* ``pick`` never changes what it holds and costs the same at 10 backends and at
  10,000: every structure below is chosen so that set, discard and pick are
  O(1) or O(log n).  A full scan happens only when a strategy is rebuilt.
* Ties never go to the first registered backend.  Every tie, and every near-tie
  ``least_load`` and ``least_latency`` treat as one, is broken with the
  ``random.Random`` passed in, so a seeded generator makes a strategy fully
  reproducible in tests.
* Load is relative: ``load / capacity``, where capacity is how many requests a
  backend serves at once.

Why these five.  ``least_load`` sends each request where it will wait least, if
the loads it sees are fresh and every backend works at the same speed.  When
loads are stale (a routed client refreshes its table once a second) many
pickers rush to the same idle backend; ``p2c`` samples two backends and takes
the less loaded, which Mitzenmacher showed ("The Power of Two Choices in
Randomized Load Balancing", IEEE TPDS 2001) keeps the maximum load
exponentially closer to the mean than one random choice while being far less
prone to that herding.  When backends differ in speed, or one slows down for a
while (a noisy neighbour, a compaction), ``least_latency`` weighs each one's
load by its recent service time.  ``round_robin`` ignores load and spreads
requests in proportion to capacity, as evenly in time as possible, with an
earliest-deadline-first scheduler over virtual time, the idea behind stride
scheduling (Waldspurger and Weihl, 1995).  ``random`` is the stateless baseline:
weighted by capacity, with no memory to go stale.
"""

from __future__ import annotations

import heapq
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from typing import ClassVar

from p2plb.buckets import Bag, LowestIndex
from p2plb.config import STRATEGY_NAMES
from p2plb.errors import RequestError

__all__ = [
    "STRATEGIES",
    "LeastLatency",
    "LeastLoad",
    "PowerOfTwo",
    "RoundRobin",
    "Strategy",
    "WeightedRandom",
    "make_strategy",
    "pick_outside",
]


class Strategy(ABC):
    """A set of eligible backends, each with a capacity and a load, and a rule to
    pick one of them."""

    name: ClassVar[str]

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    @abstractmethod
    def set(
        self, id: str, capacity: int, load: float, service: float | None = None
    ) -> None:
        """Add ``id``, or update its capacity, load and service time.

        ``service`` is the backend's recent service time in seconds, ``None``
        if unknown; only ``least_latency`` looks at it.
        """

    @abstractmethod
    def discard(self, id: str) -> None:
        """Remove ``id``; nothing happens if it is not here."""

    @abstractmethod
    def pick(self) -> str | None:
        """The chosen backend, or ``None`` when there is none."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, id: object) -> bool: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self)} backends>"


def _check(id: str, capacity: int, load: float) -> None:
    if capacity < 1:
        raise ValueError(f"capacity of {id!r} must be >= 1, got {capacity}")
    if not load >= 0:  # also rejects NaN
        raise ValueError(f"load of {id!r} must be >= 0, got {load}")


# least_load and least_latency -----------------------------------------------------

#: Relative loads closer than this are a near-tie, broken at random.
BUCKET_WIDTH = 0.01
#: Relative loads at or above this (ten times capacity) leave the buckets.
OVERFLOW_RATIO = 10.0
_BUCKETS = round(OVERFLOW_RATIO / BUCKET_WIDTH)


def _load_bucket(ratio: float) -> int:
    if ratio >= OVERFLOW_RATIO:
        return -1
    return min(int(ratio / BUCKET_WIDTH), _BUCKETS - 1)


class LeastLoad(Strategy):
    """The backend with the lowest ``load / capacity``; near-ties at random.

    Relative loads in [0, 10) fall into buckets 0.01 wide of a ``LowestIndex``,
    so a pick is constant work; backends ten times over capacity wait in its
    overflow heap.
    """

    name = "least_load"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._index = LowestIndex(rng, _load_bucket, _BUCKETS)

    def set(
        self, id: str, capacity: int, load: float, service: float | None = None
    ) -> None:
        _check(id, capacity, load)
        self._index.place(id, load / capacity)

    def discard(self, id: str) -> None:
        self._index.remove(id)

    def pick(self) -> str | None:
        return self._index.lowest()

    def ratio(self, id: str) -> float | None:
        """The relative load this strategy holds for ``id``, if it holds it."""
        return self._index.key(id)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, id: object) -> bool:
        return id in self._index


#: Expected delays within this fraction of each other are a near-tie.
LATENCY_TIE = 0.02
#: The smallest expected delay told apart from zero, in seconds.
_DELAY_FLOOR = 1e-6
_LOG_STEP = math.log1p(LATENCY_TIE)
#: The unknown service time is re-derived once the known mean moved this much.
_PRIOR_DRIFT = 0.05


class LeastLatency(Strategy):
    """The backend where a new request should finish soonest.

    Its expected delay is ``service x (load + 1) / capacity``: the backend's
    recent service time (``p2plb.servicetime``, measured by the indexer
    itself) times the requests each of its slots will have, this one included.
    Among equally fast backends this is ``least_load`` (with the new request
    counted, so an idle large backend goes before an idle small one); a
    backend five times slower than the others gets a request only once theirs
    would wait five times as long.  ``least_load`` alone keeps sending to a
    slowed backend as long as it has free slots, and learns of the slowdown
    only from the queue that then builds up there; expected delay ("shortest
    expected delay", Harchol-Balter, "Performance Modeling and Design of
    Computer Systems", 2013, chapter 24, applied with measured rather than
    known service rates) sees it on the next answer.

    Delays are bucketed on a log scale, 2 % wide, from 1 µs up, so near-ties
    are broken at random as in ``least_load``.  A backend whose service time is
    not known yet (it has answered nothing) is taken to be as fast as the mean
    of the known ones: neither flooded as if free nor starved as if slow.  Its
    delay is re-derived when that mean moves by 5 %, which costs one set per
    such backend, and such backends are few (only those that never answered).
    """

    name = "least_latency"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._index = LowestIndex(rng, _delay_bucket, _BUCKETS)
        self._service: dict[str, float] = {}  # known service times, seconds
        self._service_sum = 0.0
        self._unknown: dict[str, tuple[int, float]] = {}  # capacity, load
        self._prior_used = 1.0

    def set(
        self, id: str, capacity: int, load: float, service: float | None = None
    ) -> None:
        _check(id, capacity, load)
        if service is not None and not 0.0 <= service < math.inf:
            raise ValueError(f"service time of {id!r} must be >= 0, got {service}")

        self._forget_service(id)
        if service is None:
            self._unknown[id] = (capacity, load)
            self._index.place(id, self._delay(self._prior_used, capacity, load))
        else:
            self._service[id] = service
            self._service_sum += service
            self._index.place(id, self._delay(service, capacity, load))
        self._refresh_prior()

    def discard(self, id: str) -> None:
        self._forget_service(id)
        self._index.remove(id)
        self._refresh_prior()

    def pick(self) -> str | None:
        return self._index.lowest()

    def delay(self, id: str) -> float | None:
        """The expected delay this strategy holds for ``id``, if it holds it."""
        return self._index.key(id)

    def service_of(self, id: str) -> float:
        """The service time taken for ``id``: its own if known, else the prior."""
        return self._service.get(id, self._prior_used)

    @staticmethod
    def _delay(service: float, capacity: int, load: float) -> float:
        return service * (load + 1.0) / capacity

    def _forget_service(self, id: str) -> None:
        self._unknown.pop(id, None)
        known = self._service.pop(id, None)
        if known is not None:
            self._service_sum -= known
            if not self._service:
                self._service_sum = 0.0  # no float residue once all are gone

    def _refresh_prior(self) -> None:
        if not self._service:
            return
        prior = self._service_sum / len(self._service)
        if abs(prior - self._prior_used) <= _PRIOR_DRIFT * self._prior_used:
            return
        self._prior_used = prior
        for id, (capacity, load) in self._unknown.items():
            self._index.place(id, self._delay(prior, capacity, load))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, id: object) -> bool:
        return id in self._index


def _delay_bucket(delay: float) -> int:
    if delay <= _DELAY_FLOOR:
        return 0
    index = int(math.log(delay / _DELAY_FLOOR) / _LOG_STEP)
    return index if index < _BUCKETS else -1


# round_robin -------------------------------------------------------------------

_GOLDEN = (math.sqrt(5) - 1) / 2
# Virtual time is moved back towards zero past this, so that adding 1/capacity
# to it keeps full precision however long the balancer runs.
_REBASE_AFTER = 1e6


class _Turn:
    __slots__ = ("capacity", "gen", "key", "start", "taken")

    def __init__(self, capacity: int, start: float, gen: int, key: float) -> None:
        self.capacity = capacity
        self.start = start
        self.taken = 0
        self.gen = gen
        self.key = key

    def deadline(self) -> float:
        # Computed from the start rather than accumulated, so rounding errors do
        # not pile up over thousands of turns.
        return self.start + self.taken / self.capacity


class RoundRobin(Strategy):
    """Capacity-weighted turns, spread evenly in time; load is ignored.

    Earliest deadline first over virtual time: a backend of capacity c is due
    every 1/c units, ``pick`` takes the earliest due (a heap with lazy
    deletion) and moves virtual time to its deadline.  Over any c_1 + ... + c_n
    consecutive picks each backend gets exactly its capacity, and in between
    its turns are as evenly spaced as the others allow (weights 5, 1, 1 give
    ``a a b a a c a``-like sequences, never a long run of ``a``).

    A backend's first deadline is the current virtual time plus a phase in
    (0, 1/c]: it never starts in the past, so a joining backend gets its share
    from now on and no burst to catch up, and the others keep their order.
    Phases follow the golden-ratio (Weyl) sequence from a random starting
    point: backends joining together are spread over the period rather than
    all due at once, and each picker starts its rotation at a random place.
    """

    name = "round_robin"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._turns: dict[str, _Turn] = {}
        self._heap: list[tuple[float, float, int, str]] = []
        self._now = 0.0
        self._phase = rng.random()
        self._gen = 0

    def set(
        self, id: str, capacity: int, load: float, service: float | None = None
    ) -> None:
        _check(id, capacity, load)
        turn = self._turns.get(id)
        if turn is not None and turn.capacity == capacity:
            return

        if turn is None:
            self._phase = (self._phase + _GOLDEN) % 1.0
            start = self._now + (1.0 - self._phase) / capacity
            turn = self._turns[id] = _Turn(capacity, start, 0, self.rng.random())
        else:
            # A new capacity takes effect from the next turn, which comes no
            # later than it would have and no later than one new period away.
            turn.start = min(turn.deadline(), self._now + 1.0 / capacity)
            turn.capacity = capacity
            turn.taken = 0
        self._schedule(id, turn)

    def discard(self, id: str) -> None:
        if self._turns.pop(id, None) is None:
            return
        if len(self._heap) > 2 * len(self._turns) + 32:
            self._compact()

    def pick(self) -> str | None:
        while self._heap:
            deadline, _, gen, id = heapq.heappop(self._heap)
            turn = self._turns.get(id)
            if turn is None or turn.gen != gen:
                continue
            self._now = deadline
            turn.taken += 1
            self._schedule(id, turn)
            if self._now > _REBASE_AFTER:
                self._rebase()
            return id
        return None

    def _schedule(self, id: str, turn: _Turn) -> None:
        self._gen += 1
        turn.gen = self._gen
        heapq.heappush(self._heap, (turn.deadline(), turn.key, turn.gen, id))

    def _compact(self) -> None:
        # One live row per backend, rebuilt from the turns themselves.
        self._heap = []
        for id, turn in self._turns.items():
            self._heap.append((turn.deadline(), turn.key, turn.gen, id))
        heapq.heapify(self._heap)

    def _rebase(self) -> None:
        # O(n), once every million units of virtual time (billions of picks).
        shift = self._now
        self._now = 0.0
        for turn in self._turns.values():
            turn.start -= shift
        self._compact()

    def __len__(self) -> int:
        return len(self._turns)

    def __contains__(self, id: object) -> bool:
        return id in self._turns


# random ------------------------------------------------------------------------


class WeightedRandom(Strategy):
    """A backend at random, with probability proportional to its capacity.

    Each backend owns a slot of a Fenwick tree (Fenwick, "A New Data Structure
    for Cumulative Frequency Tables", 1994) holding its capacity, so a weight
    changes in O(log n) and a pick walks down the tree to the slot whose
    prefix sum passes a uniform random number, also O(log n).  Slots freed by
    departing backends are reused; the tree doubles when it is full.
    """

    name = "random"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._slot: dict[str, int] = {}
        self._ids: list[str | None] = [None] * 16  # slot i holds backend _ids[i]
        self._weights = [0] * 16
        self._tree = [0] * 17  # 1-based
        self._free = list(range(15, -1, -1))
        self._total = 0

    def set(
        self, id: str, capacity: int, load: float, service: float | None = None
    ) -> None:
        _check(id, capacity, load)
        slot = self._slot.get(id)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self._free.pop()
            self._slot[id] = slot
            self._ids[slot] = id
        self._add(slot, capacity - self._weights[slot])

    def discard(self, id: str) -> None:
        slot = self._slot.pop(id, None)
        if slot is None:
            return
        self._add(slot, -self._weights[slot])
        self._ids[slot] = None
        self._free.append(slot)

    def pick(self) -> str | None:
        if not self._total:
            return None
        target = self.rng.randrange(self._total)

        # Walk down from the largest power of two: after the loop, ``position``
        # is the last 1-based index whose prefix sum is <= target, so the slot
        # that contains target is the next one (0-based: ``position``).
        position = 0
        step = 1 << (len(self._weights).bit_length() - 1)
        while step:
            probe = position + step
            if probe < len(self._tree) and self._tree[probe] <= target:
                position = probe
                target -= self._tree[probe]
            step >>= 1
        id = self._ids[position]
        assert id is not None
        return id

    def _add(self, slot: int, delta: int) -> None:
        if not delta:
            return  # the usual case: a known backend set to its capacity again
        self._weights[slot] += delta
        self._total += delta
        index = slot + 1
        while index < len(self._tree):
            self._tree[index] += delta
            index += index & -index

    def _grow(self) -> None:
        old = len(self._weights)
        self._ids.extend([None] * old)
        self._weights.extend([0] * old)
        self._free = list(range(2 * old - 1, old - 1, -1))

        # Rebuild in O(n): each node passes its sum on to its parent.
        self._tree = [0, *self._weights]
        for index in range(1, len(self._tree)):
            parent = index + (index & -index)
            if parent < len(self._tree):
                self._tree[parent] += self._tree[index]

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, id: object) -> bool:
        return id in self._slot


# p2c ---------------------------------------------------------------------------


class PowerOfTwo(Strategy):
    """Two distinct backends sampled uniformly; the lower ``load / capacity`` wins.

    Uniform sampling ignores capacity on purpose: the comparison already
    favours the larger backend, and sampling by weight as well would count it
    twice.  Equal relative loads are decided by a coin.
    """

    name = "p2c"

    def __init__(self, rng: random.Random) -> None:
        super().__init__(rng)
        self._bag = Bag()
        self._ratio: dict[str, float] = {}

    def set(
        self, id: str, capacity: int, load: float, service: float | None = None
    ) -> None:
        _check(id, capacity, load)
        self._ratio[id] = load / capacity
        self._bag.add(id)

    def discard(self, id: str) -> None:
        if self._ratio.pop(id, None) is not None:
            self._bag.remove(id)

    def pick(self) -> str | None:
        count = len(self._bag)
        if count < 2:
            return self._bag[0] if count else None

        first = self.rng.randrange(count)
        second = self.rng.randrange(count - 1)
        if second >= first:
            second += 1
        a, b = self._bag[first], self._bag[second]

        ratio_a, ratio_b = self._ratio[a], self._ratio[b]
        if ratio_a == ratio_b:
            return a if self.rng.random() < 0.5 else b
        return a if ratio_a < ratio_b else b

    def __len__(self) -> int:
        return len(self._bag)

    def __contains__(self, id: object) -> bool:
        return id in self._ratio


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (LeastLoad, RoundRobin, WeightedRandom, PowerOfTwo, LeastLatency)
}
assert tuple(STRATEGIES) == STRATEGY_NAMES, "keep config.STRATEGY_NAMES in step"


def pick_outside(
    strategy: Strategy, exclude: Collection[str], put_back: Callable[[str], None]
) -> str | None:
    """A pick outside ``exclude``, in O(len(exclude)) strategy operations.

    Picking again usually lands elsewhere (round robin moves on, the random
    strategies draw again).  If it keeps landing on excluded backends, as
    ``least_load`` does when they are the least loaded, they leave the
    strategy for one pick and ``put_back`` sets each of them again; a round
    robin backend that comes back that way restarts its rotation, which costs
    it at most one turn.
    """
    for _ in range(2 * len(exclude) + 2):
        id = strategy.pick()
        if id is None or id not in exclude:
            return id

    removed = [id for id in exclude if id in strategy]
    for id in removed:
        strategy.discard(id)
    try:
        return strategy.pick()
    finally:
        for id in removed:
            put_back(id)


def make_strategy(name: str, rng: random.Random) -> Strategy:
    """A new, empty strategy called ``name``; 400 ``invalid_strategy`` if unknown."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise RequestError(
            400,
            "invalid_strategy",
            f"strategy: must be one of {', '.join(STRATEGIES)}; got {name!r}",
        )
    return cls(rng)
