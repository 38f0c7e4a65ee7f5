"""The cluster ``p2plb bench`` measures, and how each contender is driven.

Rules of this module:

* ``BenchCluster`` starts a real balancer, one real indexer per capacity of the
  scenario (with the synthetic service model) and the HAProxies asked for,
  fills the one index every request reads, and stops every process it
  started, on success, failure or Ctrl-C.
* ``measure`` runs one schedule against one contender: it waits for the
  indexers to be idle (and, unless told otherwise, for the machine to be
  quiet), switches the balancer's strategy for ``proxy/*`` and ``routed/*``,
  polls every indexer's load for its peak, and turns the samples into a
  ``ContenderResult``.
* What a scenario or the options are is ``p2plb.benchmark``'s business; this
  module only reads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from p2plb.benchreport import ContenderResult, IndexerShare
from p2plb.client import AsyncClient
from p2plb.errors import P2PLBError, Timeout, Unreachable
from p2plb.harness import Child, CpuMeter, p2plb_child, start_haproxy, wait_quiet
from p2plb.loadgen import OpenLoop, Sample, percentile

if TYPE_CHECKING:
    from p2plb.benchmark import BenchOptions, Scenario

__all__ = ["HAPROXY_BALANCES", "INDEX", "BenchCluster"]

logger = logging.getLogger(__name__)

INDEX = "bench"
HAPROXY_BALANCES = ("leastconn", "roundrobin")
_ITEMS = [f"item-{n:02d}" for n in range(10)]
_POLL_S = 0.1
_SETTLE_TIMEOUT_S = 10.0
_SERVING_TIMEOUT_S = 30.0
_QUIET_CPUS = 0.3  # others' CPU under which a contender may start
_QUIET_TIMEOUT_S = 30.0


class BenchCluster:
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

    async def __aenter__(self) -> BenchCluster:
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
