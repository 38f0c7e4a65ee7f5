"""``p2plb bench``: p2plb's balancing measured next to HAProxy, on real processes.

Rules of this module:

* One cluster per scenario: a real ``p2plb balancer`` and one real ``p2plb
  indexer`` per capacity, each ``python -m p2plb ...`` on port 0 in a
  temporary directory, with the synthetic service model of
  ``p2plb.workload`` (``--service-time``, ``--antagonist``).  Indexers queue
  up to ``queue_limit`` requests (64 unless told), deep enough that
  imbalance shows as latency rather than as ``503 overloaded``.
* Every contender runs on the same indexers, one after the other: each
  strategy through the proxy (switched with ``PUT /v1/strategy``), each
  strategy in routed mode (``p2plb.AsyncClient`` with the balancer, which
  hands the strategy over in its routing table), and, when ``haproxy`` is on
  the PATH, HAProxy ``balance leastconn`` and ``balance roundrobin``, each
  server weighted by its capacity.
* Every contender faces the same schedule of requests: open-loop Poisson
  arrivals (``p2plb.loadgen``) at ``load`` times the total capacity,
  sum(capacity) / service time per second, drawn once per scenario from the
  seed.  Latency runs from each request's scheduled arrival, so queueing the
  generator had to wait out counts.  Requests due during the warm-up are
  sent but not measured.
* The request is ``GET /v1/indices/bench`` on a ten-item index.  Routed mode
  uses ``clients`` independent ``AsyncClient`` objects in turn, each knowing
  only its own requests in flight, as the peers of a P2P system would.
* Each indexer's share is the growth of its ``served`` counter (``GET
  /v1/load``) over the contender's run, warm-up included; its peak load is
  the highest ``load`` seen polling ``/v1/load`` every 100 ms.  Between
  contenders the run waits for every indexer to be idle.
* The machine may be shared: before each contender the run waits (up to
  ``quiet_timeout``, 30 s, none with --quick) for processes outside the
  bench to use under 0.3 CPU, and every result records what they used.
* Every process started here is stopped here, on success, failure or Ctrl-C.

The options, the scenarios and the run live here; the cluster and how each
contender is driven and measured, in ``p2plb.benchcluster``.

Ratios are the figure of merit: each contender's p99 over HAProxy leastconn's
p99 from the same run, on the same machine at the same moment.  Absolute
latencies move with whatever else the machine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from p2plb.benchcluster import HAPROXY_BALANCES, BenchCluster
from p2plb.benchreport import (
    BenchReport,
    ContenderResult,
    IndexerShare,
    ScenarioResult,
    machine,
    plot,
    render,
    require_matplotlib,
)
from p2plb.config import STRATEGY_NAMES
from p2plb.errors import UsageError
from p2plb.loadgen import Bursts, arrivals

__all__ = [
    "HAPROXY_BALANCES",
    "SCENARIOS",
    "SUITES",
    "BenchOptions",
    "BenchReport",
    "ContenderResult",
    "IndexerShare",
    "Scenario",
    "ScenarioResult",
    "bench",
    "contender_names",
    "plot",
    "render",
    "require_matplotlib",
    "run_bench",
]

logger = logging.getLogger(__name__)

SUITES = ("balancing", "proxy", "control-plane")


@dataclass(frozen=True)
class Scenario:
    """A cluster and a workload; durations are per contender."""

    name: str
    load: float  # offered load, a fraction of the total capacity
    capacities: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    service_time: float = 0.020  # mean, seconds
    antagonist: tuple[float, float] | None = None  # (factor, period s)
    report_interval: float = 1.0  # seconds between an indexer's load reports
    bursts: Bursts | None = None
    clients: int = 4  # independent AsyncClients in routed mode
    duration: float = 30.0  # measured seconds
    warmup: float = 2.0  # seconds sent first, not measured

    @property
    def rate(self) -> float:
        """Requests per second: ``load`` times sum(capacity) / service time."""
        return self.load * sum(self.capacities) / self.service_time

    @property
    def slow_indexer(self) -> int | None:
        """The index of the antagonised indexer: the first of the largest."""
        if self.antagonist is None:
            return None
        return self.capacities.index(max(self.capacities))


# The antagonist's period and the bursts' period divide the duration, so every
# contender meets the same number of slow periods and bursts wherever it starts.
SCENARIOS: dict[str, Scenario] = {
    "steady": Scenario("steady", load=0.8),
    "antagonist": Scenario("antagonist", load=0.7, antagonist=(5.0, 5.0)),
    "stale": Scenario(
        "stale",
        load=0.8,
        report_interval=10.0,
        bursts=Bursts(period=5.0, length=1.0, factor=2.0),
        clients=16,
    ),
}
# --quick: a few seconds each; the antagonist switches every second instead, and
# the bursts come every 4 s.
_QUICK: dict[str, dict[str, Any]] = {
    "steady": {"duration": 2.0, "warmup": 0.5},
    "antagonist": {"duration": 4.0, "warmup": 0.5, "antagonist": (5.0, 1.0)},
    "stale": {
        "duration": 4.0,
        "warmup": 0.5,
        "bursts": Bursts(period=4.0, length=0.8, factor=2.0),
    },
}


def contender_names(haproxy: bool = True) -> list[str]:
    """Every contender, in the order they run."""
    names = [f"proxy/{s}" for s in STRATEGY_NAMES]
    names += [f"routed/{s}" for s in STRATEGY_NAMES]
    if haproxy:
        names += [f"haproxy/{b}" for b in HAPROXY_BALANCES]
    return names


@dataclass(frozen=True)
class BenchOptions:
    """What ``p2plb bench`` runs; ``None`` keeps the scenario's own setting."""

    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    suite: str = "balancing"
    quick: bool = False
    contenders: tuple[str, ...] = ()  # names or families (proxy, routed, haproxy)
    duration: float | None = None
    warmup: float | None = None
    load: float | None = None
    capacities: tuple[int, ...] | None = None
    service_time: float | None = None
    queue_limit: int = 64
    connections: int = 256
    seed: int = 0
    haproxy: bool = True  # use HAProxy when it is installed
    quiet_timeout: float | None = None  # wait for others' CPU < 0.3 (quick: 0)
    workdir: Path | None = None  # keep logs and data there

    def scenario(self, name: str) -> Scenario:
        """``name`` with --quick and every override applied."""
        if name not in SCENARIOS:
            known = ", ".join(SCENARIOS)
            raise UsageError(f"unknown scenario {name!r}; known: {known}")
        scenario = SCENARIOS[name]
        if self.quick:
            scenario = replace(scenario, **_QUICK[name])
        changes: dict[str, Any] = {
            key: value
            for key, value in (
                ("duration", self.duration),
                ("warmup", self.warmup),
                ("load", self.load),
                ("capacities", self.capacities),
                ("service_time", self.service_time),
            )
            if value is not None
        }
        return replace(scenario, **changes)

    def chosen(self, haproxy: bool) -> list[str]:
        """The contenders to run, in order; ``UsageError`` for an unknown one."""
        every = contender_names(haproxy=True)
        for wanted in self.contenders:
            if wanted not in every and wanted not in ("proxy", "routed", "haproxy"):
                raise UsageError(
                    f"unknown contender {wanted!r}; known: {', '.join(every)}, "
                    "or a family: proxy, routed, haproxy"
                )
        names = contender_names(haproxy)
        if not self.contenders:
            return names
        return [
            name
            for name in names
            if name in self.contenders or name.split("/")[0] in self.contenders
        ]


# -- entry points --------------------------------------------------------------------


def bench(options: BenchOptions, console: Console) -> BenchReport:
    """``run_bench`` on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(run_bench(options, console))
    return uvloop.run(run_bench(options, console))


async def run_bench(options: BenchOptions, console: Console) -> BenchReport:
    """Run the suite ``options`` asks for; ``UsageError`` for bad options."""
    started = time.monotonic()
    if options.suite not in SUITES:
        raise UsageError(f"unknown suite {options.suite!r}; known: {SUITES}")
    if options.suite != "balancing":
        from p2plb.benchsuites import run_suite

        figures = await run_suite(options, console)
        return BenchReport(
            options.suite,
            options.quick,
            options.seed,
            machine(),
            figures=figures,
            wall_time_s=time.monotonic() - started,
        )

    scenarios = [options.scenario(name) for name in options.scenarios]
    haproxy = options.haproxy and shutil.which("haproxy") is not None
    names = options.chosen(haproxy)
    if not haproxy and options.haproxy:
        console.print("[yellow]haproxy is not installed: its contenders are skipped")
    results = []
    for scenario in scenarios:
        results.append(await _run_scenario(scenario, names, options, console))
    return BenchReport(
        "balancing",
        options.quick,
        options.seed,
        machine(),
        scenarios=tuple(results),
        wall_time_s=time.monotonic() - started,
    )


async def _run_scenario(
    scenario: Scenario, names: list[str], options: BenchOptions, console: Console
) -> ScenarioResult:
    started = time.monotonic()
    schedule = arrivals(
        scenario.rate,
        scenario.warmup + scenario.duration,
        random.Random(f"{options.seed}:{scenario.name}"),
        scenario.bursts,
    )
    console.print(
        f"[bold]{scenario.name}[/]: capacities {list(scenario.capacities)}, "
        f"{scenario.service_time * 1000:g} ms, {scenario.load:.0%} load = "
        f"{scenario.rate:,.0f} req/s, {len(schedule):,} requests per contender "
        f"({scenario.warmup:g} s warm-up + {scenario.duration:g} s)"
    )

    with contextlib.ExitStack() as dirs:
        if options.workdir is not None:
            workdir = options.workdir / scenario.name
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(dirs.enter_context(tempfile.TemporaryDirectory("-bench")))
        async with BenchCluster(workdir, scenario, options) as cluster:
            await cluster.start(names)
            contenders = []
            for name in names:
                result = await cluster.measure(name, schedule)
                contenders.append(result)
                console.print(
                    f"  {name:<20} p50 {result.p50_ms:7.1f}  p99 "
                    f"{result.p99_ms:7.1f} ms  {result.throughput:6.0f} req/s  "
                    f"errors {result.errors}  late {result.late_ms:.0f} ms  "
                    f"others' CPU {result.others_cpu:.2f}"
                )
            slow = scenario.slow_indexer
            return ScenarioResult(
                scenario=scenario.name,
                capacities=scenario.capacities,
                load=scenario.load,
                rate=scenario.rate,
                service_time_ms=scenario.service_time * 1000.0,
                antagonist=scenario.antagonist,
                slow_indexer=None if slow is None else f"i{slow + 1}",
                report_interval=scenario.report_interval,
                bursts=None if scenario.bursts is None else asdict(scenario.bursts),
                clients=scenario.clients,
                duration=scenario.duration,
                warmup=scenario.warmup,
                contenders=tuple(contenders),
                wall_time_s=time.monotonic() - started,
            )
