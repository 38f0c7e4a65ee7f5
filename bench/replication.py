"""Replication costs: write acknowledgement, convergence after a burst, catch-up.

Usage: .venv/bin/python bench/replication.py [--json PATH] [--help]

Rules of this benchmark:

* Every figure comes from real processes on loopback: one ``p2plb balancer``
  and one to three ``p2plb indexer`` processes, started fresh for each
  measurement in a directory of their own, with the short intervals a test
  cluster uses (``CLUSTER_FLAGS``).  Every process started here is stopped
  here: each is registered in an ``ExitStack`` (a try/finally) the moment it
  starts, and a killed indexer is reaped at once.
* A cluster counts as formed once the balancer lists every indexer as serving
  and every indexer has logged ``replication.peer_added`` for each other one;
  only then does anything get measured.  A warm-up of writes opens the
  connections between them first.
* A write is a single-item ``POST /v1/indices/{name}/items`` sent straight to
  an indexer.  Its latency runs from sending to the acknowledgement, retries of
  a ``503`` included (they are counted apart).
* "Identical contents" is checked in full, never by sampling: every index
  written is read from every indexer, all pages, and each sorted list must
  equal the sorted list of items acknowledged.  Polls start every
  ``--poll`` seconds; a time is taken when the poll that saw it answered, so it
  overstates by at most one poll's duration.
* Catch-up times start when the restarted process is spawned (wall clock) and
  end at the timestamps the indexer logs (``indexer.started``,
  ``replication.serving``), or when a poll first saw identical contents.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from harness import FAILED, BenchError, http, start
from rich.console import Console
from rich.table import Table

from p2plb.harness import Child, CpuMeter, p2plb_child, wait_quiet
from p2plb.storage import BUCKETS, bucket_of

CLUSTER_FLAGS = {
    "balancer": ["--probe-interval", "0.5s"],
    "indexer": [
        "--report-interval",
        "0.5s",
        "--membership-interval",
        "0.2s",
        "--anti-entropy-interval",
        "1s",
        "--drain-period",
        "0.1s",
    ],
}
SLOW_MS = 100.0  # an acknowledgement this slow is counted apart
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z", re.MULTILINE)

console = Console(stderr=True)


# -- processes -------------------------------------------------------------------------


@dataclass
class Cluster:
    workdir: Path
    balancer: Child
    indexers: list[Child]
    ports: list[int]

    @property
    def urls(self) -> list[str]:
        return [child.url for child in self.indexers]

    def pids(self) -> list[int]:
        return [c.pid for c in [self.balancer, *self.indexers] if c.running]


def _start(stack: contextlib.ExitStack, child: Child) -> Child:
    return start(stack, child, lambda said: console.print(f"  {said}"))


def indexer_child(cluster: Cluster, node: int, port: int, name: str) -> Child:
    flags = ["--id", f"i{node + 1}", "--port", str(port)]
    flags += ["--data-dir", str(cluster.workdir / f"i{node + 1}")]
    flags += ["--balancer", cluster.balancer.url, "--log-level", "info"]
    return p2plb_child(
        name, "indexer", cluster.workdir, *flags, *CLUSTER_FLAGS["indexer"]
    )


def start_cluster(
    stack: contextlib.ExitStack, root: Path, label: str, size: int
) -> Cluster:
    workdir = root / label
    workdir.mkdir()
    flags = ["--state-file", str(workdir / "state.json"), "--log-level", "info"]
    balancer = p2plb_child(
        "balancer", "balancer", workdir, *flags, *CLUSTER_FLAGS["balancer"]
    )
    cluster = Cluster(workdir, _start(stack, balancer), [], [])
    for node in range(size):
        child = _start(stack, indexer_child(cluster, node, 0, f"i{node + 1}"))
        cluster.indexers.append(child)
        cluster.ports.append(int(child.url.rsplit(":", 1)[1]))
    wait_formed(cluster)
    return cluster


def wait_formed(cluster: Cluster, timeout: float = 30.0) -> None:
    """Until the balancer lists all as serving and every indexer knows the rest."""
    size = len(cluster.indexers)
    deadline = time.monotonic() + timeout
    while True:
        listed = json.loads(http("GET", f"{cluster.balancer.url}/v1/indexers"))
        serving = [e for e in listed["indexers"] if e.get("state") == "serving"]
        meshed = all(
            len(set(re.findall(r"replication\.peer_added id=(\S+)", c.log())))
            >= size - 1
            for c in cluster.indexers
        )
        if len(serving) == size and meshed:
            return
        if time.monotonic() > deadline:
            raise BenchError(
                f"cluster of {size} not formed in {timeout:g}s: "
                f"{len(serving)} serving, meshed={meshed}"
            )
        time.sleep(0.1)


def kill_hard(child: Child) -> None:
    """``kill -9``, and reap it so that no zombie is left behind."""
    if child.popen is not None and child.popen.poll() is None:
        child.popen.kill()
        child.popen.wait()


def log_times(child: Child, event: str) -> list[tuple[float, str]]:
    """Wall-clock times (epoch seconds) and lines of ``event`` in a child's log."""
    found = []
    for line in child.log().splitlines():
        if f" {event} " not in f"{line} ":
            continue
        match = _LOG_TIME.match(line)
        if match is not None:
            stamp = datetime.fromisoformat(match.group(1) + "+00:00")
            found.append((stamp.timestamp(), line))
    return found


# -- writes ----------------------------------------------------------------------------


@dataclass
class Writes:
    latencies_ms: list[float]
    retries: int
    seconds: float
    last_ack: float  # time.monotonic() of the last acknowledgement

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms)
        return {
            "writes": len(ordered),
            "p50_ms": percentile(ordered, 50),
            "p99_ms": percentile(ordered, 99),
            "max_ms": ordered[-1],
            "slow": sum(1 for v in ordered if v >= SLOW_MS),
            "writes_per_s": len(ordered) / self.seconds,
            "retries": self.retries,
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, round(q / 100 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


async def add_one(
    session: aiohttp.ClientSession, url: str, index: str, item: str
) -> int:
    """Add until acknowledged; returns how many 503 answers came first."""
    retries = 0
    while True:
        async with session.post(
            f"{url}/v1/indices/{index}/items", json={"item": item}
        ) as answer:
            body = await answer.read()
            if answer.status == 200:
                return retries
            if answer.status != 503 or retries >= 20:
                raise BenchError(f"add to {url}: {answer.status} {body[:200]!r}")
        retries += 1
        await asyncio.sleep(0.05)


async def write_all(
    jobs: Sequence[tuple[str, str]],
    targets: Sequence[str],
    writers: int,
) -> Writes:
    """Send ``(index, item)`` adds from ``writers`` concurrent loops.

    Writer ``w`` sends to ``targets[w % len(targets)]``; each takes the next
    job when its last one was acknowledged.
    """
    latencies: list[float] = []
    retries = 0
    pending = iter(jobs)
    last_ack = 0.0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def writer(w: int) -> None:
            nonlocal retries, last_ack
            url = targets[w % len(targets)]
            for index, item in pending:
                sent = time.perf_counter()
                retries += await add_one(session, url, index, item)
                latencies.append((time.perf_counter() - sent) * 1000)
                last_ack = time.monotonic()

        started = time.perf_counter()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        seconds = time.perf_counter() - started
    return Writes(latencies, retries, seconds, last_ack)


def burst_jobs(prefix: str, count: int, indices: int) -> list[tuple[str, str]]:
    return [(f"{prefix}-{k % indices}", f"item-{k:06d}") for k in range(count)]


def expected_of(jobs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for index, item in jobs:
        found[index].add(item)
    return {index: sorted(items) for index, items in found.items()}


# -- reading contents ------------------------------------------------------------------


async def contents(
    session: aiohttp.ClientSession, url: str, indices: Sequence[str]
) -> dict[str, list[str]]:
    """Every item of ``indices`` at one indexer, all pages, sorted."""
    held: dict[str, list[str]] = {}
    for index in indices:
        items: list[str] = []
        after: str | None = None
        while True:
            params = {"limit": "10000", **({} if after is None else {"after": after})}
            async with session.get(f"{url}/v1/indices/{index}", params=params) as r:
                if r.status == 404:
                    break
                if r.status != 200:
                    raise BenchError(f"read {url} {index}: {r.status}")
                page = await r.json()
            items += page["items"]
            after = page["next"]
            if after is None:
                break
        held[index] = items
    return held


async def wait_identical(
    urls: Sequence[str],
    expected: dict[str, list[str]],
    *,
    poll: float,
    within: float,
) -> dict[str, Any]:
    """Poll until every indexer holds exactly ``expected``.

    Returns the time (monotonic) each indexer was first seen complete, the
    time all were, the number of polls, and what was still missing on timeout.
    """
    indices = sorted(expected)
    first: dict[str, float] = {}
    polls = 0
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession() as session:
        while True:
            began = time.monotonic()
            held = await asyncio.gather(*(contents(session, u, indices) for u in urls))
            seen = time.monotonic()
            polls += 1
            for url, got in zip(urls, held, strict=True):
                if got == expected:
                    first.setdefault(url, seen)
            if all(got == expected for got in held):
                return {"all_at": seen, "first": first, "polls": polls}
            if seen > deadline:
                missing = {
                    url: sum(len(expected[i]) - len(got.get(i, [])) for i in indices)
                    for url, got in zip(urls, held, strict=True)
                }
                return {
                    "all_at": None,
                    "first": first,
                    "polls": polls,
                    "missing": missing,
                }
            await asyncio.sleep(max(0.0, poll - (time.monotonic() - began)))


def quiet(cluster: Cluster) -> None:
    """Hold a measurement back a while (20 s at most) if the machine is busy."""
    others = asyncio.run(wait_quiet(cluster.pids(), limit=0.3, within=20.0))
    if others >= 0.3:
        console.print(f"  [yellow]other processes use {others:.2f} CPUs[/yellow]")


def others_cpu(meter: CpuMeter) -> float:
    """CPUs' worth of time used outside the benchmark since ``meter`` started."""
    return round(meter.others(), 2)


# -- 1. acknowledgement latency --------------------------------------------------------


def measure_acks(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        console.print(f"[bold]ack latency[/bold]: cluster of {size}")
        with contextlib.ExitStack() as stack:
            cluster = start_cluster(stack, root, f"ack-{size}", size)
            first = cluster.urls[0]
            warm = [("warm", f"w-{k}") for k in range(200)]
            asyncio.run(write_all(warm, [first], 8))

            for mode, inflight in (("sequential", 1), ("concurrent", args.inflight)):
                jobs = [("ack", f"{mode}-{k:06d}") for k in range(args.writes)]
                quiet(cluster)
                meter = CpuMeter(cluster.pids())
                writes = asyncio.run(write_all(jobs, [first], inflight))
                row = {"indexers": size, "mode": mode, "in_flight": inflight}
                row |= writes.summary()
                row["others_cpu"] = others_cpu(meter)
                rows.append(row)
                console.print(f"  {mode}: {row}")
    return rows


# -- 2. convergence after a burst ------------------------------------------------------


def measure_burst(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for spread in ("one", "all"):
        console.print(f"[bold]burst[/bold]: {args.burst:,} writes to {spread}")
        with contextlib.ExitStack() as stack:
            cluster = start_cluster(stack, root, f"burst-{spread}", 3)
            urls = cluster.urls
            warm = [("warm", f"w-{k}") for k in range(100)]
            asyncio.run(write_all(warm, urls, 6))

            jobs = burst_jobs("burst", args.burst, args.indices)
            target = urls[:1] if spread == "one" else urls
            quiet(cluster)
            meter = CpuMeter(cluster.pids())
            writes = asyncio.run(write_all(jobs, target, args.writers))
            seen = asyncio.run(
                wait_identical(
                    urls, expected_of(jobs), poll=args.poll, within=args.timeout
                )
            )
            row: dict[str, Any] = {"writes_to": spread, "writers": args.writers}
            row |= writes.summary()
            row["converge_s"] = _since(seen["all_at"], writes.last_ack)
            row["per_indexer_s"] = {
                f"i{n + 1}": _since(seen["first"].get(url), writes.last_ack)
                for n, url in enumerate(urls)
            }
            row["polls"] = seen["polls"]
            row["missing_at_timeout"] = seen.get("missing")
            row["others_cpu"] = others_cpu(meter)
            rows.append(row)
            console.print(f"  {row}")
    return rows


def _since(moment: float | None, start: float) -> float | None:
    return None if moment is None else round(moment - start, 3)


# -- 3. catch-up after kill -9 ---------------------------------------------------------


def pull_estimate(
    before: dict[str, list[str]], after: dict[str, list[str]]
) -> dict[str, int]:
    """What a bucket-granular pull moves, against what the node lacked.

    An index whose digest differs is compared bucket by bucket, and every
    entry of a differing bucket is pulled, wanted or not.
    """
    needed = pulled = buckets = 0
    for index, items in after.items():
        had = set(before.get(index, []))
        missing = [item for item in items if item not in had]
        needed += len(missing)
        differing = {bucket_of(item) for item in missing}
        buckets += len(differing)
        pulled += sum(1 for item in items if bucket_of(item) in differing)
    return {"needed": needed, "pulled": pulled, "buckets_pulled": buckets}


def measure_catch_up(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    variants = ("same", "new") if args.restart == "both" else (args.restart,)
    for variant in variants:
        console.print(f"[bold]catch-up[/bold]: restart at the {variant} address")
        with contextlib.ExitStack() as stack:
            rows.append(catch_up_once(stack, root, args, variant))
            console.print(f"  {rows[-1]}")
    return rows


def catch_up_once(
    stack: contextlib.ExitStack, root: Path, args: argparse.Namespace, variant: str
) -> dict[str, Any]:
    cluster = start_cluster(stack, root, f"catch-up-{variant}", 3)
    urls = cluster.urls
    victim = 2

    # Preload (optional) and let all three converge, so that only the writes
    # made while the victim is down are missing from it.
    preload = burst_jobs("data", args.preload, args.indices)
    preload += [("warm", f"w-{k}") for k in range(100)]
    asyncio.run(write_all(preload, urls, args.writers))
    before = expected_of(preload)
    asyncio.run(wait_identical(urls, before, poll=args.poll, within=args.timeout))

    kill_hard(cluster.indexers[victim])
    missed = [
        (f"data-{k % args.indices}", f"missed-{k:06d}") for k in range(args.missed)
    ]
    live = [u for n, u in enumerate(urls) if n != victim]
    writes = asyncio.run(write_all(missed, live, args.writers))
    after = expected_of(preload + missed)
    asyncio.run(wait_identical(live, after, poll=args.poll, within=args.timeout))

    port = cluster.ports[victim] if variant == "same" else 0
    restarted = indexer_child(cluster, victim, port, f"i{victim + 1}-restarted")
    quiet(cluster)
    meter = CpuMeter(cluster.pids())
    spawned, spawned_mono = time.time(), time.monotonic()
    _start(stack, restarted)
    seen = asyncio.run(
        wait_identical([restarted.url], after, poll=args.poll, within=args.timeout)
    )

    serving = wait_logged(restarted, "replication.serving", args.timeout)
    started = log_times(restarted, "indexer.started")
    synced = log_times(restarted, "replication.synced")
    row: dict[str, Any] = {
        "restart_at": variant,
        "preload": args.preload,
        "missed": args.missed,
        "missed_writes_per_s": round(writes.summary()["writes_per_s"], 1),
        "started_s": _wall_since(started, spawned),
        "serving_s": _wall_since(serving, spawned),
        "identical_s": _since(seen["all_at"], spawned_mono),
        "serving_reason": _reason(serving),
        "synced_lines": [line.split(" ", 3)[-1] for _, line in synced],
        "estimate": pull_estimate(before, after),
        "missing_at_timeout": seen.get("missing"),
        "others_cpu": others_cpu(meter),
    }
    return row


def wait_logged(child: Child, event: str, within: float) -> list[tuple[float, str]]:
    deadline = time.monotonic() + within
    while not (found := log_times(child, event)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _wall_since(found: list[tuple[float, str]], start: float) -> float | None:
    return round(found[0][0] - start, 3) if found else None


def _reason(found: list[tuple[float, str]]) -> str | None:
    if not found:
        return None
    return found[0][1].split("reason=", 1)[-1]


# -- output ----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if value >= 100 else f"{value:.3g}"
    return str(value)


def show(results: dict[str, Any]) -> None:
    out = Console(width=150)
    acks = Table(title="1. write acknowledgement (single-item adds to i1)")
    for name in ("indexers", "mode", "in flight", "writes", "p50 ms", "p99 ms"):
        acks.add_column(name, justify="right")
    for name in ("max ms", f">={SLOW_MS:g} ms", "writes/s", "503s", "others CPU"):
        acks.add_column(name, justify="right")
    for row in results.get("acks", []):
        acks.add_row(
            *(
                _fmt(row[key])
                for key in (
                    "indexers",
                    "mode",
                    "in_flight",
                    "writes",
                    "p50_ms",
                    "p99_ms",
                    "max_ms",
                    "slow",
                    "writes_per_s",
                    "retries",
                    "others_cpu",
                )
            )
        )
    out.print(acks)

    burst = Table(title="2. convergence after a burst (3 indexers)")
    for name in ("writes to", "writes", "writes/s", "ack p50", "ack p99"):
        burst.add_column(name, justify="right")
    for name in ("converged s", "per indexer s", "polls", "others CPU"):
        burst.add_column(name, justify="right")
    for row in results.get("burst", []):
        per = " / ".join(f"{k} {_fmt(v)}" for k, v in row["per_indexer_s"].items())
        burst.add_row(
            row["writes_to"],
            _fmt(row["writes"]),
            _fmt(row["writes_per_s"]),
            _fmt(row["p50_ms"]),
            _fmt(row["p99_ms"]),
            _fmt(row["converge_s"]),
            per,
            _fmt(row["polls"]),
            _fmt(row["others_cpu"]),
        )
    out.print(burst)

    catch = Table(title="3. catch-up of an indexer killed -9 (3 indexers)")
    for name in ("restart at", "missed", "started s", "serving s", "identical s"):
        catch.add_column(name, justify="right")
    for name in ("needed", "pull est.", "others CPU", "serving reason"):
        catch.add_column(name, justify="right")
    for row in results.get("catch_up", []):
        catch.add_row(
            row["restart_at"],
            _fmt(row["missed"]),
            _fmt(row["started_s"]),
            _fmt(row["serving_s"]),
            _fmt(row["identical_s"]),
            _fmt(row["estimate"]["needed"]),
            _fmt(row["estimate"]["pulled"]),
            _fmt(row["others_cpu"]),
            _fmt(row["serving_reason"]),
        )
    out.print(catch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--writes", type=int, default=2000, help="per ack mode")
    parser.add_argument("--inflight", type=int, default=16, help="concurrent mode")
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--writers", type=int, default=32, help="burst, catch-up")
    parser.add_argument("--indices", type=int, default=8, help="burst spread")
    parser.add_argument("--missed", type=int, default=10_000)
    parser.add_argument(
        "--preload", type=int, default=0, help="items held before the kill"
    )
    parser.add_argument("--restart", choices=["same", "new", "both"], default="both")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds")
    parser.add_argument("--timeout", type=float, default=60.0, help="per wait")
    parser.add_argument(
        "--only",
        choices=["acks", "burst", "catch_up"],
        nargs="+",
        default=["acks", "burst", "catch_up"],
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--workdir", type=Path, help="new directory to keep data and logs in"
    )
    args = parser.parse_args(argv)

    results: dict[str, Any] = {
        "cluster_flags": CLUSTER_FLAGS,
        "compared": "full sorted item lists of every written index on every "
        "indexer, against the acknowledged items",
        "buckets_per_index": BUCKETS,
    }
    steps = {"acks": measure_acks, "burst": measure_burst, "catch_up": measure_catch_up}
    with contextlib.ExitStack() as keep:
        if args.workdir is None:
            tmp = keep.enter_context(tempfile.TemporaryDirectory(prefix="p2plb-"))
            root = Path(tmp)
        else:
            root = args.workdir
            root.mkdir(parents=True)
        try:
            for name in args.only:
                results[name] = steps[name](root, args)
        except FAILED as exc:
            console.print(f"[red]benchmark failed:[/red] {exc}")
            return 1

    show(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
