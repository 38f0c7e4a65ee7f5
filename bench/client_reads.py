"""Reads per second of one client process: routed, direct to one indexer, proxied.

Usage: .venv/bin/python bench/client_reads.py [--rounds 3] [--duration 3]

Rules of this benchmark:

* One balancer and three indexers run as real processes, with one 100-item
  index replicated on all three.  This process is the one client.
* Three ways to read it, with the same ``p2plb.AsyncClient``:
  ``routed`` (the table from the balancer, three indexers called directly),
  ``direct`` (``indexers=[one]`` only, no balancer) and ``proxy`` (every call
  through the balancer).  Each is measured with ``--concurrency`` calls in
  flight on one event loop, and with the blocking ``p2plb.Client`` making one
  call at a time.  The client's own CPU time per read is reported too: on a
  small machine the servers share one CPU, so reads per second say more about
  them than about the client.
* The ways take turns for ``--rounds`` rounds, the order changing every
  round, after a warm-up; medians are reported.  With two CPUs or more the
  servers share the first and this process runs on the second (``taskset``),
  so client and servers do not compete for a CPU.
* Every process started here is stopped here, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.error
from pathlib import Path
from typing import Any

import uvloop
from harness import FAILED, BenchError, Placement, http, place, start
from rich.console import Console
from rich.table import Table

from p2plb import AsyncClient, Client
from p2plb.harness import Child, p2plb_child

INDEX = "bench"
ITEMS = 100
WAYS = ("routed", "direct", "proxy")

console = Console(stderr=True)


def start_p2plb(
    stack: contextlib.ExitStack, placement: Placement, workdir: Path, args: list[str]
) -> Child:
    kind, flags = args[0], args[1:]
    name = flags[1] if kind == "indexer" else kind
    child = p2plb_child(name, kind, workdir, *flags, pin=placement.server)
    return start(stack, child, console.print)


def start_cluster(
    stack: contextlib.ExitStack, placement: Placement, workdir: Path
) -> tuple[Child, list[Child]]:
    common = ["--log-level", "info"]
    balancer = start_p2plb(
        stack,
        placement,
        workdir,
        ["balancer", "--state-file", str(workdir / "state.json"), *common],
    )
    indexers = [
        start_p2plb(
            stack,
            placement,
            workdir,
            [
                "indexer",
                "--id",
                f"i{n}",
                "--data-dir",
                str(workdir / f"i{n}"),
                "--balancer",
                balancer.url,
                "--report-interval",
                "0.5s",
                *common,
            ],
        )  # fmt: skip
        for n in (1, 2, 3)
    ]

    deadline = time.monotonic() + 30
    while True:
        rows = json.loads(http("GET", f"{balancer.url}/v1/routing-table"))["indexers"]
        if sum(r["healthy"] and r["state"] == "serving" for r in rows) == 3:
            return balancer, indexers
        if time.monotonic() > deadline:
            raise BenchError(f"indexers not serving after 30 s: {rows}")
        time.sleep(0.1)


def items_at(url: str) -> int:
    """How many items one indexer holds of the index; 0 before it has any."""
    try:
        return len(json.loads(http("GET", url))["items"])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return 0
        raise


def client_options(way: str, balancer: str, indexer: str) -> dict[str, Any]:
    if way == "direct":
        return {"indexers": [indexer]}
    return {"balancers": [balancer], "mode": "proxy" if way == "proxy" else "routed"}


async def read_async(
    options: dict[str, Any], concurrency: int, duration: float
) -> dict[str, float]:
    """Reads per second and latency with ``concurrency`` calls in flight."""
    latencies: list[float] = []
    async with AsyncClient(**options) as client:
        assert await client.get_index(INDEX) is not None  # warm-up and check
        stop = time.perf_counter() + duration

        async def worker() -> None:
            while (begun := time.perf_counter()) < stop:
                await client.get_index(INDEX)
                latencies.append(time.perf_counter() - begun)

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        failed = sum((await client.stats())["errors"].values())
    if failed:
        raise BenchError(f"{failed} attempts failed with {options}")
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
        "cpu_us": 1e6 * cpu / len(latencies),
    }


def read_sync(options: dict[str, Any], duration: float) -> float:
    """Reads per second of the blocking client, one call at a time."""
    with Client(**options) as client:
        client.get_index(INDEX)
        calls = 0
        started = time.perf_counter()
        while time.perf_counter() - started < duration:
            client.get_index(INDEX)
            calls += 1
        return calls / (time.perf_counter() - started)


def measure(
    balancer: Child, indexers: list[Child], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    with Client(balancers=[balancer.url]) as client:
        client.add_to_index(INDEX, [f"peer-{n:03d}" for n in range(ITEMS)])
    for indexer in indexers:  # replicated everywhere before anyone measures
        url = f"{indexer.url}/v1/indices/{INDEX}"
        deadline = time.monotonic() + 10
        while items_at(url) < ITEMS:
            if time.monotonic() > deadline:
                raise BenchError(f"{indexer.name} did not get the index in 10 s")
            time.sleep(0.1)

    samples: dict[str, dict[str, list[float]]] = {w: {} for w in WAYS}
    order = list(WAYS)
    for turn in range(args.rounds):
        for way in order:
            options = client_options(way, balancer.url, indexers[0].url)
            figures = uvloop.run(read_async(options, args.concurrency, args.duration))
            figures["sync_rps"] = read_sync(options, args.duration)
            for key, value in figures.items():
                samples[way].setdefault(key, []).append(value)
            console.print(f"round {turn + 1} {way}: {figures}")
        order = order[1:] + order[:1]
    return {
        way: {key: statistics.median(values) for key, values in figures.items()}
        for way, figures in samples.items()
    }


def show(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    table = Table(
        title=(
            f"one client process reading a {ITEMS}-item index: medians of "
            f"{args.rounds} rounds of {args.duration:g} s"
        ),
        title_justify="left",
    )
    table.add_column("way")
    for column in (
        f"async x{args.concurrency} reads/s",
        "p50 ms",
        "p99 ms",
        "client CPU us/read",
        "sync x1 reads/s",
        "async vs routed",
    ):
        table.add_column(column, justify="right")
    routed = results["routed"]["rps"]
    for way, figures in results.items():
        table.add_row(
            way,
            f"{figures['rps']:.0f}",
            f"{figures['p50_ms']:.2f}",
            f"{figures['p99_ms']:.2f}",
            f"{figures['cpu_us']:.0f}",
            f"{figures['sync_rps']:.0f}",
            f"{figures['rps'] / routed:.2f}",
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per way")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    placement = place(not args.no_pin)
    os.sched_setaffinity(0, placement.client_cpus)
    console.print(placement.note)
    with (
        tempfile.TemporaryDirectory(prefix="p2plb-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        try:
            balancer, indexers = start_cluster(stack, placement, Path(tmp))
            results = measure(balancer, indexers, args)
        except FAILED as exc:
            console.print(f"[red]benchmark failed:[/red] {exc}")
            return 1

    show(results, args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
