"""``p2plb simulate``: the strategies under queueing load, without a network.

``simulate`` runs one scenario once per policy, in simulated time, and reports
latency percentiles, throughput and how the requests spread over the
indexers.  It drives the very strategy classes the balancer uses, looked up
through ``p2plb.strategies.make_strategy``, next to reference policies the
product does not offer, so that a change to a strategy shows here as a change
in latency.  The event loop lives in ``p2plb.queueing``.

The model's rules:

* Indexer i serves c_i requests at once (its capacity) and queues the rest,
  first come first served.  Service times are exponential with mean s (20 ms
  unless told otherwise).  Requests arrive as an open Poisson stream at
  ``load`` times the total capacity, sum(c_i) / s requests per second.
* The balancer sees load as design.md "Load" defines it: what the indexer last
  reported (serving plus queued, every ``report_interval`` seconds, each
  indexer at a phase of its own) plus the requests the balancer sent there
  that are still in flight, which a proxy sees finish.  The strategy gets
  ``set(id, capacity, estimate)`` on every report, dispatch and completion.
  With ``load_header`` every answer also carries the indexer's load, as a
  ``P2PLB-Load`` header does for the proxy, and the balancer takes it as a
  fresh report.  Nothing fails and the network costs nothing: only load
  moves requests.
* Latency is queueing plus service, for requests that arrive after the
  warm-up; throughput counts completions between the warm-up and the end of
  arrivals.  Arrivals stop at ``duration`` and the run drains, so the slowest
  requests are measured, not cut off.
* One ``random.Random`` per stream (arrivals, service times, report phases,
  cluster layout, each policy's choices), seeded from ``seed``: a seed
  reproduces a report exactly, and every policy faces the same requests.

The scenarios:

* ``steady``: capacities 1, 1, 2, 2, 4, 4 at 80 % load.
* ``antagonist``: as steady at 70 % load, with the first 4-capacity indexer
  five times slower every other 5 seconds (a noisy neighbour).
* ``stale``: as steady, but the balancer does not count its own requests in
  flight (as if many independent clients shared the indexers) and learns
  loads only from reports every 10 s; the arrival rate doubles for 1 s in
  every 5, the average staying at 80 %.
* ``large``: 2,000 indexers of capacity 1 to 8 at 85 % load, about 380,000
  requests per simulated second, so it lasts 1 s (fifty service times) unless
  told otherwise: some 25 s of wall time for all seven policies.

Not modelled: lookaside answers (``/v1/route``) counted as load for a
service time, several balancers or routed clients sharing indexers (``stale``
stands in for them by not counting in flight at all), health, retries and
network delay.  The runs therefore say how the strategies rank under load and
staleness, not what latency a deployment will see; each of these would be one
more dispatcher hook or one more event kind in ``p2plb.queueing``.

The reference policies: ``unweighted_rr`` (turns, blind to capacity: the
naive balancer), ``ideal_jsq`` (join the shortest queue, knowing every queue
exactly at no cost; with unequal capacities, the least (n + 1) / c, blind to
an indexer's speed) and ``central_queue`` (one queue feeding every slot: the
M/M/c bound no dispatcher beats on mean latency with equal-speed servers,
Harchol-Balter, "Performance Modeling and Design of Computer Systems", 2013,
chapters 14 and 24).  ``p2c`` is the two-choices rule of Mitzenmacher ("The
Power of Two Choices in Randomized Load Balancing", IEEE TPDS 2001).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from p2plb import strategies as product
from p2plb.errors import UsageError
from p2plb.queueing import REFERENCE_POLICIES, Model, Outcome, run, stream

__all__ = [
    "REFERENCE_POLICIES",
    "SCENARIOS",
    "IndexerResult",
    "PolicyResult",
    "SimulationReport",
    "build_model",
    "policy_names",
    "render",
    "simulate",
]


@dataclass(frozen=True)
class _Scenario:
    load: float
    duration: float  # simulated seconds
    warmup: float
    indexers: int = 6
    count_inflight: bool = True
    bursts: bool = False
    antagonist: bool = False


_SCENARIOS = {
    "steady": _Scenario(load=0.8, duration=60.0, warmup=5.0),
    "antagonist": _Scenario(load=0.7, duration=60.0, warmup=5.0, antagonist=True),
    "stale": _Scenario(
        load=0.8, duration=60.0, warmup=5.0, count_inflight=False, bursts=True
    ),
    "large": _Scenario(load=0.85, duration=1.0, warmup=0.1, indexers=2000),
}
SCENARIOS = tuple(_SCENARIOS)

_PATTERN = (1, 1, 2, 2, 4, 4)  # capacities of the small scenarios, repeated
_LARGE_CAPACITIES = (1, 8)  # inclusive range, drawn per indexer


@dataclass(frozen=True)
class IndexerResult:
    """Where one policy sent requests: one indexer's part."""

    id: str
    capacity: int
    requests: int
    share: float  # of all measured requests
    peak_queue: int  # most requests waiting behind its busy slots


@dataclass(frozen=True)
class PolicyResult:
    """One policy's run: latency in milliseconds, queueing plus service."""

    policy: str
    reference: bool  # a yardstick, not a strategy of the product
    requests: int
    throughput: float  # completions per second between warm-up and end
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    peak_queue: int  # the longest queue anywhere (the shared one, if central)
    max_share_ratio: float  # max over indexers of share / capacity share
    indexers: tuple[IndexerResult, ...]


@dataclass(frozen=True)
class SimulationReport:
    """Every policy's result for one scenario and seed."""

    scenario: str
    seed: int
    indexers: int
    total_capacity: int  # sum of capacities: slots, not requests per second
    load: float
    service_time: float
    report_interval: float
    count_inflight: bool
    load_header: bool
    duration: float
    warmup: float
    policies: tuple[PolicyResult, ...]
    wall_time_s: float = dataclasses.field(default=0.0, compare=False)

    def result(self, policy: str) -> PolicyResult:
        """The result of ``policy``; ``KeyError`` if it did not run."""
        for result in self.policies:
            if result.policy == policy:
                return result
        raise KeyError(policy)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.as_dict(), indent=indent)


def policy_names() -> list[str]:
    """The product strategies, then the reference policies: the default run."""
    return [*product.STRATEGIES, *REFERENCE_POLICIES]


def build_model(
    scenario: str,
    *,
    seed: int = 0,
    duration: float | None = None,
    indexers: int | None = None,
    load: float | None = None,
    service_time: float = 0.02,
    report_interval: float = 10.0,
    warmup: float | None = None,
    load_header: bool = False,
) -> Model:
    """The cluster and workload of ``scenario``, with any setting overridden.

    ``warmup`` defaults to the scenario's, at most a tenth of ``duration``.
    ``UsageError`` for an unknown scenario or a setting out of range.
    """
    shape = _SCENARIOS.get(scenario)
    if shape is None:
        raise UsageError(
            f"scenario: must be one of {', '.join(SCENARIOS)}; got {scenario!r}"
        )
    duration = shape.duration if duration is None else duration
    count = shape.indexers if indexers is None else indexers
    load = shape.load if load is None else load
    if warmup is None:
        warmup = min(shape.warmup, duration / 10.0)
    _check(duration > 0, "duration", "must be > 0 seconds", duration)
    _check(count >= 1, "indexers", "must be >= 1", count)
    # An open system at or over capacity has no steady state: its latencies
    # would only measure how long the run lasted.
    _check(0 < load < 1, "load", "must be a fraction of capacity in (0, 1)", load)
    _check(service_time > 0, "service_time", "must be > 0 seconds", service_time)
    _check(report_interval > 0, "report_interval", "must be > 0", report_interval)
    _check(0 <= warmup < duration, "warmup", "must be in [0, duration)", warmup)

    if scenario == "large":
        layout = stream(seed, "layout")
        capacities = tuple(layout.randint(*_LARGE_CAPACITIES) for _ in range(count))
    else:
        capacities = tuple(_PATTERN[index % len(_PATTERN)] for index in range(count))
    slow = capacities.index(max(capacities)) if shape.antagonist else None

    return Model(
        capacities=capacities,
        rate=load * sum(capacities) / service_time,
        service_time=service_time,
        report_interval=report_interval,
        count_inflight=shape.count_inflight,
        duration=duration,
        warmup=warmup,
        burst_period=5.0 if shape.bursts else 0.0,
        burst_length=1.0,
        burst_factor=2.0 if shape.bursts else 1.0,
        slow=slow,
        slow_period=5.0,
        slow_factor=5.0,
        load_header=load_header,
    )


def simulate(
    scenario: str = "steady",
    *,
    strategies: Sequence[str] | None = None,
    seed: int = 0,
    duration: float | None = None,
    indexers: int | None = None,
    load: float | None = None,
    service_time: float = 0.02,
    report_interval: float = 10.0,
    warmup: float | None = None,
    load_header: bool = False,
) -> SimulationReport:
    """Run ``scenario`` once per policy in ``strategies`` (default: every one).

    ``strategies`` names product strategies and reference policies alike
    (``policy_names()``); a name given twice runs once.  ``duration`` and
    ``warmup`` are simulated seconds; ``indexers`` resizes the cluster;
    ``load`` is the fraction of total capacity offered; ``load_header`` has
    every answer report the indexer's load.  ``UsageError`` for an
    unknown name or a setting out of range, before anything runs.
    """
    names = list(dict.fromkeys(policy_names() if strategies is None else strategies))
    known = policy_names()
    for name in names:
        _check(name in known, "strategies", f"must be among {', '.join(known)}", name)
    _check(bool(names), "strategies", "must name at least one policy", names)
    model = build_model(
        scenario,
        seed=seed,
        duration=duration,
        indexers=indexers,
        load=load,
        service_time=service_time,
        report_interval=report_interval,
        warmup=warmup,
        load_header=load_header,
    )

    started = time.perf_counter()
    results = tuple(_result(model, name, run(model, name, seed)) for name in names)
    wall = time.perf_counter() - started

    return SimulationReport(
        scenario=scenario,
        seed=seed,
        indexers=len(model.capacities),
        total_capacity=sum(model.capacities),
        load=load if load is not None else _SCENARIOS[scenario].load,
        service_time=service_time,
        report_interval=report_interval,
        count_inflight=model.count_inflight,
        load_header=model.load_header,
        duration=model.duration,
        warmup=model.warmup,
        policies=results,
        wall_time_s=wall,
    )


def render(report: SimulationReport) -> Table:
    """One row per policy, for a terminal; reference policies are dimmed."""
    inflight = "counted" if report.count_inflight else "not counted"
    header = ", load on every answer" if report.load_header else ""
    table = Table(
        title=(
            f"{report.scenario}: {report.indexers} indexers, "
            f"{report.total_capacity} slots, load {report.load:.0%}, "
            f"{report.duration:g} s simulated after {report.warmup:g} s warm-up, "
            f"seed {report.seed}"
        ),
        caption=(
            f"service {report.service_time * 1000:g} ms mean; reports every "
            f"{report.report_interval:g} s{header}, in flight {inflight}; "
            f"wall time {report.wall_time_s:.1f} s"
        ),
        title_justify="left",
        caption_justify="left",
    )
    table.add_column("policy")
    for column in (
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "mean ms",
        "req/s",
        "peak queue",
        "max share/fair",
    ):
        table.add_column(column, justify="right")

    for result in report.policies:
        table.add_row(
            result.policy,
            f"{result.p50_ms:.1f}",
            f"{result.p90_ms:.1f}",
            f"{result.p99_ms:.1f}",
            f"{result.p999_ms:.1f}",
            f"{result.mean_ms:.1f}",
            f"{result.throughput:.0f}",
            str(result.peak_queue),
            f"{result.max_share_ratio:.2f}",
            style="dim" if result.reference else None,
        )
    return table


def _result(model: Model, policy: str, outcome: Outcome) -> PolicyResult:
    latencies = outcome.latencies
    total = sum(outcome.requests)
    slots = sum(model.capacities)

    indexers = tuple(
        IndexerResult(
            id=f"i{index}",
            capacity=capacity,
            requests=outcome.requests[index],
            share=outcome.requests[index] / total if total else 0.0,
            peak_queue=outcome.peak_queues[index],
        )
        for index, capacity in enumerate(model.capacities)
    )
    ratio = max((row.share * slots / row.capacity for row in indexers), default=0.0)

    return PolicyResult(
        policy=policy,
        reference=policy in REFERENCE_POLICIES,
        requests=len(latencies),
        throughput=outcome.completed / (model.duration - model.warmup),
        mean_ms=1000.0 * math.fsum(latencies) / len(latencies) if latencies else 0.0,
        p50_ms=_percentile(latencies, 0.50),
        p90_ms=_percentile(latencies, 0.90),
        p99_ms=_percentile(latencies, 0.99),
        p999_ms=_percentile(latencies, 0.999),
        peak_queue=max([outcome.peak_central, *outcome.peak_queues]),
        max_share_ratio=ratio,
        indexers=indexers,
    )


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank, in milliseconds; 0 when nothing was measured."""
    if not ordered:
        return 0.0
    return 1000.0 * ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise UsageError(f"{name}: {rule}; got {value!r}")
