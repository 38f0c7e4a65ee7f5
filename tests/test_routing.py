"""The routed client's table and retry budget, without a network: fake clock,
seeded randomness, whole observable states."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from p2plb.budget import RetryBudget, backoff
from p2plb.routing import RoutingTable, Row, Table
from p2plb.strategies import STRATEGIES, make_strategy

ALL = list(STRATEGIES)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def row(
    id: str,
    capacity: int = 10,
    load: int = 0,
    state: str = "serving",
    healthy: bool = True,
) -> Row:
    return Row(
        id, f"http://127.0.0.1:{7400 + int(id[1:])}", capacity, load, state, healthy
    )


def routing(
    *rows: Row, strategy: str = "least_load", seed: int = 1, **options: Any
) -> tuple[RoutingTable, Clock]:
    clock = Clock()
    table = RoutingTable(clock=clock, rng=random.Random(seed), **options)
    table.apply(Table(7, strategy, rows))
    return table, clock


def picks(
    table: RoutingTable, op: str = "read", n: int = 200, **kw: Any
) -> Counter[str]:
    found: Counter[str] = Counter()
    for _ in range(n):
        target = table.pick(op, **kw)
        found[target.id if target else "none"] += 1
    return found


# -- applying a table --------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL)
def test_reads_skip_unhealthy_and_syncing_writes_allow_syncing(strategy: str) -> None:
    table, _ = routing(
        row("i1"),
        row("i2", state="syncing"),
        row("i3", healthy=False),
        row("i4"),
        strategy=strategy,
    )

    assert set(picks(table, "read")) == {"i1", "i4"}
    assert set(picks(table, "write")) == {"i1", "i2", "i4"}
    assert (table.version, table.strategy, table.source) == (7, strategy, "balancer")


def test_a_new_table_replaces_rows_and_keeps_what_the_client_learnt() -> None:
    table, _ = routing(row("i1"), row("i2"))
    for _ in range(3):
        table.begin("i1")

    table.apply(Table(8, "least_load", (row("i1"), row("i3"))))

    assert set(picks(table)) == {"i3"}  # i1 still has 3 of 10 in flight from us
    assert table.version == 8 and len(table) == 2
    target = table.pick("read")
    assert target is not None and target.address == "http://127.0.0.1:7403"


def test_none_eligible_is_explained() -> None:
    table, _ = routing(row("i1", state="syncing"), row("i2", healthy=False))

    assert table.pick("read") is None
    assert table.describe_none("read") == (
        "no indexer can serve a read: 1 of 2 in the routing table are healthy "
        "but none is serving (still syncing)"
    )
    table.apply(Table(8, "least_load", (row("i2", healthy=False),)))
    assert table.pick("write") is None
    assert table.describe_none("write") == (
        "no healthy indexer: 0 of 1 in the routing table"
    )


def test_parse_reads_a_balancer_table_and_rejects_garbage() -> None:
    body = {
        "version": 3,
        "strategy": "p2c",
        "indexers": [
            {
                "id": "i1",
                "address": "http://127.0.0.1:7401",
                "capacity": 4,
                "load": 2,
                "state": "serving",
                "healthy": True,
                "zone": None,
            }
        ],
    }
    parsed = Table.parse(body)
    assert parsed == Table(
        3, "p2c", (Row("i1", "http://127.0.0.1:7401", 4, 2, "serving", True),)
    )
    # A strategy from a newer balancer runs as least_load.
    assert Table.parse(body | {"strategy": "latency"}).strategy == "least_load"

    # Out of the balancer's bounds: a load past 64 bits once overflowed the
    # client's strategies.
    for field, value, expected in (
        ("capacity", 0, "capacity of i1: expected 1 to 1000000, got 0"),
        ("capacity", 10**30, "capacity of i1: expected 1 to 1000000, got 10"),
        ("load", -1, "load of i1: expected 0 to 9223372036854775807, got -1"),
        ("load", 10**400, "load of i1: expected 0 to 9223372036854775807, got 1"),
        ("load", True, "load of i1: expected 0 to 9223372036854775807, got True"),
    ):
        bad_row = body["indexers"][0] | {field: value}
        with pytest.raises(ValueError, match=f"^indexers.{expected}"):
            Table.parse(body | {"indexers": [bad_row]})

    # service_ms, in milliseconds on the wire, is seconds in the row.
    timed = body["indexers"][0] | {"service_ms": 12.5}
    assert Table.parse(body | {"indexers": [timed]}).rows[0].service == 0.0125
    for garbage in ("12", -1, True, float("nan")):
        bad_row = body["indexers"][0] | {"service_ms": garbage}
        with pytest.raises(ValueError, match=r"indexers.service_ms of i1: got "):
            Table.parse(body | {"indexers": [bad_row]})
    with pytest.raises(ValueError, match='expected an object with an "indexers"'):
        Table.parse([])


def test_static_indexers_are_round_robin_at_capacity_one_until_they_say() -> None:
    clock = Clock()
    table = RoutingTable(clock=clock, rng=random.Random(3))
    table.use_static(["http://127.0.0.1:1", "http://127.0.0.1:2"])

    assert (table.strategy, table.source, table.version) == (
        "round_robin",
        "indexers",
        None,
    )
    assert picks(table, n=100) == {"http://127.0.0.1:1": 50, "http://127.0.0.1:2": 50}

    # An answer says the first one serves 3 at once: it gets 3 turns in 4.
    table.begin("http://127.0.0.1:1")
    table.finish("http://127.0.0.1:1", "ok", (0, 3))
    assert picks(table, n=100) == {"http://127.0.0.1:1": 75, "http://127.0.0.1:2": 25}


# -- load: own requests in flight and P2PLB-Load ------------------------------------


def test_own_requests_in_flight_add_to_the_table_load() -> None:
    table, _ = routing(row("i1", capacity=10, load=2), row("i2", capacity=10, load=2))
    for _ in range(3):
        table.begin("i1")

    assert picks(table) == {"i2": 200}
    for _ in range(3):
        table.finish("i1", "ok")
    assert set(picks(table)) == {"i1", "i2"}


def test_a_load_header_overrides_the_table_until_it_goes_stale() -> None:
    table, clock = routing(row("i1"), row("i2"), header_ttl=1.0)

    table.begin("i1")
    table.finish("i1", "ok", (8, 10))
    assert picks(table) == {"i2": 200}

    clock.now += 0.5
    table.apply(Table(8, "least_load", (row("i1"), row("i2"))))
    assert picks(table) == {"i2": 200}, "a header half a second old beats the table"

    clock.now += 0.6
    table.apply(Table(9, "least_load", (row("i1"), row("i2"))))
    assert set(picks(table)) == {"i1", "i2"}, "a stale header gives way to the table"


def test_load_seen_through_the_proxy_counts_too() -> None:
    table, _ = routing(row("i1"), row("i2"))
    table.observe_load("i2", 9, 10)
    table.count("i2", ok=True)
    table.count("i2", ok=False)

    assert picks(table) == {"i1": 200}
    assert table.requests == {"i2": 2} and table.errors == {"i2": 1}


def test_least_latency_follows_the_service_time_answers_carry() -> None:
    table, clock = routing(
        Row("i1", "http://127.0.0.1:7401", 4, 0, "serving", True, None, 0.050),
        Row("i2", "http://127.0.0.1:7402", 4, 0, "serving", True, None, 0.010),
        strategy="least_latency",
        header_ttl=1.0,
    )
    assert picks(table) == {"i2": 200}

    # i2 answers that it has slowed down: its header beats the table.
    table.begin("i2")
    table.finish("i2", "ok", (0, 4), 0.200)
    assert picks(table) == {"i1": 200}
    clock.now += 0.5
    fresh = (
        Row("i1", "http://127.0.0.1:7401", 4, 0, "serving", True, None, 0.050),
        Row("i2", "http://127.0.0.1:7402", 4, 0, "serving", True, None, 0.010),
    )
    table.apply(Table(8, "least_latency", fresh))
    assert picks(table) == {"i1": 200}, "a header half a second old beats the table"

    # Later the table's figure, from the indexer's newer report, wins again;
    # an answer seen through the proxy counts as a header.
    clock.now += 0.6
    table.apply(Table(9, "least_latency", fresh))
    assert picks(table) == {"i2": 200}
    table.observe_load("i2", 0, 4, 0.300)
    assert picks(table) == {"i1": 200}


# -- outliers ----------------------------------------------------------------------


def test_an_indexer_failing_three_in_a_row_is_avoided_then_tried_again() -> None:
    table, clock = routing(row("i1"), row("i2"), avoid_for=5.0)

    for _ in range(2):
        table.begin("i1")
        table.finish("i1", "failed")
    table.begin("i1")
    table.finish("i1", "busy")  # a load signal neither counts nor resets
    assert "i1" in picks(table)
    table.begin("i1")
    table.finish("i1", "failed")
    assert picks(table) == {"i2": 200}
    assert table.errors == {"i1": 4}

    clock.now += 4.9
    assert picks(table) == {"i2": 200}
    clock.now += 0.1
    assert "i1" in picks(table)

    # Back on probation: one failure sends it away again, for twice as long.
    table.begin("i1")
    table.finish("i1", "failed")
    clock.now += 9.9
    assert picks(table) == {"i2": 200}
    clock.now += 0.1
    assert "i1" in picks(table)

    # A success ends the probation and the doubling.
    table.begin("i1")
    table.finish("i1", "ok")
    for _ in range(3):
        table.begin("i1")
        table.finish("i1", "failed")
    clock.now += 5.0
    assert "i1" in picks(table)


def test_a_request_its_caller_gave_up_says_nothing_about_the_indexer() -> None:
    table, _ = routing(row("i1"), row("i2"))
    for _ in range(2):
        table.begin("i1")
        table.finish("i1", "failed")
    for _ in range(5):
        table.begin("i1")
        table.finish("i1", "cancelled")

    assert "i1" in picks(table)
    assert table.errors == {"i1": 2} and table.requests == {"i1": 7}


def test_success_resets_the_failures_in_a_row() -> None:
    table, _ = routing(row("i1"), row("i2"))
    for outcome in ("failed", "failed", "ok", "failed", "failed"):
        table.begin("i1")
        table.finish("i1", outcome)  # type: ignore[arg-type]

    assert "i1" in picks(table)


def test_when_every_indexer_is_avoided_the_first_to_return_is_used() -> None:
    table, clock = routing(row("i1"), row("i2"))
    for id in ("i1", "i2"):
        for _ in range(3):
            table.begin(id)
            table.finish(id, "failed")
        clock.now += 1.0

    assert picks(table) == {"i1": 200}
    assert picks(table, exclude={"i1"}) == {"i2": 200}


@pytest.mark.parametrize("strategy", ALL)
def test_exclude_is_respected_while_there_is_another(strategy: str) -> None:
    table, _ = routing(row("i1", load=0), row("i2", load=9), strategy=strategy)

    assert picks(table, exclude={"i1"}) == {"i2": 200}
    assert picks(table, exclude={"i1", "i2"}) == {"none": 200}


# -- the herd --------------------------------------------------------------------------

CAPACITY_SETS = [
    [4, 4, 4],
    [1, 2, 3],
    [2, 3, 4, 5],
    [1, 1, 2, 2],
    [2, 2, 3, 3, 4],
    [4, 4, 5, 5, 6, 6],
]


def herd(
    strategy: str, capacities: list[int], seed: int, loads: list[int]
) -> Counter[str]:
    """50 clients, each with its own table from the same answer, pick once."""
    rows = tuple(
        row(f"i{n}", capacity=c, load=load)
        for n, (c, load) in enumerate(zip(capacities, loads, strict=True))
    )
    chosen: Counter[str] = Counter()
    for client in range(50):
        table = RoutingTable(clock=Clock(), rng=random.Random(seed * 1000 + client))
        table.apply(Table(1, strategy, rows))
        target = table.pick("read")
        assert target is not None
        chosen[target.id] += 1
    return chosen


@pytest.mark.parametrize("capacities", CAPACITY_SETS, ids=str)
@pytest.mark.parametrize("strategy", ALL)
def test_fifty_clients_on_one_fresh_table_stay_within_twice_their_share(
    strategy: str, capacities: list[int]
) -> None:
    total = sum(capacities)
    for seed in range(3):
        chosen = herd(strategy, capacities, seed, [0] * len(capacities))
        for n, capacity in enumerate(capacities):
            share = 50 * capacity / total
            assert chosen[f"i{n}"] <= 2 * share, (seed, chosen)


@pytest.mark.parametrize("strategy", ALL)
def test_on_average_the_herd_splits_in_proportion_to_capacity(strategy: str) -> None:
    capacities = [1, 2, 3, 6]
    chosen: Counter[str] = Counter()
    for seed in range(40):
        chosen += herd(strategy, capacities, seed, [0, 0, 0, 0])

    for n, capacity in enumerate(capacities):
        share = 40 * 50 * capacity / sum(capacities)
        assert 0.8 * share <= chosen[f"i{n}"] <= 1.2 * share, chosen


def test_near_ties_do_not_send_the_herd_to_one_indexer() -> None:
    # Loads one or two requests apart on capacity 64: the strategy alone would
    # send all fifty to i0; the client's tie rule spreads them.
    loads = [1, 2, 3]
    bare: Counter[str] = Counter()
    for client in range(50):
        strategy = make_strategy("least_load", random.Random(client))
        for n, load in enumerate(loads):
            strategy.set(f"i{n}", 64, load)
        bare[strategy.pick() or "none"] += 1
    assert bare == {"i0": 50}

    chosen = herd("least_load", [64, 64, 64], seed=0, loads=loads)
    assert set(chosen) == {"i0", "i1", "i2"}
    assert max(chosen.values()) <= 2 * 50 / 3


def test_a_clearly_less_loaded_indexer_still_wins() -> None:
    chosen = herd("least_load", [10, 10, 10], seed=0, loads=[0, 5, 5])
    assert chosen == {"i0": 50}


def test_the_herd_guard_never_trades_a_fast_pick_for_a_slow_indexer() -> None:
    rows = (
        Row("i0", "http://127.0.0.1:7400", 4, 0, "serving", True, None, 0.100),
        Row("i1", "http://127.0.0.1:7401", 4, 0, "serving", True, None, 0.020),
        Row("i2", "http://127.0.0.1:7402", 4, 0, "serving", True, None, 0.021),
    )
    chosen: Counter[str] = Counter()
    for client in range(50):
        table = RoutingTable(clock=Clock(), rng=random.Random(client))
        table.apply(Table(1, "least_latency", rows))
        target = table.pick("read")
        assert target is not None
        chosen[target.id] += 1
    # i0 is as idle as the others but five times slower; i1 and i2 are alike.
    assert set(chosen) == {"i1", "i2"}
    assert max(chosen.values()) <= 2 * 50 / 2


# -- the retry budget ----------------------------------------------------------------


def test_the_budget_starts_with_its_reserve_and_earns_a_fifth_per_call() -> None:
    clock = Clock()
    budget = RetryBudget(clock=clock, ratio=0.2, reserve=10.0, refill_per_s=1.0)

    assert [budget.spend() for _ in range(11)] == [True] * 10 + [False]
    for _ in range(4):
        budget.deposit()
    assert budget.spend() is False, "four calls earn 0.8 of a retry"
    budget.deposit()
    assert budget.spend() is True and budget.tokens == pytest.approx(0.0)


def test_the_budget_keeps_retries_near_a_fifth_of_calls_under_failure() -> None:
    clock = Clock()
    budget = RetryBudget(clock=clock)
    retries = 0
    for _ in range(1000):
        budget.deposit()
        for _ in range(3):  # every call would like three retries
            if budget.spend():
                retries += 1
    assert retries == 10 + 200


def test_time_refills_the_reserve_only_and_deposits_stop_at_the_cap() -> None:
    clock = Clock()
    budget = RetryBudget(clock=clock, reserve=10.0, refill_per_s=1.0, cap=12.0)
    while budget.spend():
        pass
    clock.now += 4.0
    assert budget.tokens == pytest.approx(4.0)
    clock.now += 100.0
    assert budget.tokens == pytest.approx(10.0)
    for _ in range(100):
        budget.deposit()
    assert budget.tokens == pytest.approx(12.0)

    with pytest.raises(ValueError, match="cap >= reserve"):
        RetryBudget(clock=clock, reserve=5.0, cap=1.0)


def test_backoff_is_jittered_grows_and_honours_retry_after_up_to_its_cap() -> None:
    rng = random.Random(5)
    first = [backoff(1, rng, base=0.01, cap=0.25) for _ in range(200)]
    fifth = [backoff(5, rng, base=0.01, cap=0.25) for _ in range(200)]
    assert min(first) >= 0 and max(first) <= 0.01
    assert max(fifth) <= 0.16 and max(fifth) > 0.1
    assert len(set(first)) == 200
    assert backoff(1, rng, retry_after=0.1) >= 0.1
    assert backoff(1, rng, cap=0.25, retry_after=30.0) == 0.25


def test_probes_in_fallback_back_off_to_a_ceiling_and_stay_there() -> None:
    from p2plb.fallback import Balancers

    balancers = Balancers(
        ["http://127.0.0.1:1"],
        RoutingTable(clock=lambda: 0.0, rng=random.Random(1)),
        random.Random(2),
    )
    balancers.in_fallback = True
    waits = [balancers.wait(1.0) for _ in range(5_000)]  # hours without a balancer

    assert 0.1 <= waits[0] <= 0.2
    assert all(2.5 <= w <= 5.0 for w in waits[10:])


def test_every_operation_picks_on_the_loads_of_the_moment() -> None:
    # Loads reach a strategy lazily, at its next pick: each operation's pick
    # must still see every change made since, however the calls interleave.
    table, clock = routing(row("i1"), row("i2"), near_tie=0.0)
    for _ in range(5):
        table.begin("i1")
    assert picks(table, "read", 1) == Counter({"i2": 1})
    assert picks(table, "write", 1) == Counter({"i2": 1})

    for _ in range(5):
        table.finish("i1", "ok")
        table.begin("i2")
    table.observe_load("i2", 3, 10)  # and the header says more is queued there
    assert picks(table, "write", 1) == Counter({"i1": 1})
    assert picks(table, "read", 1) == Counter({"i1": 1})

    for _ in range(3):  # i1 fails: avoided for both operations at once
        table.begin("i1")
        table.finish("i1", "failed", error="connection refused")
    clock.now += 0.5
    assert set(picks(table, "write", 20)) == {"i2"}
    assert set(picks(table, "read", 20)) == {"i2"}
