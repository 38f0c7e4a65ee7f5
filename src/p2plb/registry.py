"""The balancer's view of its indexers: who they are, how loaded, how healthy.

Rules of this module:

* No I/O.  Time comes from the ``clock`` passed in (monotonic seconds) and
  randomness from the ``random.Random`` passed in; the server calls in when
  something happens and logs the ``HealthChange`` events it drains.
* One entry per indexer id, replaced by a registration from another process.
  Who a message speaks for follows ``p2plb.membership``, which says why: a
  ``409 superseded`` only where a replacement shows (one this process saw, or
  another address than an entry heard from since the restart); another
  instance at the entry's address is the indexer restarted in place, and is
  adopted; a restored entry refuses no one until its indexer speaks.
* A new registration is healthy at once and takes writes; it takes reads once
  a report says ``serving`` (it may still have to catch up before that).
  Entries restored from a snapshot wait for a successful probe instead.
* The *effective load* of an entry (design.md, "Load") is its freshest reported
  load, plus the proxied requests in flight to it, plus the ``/v1/route``
  answers that pointed at it and still count: until a load figure of it is
  observed at least one service time after them (``p2plb.lookaside``).
* Two strategy pools are kept up to date on every change of effective load,
  health, state or capacity: reads go to healthy ``serving`` indexers, writes
  to any healthy one (a ``syncing`` indexer takes writes so that it catches
  up).  A pick is then a single strategy pick, sublinear in the number of
  indexers; only ``tick`` (about once a second), ``set_strategy``,
  ``snapshot`` and ``restore`` walk every entry.
* Passive ejection never takes out more than ``max_ejected_fraction`` of the
  indexers: the registry is the one place that sees them all.
* ``total_requests`` and ``routed_requests`` only grow: removing an indexer
  does not take its requests out of the totals.
* Every figure stored is within the bounds of the API: loads and counts up to
  ``MAX_COUNT``, capacities up to ``MAX_CAPACITY``.  Whatever an indexer sends,
  status, metrics and the state file can then always be produced (a load past
  64 bits once overflowed the float arithmetic of each of them).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from typing import Any

from p2plb.backends import STATES, Entry, Flight, LatencyWindow
from p2plb.errors import NoHealthyIndexer, RequestError
from p2plb.health import Health, HealthChange, HealthPolicy
from p2plb.lookaside import Lookaside
from p2plb.membership import Replacements, not_found, same_process
from p2plb.snapshot import SNAPSHOT_VERSION, parse_snapshot, snapshot_row
from p2plb.strategies import Strategy, make_strategy, pick_outside
from p2plb.wire import (
    MAX_CAPACITY,
    MAX_COUNT,
    check_address,
    check_indexer_id,
    invalid,
)

__all__ = [
    "OPS",
    "SNAPSHOT_VERSION",
    "STATES",
    "Entry",
    "Flight",
    "LatencyWindow",
    "Registry",
]

OPS = ("read", "write")


class Registry:
    """Every indexer this balancer knows, and the strategy that picks among them."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        rng: random.Random,
        policy: HealthPolicy,
        strategy: str = "least_load",
        forget_after: float = 3600.0,
        service_time: float = 0.05,
        lookaside_max_age: float = 6.0,
        max_lookaside: int = 100_000,
    ) -> None:
        self._clock = clock
        self._rng = rng
        self.policy = policy
        self.forget_after = forget_after
        self.service_time = service_time  # when an indexer has not said its own

        self._read: Strategy = make_strategy(strategy, rng)
        self._write: Strategy = make_strategy(strategy, rng)
        self._entries: dict[str, Entry] = {}
        self._ejected: set[str] = set()
        self._lookaside = Lookaside(
            self._sync,
            default_service=service_time,
            max_age=lookaside_max_age,
            most=max_lookaside,
        )
        self._replaced = Replacements()
        self._changes: list[HealthChange] = []
        self._total_requests = 0
        self._total_routed = 0
        self._version = 0
        # Moves only when who is registered, where, healthy or serving changes:
        # indexers ask for the member list only when it did (not on load).
        self._members_version = 0
        self._shown: dict[str, tuple[str, bool, str]] = {}

    # what the server reads -------------------------------------------------------

    @property
    def strategy(self) -> str:
        return self._read.name

    @property
    def total_requests(self) -> int:
        return self._total_requests

    @property
    def routed_requests(self) -> int:
        return self._total_routed

    @property
    def members_version(self) -> int:
        """Changes when the member list as indexers see it changes."""
        return self._members_version

    @property
    def version(self) -> int:
        """Grows whenever anything a routing table shows changes (load included)."""
        return self._version

    generation = version

    def effective_load(self, entry: Entry) -> int:
        """``entry.load``: reported + in flight + recent lookaside answers."""
        return entry.load

    def entries(self) -> list[Entry]:
        """All entries, in registration order (a replacement keeps its place).

        Their loads are the ones a routing table would show at this moment:
        metrics and the indexer list read them here.
        """
        self._lookaside.expire(self._clock())
        return list(self._entries.values())

    def get(self, id: str) -> Entry | None:
        return self._entries.get(id)

    def healthy_count(self) -> int:
        return len(self._write)  # the write pool holds exactly the healthy ones

    def __len__(self) -> int:
        return len(self._entries)

    def drain_changes(self) -> list[HealthChange]:
        """Health changes since the last drain, oldest first, for the log."""
        changes, self._changes = self._changes, []
        return changes

    def status(self) -> dict[str, Any]:
        """``GET /v1/status`` without ``uptime_seconds``, which the server adds."""
        now = self._clock()
        self._lookaside.expire(now)  # the loads a routing table shows now
        return {
            "healthy_indexers": self.healthy_count(),
            "total_indexers": len(self._entries),
            "total_requests": self._total_requests,
            "routed_requests": self._total_routed,
            "strategy": self.strategy,
            "indexers": [entry.status(now) for entry in self._entries.values()],
        }

    def routing_table(self) -> dict[str, Any]:
        """``GET /v1/routing-table``: every indexer, healthy or not."""
        self._lookaside.expire(self._clock())
        return {
            "version": self._version,
            "strategy": self.strategy,
            "indexers": [entry.route_row() for entry in self._entries.values()],
        }

    # what indexers do ------------------------------------------------------------

    def register(
        self,
        id: str,
        address: str,
        capacity: int,
        zone: str | None = None,
        instance: str | None = None,
        *,
        state: str = "syncing",
    ) -> tuple[Entry, bool]:
        """Add an indexer; ``True`` if the id is new (201), ``False`` if known (200).

        A new entry is healthy at once and takes writes, but no reads until a
        report says it is ``serving`` (``state``, if the caller knows better):
        an indexer that has not said so may not have caught up yet.  The same
        process registering again (same address, same or unknown instance)
        keeps its entry, state and counters.  A different process replaces the
        entry in place: counters carry over, health and state start afresh,
        and the old (address, instance) is remembered as superseded.
        """
        id = check_indexer_id(id)
        address = check_address(address)
        _check_count(capacity, "capacity", minimum=1, maximum=MAX_CAPACITY)
        if state not in STATES:
            raise invalid("state", f"must be one of {', '.join(STATES)}; got {state!r}")
        now = self._clock()
        self._lookaside.expire(now)  # the answer shows the entry's load as of now

        old = self._entries.get(id)
        if old is not None and same_process(old, address, instance):
            old.restored = False
            old.capacity = capacity
            old.zone = zone
            old.instance = old.instance if instance is None else instance
            self._record(old, old.health.on_contact(now))
            self._sync(old)
            return old, False

        entry = Entry(
            id=id,
            address=address,
            capacity=capacity,
            zone=zone,
            instance=instance,
            state=state,
            reported_load=0,
            registered_at=now,
            last_report=None,
            health=Health(id, self.policy, now),
        )
        if old is not None:
            self._leave(old)
            self._replaced.add(old, now)
            entry.requests, entry.routed, entry.errors = (
                old.requests,
                old.routed,
                old.errors,
            )
        self._replaced.discard(id, address, instance)
        self._entries[id] = entry
        self._sync(entry)
        return entry, old is None

    def unregister(
        self,
        id: str,
        instance: str | None = None,
        *,
        address: str | None = None,
        prove: bool = False,
    ) -> Entry:
        """Remove an indexer; ``404 indexer_not_found`` if it is not registered.

        ``instance`` and ``address`` are the sender's, when an indexer removes
        itself: a process that was replaced gets ``409 superseded`` and removes
        nothing, for the entry it would remove is its replacement's; the
        indexer restarted in place removes its entry.  ``prove`` is for a
        sender whose token lets it remove itself only: then nothing but the
        very instance held here will do (``403 wrong_token``), since a restart
        in place is told apart by the address alone, which anyone can read.

        Known shortcoming: with a cluster token, an indexer restarted in place
        that stops before its first report to a balancer restored from an
        older state file cannot remove itself there (403); that balancer's
        probes take the entry out within ``probe_fall`` intervals.  A secret
        that outlives the process (kept in the indexer's data directory, sent
        when it registers) as the proof, apart from the per-process instance,
        would fix it.
        """
        if instance is None and address is None:
            entry = self._entries.get(id)  # an admin, naming no process
            if entry is None:
                raise not_found(id)
        else:
            entry = self._replaced.sender(self._entries.get(id), id, address, instance)
        if prove and (instance is None or instance != entry.instance):
            raise RequestError(
                403,
                "wrong_token",
                "Authorization: removing another indexer needs the admin token; "
                f"the cluster token removes only the instance registered as {id!r}",
            )

        self._leave(entry)
        del self._entries[id]
        return entry

    def report(
        self,
        id: str,
        load: int,
        state: str,
        *,
        served: int | None = None,
        address: str | None = None,
        instance: str | None = None,
        service: float | None = None,
    ) -> Entry:
        """A load report: 404 if ``id`` is unknown, 409 if the sender was replaced.

        A sender at the entry's address with another instance is the indexer
        restarted in place: its instance is adopted (the caller logs it).
        ``served`` is the indexer's cumulative count of requests served; the
        positive difference from the last one is added to ``requests``, and a
        smaller value means the indexer restarted and counts from zero again.
        ``service`` is its recent service time in seconds, if it has one.
        """
        _check_count(load, "load", minimum=0)
        if state not in STATES:
            raise invalid("state", f"must be one of {', '.join(STATES)}; got {state!r}")
        if served is not None:
            _check_count(served, "served", minimum=0)
        if address is not None:
            address = check_address(address)
        now = self._clock()

        entry = self._replaced.sender(self._entries.get(id), id, address, instance)
        if instance is not None and instance != entry.instance:
            self._replaced.adopt(entry, instance, now)
        entry.restored = False

        entry.reported_load = load
        entry.inflight_at_report = entry.inflight
        entry.state = state
        entry.last_report = now
        if service is not None:
            entry.service = service
        self._lookaside.observed(entry, now)
        if served is not None:
            self._count_served(entry, served)
        self._record(entry, entry.health.on_report(now))
        self._sync(entry)
        return entry

    # what the balancer observes ---------------------------------------------------

    def observe_load(
        self, id: str, load: int, capacity: int, service: float | None = None
    ) -> None:
        """A ``P2PLB-Load`` header on a proxied answer: fresher than any report.

        ``service`` comes from the same answer's ``P2PLB-Service-Ms``, if any.
        """
        entry = self._entries.get(id)
        if entry is None or not (
            0 <= load <= MAX_COUNT and 1 <= capacity <= MAX_CAPACITY
        ):
            return
        if service is not None:
            entry.service = service
        entry.reported_load = load
        # The answer carrying the header left the indexer's count already.
        entry.inflight_at_report = max(0, entry.inflight - 1)
        entry.capacity = capacity
        self._lookaside.observed(entry, self._clock())
        self._sync(entry)

    def probe_result(self, id: str, ok: bool, detail: str) -> None:
        """An active probe ended; ignored if the indexer is gone meanwhile."""
        entry = self._entries.get(id)
        if entry is None:
            return
        self._record(entry, entry.health.on_probe(ok, detail, self._clock()))
        self._sync(entry)

    def pick(self, op: str = "read", *, exclude: Collection[str] = ()) -> Entry | None:
        """The indexer the strategy picks for ``op``, without counting anything.

        ``read`` considers healthy ``serving`` indexers, ``write`` every healthy
        one; ``exclude`` names indexers already tried by a retrying caller.
        """
        pool = self._pool(op)
        self._lookaside.expire(self._clock())
        id = pool.pick()
        if id is not None and id in exclude:
            id = self._pick_excluding(pool, exclude)
        return None if id is None else self._entries[id]

    def route(self, op: str = "read") -> Entry:
        """A lookaside answer (``GET /v1/route``): pick, and count the pick.

        The pick counts as ``routed`` and adds one to the entry's effective load
        until the balancer learns that indexer's load again (see the rules
        above), so that lookaside calls, at once or one after another, spread
        out instead of all landing on the idlest indexer.
        """
        entry = self.pick(op)
        if entry is None:
            raise NoHealthyIndexer(self.describe_none(op))

        entry.routed += 1
        self._total_routed += 1
        self._lookaside.given(entry, self._clock())
        self._sync(entry)
        return entry

    def begin(self, id: str) -> Flight:
        """A proxied request to ``id`` starts: it counts as routed and in flight.

        An unknown id gives a ``Flight`` that counts nothing.
        """
        entry = self._entries.get(id)
        if entry is None:
            return Flight(None)
        entry.routed += 1
        self._total_routed += 1
        entry.inflight += 1
        self._sync(entry)
        return Flight(entry)

    def finish(
        self, flight: Flight | str, ok: bool, latency_s: float, detail: str = ""
    ) -> None:
        """A proxied request ended; ``ok=False`` is a failure of the indexer.

        Failures are refused connections, timeouts and 5xx answers other than
        ``503 overloaded`` (an overloaded indexer is busy, not broken: finish
        that with ``ok=True``).  They count as ``errors`` and feed passive
        health; successes give a latency sample.  Given a ``Flight``, a second
        finish does nothing; given an id, the current entry's in-flight count
        goes down but never below zero.
        """
        if isinstance(flight, Flight):
            if flight.done:
                return
            flight.done = True
            entry = flight.entry
        else:
            entry = self._entries.get(flight)
        if entry is None:
            return

        entry.inflight = max(0, entry.inflight - 1)
        if ok:
            entry.latency.add(latency_s)
        else:
            entry.errors += 1
        if self._entries.get(entry.id) is not entry:
            return  # removed or replaced meanwhile: its health no longer matters

        may_eject = entry.id in self._ejected or (
            len(self._ejected) + 1
            <= self.policy.max_ejected_fraction * len(self._entries) + 1e-9
        )
        now = self._clock()
        self._record(
            entry, entry.health.on_request(ok, detail, now, may_eject=may_eject)
        )
        self._sync(entry)

    # what the operator and the timer do -------------------------------------------

    def set_strategy(self, name: str) -> None:
        """Switch strategy (``400 invalid_strategy`` if unknown); rebuilds the pools."""
        read = make_strategy(name, self._rng)
        write = make_strategy(name, self._rng)
        self._read, self._write = read, write
        for entry in self._entries.values():
            self._sync(entry)

    def tick(self) -> list[HealthChange]:
        """Apply the passage of time to every entry; return ``drain_changes()``.

        Ends ejections, notices silent indexers, and forgets those unhealthy
        for ``forget_after`` seconds (a ``HealthChange`` with ``removed=True``).
        O(n): meant to run about once a second, never per request.
        """
        now = self._clock()
        self._lookaside.expire(now)

        for entry in list(self._entries.values()):
            change = entry.health.evaluate(now)
            if change is not None:
                self._record(entry, change)
                self._sync(entry)
            unhealthy_for = now - entry.health.since
            if not entry.health.healthy and unhealthy_for >= self.forget_after:
                self._leave(entry)
                del self._entries[entry.id]
                reason = f"forgotten after {unhealthy_for:.0f} s unhealthy"
                self._changes.append(
                    HealthChange(
                        entry.id, False, f"{reason}: {entry.health.reason}", True
                    )
                )

        self._replaced.expire(now, self.forget_after)
        return self.drain_changes()

    # persistence -----------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What the balancer's state file holds; JSON-able."""
        return {
            "version": SNAPSHOT_VERSION,
            "strategy": self.strategy,
            "total_requests": self._total_requests,
            "routed_requests": self._total_routed,
            "indexers": [snapshot_row(entry) for entry in self._entries.values()],
        }

    def restore(self, snapshot: Any) -> None:
        """Replace everything with a ``snapshot()``; ``ValueError`` if malformed.

        The whole snapshot is checked before anything changes.  Restored
        indexers are unhealthy ("restored; awaiting probe") until their first
        successful probe, and have ``unhealthy_after`` seconds to report.
        """
        rows = parse_snapshot(snapshot)
        now = self._clock()

        self._read = make_strategy(snapshot["strategy"], self._rng)
        self._write = make_strategy(snapshot["strategy"], self._rng)
        self._entries = {}
        self._ejected = set()
        self._lookaside.clear()
        self._total_requests = snapshot["total_requests"]
        self._total_routed = snapshot["routed_requests"]

        for row in rows:
            entry = Entry(
                id=row["id"],
                address=row["address"],
                capacity=row["capacity"],
                zone=row["zone"],
                instance=row["instance"],
                state=row["state"],
                reported_load=row["reported_load"],
                registered_at=now,
                last_report=None,
                health=Health(row["id"], self.policy, now, restored=True),
                requests=row["requests"],
                routed=row["routed"],
                errors=row["errors"],
                served_seen=row["served"],
                restored=True,
            )
            self._entries[entry.id] = entry
            self._sync(entry)

    # internals -------------------------------------------------------------------

    def _pool(self, op: str) -> Strategy:
        if op == "read":
            return self._read
        if op == "write":
            return self._write
        raise invalid("op", f"must be one of {', '.join(OPS)}; got {op!r}")

    def _pick_excluding(self, pool: Strategy, exclude: Collection[str]) -> str | None:
        def put_back(id: str) -> None:
            entry = self._entries[id]
            pool.set(id, entry.capacity, entry.load, entry.service)

        return pick_outside(pool, exclude, put_back)

    def _sync(self, entry: Entry) -> None:
        """Bring both pools in line with ``entry`` (if it is still current)."""
        if self._entries.get(entry.id) is not entry:
            return
        self._version += 1
        healthy = entry.health.healthy
        shown = (entry.address, healthy, entry.state)
        if self._shown.get(entry.id) != shown:
            self._shown[entry.id] = shown
            self._members_version += 1
        for pool, eligible in (
            (self._read, healthy and entry.state == "serving"),
            (self._write, healthy),
        ):
            if eligible:
                pool.set(entry.id, entry.capacity, entry.load, entry.service)
            else:
                pool.discard(entry.id)

    def _leave(self, entry: Entry) -> None:
        """Take ``entry`` out of the pools and counts, before it is dropped."""
        self._read.discard(entry.id)
        self._write.discard(entry.id)
        self._ejected.discard(entry.id)
        self._version += 1
        self._shown.pop(entry.id, None)
        self._members_version += 1

    def _record(self, entry: Entry, change: HealthChange | None) -> None:
        if entry.health.ejected:
            self._ejected.add(entry.id)
        else:
            self._ejected.discard(entry.id)
        if change is not None:
            self._changes.append(change)

    def _count_served(self, entry: Entry, served: int) -> None:
        previous = entry.served_seen
        delta = served if previous is None or served < previous else served - previous
        entry.served_seen = served
        # Saturated, so that no sequence of reports takes a count out of bounds.
        entry.requests = min(MAX_COUNT, entry.requests + delta)
        self._total_requests = min(MAX_COUNT, self._total_requests + delta)

    def describe_none(self, op: str) -> str:
        """Why no indexer can take ``op``, for the 503 a caller sees."""
        healthy = self.healthy_count()
        total = len(self._entries)
        if op == "read" and healthy:
            return (
                f"no healthy indexer can serve a read: {healthy} of {total} are "
                "healthy but still syncing"
            )
        return f"no healthy indexer: {healthy} of {total} registered are healthy"


def _check_count(
    value: object, name: str, *, minimum: int, maximum: int = MAX_COUNT
) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"must be an integer >= {minimum}, got {value!r}")
    if not minimum <= value <= maximum:
        raise invalid(
            name, f"must be an integer from {minimum} to {maximum}, got {value!r}"
        )
