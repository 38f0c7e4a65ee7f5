"""A routed client's table of indexers, and its choice of one per request.

Rules of this module:

* No I/O: time comes from the ``clock`` passed in (monotonic seconds) and
  randomness from the ``random.Random`` passed in.  The client feeds it the
  balancer's routing table (``apply``), or the indexers it was given
  (``use_static``), and tells it when each request starts and how it ended.
* Reads go to healthy indexers whose state is ``serving``; writes to every
  healthy one (a ``syncing`` indexer takes writes to catch up).
* The load of an indexer is the freshest one known plus this client's own
  requests in flight to it (design.md "Load").  The freshest known is the
  ``P2PLB-Load`` header of its last answer for ``header_ttl`` seconds after it
  came, else the table's load.  Its service time (for ``least_latency``) is
  the ``P2PLB-Service-Ms`` header of its last answer, or the table's
  ``service_ms`` when that is newer.
* Picks use the balancer's own strategy classes (``p2plb.strategies``), one
  per operation, updated incrementally: a pick stays sublinear in the number
  of indexers.  A rebuild happens only when the strategy changes.
* An indexer that fails ``failure_limit`` requests in a row (refused, reset,
  timed out, 5xx other than a load signal) is avoided for ``avoid_for``
  seconds, doubled each time it fails again on its first request back, up to
  ``avoid_max``.  ``503 overloaded`` and ``503 replica_behind`` are load
  signals, not failures.  If every eligible indexer is avoided, the one whose
  avoidance ends first is used rather than none.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from p2plb.errors import RequestError
from p2plb.strategies import (
    STRATEGIES,
    LeastLatency,
    Strategy,
    WeightedRandom,
    make_strategy,
    pick_outside,
)
from p2plb.wire import MAX_CAPACITY, MAX_COUNT, check_address

__all__ = ["NEAR_TIE", "OPS", "Outcome", "Row", "RoutingTable", "Table", "Target"]

logger = logging.getLogger(__name__)

OPS = ("read", "write")
Outcome = Literal["ok", "failed", "busy", "cancelled"]

#: Relative loads within this of the chosen indexer's count as a tie (herd guard).
NEAR_TIE = 0.1
#: Capacity-weighted draws the herd guard makes before it keeps the strategy's pick.
GUARD_DRAWS = 4
_LOAD_AWARE = frozenset({"least_load", "p2c", "least_latency"})


@dataclass(frozen=True)
class Row:
    """One indexer as a routing table lists it."""

    id: str
    address: str
    capacity: int
    load: int
    state: str
    healthy: bool
    zone: str | None = None
    service: float | None = None  # seconds; None if the balancer knows none


@dataclass(frozen=True)
class Table:
    version: int | None
    strategy: str
    rows: tuple[Row, ...]

    @classmethod
    def parse(cls, body: Any) -> Table:
        """A ``GET /v1/routing-table`` answer; ``ValueError`` says what is wrong.

        A strategy this client does not know (from a newer balancer) is run as
        ``least_load``, so an old client keeps working.
        """
        if not isinstance(body, dict) or not isinstance(body.get("indexers"), list):
            raise ValueError('expected an object with an "indexers" list')
        version = body.get("version")
        if version is not None and (type(version) is not int or version < 0):
            raise ValueError(f"version: expected an integer, got {version!r}")
        strategy = body.get("strategy")
        if strategy not in STRATEGIES:
            strategy = "least_load"
        rows = tuple(_parse_row(row) for row in body["indexers"])
        return cls(version, str(strategy), rows)

    def readable(self) -> bool:
        """Whether some indexer here can serve a read."""
        return any(row.healthy and row.state == "serving" for row in self.rows)


def _parse_row(row: Any) -> Row:
    if not isinstance(row, dict):
        raise ValueError(f"indexers: expected objects, got {row!r}")
    id, capacity, load = row.get("id"), row.get("capacity"), row.get("load")
    if not isinstance(id, str) or not id:
        raise ValueError(f"indexers.id: expected a string, got {id!r}")
    try:
        address = check_address(row.get("address"), field="indexers.address")
    except RequestError as exc:
        raise ValueError(exc.message) from None
    # Bounded as the balancer bounds them: a larger figure would overflow the
    # float arithmetic of the strategies.
    if type(capacity) is not int or not 1 <= capacity <= MAX_CAPACITY:
        raise ValueError(
            f"indexers.capacity of {id}: expected 1 to {MAX_CAPACITY}, got {capacity!r}"
        )
    if type(load) is not int or not 0 <= load <= MAX_COUNT:
        raise ValueError(
            f"indexers.load of {id}: expected 0 to {MAX_COUNT}, got {load!r}"
        )
    state, healthy, zone = row.get("state"), row.get("healthy"), row.get("zone")
    if not isinstance(state, str) or not isinstance(healthy, bool):
        raise ValueError(f"indexers.state/healthy of {id}: got {state!r}/{healthy!r}")
    # Absent from the tables of balancers older than least_latency.
    service_ms = row.get("service_ms")
    if service_ms is not None and (
        type(service_ms) not in (int, float) or not 0 <= service_ms < math.inf
    ):
        raise ValueError(f"indexers.service_ms of {id}: got {service_ms!r}")
    service = None if service_ms is None else service_ms / 1000.0
    return Row(id, address, capacity, load, state, healthy, zone, service)


@dataclass(frozen=True)
class Target:
    """The indexer chosen for one attempt."""

    id: str
    address: str


class _View:
    """What this client knows about one indexer."""

    __slots__ = (
        "address", "avoid_for", "avoid_until", "avoid_why", "capacity", "failures",
        "header_at", "header_load", "healthy", "id", "inflight", "last_error",
        "probation", "service", "service_at", "state", "table_load",
    )  # fmt: skip

    def __init__(self, row: Row, avoid_for: float) -> None:
        self.id = row.id
        self.address = row.address
        self.capacity = row.capacity
        self.table_load = row.load
        self.state = row.state
        self.healthy = row.healthy
        self.inflight = 0
        self.header_load: int | None = None
        self.header_at = -math.inf
        self.service = row.service
        self.service_at = -math.inf  # when an answer last said it
        self.failures = 0
        self.avoid_until: float | None = None
        self.avoid_why = ""
        self.last_error = ""
        self.avoid_for = avoid_for
        self.probation = False


class _Pool:
    """The indexers eligible for one operation, in a strategy and a sampler.

    ``ratio`` is what the herd guard compares: each indexer's relative load;
    for ``least_latency`` also ``service``, its service time as the strategy
    takes it (a known one, or the strategy's estimate for an unknown one).
    """

    def __init__(self, strategy: str, rng: random.Random) -> None:
        self.strategy: Strategy = make_strategy(strategy, rng)
        self.sampler = WeightedRandom(rng) if strategy in _LOAD_AWARE else None
        self.ratio: dict[str, float] = {}
        self.service: dict[str, float] = {}

    def put(self, id: str, capacity: int, load: float, service: float | None) -> None:
        self.strategy.set(id, capacity, load, service)
        if self.sampler is not None:
            self.sampler.set(id, capacity, 0)
        self.ratio[id] = load / capacity
        if isinstance(self.strategy, LeastLatency):
            self.service[id] = self.strategy.service_of(id)

    def near(self, id: str, chosen: str, near_tie: float) -> bool:
        """Whether ``id`` is as good as ``chosen`` to the herd guard.

        For ``least_latency`` an indexer must also be about as fast: a slow
        one is never as good as a fast pick, however idle it looks.
        """
        if self.ratio[id] > self.ratio[chosen] + near_tie:
            return False
        if isinstance(self.strategy, LeastLatency):
            return self.service[id] <= self.service[chosen] * (1.0 + near_tie)
        return True

    def drop(self, id: str) -> None:
        self.strategy.discard(id)
        if self.sampler is not None:
            self.sampler.discard(id)
        self.ratio.pop(id, None)
        self.service.pop(id, None)


class RoutingTable:
    def __init__(
        self,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        near_tie: float = NEAR_TIE,
        failure_limit: int = 3,
        avoid_for: float = 5.0,
        avoid_max: float = 60.0,
        header_ttl: float = 1.0,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self.near_tie = near_tie
        self.failure_limit = failure_limit
        self.avoid_for = avoid_for
        self.avoid_max = avoid_max
        self.header_ttl = header_ttl

        self.strategy: str | None = None
        self.version: int | None = None
        self.source = "none"  # "balancer" or "indexers" once filled
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._views: dict[str, _View] = {}
        self._pools: dict[str, _Pool] = {}
        self._avoided: list[tuple[float, str]] = []  # heap of (until, id)
        # Per operation, the views whose load changed since its strategy last
        # saw them.  A call changes its indexer's load twice (begin, finish)
        # and picks once, for one operation, so a strategy is brought up to
        # date at its next pick rather than at every change: a quarter of the
        # work on the client's hot path, and every pick still sees the loads
        # of that moment.
        self._stale: dict[str, set[str]] = {op: set() for op in OPS}

    def __len__(self) -> int:
        return len(self._views)

    def readable(self) -> bool:
        """Whether some indexer here can serve a read, avoided or not."""
        return any(v.healthy and v.state == "serving" for v in self._views.values())

    # -- what the client learns ----------------------------------------------------

    def apply(self, table: Table, *, source: str = "balancer") -> None:
        """Take a new table; what this client learnt about kept indexers stays."""
        now = self._clock()
        rebuild = table.strategy != self.strategy
        if rebuild:
            self.strategy = table.strategy
            self._pools = {op: _Pool(table.strategy, self._rng) for op in OPS}

        # New indexers join the strategies in random order, so that clients
        # reading the same table do not all give the first one the same phase.
        rows = list(table.rows)
        self._rng.shuffle(rows)
        kept: set[str] = set()
        for row in rows:
            kept.add(row.id)
            view = self._views.get(row.id)
            if view is None or view.address != row.address:
                if view is not None:
                    self._drop(view.id)
                view = self._views[row.id] = _View(row, self.avoid_for)
            view.capacity, view.table_load = row.capacity, row.load
            view.state, view.healthy = row.state, row.healthy
            if row.service is not None and now - view.service_at >= self.header_ttl:
                view.service = row.service
        for id in [id for id in self._views if id not in kept]:
            self._drop(id)
            del self._views[id]
        for view in self._views.values():
            self._sync(view, now)
        for stale in self._stale.values():
            stale.clear()

        # Start the rotation at a random point of it (design.md: each client
        # starts at a random point); without this a fresh round robin favours
        # some indexers on its first pick by up to 1.6 times their share.
        if rebuild and self.strategy == "round_robin":
            for pool in self._pools.values():
                for _ in range(self._rng.randrange(len(pool.strategy) or 1)):
                    pool.strategy.pick()
        self.version, self.source = table.version, source

    def use_static(self, addresses: Sequence[str]) -> None:
        """Indexers given directly: healthy, serving, capacity 1 until they say."""
        rows = tuple(Row(a, a, 1, 0, "serving", True) for a in addresses)
        self.apply(Table(None, self.strategy or "round_robin", rows), source="indexers")

    def observe_load(
        self, id: str, load: int, capacity: int, service: float | None = None
    ) -> None:
        """The ``P2PLB-Load`` (and ``P2PLB-Service-Ms``) headers of an answer."""
        view = self._views.get(id)
        if view is None:
            return
        now = self._clock()
        view.header_load, view.header_at = load, now
        view.capacity = capacity
        if service is not None:
            view.service, view.service_at = service, now
        self._changed(id)

    # -- a request's life ----------------------------------------------------------

    def begin(self, id: str) -> None:
        self.requests[id] += 1
        view = self._views.get(id)
        if view is not None:
            view.inflight += 1
            self._changed(id)

    def finish(
        self,
        id: str,
        outcome: Outcome,
        load: tuple[int, int] | None = None,
        service: float | None = None,
        error: str = "",
    ) -> None:
        """A request to ``id`` ended: answered, failed, refused for load, or
        given up by the caller (which says nothing about the indexer).
        ``load`` and ``service`` are what the answer's headers said; ``error``
        what a failure was, for ``avoided``."""
        if outcome in ("failed", "busy"):
            self.errors[id] += 1
        view = self._views.get(id)
        if view is None:
            return
        now = self._clock()
        view.inflight = max(0, view.inflight - 1)
        if load is not None:
            view.header_load, view.capacity = load
            view.header_at = now
        if service is not None:
            view.service, view.service_at = service, now

        if outcome == "ok":
            view.failures = 0
            if view.probation:
                view.probation, view.avoid_for = False, self.avoid_for
        elif outcome == "failed":
            view.failures += 1
            view.last_error = error or "failed"
            if view.probation or view.failures >= self.failure_limit:
                self._avoid(view, now)
        self._changed(id)

    def count(self, id: str, ok: bool) -> None:
        """A request some other node routed to ``id`` (the proxy), for stats."""
        self.requests[id] += 1
        if not ok:
            self.errors[id] += 1

    # -- choosing ------------------------------------------------------------------

    def pick(self, op: str, exclude: Collection[str] = ()) -> Target | None:
        """The indexer for one attempt at ``op``, outside ``exclude``; or None."""
        now = self._clock()
        self._return_avoided(now)
        pool = self._pools.get(op)
        if pool is not None:
            self._refresh(op, pool, now)
        id = None if pool is None else self._pick_in(pool, exclude)
        if id is None:
            id = self._least_avoided(op, exclude)
        if id is None:
            return None
        return Target(id, self._views[id].address)

    def describe_none(self, op: str) -> str:
        """Why ``pick`` found nothing for ``op``, for the error a caller sees."""
        total = len(self._views)
        healthy = sum(1 for v in self._views.values() if v.healthy)
        if op == "read" and healthy:
            return (
                f"no indexer can serve a read: {healthy} of {total} in the routing "
                "table are healthy but none is serving (still syncing)"
            )
        return f"no healthy indexer: {healthy} of {total} in the routing table"

    # Herd guard.  Every routed client reads the same table, refreshed once a
    # second, and adds only its own requests in flight.  With least_load they
    # would all see the same least loaded indexer and all send to it (the herd
    # effect: Mitzenmacher, "How Useful Is Old Information?", IEEE TPDS 2000);
    # with equal loads the strategies break ties uniformly, which gives a small
    # indexer as many requests as a large one.  So for the load-aware
    # strategies a client counts every indexer whose relative load is within
    # ``near_tie`` of the strategy's pick (for least_latency: and whose service
    # time is within that fraction of it) as just as good, and chooses among
    # them in proportion to capacity: up to GUARD_DRAWS capacity-weighted draws
    # (O(log n) each), keeping the first that is within the tie, else the
    # strategy's own pick.  Fifty clients on a fresh table then spread in
    # proportion to capacity, while a clearly less loaded indexer still wins.

    def _pick_in(self, pool: _Pool, exclude: Collection[str]) -> str | None:
        id = pool.strategy.pick()
        if id is not None and id in exclude:
            id = self._pick_excluding(pool, exclude)
        if id is None or pool.sampler is None:
            return id

        for _ in range(GUARD_DRAWS):
            other = pool.sampler.pick()
            if other is None or other in exclude:
                continue
            if pool.near(other, id, self.near_tie):
                return other
        return id

    def _pick_excluding(self, pool: _Pool, exclude: Collection[str]) -> str | None:
        now = self._clock()

        def put_back(id: str) -> None:
            view = self._views[id]
            pool.put(id, view.capacity, self._load(view, now), view.service)

        return pick_outside(pool.strategy, exclude, put_back)

    def _least_avoided(self, op: str, exclude: Collection[str]) -> str | None:
        # O(n), but only when every eligible indexer is being avoided.
        best: _View | None = None
        for view in self._views.values():
            if view.avoid_until is None or view.id in exclude:
                continue
            if not self._eligible(view, op, ignore_avoidance=True):
                continue
            if best is None or view.avoid_until < (best.avoid_until or 0.0):
                best = view
        return None if best is None else best.id

    # -- internals -----------------------------------------------------------------

    def _load(self, view: _View, now: float) -> int:
        base = view.table_load
        if view.header_load is not None and now - view.header_at < self.header_ttl:
            base = view.header_load
        return base + view.inflight

    def _eligible(
        self, view: _View, op: str, *, ignore_avoidance: bool = False
    ) -> bool:
        if not view.healthy or (op == "read" and view.state != "serving"):
            return False
        return ignore_avoidance or view.avoid_until is None

    def _sync(self, view: _View, now: float) -> None:
        load = self._load(view, now)
        for op, pool in self._pools.items():
            self._sync_in(op, pool, view, load)

    def _sync_in(self, op: str, pool: _Pool, view: _View, load: int) -> None:
        if self._eligible(view, op):
            pool.put(view.id, view.capacity, load, view.service)
        else:
            pool.drop(view.id)

    def _changed(self, id: str) -> None:
        for stale in self._stale.values():
            stale.add(id)

    def _refresh(self, op: str, pool: _Pool, now: float) -> None:
        """Bring ``op``'s strategy up to date with every view changed since."""
        stale = self._stale[op]
        while stale:
            view = self._views.get(stale.pop())
            if view is not None:  # else dropped with its table row
                self._sync_in(op, pool, view, self._load(view, now))

    def _drop(self, id: str) -> None:
        for pool in self._pools.values():
            pool.drop(id)

    def avoided(self) -> dict[str, str]:
        """The indexers this client leaves out for now, each with why."""
        now = self._clock()
        return {
            view.id: f"{view.avoid_why}; tried again in "
            f"{max(0.0, view.avoid_until - now):.1f} s"
            for view in self._views.values()
            if view.avoid_until is not None
        }

    def _avoid(self, view: _View, now: float) -> None:
        view.avoid_until = now + view.avoid_for
        view.avoid_why = (
            f"failed on probation: {view.last_error}"
            if view.probation
            else f"{view.failures} failed requests in a row, the last: "
            f"{view.last_error}"
        )
        logger.info(
            "client.indexer_avoided id=%s address=%s for_s=%.1f",
            view.id,
            view.address,
            view.avoid_for,
        )
        heapq.heappush(self._avoided, (view.avoid_until, view.id))
        view.avoid_for = min(self.avoid_max, view.avoid_for * 2)
        view.failures, view.probation = 0, False

    def _return_avoided(self, now: float) -> None:
        while self._avoided and self._avoided[0][0] <= now:
            until, id = heapq.heappop(self._avoided)
            view = self._views.get(id)
            if view is None or view.avoid_until != until:
                continue  # gone, or replaced by a new registration
            view.avoid_until, view.probation = None, True
            logger.info("client.indexer_retried id=%s address=%s", id, view.address)
            self._sync(view, now)
