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

Ratios are the figure of merit: each contender's p99 over HAProxy leastconn's
p99 from the same run, on the same machine at the same moment.  Absolute
latencies move with whatever else the machine does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console

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
from p2plb.client import AsyncClient
from p2plb.config import STRATEGY_NAMES
from p2plb.errors import P2PLBError, Timeout, Unreachable, UsageError
from p2plb.harness import Child, CpuMeter, p2plb_child, start_haproxy, wait_quiet
from p2plb.loadgen import Bursts, OpenLoop, Sample, arrivals, percentile

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

INDEX = "bench"
HAPROXY_BALANCES = ("leastconn", "roundrobin")
SUITES = ("balancing", "proxy", "control-plane")
_ITEMS = [f"item-{n:02d}" for n in range(10)]
_POLL_S = 0.1
_SETTLE_TIMEOUT_S = 10.0
_SERVING_TIMEOUT_S = 30.0
_QUIET_CPUS = 0.3  # others' CPU under which a contender may start
_QUIET_TIMEOUT_S = 30.0


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
        async with _Cluster(workdir, scenario, options) as cluster:
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


# -- the cluster -----------------------------------------------------------------------


class _Cluster:
    """A balancer, its indexers and the HAProxies in front of them."""

    def __init__(
        self,
        workdir: Path,
        scenario: Scenario,
        options: BenchOptions,
        *,
        pin: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.scenario = scenario
        self.options = options
        self.pin = list(pin)  # a command prefix for every server, e.g. taskset
        self.balancer: Child | None = None
        self.indexers: list[Child] = []
        self.capacity: dict[str, int] = {}
        self.haproxy: dict[str, Child] = {}
        self._stack = contextlib.AsyncExitStack()
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> _Cluster:
        await self._stack.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._stack.aclose()

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None
        return self._http

    @property
    def pids(self) -> list[int]:
        children = [self.balancer, *self.indexers, *self.haproxy.values()]
        return [child.pid for child in children if child is not None]

    async def start(self, names: list[str]) -> None:
        scenario, workdir = self.scenario, self.workdir
        self._http = await self._stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        )
        state = str(workdir / "balancer-state.json")
        balancer = p2plb_child(
            "balancer", "balancer", workdir, "--state-file", state, pin=self.pin
        )
        self._spawn(balancer)
        await balancer.wait_ready()
        self.balancer = balancer

        # Indexers stop last-in first-out, so before the balancer they register with.
        for number, capacity in enumerate(scenario.capacities, start=1):
            id = f"i{number}"
            flags = ["--id", id, "--data-dir", str(workdir / id)]
            flags += ["--capacity", str(capacity)]
            flags += ["--queue-limit", str(self.options.queue_limit)]
            flags += ["--balancer", balancer.url, "--drain-period", "0.2s"]
            flags += ["--report-interval", f"{scenario.report_interval:g}s"]
            if scenario.service_time > 0:
                flags += ["--service-time", f"{scenario.service_time * 1000:g}ms"]
            if number - 1 == scenario.slow_indexer and scenario.antagonist:
                factor, period = scenario.antagonist
                flags += ["--antagonist", f"{factor:g}/{period:g}s"]
            indexer = p2plb_child(id, "indexer", workdir, *flags, pin=self.pin)
            self._spawn(indexer)
            self.indexers.append(indexer)
            self.capacity[id] = capacity
        await asyncio.gather(*(indexer.wait_ready() for indexer in self.indexers))
        await self._wait_serving()
        await self._fill()

        backends = [(i.name, i.url, self.capacity[i.name]) for i in self.indexers]
        for balance in HAPROXY_BALANCES:
            if f"haproxy/{balance}" in names:
                self.haproxy[balance] = await start_haproxy(
                    self._stack, workdir, balance, backends, pin=self.pin
                )

    def _spawn(self, child: Child) -> None:
        child.spawn()
        self._stack.push_async_callback(asyncio.to_thread, child.stop)

    async def _get(self, url: str) -> Any:
        try:
            async with self.http.get(url) as answer:
                answer.raise_for_status()
                return await answer.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Unreachable(f"GET {url}: {exc}") from exc

    async def _wait_serving(self) -> None:
        assert self.balancer is not None
        deadline = time.monotonic() + _SERVING_TIMEOUT_S
        while True:
            table = await self._get(f"{self.balancer.url}/v1/routing-table")
            rows = table["indexers"]
            serving = [r for r in rows if r["healthy"] and r["state"] == "serving"]
            if len(serving) == len(self.indexers):
                return
            if time.monotonic() > deadline:
                raise Timeout(
                    f"{len(serving)} of {len(self.indexers)} indexers serving "
                    f"after {_SERVING_TIMEOUT_S:g} s"
                )
            await asyncio.sleep(0.1)

    async def _fill(self) -> None:
        """The index every request reads, on every indexer."""
        assert self.balancer is not None
        async with AsyncClient([self.balancer.url]) as client:
            await client.add_to_index(INDEX, _ITEMS)
        deadline = time.monotonic() + _SERVING_TIMEOUT_S
        for indexer in self.indexers:
            async with AsyncClient(indexers=[indexer.url]) as direct:
                while await direct.get_index(INDEX) != _ITEMS:
                    if time.monotonic() > deadline:
                        raise Timeout(f"{indexer.name} never got the bench index")
                    await asyncio.sleep(0.1)

    async def _loads(self) -> dict[str, dict[str, Any]]:
        """Every indexer's ``GET /v1/load``."""
        bodies = await asyncio.gather(
            *(self._get(f"{indexer.url}/v1/load") for indexer in self.indexers)
        )
        return {
            indexer.name: body
            for indexer, body in zip(self.indexers, bodies, strict=True)
        }

    async def _settle(self) -> None:
        """Until no indexer has a request serving or queued."""
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        while any(body["load"] for body in (await self._loads()).values()):
            if time.monotonic() > deadline:
                logger.warning("bench.not_idle after_s=%g", _SETTLE_TIMEOUT_S)
                return
            await asyncio.sleep(0.05)

    async def _watch(self, peaks: dict[str, int], stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Unreachable):
                for id, body in (await self._loads()).items():
                    peaks[id] = max(peaks[id], body["load"])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _POLL_S)

    # -- one contender ---------------------------------------------------------------

    async def measure(self, name: str, schedule: list[float]) -> ContenderResult:
        """Run ``schedule`` against contender ``name``; what it measured."""
        await self._settle()
        quiet = self.options.quiet_timeout
        if quiet is None:
            quiet = 0.0 if self.options.quick else _QUIET_TIMEOUT_S
        if quiet > 0:
            await wait_quiet(self.pids, limit=_QUIET_CPUS, within=quiet)
        async with self._sender(name) as send:
            before = await self._loads()
            peaks = dict.fromkeys(self.capacity, 0)
            stop = asyncio.Event()
            watcher = asyncio.create_task(self._watch(peaks, stop))
            meter = CpuMeter(self.pids)
            loop = OpenLoop(send, limit=self.options.connections)
            try:
                samples = await loop.run(schedule)
            finally:
                stop.set()
                await watcher
            others = meter.others()
            after = await self._loads()

        served = {id: after[id]["served"] - before[id]["served"] for id in before}
        total_served = sum(served.values()) or 1
        total_capacity = sum(self.capacity.values())
        shares = tuple(
            IndexerShare(
                id=id,
                capacity=capacity,
                served=served[id],
                share=served[id] / total_served,
                capacity_share=capacity / total_capacity,
                peak_load=peaks[id],
            )
            for id, capacity in self.capacity.items()
        )
        return _summarize(name, samples, self.scenario, loop.late, others, shares)

    @contextlib.asynccontextmanager
    async def _sender(self, name: str) -> Any:
        """A ``send()`` for ``name``, its strategy switched on and clients warm."""
        kind, _, strategy = name.partition("/")
        assert self.balancer is not None
        if kind == "haproxy":
            async with _fetcher(self.haproxy[strategy].url, self.options) as send:
                yield send
            return

        url = f"{self.balancer.url}/v1/strategy"
        async with self.http.put(url, json={"strategy": strategy}) as answer:
            answer.raise_for_status()
        if kind == "proxy":
            async with _fetcher(self.balancer.url, self.options) as send:
                yield send
            return

        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    AsyncClient(
                        [self.balancer.url],
                        rng=random.Random(f"{self.options.seed}:{n}"),
                    )
                )
                for n in range(self.scenario.clients)
            ]
            for client in clients:  # fetch the table now, not during the run
                await client.get_index(INDEX)
            turn = itertools.cycle(clients)

            async def send() -> bool:
                try:
                    return await next(turn).get_index(INDEX) is not None
                except P2PLBError:
                    return False

            yield send


@contextlib.asynccontextmanager
async def _fetcher(base: str, options: BenchOptions) -> Any:
    """``send()`` for plain HTTP: the index read through ``base``."""
    url = f"{base}/v1/indices/{INDEX}"
    connector = aiohttp.TCPConnector(limit=options.connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def send() -> bool:
            try:
                async with http.get(url) as answer:
                    await answer.read()
                    return answer.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await send()  # the first connection, outside the measurement
        yield send


def _summarize(
    name: str,
    samples: list[Sample],
    scenario: Scenario,
    late: float,
    others: float,
    shares: tuple[IndexerShare, ...],
) -> ContenderResult:
    measured = [s for s in samples if s.scheduled >= scenario.warmup]
    good = [s for s in measured if s.ok]
    latencies = sorted(s.latency * 1000.0 for s in measured)
    end = max((s.scheduled + s.latency for s in measured), default=scenario.warmup)
    window = max(end - scenario.warmup, 1e-9)
    return ContenderResult(
        name=name,
        requests=len(measured),
        errors=len(measured) - len(good),
        throughput=len(good) / window,
        mean_ms=statistics.fmean(latencies) if latencies else math.nan,
        p50_ms=percentile(latencies, 0.50),
        p90_ms=percentile(latencies, 0.90),
        p99_ms=percentile(latencies, 0.99),
        p999_ms=percentile(latencies, 0.999),
        max_ms=latencies[-1] if latencies else math.nan,
        late_ms=late * 1000.0,
        others_cpu=others,
        indexers=shares,
    )
