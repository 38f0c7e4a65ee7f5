"""``p2plb demo``: a small cluster doing the main job on real input.

Rules of this module:

* Real processes only: one balancer and ``--indexers`` indexers, each
  ``python -m p2plb ...`` on a free loopback port (``--port 0``), in a
  temporary directory that holds their logs and data.  A server is up when
  its ``*.started`` log line names its URL; the cluster is up when the
  balancer's ``/v1/status`` lists every indexer healthy and serving.
* The data path is ``p2plb.AsyncClient`` and nothing else.  The demo itself
  only reads the balancer's ``/v1/status``, for the display.
* The phases run in order: corpus (``p2plb.corpus``), cluster, load,
  convergence, workload, report, stop.  The workload is read-heavy, its words
  drawn by their frequency in the corpus, and one indexer is killed with
  SIGKILL halfway through it, so the report shows failover as users meet it.
* Each workload worker has a client of its own, like a peer of a P2P system,
  and makes one call at a time; the client's per-indexer counters before and
  after a call say which indexer answered it, which gives the latency per
  indexer as the clients saw it.
* A request has failed when the client raised after its own retries.  The
  aim is none; the exit status is 1 when any failed, so scripts notice.
* Two rates, each labelled as what it is: while the workload runs, the live
  view shows the requests per second of the last ``_RATE_WINDOW`` seconds
  (``RecentRate``); once it ends, the live view and the report both show the
  mean of the whole run (``mean_rate``), the same figure.
* Every way out (the end, an error, Ctrl-C) stops the servers (SIGTERM, a
  grace period, SIGKILL) and removes the directory.  Only a demo that ran to
  its end with ``--keep-running`` leaves the cluster up, and says how to stop it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Table

from p2plb.client import AsyncClient
from p2plb.cluster import LocalCluster, LocalServer
from p2plb.corpus import Corpus, build_corpus
from p2plb.errors import P2PLBError, Timeout, Unreachable

__all__ = ["DemoOptions", "run_demo"]

logger = logging.getLogger(__name__)

_CONVERGE_TIMEOUT = 10.0
_LAST_REPORT_WAIT = 1.5  # seconds: a report interval (1 s) and some slack
_QUICK_DURATION = 3.0
_WRITE_SHARE = 0.05
_LOAD_CONCURRENCY = 16
_WORKERS = 8
_SHOWN_ERRORS = 5
_RATE_WINDOW = 2.0  # seconds the live rate looks back over


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 15.0
    indexers: int = 3
    strategy: str = "least_load"
    keep_running: bool = False
    seed: int = 0
    quick: bool = False


async def run_demo(options: DemoOptions, console: Console) -> int:
    """Run every phase of the demo; returns the exit status."""
    duration = _QUICK_DURATION if options.quick else options.duration
    console.print(
        f"[bold]p2plb demo[/]: {options.indexers} indexers, strategy "
        f"{options.strategy}, {duration:g} s of {1 - _WRITE_SHARE:.0%} reads, "
        f"seed {options.seed}"
    )

    started = time.monotonic()
    corpus = await asyncio.to_thread(_build_corpus, options)
    console.print(
        f"Corpus: {len(corpus.postings):,} words in {corpus.total_postings:,} "
        f"postings, from the {corpus.source} ({_since(started)})"
    )

    workdir = Path(tempfile.mkdtemp(prefix="p2plb-demo-"))
    # Reports every second and membership twice a second, instead of the
    # production defaults, so that a short demo shows changes as they happen.
    cluster = LocalCluster(
        workdir,
        indexers=options.indexers,
        strategy=options.strategy,
        indexer_flags=[
            "--report-interval", "1s",
            "--membership-interval", "0.5s",
            "--drain-period", "0.5s",
        ],
    )  # fmt: skip
    finished = False
    try:
        started = time.monotonic()
        await cluster.start()
        console.print(f"Cluster in {workdir} ({_since(started)}):", soft_wrap=True)
        for server in cluster.servers:
            line = f"  {server.name:<9} {server.url}  pid {server.pid}"
            console.print(line, soft_wrap=True)

        await _load(cluster.balancer.url, corpus, options.seed, console)
        started = time.monotonic()
        await _converge([s.url for s in cluster.indexers], len(corpus.postings))
        console.print(
            f"Replicas converged: every indexer lists the {len(corpus.postings):,} "
            f"words ({_since(started)})"
        )

        workload = _Workload(cluster, corpus, options, duration)
        tally = await workload.run(console)
        # The indexers report what they served every second; the report waits
        # for one more round so that the balancer's counts include the end.
        await asyncio.sleep(_LAST_REPORT_WAIT)
        _report(tally, await cluster.status(), options.strategy, console)
        finished = True
    finally:
        if finished and options.keep_running:
            await cluster.close()
            _print_running(cluster, corpus.words[0], console)
        else:
            started = time.monotonic()
            await cluster.stop()
            shutil.rmtree(workdir, ignore_errors=True)
            console.print(
                f"Stopped the cluster, removed {workdir} ({_since(started)})",
                soft_wrap=True,
            )
    return 0 if finished and not tally.failed else 1


def _build_corpus(options: DemoOptions) -> Corpus:
    if options.quick:
        return build_corpus(
            seed=options.seed, max_modules=40, max_words=300, max_postings=20
        )
    return build_corpus(seed=options.seed)


def _since(started: float) -> str:
    return f"{time.monotonic() - started:.1f} s"


# -- loading ---------------------------------------------------------------------


async def _load(balancer: str, corpus: Corpus, seed: int, console: Console) -> None:
    """One write per word, with its list of modules, a few at a time."""
    words = iter(sorted(corpus.postings))
    failures: list[P2PLBError] = []
    progress = Progress(
        TextColumn("Loading the index"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("words, {task.fields[postings]:,} postings"),
        TimeElapsedColumn(),
        console=console,
    )

    async with AsyncClient([balancer], rng=seed) as client:
        with progress:
            task = progress.add_task("load", total=len(corpus.postings), postings=0)
            postings = 0

            async def loader() -> None:
                nonlocal postings
                for word in words:
                    try:
                        await client.add_to_index(word, corpus.postings[word])
                    except P2PLBError as exc:
                        failures.append(exc)
                    postings += len(corpus.postings[word])
                    progress.update(task, advance=1, postings=postings)

            await asyncio.gather(*(loader() for _ in range(_LOAD_CONCURRENCY)))

    if failures:
        console.print(f"[red]{len(failures)} words could not be loaded[/]")
        raise failures[0]


async def _converge(indexers: list[str], words: int) -> None:
    """Wait until each indexer, asked directly, lists every word."""
    deadline = time.monotonic() + _CONVERGE_TIMEOUT
    for url in indexers:
        async with AsyncClient(indexers=[url]) as client:
            while (listed := len(await client.list_indices())) < words:
                if time.monotonic() > deadline:
                    raise Timeout(
                        f"indexer {url} lists {listed} of the {words} words "
                        f"{_CONVERGE_TIMEOUT:g} s after loading"
                    )
                await asyncio.sleep(0.1)


# -- the workload ----------------------------------------------------------------


@dataclass
class _Tally:
    """What the workload did and saw."""

    calls: int = 0
    writes: int = 0
    failed: int = 0
    not_found: int = 0
    errors: list[str] = field(default_factory=list)
    read_ms: defaultdict[str, list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )
    write_ms: list[float] = field(default_factory=list)
    served: Counter[str] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)
    failed_attempts: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    peak_load: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    victim: str | None = None
    killed_at: float | None = None


class _Workload:
    """Workers reading and writing words by frequency; a kill halfway through."""

    def __init__(
        self,
        cluster: LocalCluster,
        corpus: Corpus,
        options: DemoOptions,
        duration: float,
    ) -> None:
        self.cluster = cluster
        self.options = options
        self.duration = duration
        self.tally = _Tally()
        self._words = corpus.words
        self._weights = list(
            itertools.accumulate(corpus.occurrences[w] for w in self._words)
        )
        self._modules = corpus.modules
        self._health: dict[str, bool] = {}
        self._events: list[str] = []
        self._rate = RecentRate(_RATE_WINDOW)
        self._stop = asyncio.Event()
        self._started = 0.0

    async def run(self, console: Console) -> _Tally:
        seed = self.options.seed
        clients = [
            AsyncClient([self.cluster.balancer.url], rng=random.Random(f"{seed}:{n}"))
            for n in range(_WORKERS)
        ]
        victim = random.Random(seed).choice(self.cluster.indexers)
        tasks: list[asyncio.Task[None]] = []
        self._started = time.monotonic()
        try:
            with Live(self._view(), console=console, refresh_per_second=4) as live:
                tasks = [
                    asyncio.create_task(self._worker(c, random.Random(f"{seed}/{n}")))
                    for n, c in enumerate(clients)
                ]
                tasks.append(asyncio.create_task(self._watch(victim.name)))

                while (elapsed := self._elapsed()) < self.duration:
                    if self.tally.victim is None and elapsed >= self.duration / 2:
                        self._kill(victim, elapsed)
                    self._rate.add(time.monotonic(), self.tally.calls)
                    live.update(self._view())
                    await asyncio.sleep(min(0.25, self.duration - elapsed))

                self._stop.set()
                await asyncio.gather(*tasks[:-1])
                self.tally.seconds = self._elapsed()
                live.update(self._view())
        finally:
            if not console.is_terminal:
                console.line()  # rich ends a live display off a terminal mid-line
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for client in clients:
                stats = await client.stats()
                self.tally.attempts.update(stats["requests"])
                self.tally.failed_attempts.update(stats["errors"])
                self.tally.retries += stats["retries"]
                await client.aclose()
        return self.tally

    def _elapsed(self) -> float:
        return time.monotonic() - self._started

    async def _worker(self, client: AsyncClient, rng: random.Random) -> None:
        tally = self.tally
        while not self._stop.is_set():
            word = rng.choices(self._words, cum_weights=self._weights)[0]
            write = rng.random() < _WRITE_SHARE
            before = await client.stats()

            started = time.perf_counter()
            try:
                if write:
                    await client.add_to_index(word, rng.choice(self._modules))
                elif await client.get_index(word) is None:
                    tally.not_found += 1
            except P2PLBError as exc:
                tally.failed += 1
                if len(tally.errors) < _SHOWN_ERRORS:
                    tally.errors.append(f"{self._elapsed():.1f} s: {exc}")
                continue
            finally:
                tally.calls += 1
                tally.writes += write
            took_ms = (time.perf_counter() - started) * 1000

            after = await client.stats()
            served = _answered_by(before, after)
            if served is not None:
                tally.served[served] += 1
                if write:
                    tally.write_ms.append(took_ms)
                else:
                    tally.read_ms[served].append(took_ms)

    async def _watch(self, victim: str) -> None:
        """Follow the balancer's view: health and the peak load of each indexer."""
        while True:
            try:
                status = await self.cluster.status()
            except Unreachable as exc:
                logger.warning("demo.status_failed error=%s", exc)
            else:
                for row in status.get("indexers", []):
                    self._observe(row, victim)
            await asyncio.sleep(0.5)

    def _observe(self, row: dict[str, Any], victim: str) -> None:
        id, now, killed_at = row["id"], self._elapsed(), self.tally.killed_at
        peak = self.tally.peak_load.get(id, 0.0)
        self.tally.peak_load[id] = max(peak, row["load_percentage"])

        was_healthy, self._health[id] = self._health.get(id, True), row["healthy"]
        if id == victim and was_healthy and not row["healthy"] and killed_at:
            self._events.append(
                f"{now:.1f} s: the balancer marks {id} unhealthy, "
                f"{now - killed_at:.1f} s after the kill: "
                f"{escape(row['health_reason'])}"
            )

    def _kill(self, victim: LocalServer, elapsed: float) -> None:
        victim.kill()
        self.tally.victim, self.tally.killed_at = victim.name, elapsed
        self._events.append(
            f"[bold red]{elapsed:.1f} s: SIGKILL to indexer {victim.name} "
            f"(pid {victim.pid})[/]: the clients retry its requests on the others"
        )
        logger.info("demo.killed id=%s pid=%d", victim.name, victim.pid)

    def _view(self) -> RenderableType:
        tally, elapsed = self.tally, min(self._elapsed(), self.duration)
        clock = Table.grid(padding=(0, 1))
        clock.add_row(
            "Workload",
            ProgressBar(total=self.duration, completed=elapsed, width=40),
            f"{elapsed:4.1f} / {self.duration:g} s",
        )
        failed = "[green]0[/]" if not tally.failed else f"[red]{tally.failed}[/]"
        over = tally.seconds > 0  # the workload is over: the report's figure
        rate = mean_rate(tally.calls, tally.seconds) if over else self._rate.text()
        summary = (
            f"{rate}   {tally.calls:,} requests "
            f"({tally.writes:,} writes)   failed: {failed}"
        )

        table = Table(box=None, padding=(0, 2))
        for column in ("indexer", "process", "balancer sees", "answered", "share"):
            table.add_column(
                column, justify="right" if column == "answered" else "left"
            )
        total = sum(tally.served.values()) or 1
        for server in self.cluster.indexers:
            name, served = server.name, tally.served[server.name]
            process = "[red]killed[/]" if name == tally.victim else "running"
            healthy = self._health.get(name, True)
            table.add_row(
                name,
                process,
                "healthy" if healthy else "[red]unhealthy[/]",
                f"{served:,}",
                ProgressBar(total=total, completed=served, width=30),
            )
        return Group(clock, summary, table, *self._events)


class RecentRate:
    """Requests per second over the last ``window`` seconds of samples."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, calls: int) -> None:
        """Note that ``calls`` requests were done in all by ``now``."""
        self._samples.append((now, calls))
        while now - self._samples[0][0] > self.window:
            self._samples.popleft()

    @property
    def per_second(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (first, before), (last, after) = self._samples[0], self._samples[-1]
        return (after - before) / max(last - first, 1e-9)

    def text(self) -> str:
        return f"{self.per_second:,.0f} requests/s (last {self.window:g} s)"


def mean_rate(calls: int, seconds: float) -> str:
    """The whole run's requests per second: the report's figure, and the live
    view's once the workload is over."""
    rate = calls / seconds if seconds > 0 else 0.0
    return f"{rate:,.0f} requests/s (mean of {seconds:.1f} s)"


def _answered_by(before: dict[str, Any], after: dict[str, Any]) -> str | None:
    """The one indexer whose count of good answers grew during the call."""
    grew = [
        id
        for id, count in after["requests"].items()
        if count - before["requests"].get(id, 0)
        > after["errors"].get(id, 0) - before["errors"].get(id, 0)
    ]
    return grew[0] if len(grew) == 1 else None


# -- the report ------------------------------------------------------------------


def _report(
    tally: _Tally, status: dict[str, Any], strategy: str, console: Console
) -> None:
    rows = {row["id"]: row for row in status.get("indexers", [])}
    attempts = sum(tally.attempts.values()) or 1
    table = Table(
        title=f"Where {tally.calls:,} requests went in {tally.seconds:.1f} s "
        f"(strategy {strategy})",
        caption="served: as each indexer reported to the balancer, loading "
        "included.  attempts, latency: as the workload's clients measured them.",
        caption_justify="left",
    )
    for column in (
        "indexer",
        "state",
        "served",
        "attempts",
        "share",
        "peak load %",
        "read p50 ms",
        "read p99 ms",
        "failed attempts",
    ):
        table.add_column(
            column, justify="left" if column in {"indexer", "state"} else "right"
        )

    for id in sorted(set(rows) | set(tally.attempts)):
        row = rows.get(id, {})
        latency = sorted(tally.read_ms.get(id, []))
        state = "healthy" if row.get("healthy") else "unhealthy"
        if id == tally.victim:
            state = "[red]killed[/]"
        table.add_row(
            id,
            state,
            f"{row.get('requests', 0):,}",
            f"{tally.attempts[id]:,}",
            f"{tally.attempts[id] / attempts:.0%}",
            f"{tally.peak_load.get(id, 0.0):.1f}",
            _percentile(latency, 0.50),
            _percentile(latency, 0.99),
            f"{tally.failed_attempts[id]:,}",
        )
    console.print(table)

    writes = sorted(tally.write_ms)
    console.print(
        f"{mean_rate(tally.calls, tally.seconds)} from {_WORKERS} clients: "
        f"{tally.calls - tally.writes:,} reads, and {tally.writes:,} writes "
        f"(p50 {_percentile(writes, 0.5)} ms, p99 {_percentile(writes, 0.99)} ms: "
        "each waits for a second durable copy)."
    )
    if tally.victim is not None:
        console.print(
            f"Indexer {tally.victim} was killed with SIGKILL at "
            f"{tally.killed_at:.1f} s; the clients retried {tally.retries:,} "
            "attempts on another indexer."
        )
    if tally.failed:
        console.print(f"[bold red]Failed requests: {tally.failed:,}[/]")
        for line in tally.errors:
            console.print(f"  {line}", markup=False, soft_wrap=True)
    else:
        console.print("[bold green]Failed requests: 0[/]")
    if tally.not_found:
        console.print(
            f"[yellow]{tally.not_found:,} reads found no items for a word that was "
            "loaded[/]"
        )


def _percentile(sorted_values: list[float], fraction: float) -> str:
    if not sorted_values:
        return "-"
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return f"{sorted_values[index]:.1f}"


def _print_running(cluster: LocalCluster, word: str, console: Console) -> None:
    url = cluster.balancer.url
    alive = [s for s in cluster.servers if s.running]
    pids = " ".join(str(s.pid) for s in alive)
    console.print(
        f"\nThe cluster is still running (--keep-running); the indexer the demo "
        f"killed stays down.  Try:\n"
        f"  p2plb status --balancer {url}\n"
        f"  p2plb get {word} --balancer {url}\n"
        f"Logs and data: {cluster.workdir}\n"
        # The servers take about a second to stop after SIGTERM; removing the
        # directory before that would race with their last writes to it.
        f"Stop it with:  kill {pids}; sleep 2; rm -rf {cluster.workdir}",
        soft_wrap=True,  # commands to copy, whole
    )
