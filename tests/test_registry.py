"""The registry, driven with a fake clock and seeded generators."""

from __future__ import annotations

import copy
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2plb.config import STRATEGY_NAMES
from p2plb.errors import NoHealthyIndexer, RequestError
from p2plb.health import HealthChange, HealthPolicy
from p2plb.metrics import Metrics
from p2plb.registry import Entry, Registry
from p2plb.wire import MAX_CAPACITY, MAX_COUNT


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **kwargs: Any) -> Registry:
    return Registry(clock=clock, rng=random.Random(4), policy=HealthPolicy(), **kwargs)


def addr(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def add(registry: Registry, *ids: str, capacity: int = 10) -> None:
    """Register indexers that have reported once, as ``serving``, with load 0."""
    for n, id in enumerate(ids):
        registry.register(id, addr(7401 + n), capacity)
        registry.report(id, 0, "serving")


def error_of(call: Any, *args: Any, **kwargs: Any) -> tuple[int, str, str]:
    with pytest.raises(RequestError) as caught:
        call(*args, **kwargs)
    return caught.value.status, caught.value.code, caught.value.message


# registration ---------------------------------------------------------------------


def test_register_new_then_again(clock: FakeClock) -> None:
    registry = make(clock)
    entry, created = registry.register("i1", "HTTP://127.0.0.1:7401/", 8, zone="z1")
    assert created
    assert (entry.address, entry.capacity, entry.zone, entry.state) == (
        "http://127.0.0.1:7401",
        8,
        "z1",
        "syncing",
    )
    assert (entry.health.healthy, entry.health.reason) == (True, "registered")
    assert registry.pick("write") is entry  # routable at once...
    assert registry.pick("read") is None  # ...but reads wait for "serving"
    registry.report("i1", 0, "serving")
    assert registry.pick("read") is entry

    entry.routed = 5
    clock.advance(50)
    again, created = registry.register("i1", addr(7401), 16, instance="abc")
    assert (again is entry, created) == (True, False)
    assert (entry.capacity, entry.instance, entry.routed, entry.zone) == (
        16,
        "abc",
        5,
        None,
    )
    clock.advance(50)  # the registration counted as a sign of life
    assert registry.tick() == []
    assert len(registry) == 1


def test_register_rejects_bad_fields(clock: FakeClock) -> None:
    registry = make(clock)
    assert error_of(registry.register, "i 1", addr(1), 1)[:2] == (400, "invalid_field")
    assert error_of(registry.register, "i1", "ftp://x:1", 1)[2].startswith("address:")
    assert error_of(registry.register, "i1", addr(1), 0)[2].startswith("capacity:")
    assert error_of(registry.register, "i1", addr(1), True)[2].startswith("capacity:")
    assert len(registry) == 0


def test_a_new_process_replaces_the_entry_and_the_old_one_is_superseded(
    clock: FakeClock,
) -> None:
    registry = make(clock)
    add(registry, "i0")
    old, _ = registry.register("i1", addr(7401), 10, instance="first")
    add(registry, "i2")
    old.requests, old.routed, old.errors = 7, 6, 1
    flight = registry.begin("i1")

    new, created = registry.register("i1", addr(7501), 10, instance="second")
    assert not created
    assert new is not old and registry.get("i1") is new
    assert [e.id for e in registry.entries()] == ["i0", "i1", "i2"]
    assert (new.requests, new.routed, new.errors, new.inflight) == (7, 7, 1, 0)

    # The old process: by address, by instance, or both.
    for sender in (
        {"address": addr(7401)},
        {"instance": "first"},
        {"address": addr(7401), "instance": "first"},
    ):
        status, code, message = error_of(registry.report, "i1", 1, "serving", **sender)
        assert (status, code) == (409, "superseded")
        assert message.startswith("id: indexer 'i1' (")
    registry.report("i1", 3, "serving", address=addr(7501), instance="second")
    assert new.reported_load == 3

    # Finishing the old request touches the old entry only.
    registry.finish(flight, False, 0.1, "HTTP 500")
    assert (old.inflight, new.inflight, new.errors) == (0, 0, 1)

    # Even once the id is gone, the replaced process is told to stop.
    registry.unregister("i1")
    assert error_of(registry.report, "i1", 1, "serving", instance="first")[0] == 409
    assert error_of(registry.report, "i1", 1, "serving", instance="third")[0] == 404


def test_a_replaced_process_cannot_unregister_its_replacement(
    clock: FakeClock,
) -> None:
    registry = make(clock)
    registry.register("mv", addr(7401), 10, instance="a")
    moved, _ = registry.register("mv", addr(7402), 10, instance="b")

    assert error_of(registry.unregister, "mv", "a") == (
        409,
        "superseded",
        "id: indexer 'mv' (instance a) was replaced by a newer registration at "
        f"{addr(7402)}; this process must stop reporting",
    )
    assert registry.get("mv") is moved
    assert registry.unregister("mv", "b") is moved  # itself
    again, _ = registry.register("mv", addr(7402), 10, instance="b")
    assert registry.unregister("mv") is again  # an admin: no instance
    registry.register("mv", addr(7403), 10)  # an entry that never said one
    assert registry.unregister("mv", "c").address == addr(7403)
    assert len(registry) == 0


def restored_from(clock: FakeClock, before: Registry) -> Registry:
    """A balancer restarted from ``before``'s state file."""
    after = make(clock)
    after.restore(json.loads(json.dumps(before.snapshot())))
    return after


def test_a_restored_instance_gives_way_to_the_indexer_restarted_in_place(
    clock: FakeClock,
) -> None:
    # The state file holds instance a; the indexer was restarted at the same
    # address as b since, and the balancer was killed before saving that.
    before = make(clock)
    before.register("x1", addr(7401), 10, instance="a")
    before.report("x1", 0, "serving", served=40, address=addr(7401), instance="a")
    registry = restored_from(clock, before)

    entry = registry.report(
        "x1", 2, "serving", served=3, address=addr(7401), instance="b"
    )
    assert registry.get("x1") is entry
    assert (entry.instance, entry.requests, entry.reported_load) == ("b", 43, 2)
    registry.report("x1", 0, "serving", served=5, address=addr(7401), instance="b")
    assert entry.requests == 45  # counted from the new process's zero

    # Seen replaced now, the old instance is refused, at any address.
    for address in (addr(7401), None):
        assert error_of(
            registry.report, "x1", 0, "serving", address=address, instance="a"
        )[:2] == (409, "superseded")
    assert registry.unregister("x1", "b", address=addr(7401), prove=True) is entry


def test_a_restored_entry_refuses_no_one_until_its_indexer_speaks(
    clock: FakeClock,
) -> None:
    before = make(clock)
    before.register("x1", addr(7401), 10, instance="a")
    registry = restored_from(clock, before)

    # The indexer moved since the state file was saved: it is told to
    # register again (404, not 409), and its registration replaces the entry.
    assert error_of(
        registry.report, "x1", 0, "serving", address=addr(7402), instance="c"
    ) == (
        404,
        "indexer_not_found",
        f"id: indexer 'x1' is known here at {addr(7401)} only from the state "
        "file; register again",
    )
    assert error_of(registry.unregister, "x1", "c", address=addr(7402))[0] == 404
    moved, created = registry.register("x1", addr(7402), 10, instance="c")
    assert (created, registry.get("x1")) == (False, moved)
    assert error_of(
        registry.report, "x1", 0, "serving", address=addr(7401), instance="a"
    )[:2] == (409, "superseded")

    # An entry heard from since is no longer taken for stale: another address
    # is a replaced process.
    again = restored_from(clock, before)
    again.report("x1", 0, "serving", address=addr(7401), instance="a")
    for call in (again.report, again.unregister):
        kwargs: dict[str, Any] = {"address": addr(7402), "instance": "c"}
        args = ("x1", 0, "serving") if call == again.report else ("x1",)
        assert error_of(call, *args, **kwargs)[:2] == (409, "superseded")
    assert len(again) == 1


def test_an_indexer_restarted_in_place_may_remove_itself(clock: FakeClock) -> None:
    before = make(clock)
    before.register("x1", addr(7401), 10, instance="a")
    registry = restored_from(clock, before)

    # Nothing but the very instance held proves who sends with a cluster token:
    # the address alone is public.
    assert error_of(registry.unregister, "x1", "b", address=addr(7401), prove=True) == (
        403,
        "wrong_token",
        "Authorization: removing another indexer needs the admin token; the "
        "cluster token removes only the instance registered as 'x1'",
    )
    for sender in ({}, {"address": addr(7401)}):
        assert error_of(registry.unregister, "x1", prove=True, **sender)[0] == 403
    assert len(registry) == 1
    assert registry.unregister("x1", "b", address=addr(7401)).instance == "a"

    # Without a restore: the replaced instance stays refused at its address.
    registry.register("x1", addr(7401), 10, instance="a")
    current, _ = registry.register("x1", addr(7401), 10, instance="b")
    assert error_of(registry.unregister, "x1", "a", address=addr(7401))[0] == 409
    assert registry.get("x1") is current


def test_unknown_ids_are_404(clock: FakeClock) -> None:
    registry = make(clock)
    expected = (404, "indexer_not_found", "id: no indexer 'x' is registered")
    assert error_of(registry.report, "x", 1, "serving") == expected
    assert error_of(registry.unregister, "x") == expected
    registry.probe_result("x", False, "refused")  # ignored: it may have just left
    registry.observe_load("x", 3, 10)
    assert len(registry) == 0


def test_report_validates_and_updates(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "i1")
    assert error_of(registry.report, "i1", -1, "serving")[2].startswith("load:")
    assert error_of(registry.report, "i1", 1, "busy")[2].startswith("state:")
    assert error_of(registry.report, "i1", 1, "serving", served=-3)[2].startswith(
        "served:"
    )

    clock.advance(2)
    entry = registry.report("i1", 4, "syncing")
    assert (entry.reported_load, entry.state, entry.last_report) == (4, "syncing", 1002)
    clock.advance(2.1)
    status = registry.status()["indexers"][0]
    assert (status["health_reason"], status["last_report_age_s"]) == (
        "report 2.1 s ago",
        2.1,
    )


def test_served_counter_deltas_and_reset(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "i1", "i2")
    registry.report("i1", 0, "serving", served=100)
    registry.report("i1", 0, "serving", served=150)
    registry.report("i1", 0, "serving")  # no counter: nothing to add
    registry.report("i1", 0, "serving", served=150)
    registry.report("i1", 0, "serving", served=20)  # restarted: counts from zero
    registry.report("i2", 0, "serving", served=5)
    assert registry.get("i1").requests == 170  # type: ignore[union-attr]
    assert registry.total_requests == 175

    registry.unregister("i1")
    assert registry.total_requests == 175  # totals never go down


def test_no_figure_out_of_the_api_bounds_is_ever_stored(clock: FakeClock) -> None:
    # A load past 64 bits once overflowed status, metrics and routing alike.
    registry = make(clock)
    add(registry, "i1")
    big = MAX_COUNT + 1
    assert error_of(registry.report, "i1", big, "serving") == (
        400,
        "invalid_field",
        f"load: must be an integer from 0 to {MAX_COUNT}, got {big}",
    )
    assert error_of(registry.report, "i1", 0, "serving", served=big)[2] == (
        f"served: must be an integer from 0 to {MAX_COUNT}, got {big}"
    )
    assert error_of(registry.register, "i2", addr(9), 10**30)[2] == (
        f"capacity: must be an integer from 1 to 1000000, got {10**30}"
    )
    for load, capacity in ((10**400, 10), (big, 10), (-1, 10), (1, 0), (1, 10**6 + 1)):
        registry.observe_load("i1", load, capacity)
    entry = registry.get("i1")
    assert entry is not None
    assert (entry.reported_load, entry.capacity, len(registry)) == (0, 10, 1)

    # Counters saturate rather than leave the bounds a state file is held to.
    registry.report("i1", 0, "serving", served=MAX_COUNT)
    registry.report("i1", 0, "serving", served=0)  # restarted
    registry.report("i1", 0, "serving", served=MAX_COUNT)
    assert (entry.requests, registry.total_requests) == (MAX_COUNT, MAX_COUNT)
    make(clock).restore(json.loads(json.dumps(registry.snapshot())))


# health through the registry ---------------------------------------------------------


def test_silent_indexers_turn_unhealthy_then_are_forgotten(clock: FakeClock) -> None:
    registry = make(clock, forget_after=600.0)
    add(registry, "i1", "i2")
    clock.advance(30)
    registry.report("i2", 0, "serving")

    clock.advance(31)
    assert registry.tick() == [HealthChange("i1", False, "no report for 61.0 s")]
    assert registry.healthy_count() == 1
    assert registry.route("read").id == "i2"

    clock.advance(599)
    changes = registry.tick()
    assert registry.get("i1") is not None
    assert changes == [HealthChange("i2", False, "no report for 630.0 s")]
    clock.advance(1)
    assert registry.tick() == [
        HealthChange(
            "i1", False, "forgotten after 600 s unhealthy: no report for 661.0 s", True
        )
    ]
    assert [e.id for e in registry.entries()] == ["i2"]
    with pytest.raises(NoHealthyIndexer, match="0 of 1 registered are healthy"):
        registry.route("write")


def test_probe_results_feed_health_and_changes_are_drained(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "i1", "i2")
    registry.probe_result("i1", False, "connection refused")
    registry.probe_result("i1", False, "connection refused")
    assert registry.healthy_count() == 1
    assert {registry.route("read").id for _ in range(20)} == {"i2"}
    registry.probe_result("i1", True, "")
    registry.probe_result("i1", True, "")
    assert registry.drain_changes() == [
        HealthChange("i1", False, "2 failed probes: connection refused"),
        HealthChange("i1", True, "probe ok"),
    ]
    assert registry.drain_changes() == []


def test_passive_ejection_takes_out_at_most_half(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "a", "b", "c", "d", "e")
    for id in "abcde":
        for _ in range(3):
            registry.finish(registry.begin(id), False, 0.01, "HTTP 500")

    changes = registry.drain_changes()
    assert [(c.id, c.healthy) for c in changes] == [
        ("a", False),
        ("b", False),
        ("c", True),
        ("d", True),
        ("e", True),
    ]
    assert changes[2].reason == (
        "not ejected after 3 failed requests: HTTP 500; "
        "at most 50% of the indexers may be ejected at once"
    )
    assert registry.healthy_count() == 3
    assert {e.errors for e in registry.entries()} == {3}

    # Once the ejections end, the others may take their turn.
    clock.advance(10)
    assert [c.healthy for c in registry.tick()] == [True, True]
    for _ in range(3):
        registry.finish(registry.begin("c"), False, 0.01, "timed out")
    assert registry.drain_changes() == [
        HealthChange("c", False, "ejected after 3 failed requests: timed out")
    ]


def test_a_lone_indexer_is_never_ejected(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "i1")
    for _ in range(9):
        registry.finish(registry.begin("i1"), False, 0.01, "HTTP 500")
    assert registry.get("i1").health.healthy  # type: ignore[union-attr]
    assert [c.healthy for c in registry.drain_changes()] == [True, True, True]


# routing -------------------------------------------------------------------------


def test_syncing_takes_writes_but_not_reads(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "i1", "i2")
    registry.report("i1", 0, "syncing")
    assert {registry.route("read").id for _ in range(30)} == {"i2"}
    assert {registry.route("write").id for _ in range(60)} == {"i1", "i2"}

    registry.report("i2", 0, "syncing")
    with pytest.raises(NoHealthyIndexer, match="2 of 2 are healthy but still syncing"):
        registry.route("read")
    assert registry.pick("read") is None
    registry.report("i1", 0, "serving")
    assert registry.route("read").id == "i1"

    assert (
        error_of(registry.route, "scan")[2]
        == "op: must be one of read, write; got 'scan'"
    )


@pytest.mark.parametrize("spacing", [0.0, 0.005, 0.02, 0.1])
def test_lookaside_spreads_onto_a_new_idle_indexer_without_flooding_it(
    clock: FakeClock, spacing: float
) -> None:
    # Issue 7, incident 3, with the picks at once or one after another: with
    # answers counted for a fixed 50 ms, picks 5 ms apart sent 61% to the
    # newcomer, 20 ms apart all of them.
    registry = make(clock, service_time=0.05)
    add(registry, "i1", "i2", "i3")
    for id in ("i1", "i2", "i3"):
        registry.report(id, 5, "serving")
    registry.register("i4", addr(7999), 10)
    registry.report("i4", 0, "serving")

    chosen = []
    for _ in range(200):
        chosen.append(registry.route("read").id)
        clock.advance(spacing)
    counts = Counter(chosen)
    assert chosen[:5] == ["i4"] * 5  # the idle one is preferred at first...
    assert counts["i4"] <= 80  # ...but gets at most 40%
    assert min(counts[id] for id in ("i1", "i2", "i3")) >= 30
    assert registry.routed_requests == 200
    assert sum(e.routed for e in registry.entries()) == 200

    # The loads the indexers report next hold whatever those picks became.
    clock.advance(0.05)
    for n, id in enumerate(("i1", "i2", "i3", "i4")):
        registry.report(id, n, "serving")
    assert [e.load for e in registry.entries()] == [0, 1, 2, 3]


def test_a_lookaside_answer_counts_until_a_load_is_observed_after_it(
    clock: FakeClock,
) -> None:
    registry = make(clock, service_time=0.05)
    add(registry, "i1")
    entry = registry.get("i1")
    assert entry is not None
    for _ in range(3):
        registry.route("read")
    clock.advance(0.03)
    registry.route("read")
    assert (entry.recent, entry.load) == (4, 4)

    # Too soon after every answer: their requests may not have arrived yet.
    clock.advance(0.01)
    registry.report("i1", 2, "serving")
    assert (entry.recent, entry.load) == (4, 6)
    # 50 ms after the first three: a proxied answer's header settles them.
    clock.advance(0.01)
    registry.observe_load("i1", 1, 10)
    assert (entry.recent, entry.load) == (1, 2)

    # Time alone settles nothing before the age limit...
    clock.advance(1.0)
    registry.tick()
    assert (entry.recent, entry.load) == (1, 2)
    # ...and the indexer's own service time, once known, replaces the default.
    registry.report("i1", 0, "serving", service=2.0)
    assert (entry.recent, entry.load) == (1, 1)
    clock.advance(0.98)
    registry.observe_load("i1", 0, 10)
    assert (entry.recent, entry.load) == (0, 0)


def test_lookaside_answers_stop_counting_at_the_age_limit(clock: FakeClock) -> None:
    # An indexer whose load is never observed (no report, no probe header)
    # does not gather answers for ever.
    registry = make(clock, lookaside_max_age=6.0)
    add(registry, "i1")
    for _ in range(2):
        registry.route("read")
    clock.advance(3.0)
    for _ in range(2):
        registry.route("read")

    def load() -> int:
        row: int = registry.routing_table()["indexers"][0]["load"]
        return row

    clock.advance(2.999)
    assert load() == 4
    clock.advance(0.001)
    assert load() == 2
    clock.advance(3.0)
    assert load() == 0

    # An answer settled early leaves its place in the age queue behind: the
    # newer one keeps counting to its own limit.
    registry.route("read")
    clock.advance(0.05)
    registry.observe_load("i1", 0, 10)
    registry.route("read")
    clock.advance(5.96)
    assert load() == 1
    clock.advance(0.04)
    assert load() == 0


def test_at_most_max_lookaside_answers_count_at_once(clock: FakeClock) -> None:
    registry = make(clock, max_lookaside=3, lookaside_max_age=3600.0)
    add(registry, "i1", "i2")
    for _ in range(5):
        registry.route("read")
    # The two oldest went first, whichever indexer they pointed at.
    assert sum(entry.recent for entry in registry.entries()) == 3
    clock.advance(0.05)
    for id in ("i1", "i2"):
        registry.report(id, 0, "serving")
    assert [entry.recent for entry in registry.entries()] == [0, 0]


_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("route"), st.sampled_from(["read", "write"])),
        st.tuples(
            st.just("advance"), st.sampled_from([0.0, 0.001, 0.02, 0.05, 2.99, 3.0])
        ),
        st.tuples(st.just("report"), st.sampled_from(["i1", "i2"])),
        st.tuples(st.just("observe"), st.sampled_from(["i1", "i2"])),
        st.tuples(st.just("service"), st.sampled_from(["i1", "i2"])),
        st.tuples(st.just("replace"), st.sampled_from(["i1", "i2"])),
        st.tuples(st.just("tick"), st.just("")),
    ),
    max_size=60,
)


@given(steps=_STEPS)
@settings(max_examples=300, deadline=None)
def test_lookaside_counts_follow_the_rule_and_never_go_negative(
    steps: list[tuple[str, Any]],
) -> None:
    # A model of the rule beside the registry: each answer counts until a
    # load is observed at least one service time after it, or until it is
    # ``lookaside_max_age`` old.
    clock = FakeClock()
    registry = make(clock, service_time=0.05, lookaside_max_age=6.0)
    add(registry, "i1", "i2")
    given_at: dict[Entry, list[float]] = {}  # held, so no id is reused
    moves = 0

    def settle(id: str) -> None:
        entry = registry.get(id)
        assert entry is not None
        wait = 0.05 if entry.service is None else entry.service
        kept = given_at.get(entry, [])
        given_at[entry] = [t for t in kept if t + wait > clock.now]

    for step, arg in steps:
        if step == "route":
            given_at.setdefault(registry.route(arg), []).append(clock.now)
        elif step == "advance":
            clock.advance(arg)
        elif step == "report":
            registry.report(arg, 1, "serving")
            settle(arg)
        elif step == "observe":
            registry.observe_load(arg, 1, 10)
            settle(arg)
        elif step == "service":
            registry.report(arg, 0, "serving", service=0.02)
            settle(arg)
        elif step == "replace":
            moves += 1
            registry.register(arg, addr(7500 + moves), 10, state="serving")
        else:
            registry.tick()

        rows = registry.routing_table()["indexers"]  # applies the age limit
        for entry, row in zip(registry.entries(), rows, strict=True):
            alive = [t for t in given_at.get(entry, []) if t > clock.now - 6.0]
            assert entry.recent == len(alive) >= 0
            assert row["load"] == entry.load >= 0

    clock.advance(6.0)
    registry.tick()
    assert [entry.recent for entry in registry.entries()] == [0, 0]


def test_least_latency_routes_by_the_service_time_indexers_report(
    clock: FakeClock,
) -> None:
    registry = make(clock, strategy="least_latency")
    add(registry, "fast", "slow")
    registry.report("fast", 4, "serving", service=0.020)  # 0.02 * 5 / 10
    registry.report("slow", 0, "serving", service=0.200)  # 0.2 * 1 / 10
    picked = [registry.pick() for _ in range(20)]
    assert {entry.id if entry else None for entry in picked} == {"fast"}

    # Each lookaside answer counts as load for a while: at 0.02 * 10 / 10 the
    # fast one's delay has reached the slow one's, and they share.
    routed = [registry.route("read").id for _ in range(12)]
    assert routed[:5] == ["fast"] * 5
    assert "slow" in routed[5:]
    clock.advance(1.0)

    # A proxied answer's headers are fresher than the report: the slow one
    # has recovered, and is idle.
    registry.observe_load("slow", 0, 10, 0.010)
    entry = registry.pick()
    assert entry is not None and entry.id == "slow"
    assert registry.routing_table()["indexers"][1]["service_ms"] == 10.0

    # A report or header without a service time keeps the last one known.
    registry.report("slow", 0, "serving")
    registry.observe_load("slow", 0, 10)
    assert registry.get("slow").service == 0.010  # type: ignore[union-attr]


def test_pick_counts_nothing(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "i1")
    entry = registry.pick()
    assert entry is not None
    assert (entry.routed, entry.load, registry.routed_requests) == (0, 0, 0)


def test_effective_load_adds_inflight_and_recent_picks(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "i1")
    registry.report("i1", 3, "serving")
    flight = registry.begin("i1")
    registry.route("read")
    entry = registry.get("i1")
    assert entry is not None
    assert (entry.load, entry.inflight, entry.recent, entry.routed) == (5, 1, 1, 2)
    assert registry.status()["indexers"][0]["load_percentage"] == 50.0

    registry.observe_load("i1", 7, 20)  # fresher than the report
    assert (entry.load, entry.capacity) == (9, 20)
    clock.advance(0.05)
    registry.finish(flight, True, 0.002)
    assert registry.routing_table()["indexers"][0]["load"] == 8
    registry.observe_load("i1", 7, 20)  # taken after the lookaside request came
    assert registry.routing_table()["indexers"][0]["load"] == 7


def _views(registry: Registry) -> dict[str, Callable[[], float]]:
    """Every place an indexer's load shows, as a load (not a ratio)."""

    def metric() -> float:
        text = Metrics(registry).render().decode()
        found = re.search(r'p2plb_indexer_load_ratio\{indexer="i1"\} (\S+)', text)
        assert found is not None
        return float(found[1]) * 10

    return {
        "status": lambda: registry.status()["indexers"][0]["current_load"],
        "routing table": lambda: registry.routing_table()["indexers"][0]["load"],
        "entries": lambda: registry.entries()[0].load,
        "metrics": metric,
        "registration": lambda: registry.register("i1", addr(7401), 10)[0].load,
    }


@pytest.mark.parametrize(
    "first", ["status", "routing table", "entries", "metrics", "registration"]
)
def test_every_view_agrees_once_lookaside_answers_expire(
    clock: FakeClock, first: str
) -> None:
    # Metrics and the indexer list once showed answers past their time, for
    # only the routing table and status expired them.
    registry = make(clock, lookaside_max_age=6.0)
    add(registry, "i1")
    registry.route("read")
    views = _views(registry)
    assert {name: view() for name, view in views.items()} == dict.fromkeys(views, 1)

    clock.advance(6.0)
    assert views[first]() == 0  # whichever is asked first expires them
    assert {name: view() for name, view in views.items()} == dict.fromkeys(views, 0)


def test_inflight_never_goes_below_zero(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "i1")
    flight = registry.begin("i1")
    registry.finish(flight, True, 0.004)
    registry.finish(flight, True, 0.004)
    registry.finish("i1", False, 0.0, "refused")
    entry = registry.get("i1")
    assert entry is not None
    assert (entry.inflight, entry.errors, entry.load) == (0, 1, 0)
    assert entry.latency.percentiles() == (4.0, 4.0)

    flight = registry.begin("i1")
    registry.unregister("i1")
    registry.finish(flight, False, 0.1, "refused")
    registry.finish(flight, False, 0.1, "refused")
    registry.finish("i1", True, 0.1)
    assert entry.inflight == 0

    ghost = registry.begin("nobody")
    registry.finish(ghost, True, 0.1)
    assert registry.routed_requests == 2


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_routes_and_can_be_switched_to(
    clock: FakeClock, name: str
) -> None:
    registry = make(clock)
    add(registry, "i1", "i2", "i3")
    registry.report("i3", 0, "syncing")
    registry.set_strategy(name)
    assert registry.strategy == name
    assert {registry.route("read").id for _ in range(60)} == {"i1", "i2"}
    assert {registry.route("write").id for _ in range(90)} == {"i1", "i2", "i3"}


def test_unknown_strategy_is_refused_and_changes_nothing(clock: FakeClock) -> None:
    registry = make(clock, strategy="p2c")
    assert error_of(registry.set_strategy, "nope")[:2] == (400, "invalid_strategy")
    assert registry.strategy == "p2c"


def test_latency_window_is_bounded_and_ranks() -> None:
    from p2plb.registry import LatencyWindow

    window = LatencyWindow()
    assert window.percentiles() == (None, None)
    for n in range(1, 3001):
        window.add(n / 1000.0)
    assert len(window) == 1024
    # The last 1024 samples: 1977 ms .. 3000 ms.
    assert window.percentiles() == (2488.0, 2990.0)


# persistence ---------------------------------------------------------------------


def populated(clock: FakeClock) -> Registry:
    registry = make(clock, strategy="round_robin")
    registry.register("i1", addr(7401), 8, zone="eu", instance="x1")
    registry.register("i2", addr(7402), 4)
    registry.report("i1", 3, "serving", served=40)
    registry.report("i2", 1, "syncing", served=2)
    registry.finish(registry.begin("i1"), False, 0.1, "HTTP 500")
    registry.route("write")
    return registry


def test_snapshot_restore_round_trip(clock: FakeClock) -> None:
    before = populated(clock)
    snapshot = json.loads(json.dumps(before.snapshot()))
    assert snapshot["strategy"] == "round_robin"
    assert snapshot["indexers"][0] == {
        "id": "i1",
        "address": addr(7401),
        "capacity": 8,
        "zone": "eu",
        "instance": "x1",
        "state": "serving",
        "reported_load": 3,
        "requests": 40,
        "routed": snapshot["indexers"][0]["routed"],
        "errors": 1,
        "served": 40,
    }

    clock.advance(100)
    after = make(clock)
    after.restore(snapshot)
    assert after.snapshot() == snapshot
    assert (after.strategy, after.total_requests, after.routed_requests) == (
        "round_robin",
        42,
        2,
    )
    assert [(e.health.healthy, e.health.reason) for e in after.entries()] == [
        (False, "restored; awaiting probe")
    ] * 2
    with pytest.raises(NoHealthyIndexer):
        after.route("write")

    after.probe_result("i1", True, "")
    assert after.drain_changes() == [HealthChange("i1", True, "probe ok")]
    assert after.route("read").id == "i1"
    after.report("i1", 3, "serving", served=45)  # the counter carries on
    restored = after.get("i1")
    assert restored is not None
    assert (restored.requests, after.total_requests) == (45, 47)


def _mutations() -> list[tuple[str, Any]]:
    def drop(key: str) -> Any:
        return lambda s: s.pop(key)

    def row(key: str, value: Any) -> Any:
        return lambda s: s["indexers"][0].__setitem__(key, value)

    return [
        ("not a dict", lambda s: s.clear() or s.update({"x": 1})),
        ("missing strategy", drop("strategy")),
        ("extra key", lambda s: s.__setitem__("extra", 1)),
        ("wrong version", lambda s: s.__setitem__("version", 2)),
        ("version as bool", lambda s: s.__setitem__("version", True)),
        ("unknown strategy", lambda s: s.__setitem__("strategy", "fastest")),
        ("negative total", lambda s: s.__setitem__("total_requests", -1)),
        ("indexers not a list", lambda s: s.__setitem__("indexers", {})),
        ("row not a dict", lambda s: s["indexers"].append("i3")),
        ("bad id", row("id", "no spaces allowed")),
        ("bad address", row("address", "127.0.0.1:7401")),
        ("zero capacity", row("capacity", 0)),
        ("float capacity", row("capacity", 2.5)),
        ("bool load", row("reported_load", False)),
        ("bad state", row("state", "asleep")),
        ("zone not a string", row("zone", 5)),
        ("served negative", row("served", -1)),
        ("missing errors", lambda s: s["indexers"][0].pop("errors")),
        ("duplicate id", lambda s: s["indexers"].append(dict(s["indexers"][0]))),
        ("load past 64 bits", row("reported_load", 10**400)),
        ("capacity past the API's", row("capacity", 10**30)),
        ("total past 64 bits", lambda s: s.__setitem__("total_requests", 10**400)),
        ("requests as bool", row("requests", True)),
        ("zone too long", row("zone", "z" * 65)),
    ]


@pytest.mark.parametrize(
    ("case", "mutate"), _mutations(), ids=[m[0] for m in _mutations()]
)
def test_restore_rejects_wrong_shapes(clock: FakeClock, case: str, mutate: Any) -> None:
    snapshot = populated(clock).snapshot()
    broken = copy.deepcopy(snapshot)
    mutate(broken)

    target = make(clock)
    add(target, "keep")
    with pytest.raises(ValueError, match=r"^snapshot"):
        target.restore(broken)
    assert [e.id for e in target.entries()] == ["keep"]  # nothing changed


# Numbers at and past every bound the API holds a figure to, beside any JSON.
_BOUNDS = st.sampled_from(
    [-1, 0, 1, MAX_CAPACITY, MAX_CAPACITY + 1, MAX_COUNT, MAX_COUNT + 1, 10**400]
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | _BOUNDS
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@given(path=st.integers(0, 1_000), value=_BOUNDS | _JSON)
@settings(max_examples=300, deadline=None)
def test_any_field_of_any_json_type_is_a_value_error(path: int, value: Any) -> None:
    # A state file is JSON: whatever a field holds instead of what belongs
    # there, restoring refuses with the ValueError the balancer sets aside
    # (an unhashable strategy once crashed it at every start), or restores a
    # registry that status, metrics and the next save can all show (a load
    # past 64 bits once made them fail for as long as it was saved again).
    clock = FakeClock()
    snapshot = populated(clock).snapshot()
    fields: list[tuple[Any, Any]] = [(snapshot, key) for key in snapshot]
    for row in snapshot["indexers"]:
        fields += [(row, key) for key in row]
    holder, key = fields[path % len(fields)]
    holder[key] = value

    target = make(clock)
    add(target, "keep")
    try:
        target.restore(snapshot)
    except ValueError:
        assert [e.id for e in target.entries()] == ["keep"]
        return
    target.status()
    target.routing_table()
    Metrics(target).render()
    make(clock).restore(json.loads(json.dumps(target.snapshot())))


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("reported_load", 10**400, f"expected an integer from 0 to {MAX_COUNT}, got "),
        ("capacity", 10**6 + 1, "must be an integer from 1 to 1000000, got 1000001"),
        ("capacity", True, "expected an integer, got True"),
        ("errors", False, f"expected an integer from 0 to {MAX_COUNT}, got False"),
        ("served", MAX_COUNT + 1, f"expected an integer from 0 to {MAX_COUNT}, got "),
        ("zone", "", "must be 1 to 64 characters"),
        ("instance", "i" * 129, "must be 1 to 128 characters"),
    ],
)
def test_restore_holds_rows_to_the_bounds_of_the_api(
    clock: FakeClock, where: str, value: Any, message: str
) -> None:
    snapshot = populated(clock).snapshot()
    snapshot["indexers"][1][where] = value

    with pytest.raises(ValueError) as refused:
        make(clock).restore(snapshot)
    assert str(refused.value).startswith(f"snapshot.indexers[1].{where}: {message}")


def test_restore_rejects_non_objects(clock: FakeClock) -> None:
    registry = make(clock)
    values: list[Any] = [None, [], "state", 3]
    for value in values:
        with pytest.raises(ValueError, match="snapshot: expected an object"):
            registry.restore(value)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_pick_can_exclude_indexers_already_tried(clock: FakeClock, name: str) -> None:
    registry = make(clock, strategy=name)
    add(registry, "i1", "i2", "i3")
    registry.report("i1", 0, "serving")
    registry.report("i2", 9, "serving")
    registry.report("i3", 9, "serving")

    for _ in range(30):
        entry = registry.pick("read", exclude={"i1"})
        assert entry is not None and entry.id in ("i2", "i3")
    assert registry.pick("read", exclude={"i1", "i2", "i3"}) is None
    assert registry.healthy_count() == 3
    if name == "least_load":
        assert registry.pick("read").id == "i1"  # type: ignore[union-attr]


def test_status_and_routing_table_shapes(clock: FakeClock) -> None:
    registry = make(clock)
    add(registry, "i1")
    registry.report("i1", 2, "serving", served=10, service=0.0125)
    before = registry.generation
    registry.finish(registry.begin("i1"), True, 0.0019)
    assert registry.generation > before
    assert registry.effective_load(registry.get("i1")) == 2  # type: ignore[arg-type]

    clock.advance(1)
    assert registry.status() == {
        "healthy_indexers": 1,
        "total_indexers": 1,
        "total_requests": 10,
        "routed_requests": 1,
        "strategy": "least_load",
        "indexers": [
            {
                "id": "i1",
                "address": addr(7401),
                "zone": None,
                "capacity": 10,
                "current_load": 2,
                "load_percentage": 20.0,
                "healthy": True,
                "state": "serving",
                "health_reason": "report 1.0 s ago",
                "last_report_age_s": 1.0,
                "requests": 10,
                "routed": 1,
                "errors": 0,
                "latency_ms": {"p50": 1.9, "p99": 1.9},
            }
        ],
    }
    table = registry.routing_table()
    assert table == {
        "version": registry.version,
        "strategy": "least_load",
        "indexers": [
            {
                "id": "i1",
                "address": addr(7401),
                "capacity": 10,
                "load": 2,
                "state": "serving",
                "healthy": True,
                "zone": None,
                "service_ms": 12.5,
            }
        ],
    }


def test_replaced_processes_are_remembered_for_forget_after(clock: FakeClock) -> None:
    registry = make(clock, forget_after=100.0)
    registry.register("i1", addr(7401), 10, instance="old")
    registry.register("i1", addr(7402), 10, instance="new")
    registry.unregister("i1")
    clock.advance(99)
    registry.tick()
    assert error_of(registry.report, "i1", 0, "serving", instance="old")[0] == 409
    clock.advance(1)
    registry.tick()
    assert error_of(registry.report, "i1", 0, "serving", instance="old")[0] == 404

    # A process that registers again is no longer taken for a replaced one.
    registry.register("i1", addr(7401), 10, instance="a")
    registry.register("i1", addr(7401), 10, instance="b")
    registry.register("i1", addr(7401), 10, instance="a")
    assert registry.report("i1", 1, "serving", instance="a").instance == "a"
    assert error_of(registry.report, "i1", 0, "serving", instance="b")[0] == 409


def test_a_report_is_not_counted_twice_with_the_requests_in_flight(
    clock: FakeClock,
) -> None:
    registry = make(clock)
    registry.register("i1", "http://127.0.0.1:9001", 10)
    flights = [registry.begin("i1") for _ in range(3)]
    entry = registry.get("i1")
    assert entry is not None and entry.load == 3

    registry.report("i1", 5, "serving")  # the indexer counts our 3 among its 5
    assert entry.load == 5

    for flight in flights:
        registry.finish(flight, ok=True, latency_s=0.01)
    assert entry.load == 2  # the 2 that came from elsewhere

    registry.observe_load("i1", 4, 10)  # on an answer, with nothing of ours left
    assert entry.load == 4
    flight = registry.begin("i1")
    registry.observe_load("i1", 4, 10)  # the answer to that one: it left the count
    assert entry.load == 5
    registry.finish(flight, ok=True, latency_s=0.01)
    assert entry.load == 4


def test_the_balancer_times_silence_on_the_monotonic_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from p2plb import balancer as balancer_module
    from p2plb.config import build_config

    now = {"monotonic": 1000.0, "wall": 1.7e9}
    monkeypatch.setattr(balancer_module.time, "monotonic", lambda: now["monotonic"])
    monkeypatch.setattr(balancer_module.time, "time", lambda: now["wall"])
    registry = balancer_module.Balancer(build_config("balancer", {})).registry
    registry.register("i1", "http://127.0.0.1:9001", 1, state="serving")
    registry.report("i1", 0, "serving")

    # The wall clock jumps a day ahead (NTP, a VM resumed): nothing changes.
    now["wall"] += 86_400
    assert registry.tick() == []
    assert registry.healthy_count() == 1

    # Only time that really passed counts.
    now["monotonic"] += 61
    assert registry.tick() == [HealthChange("i1", False, "no report for 61.0 s")]
