"""The five strategies, driven directly with seeded generators."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator, Mapping

import pytest

from p2plb.buckets import LowestIndex
from p2plb.config import STRATEGY_NAMES
from p2plb.errors import RequestError
from p2plb.strategies import (
    BUCKET_WIDTH,
    LATENCY_TIE,
    STRATEGIES,
    LeastLatency,
    LeastLoad,
    RoundRobin,
    Strategy,
    make_strategy,
)

ALL = list(STRATEGY_NAMES)


def build(
    name: str, backends: Mapping[str, tuple[int, float]], seed: int = 1
) -> Strategy:
    strategy = make_strategy(name, random.Random(seed))
    for id, (capacity, load) in backends.items():
        strategy.set(id, capacity, load)
    return strategy


def picks(strategy: Strategy, n: int) -> list[str]:
    chosen = [strategy.pick() for _ in range(n)]
    assert None not in chosen
    return [id for id in chosen if id is not None]


def longest_run(sequence: list[str], id: str) -> int:
    best = run = 0
    for item in sequence:
        run = run + 1 if item == id else 0
        best = max(best, run)
    return best


# every strategy ----------------------------------------------------------------


def test_registry_of_strategies_matches_config() -> None:
    assert tuple(STRATEGIES) == STRATEGY_NAMES
    for name in ALL:
        assert make_strategy(name, random.Random(0)).name == name


def test_unknown_strategy_is_a_400() -> None:
    with pytest.raises(RequestError) as caught:
        make_strategy("fastest", random.Random(0))
    assert (caught.value.status, caught.value.code) == (400, "invalid_strategy")
    assert caught.value.message == (
        "strategy: must be one of least_load, round_robin, random, p2c, "
        "least_latency; got 'fastest'"
    )


@pytest.mark.parametrize("name", ALL)
def test_empty_picks_none_and_absent_discard_is_harmless(name: str) -> None:
    strategy = make_strategy(name, random.Random(0))
    assert strategy.pick() is None
    strategy.discard("ghost")
    assert len(strategy) == 0

    strategy.set("a", 4, 1)
    strategy.discard("ghost")
    assert ("a" in strategy, "ghost" in strategy, len(strategy)) == (True, False, 1)
    assert picks(strategy, 5) == ["a"] * 5

    strategy.discard("a")
    assert strategy.pick() is None
    assert "a" not in strategy


@pytest.mark.parametrize("name", ALL)
def test_rejects_impossible_capacity_and_load(name: str) -> None:
    strategy = make_strategy(name, random.Random(0))
    with pytest.raises(ValueError, match="capacity"):
        strategy.set("a", 0, 0)
    with pytest.raises(ValueError, match="load"):
        strategy.set("a", 1, -1)
    assert len(strategy) == 0


@pytest.mark.parametrize("name", ALL)
def test_ties_do_not_go_to_the_first_registered(name: str) -> None:
    firsts = Counter(
        build(name, {"a": (8, 0), "b": (8, 0), "c": (8, 0)}, seed).pick()
        for seed in range(60)
    )
    assert set(firsts) == {"a", "b", "c"}
    assert max(firsts.values()) < 40


@pytest.mark.parametrize("name", ALL)
def test_ten_thousand_backends(name: str) -> None:
    backends = {f"i{n}": (1 + n % 7, n % 13) for n in range(10_000)}
    strategy = build(name, backends)
    assert len(strategy) == 10_000

    for id in list(backends)[::2]:
        strategy.discard(id)
    chosen = picks(strategy, 2_000)
    assert len(strategy) == 5_000
    assert all(int(id[1:]) % 2 == 1 for id in chosen)
    if name == "least_load":
        assert {backends[id][1] for id in chosen} == {0}


# round_robin --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(10))
def test_round_robin_is_exact_over_every_cycle(seed: int) -> None:
    strategy = build("round_robin", {"a": (3, 0), "b": (2, 9), "c": (1, 0)}, seed)
    sequence = picks(strategy, 600)
    for start in range(len(sequence) - 6):
        window = Counter(sequence[start : start + 6])
        assert window == {"a": 3, "b": 2, "c": 1}, (start, sequence[:12])


@pytest.mark.parametrize("seed", range(20))
def test_round_robin_is_smooth(seed: int) -> None:
    strategy = build("round_robin", {"a": (5, 0), "b": (1, 0), "c": (1, 0)}, seed)
    sequence = picks(strategy, 70)
    # b and c are spread apart, so a never runs more than 4 in a row (the ideal
    # is 3, a plain weighted rotation gives 5 and more).
    assert longest_run(sequence, "a") <= 4, "".join(sequence)
    for start in range(0, 70, 7):
        assert Counter(sequence[start : start + 7]) == {"a": 5, "b": 1, "c": 1}


def test_round_robin_ignores_load() -> None:
    strategy = build("round_robin", {"a": (1, 0), "b": (1, 0)})
    strategy.set("a", 1, 1000)
    assert Counter(picks(strategy, 100)) == {"a": 50, "b": 50}


def test_round_robin_joiner_gets_no_burst() -> None:
    strategy = build("round_robin", {"a": (4, 0), "b": (4, 0), "c": (4, 0)})
    picks(strategy, 301)

    strategy.set("d", 4, 0)
    after = picks(strategy, 40)
    assert after.count("d") in (9, 10, 11)
    assert longest_run(after, "d") == 1
    for start in range(4, 40, 4):
        assert len(set(after[start : start + 4])) == 4, after


def test_round_robin_removal_keeps_the_order_of_the_others() -> None:
    strategy = build("round_robin", {id: (1, 0) for id in "abcde"}, seed=7)
    cycle = picks(strategy, 5)
    assert sorted(cycle) == list("abcde")

    strategy.discard(cycle[2])
    kept = [id for id in cycle if id != cycle[2]]
    assert picks(strategy, 12) == kept * 3


def test_round_robin_capacity_change_takes_effect() -> None:
    strategy = build("round_robin", {"a": (1, 0), "b": (1, 0)})
    picks(strategy, 10)
    strategy.set("a", 3, 0)
    picks(strategy, 3)
    assert Counter(picks(strategy, 400)) == {"a": 300, "b": 100}


def test_round_robin_heap_stays_small_under_churn() -> None:
    strategy = build("round_robin", {"a": (2, 0), "b": (3, 0)})
    for n in range(5_000):
        strategy.set(f"x{n}", 1 + n % 5, 0)
        strategy.set(f"x{n}", 2 + n % 5, 0)
        strategy.discard(f"x{n}")
    assert isinstance(strategy, RoundRobin)
    assert len(strategy._heap) <= 2 * len(strategy) + 33
    assert Counter(picks(strategy, 50)) == {"a": 20, "b": 30}


# random ---------------------------------------------------------------------------


def test_random_shares_follow_capacity() -> None:
    strategy = build("random", {"a": (6, 0), "b": (3, 50), "c": (1, 0)}, seed=3)
    counts = Counter(picks(strategy, 20_000))
    assert counts["a"] == pytest.approx(12_000, rel=0.04)
    assert counts["b"] == pytest.approx(6_000, rel=0.05)
    assert counts["c"] == pytest.approx(2_000, rel=0.08)


def test_random_stays_consistent_through_growth_and_reuse() -> None:
    rng = random.Random(11)
    strategy = make_strategy("random", random.Random(12))
    weights: dict[str, int] = {}
    for step in range(3_000):
        id = f"i{rng.randrange(200)}"
        if rng.random() < 0.3:
            strategy.discard(id)
            weights.pop(id, None)
        else:
            weights[id] = rng.randrange(1, 10)
            strategy.set(id, weights[id], 0)
        if step % 100 == 0:
            assert len(strategy) == len(weights)

    counts = Counter(picks(strategy, 40_000))
    total = sum(weights.values())
    assert set(counts) <= set(weights)
    for id, weight in weights.items():
        expected = 40_000 * weight / total
        assert abs(counts[id] - expected) < 5 * expected**0.5 + 5, id


# least_load -----------------------------------------------------------------------


def test_least_load_spreads_ties_while_loads_are_stale() -> None:
    strategy = build("least_load", {"a": (10, 0), "b": (10, 0), "c": (10, 0)})
    counts = Counter(picks(strategy, 300))
    assert set(counts) == {"a", "b", "c"}
    assert all(60 <= count <= 140 for count in counts.values()), counts


def test_least_load_follows_load_changes() -> None:
    strategy = build("least_load", {"a": (10, 0), "b": (20, 0), "c": (5, 0)})
    strategy.set("a", 10, 5)  # 0.5
    strategy.set("b", 20, 4)  # 0.2
    strategy.set("c", 5, 2)  # 0.4
    assert set(picks(strategy, 20)) == {"b"}

    strategy.set("b", 20, 19)  # 0.95
    assert set(picks(strategy, 20)) == {"c"}

    strategy.set("c", 5, 100)  # 20: far past capacity, in the overflow heap
    strategy.set("a", 10, 150)  # 15
    strategy.set("b", 20, 400)  # 20
    assert set(picks(strategy, 20)) == {"a"}
    strategy.discard("a")
    assert set(picks(strategy, 40)) == {"b", "c"}  # exact ties rotate there too


def churn(seed: int, steps: int = 4_000) -> Iterator[tuple[str, str, int, float]]:
    """Random sets (with a capacity, a load and a service time), discards and
    picks over 300 ids, as ("set" | "discard" | "pick", id, capacity, ...)."""
    rng = random.Random(seed)
    for _ in range(steps):
        roll = rng.random()
        id = f"i{rng.randrange(300)}"
        if roll < 0.5:
            capacity = rng.randrange(1, 100)
            load = rng.choice([rng.randrange(0, 3 * capacity), rng.uniform(0, 2000)])
            yield "set", id, capacity, load
        else:
            yield ("discard" if roll < 0.7 else "pick"), id, 0, 0.0


@pytest.mark.parametrize("seed", range(4))
def test_least_load_matches_a_brute_force_reference(seed: int) -> None:
    strategy = LeastLoad(random.Random(seed + 100))
    ratios: dict[str, float] = {}

    for action, id, capacity, load in churn(seed):
        if action == "set":
            strategy.set(id, capacity, load)
            ratios[id] = load / capacity
        elif action == "discard":
            strategy.discard(id)
            ratios.pop(id, None)
        else:
            chosen = strategy.pick()
            assert (chosen is None) == (not ratios)
            if chosen is not None:
                assert ratios[chosen] - min(ratios.values()) < BUCKET_WIDTH + 1e-9
        assert len(strategy) == len(ratios)
        assert all(strategy.ratio(id) == ratio for id, ratio in ratios.items())


# least_latency ------------------------------------------------------------------


def latency(backends: Mapping[str, tuple[int, float, float | None]]) -> LeastLatency:
    strategy = LeastLatency(random.Random(3))
    for id, (capacity, load, service) in backends.items():
        strategy.set(id, capacity, load, service)
    return strategy


def test_least_latency_avoids_a_slow_backend_with_free_slots() -> None:
    # Same capacity: "slow" is idle, "fast" half busy.  least_load picks the
    # idle one; its requests would take 0.1 s there against 0.02 s here.
    backends = {"fast": (4, 2, 0.020), "slow": (4, 0, 0.100)}
    assert set(picks(latency(backends), 50)) == {"fast"}
    assert set(picks(build("least_load", {"fast": (4, 2), "slow": (4, 0)}), 50)) == {
        "slow"
    }

    # Once the fast one's slots would each hold five times as much, the slow
    # one is where a request finishes first: 0.02 * 21 / 4 > 0.1 * 1 / 4.
    strategy = latency(backends)
    strategy.set("fast", 4, 20, 0.020)
    assert set(picks(strategy, 50)) == {"slow"}
    assert strategy.delay("slow") == pytest.approx(0.025)


def test_least_latency_among_equals_is_least_load_counting_the_new_request() -> None:
    strategy = latency({"big": (4, 0, 0.02), "small": (1, 0, 0.02)})
    assert set(picks(strategy, 20)) == {"big"}  # 1/4 of a service time, not 1
    strategy.set("big", 4, 3, 0.02)  # (3 + 1) / 4 = 1: now a near-tie
    counts = Counter(picks(strategy, 400))
    assert set(counts) == {"big", "small"}
    assert all(150 <= count <= 250 for count in counts.values()), counts


def test_least_latency_takes_an_unknown_service_time_as_the_known_mean() -> None:
    strategy = latency({"a": (4, 0, None)})
    assert strategy.pick() == "a"  # nothing known: any figure compares alike
    strategy.set("b", 4, 0, 0.010)
    strategy.set("c", 4, 0, 0.030)
    assert strategy.service_of("a") == pytest.approx(0.020)
    assert strategy.delay("a") == pytest.approx(0.020 / 4)

    # The prior follows the known mean once it moves by more than 5 %.
    strategy.set("c", 4, 0, 0.031)  # mean 0.0205: 2.5 % off, kept
    assert strategy.service_of("a") == pytest.approx(0.020)
    strategy.discard("b")  # mean 0.031
    assert strategy.service_of("a") == pytest.approx(0.031)
    assert strategy.delay("a") == pytest.approx(0.031 / 4)

    # A backend that answers leaves the unknowns; one that is discarded
    # leaves the mean.
    strategy.set("a", 4, 0, 0.001)
    assert set(picks(strategy, 20)) == {"a"}
    strategy.discard("a")
    strategy.discard("c")
    assert len(strategy) == 0 and strategy.pick() is None


@pytest.mark.parametrize("service", [-0.001, math.nan, math.inf])
def test_least_latency_rejects_impossible_service_times(service: float) -> None:
    strategy = LeastLatency(random.Random(0))
    with pytest.raises(ValueError, match="service time of 'a' must be >= 0"):
        strategy.set("a", 1, 0, service)
    assert len(strategy) == 0


def test_least_latency_orders_extreme_delays_in_the_overflow_heap() -> None:
    strategy = latency(
        {"x": (1, 1_000_000, 100.0), "y": (1, 2_000_000, 100.0), "z": (1, 0, 0.0)}
    )
    assert set(picks(strategy, 5)) == {"z"}  # no time at all: the first bucket
    strategy.discard("z")
    assert set(picks(strategy, 5)) == {"x"}
    strategy.set("x", 1, 3_000_000, 100.0)
    assert set(picks(strategy, 5)) == {"y"}


@pytest.mark.parametrize("seed", range(4))
def test_least_latency_matches_a_brute_force_reference(seed: int) -> None:
    strategy = LeastLatency(random.Random(seed + 100))
    services = random.Random(seed + 200)
    delays: dict[str, float] = {}

    for action, id, capacity, load in churn(seed):
        if action == "set":
            service = services.choice(
                [services.uniform(1e-4, 0.5), services.expovariate(50)]
            )
            strategy.set(id, capacity, load, service)
            delays[id] = service * (load + 1) / capacity
        elif action == "discard":
            strategy.discard(id)
            delays.pop(id, None)
        else:
            chosen = strategy.pick()
            assert (chosen is None) == (not delays)
            if chosen is not None:
                best = min(delays.values())
                assert delays[chosen] <= best * (1 + LATENCY_TIE) + 1e-12
        assert len(strategy) == len(delays)


# p2c ------------------------------------------------------------------------------


def test_p2c_with_two_always_takes_the_lower() -> None:
    strategy = build("p2c", {"a": (10, 7), "b": (2, 1)})  # 0.7 against 0.5
    assert set(picks(strategy, 100)) == {"b"}
    strategy.set("b", 2, 2)
    assert set(picks(strategy, 100)) == {"a"}


def test_p2c_never_picks_the_most_loaded() -> None:
    backends = {f"i{n}": (10, n) for n in range(6)}
    strategy = build("p2c", backends, seed=5)
    counts = Counter(picks(strategy, 3_000))
    assert "i5" not in counts
    # i0 wins every sample it is in: 2 of 6 draws, about a third of the picks.
    assert counts["i0"] == pytest.approx(1_000, rel=0.1)
    assert counts["i0"] > counts["i1"] > counts["i2"] > counts["i3"] > counts["i4"]


def test_p2c_breaks_ties_with_a_coin() -> None:
    strategy = build("p2c", {"a": (4, 2), "b": (2, 1)}, seed=9)
    counts = Counter(picks(strategy, 400))
    assert 150 <= counts["a"] <= 250


def test_round_robin_survives_moving_virtual_time_back() -> None:
    strategy = make_strategy("round_robin", random.Random(2))
    assert isinstance(strategy, RoundRobin)
    strategy._now = 999_999.9  # as after billions of picks
    for id, capacity in (("a", 3), ("b", 2), ("c", 1)):
        strategy.set(id, capacity, 0)
    sequence = picks(strategy, 60)
    assert strategy._now < 10
    for start in range(len(sequence) - 6):
        assert Counter(sequence[start : start + 6]) == {"a": 3, "b": 2, "c": 1}


def test_a_lowest_index_refuses_a_bucket_out_of_range() -> None:
    index = LowestIndex(random.Random(0), lambda key: int(key), buckets=4)
    index.place("a", 3.5)
    with pytest.raises(ValueError, match="bucket of 4.5 must be -1 to 3"):
        index.place("b", 4.5)
    assert (len(index), index.lowest(), "b" in index) == (1, "a", False)
    with pytest.raises(ValueError, match="buckets must be >= 1"):
        LowestIndex(random.Random(0), int, buckets=0)
