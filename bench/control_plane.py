"""The balancer's control plane with 10,000 indexers: reports, routes, status, RSS.

Usage: .venv/bin/python bench/control_plane.py [--indexers 10000] [--json PATH]

Rules of this benchmark:

* One real ``p2plb balancer`` process.  The indexers are fake: they are
  registered over HTTP with addresses on which nobody listens, and the balancer
  is started with a probe interval, ``--unhealthy-after`` and ``--forget-after``
  of hours, so none of them is probed, found silent or forgotten during the
  run.  Its state file is saved once an hour, so no save lands in a
  measurement either.  The once-a-second ``tick`` over every entry does run.
* Before anything is measured every fake indexer reports ``serving`` once, so
  that all of them take reads.
* HTTP figures come from wrk, a separate process: load reports rotate over
  every id with a Lua script; route decisions are ``GET /v1/route`` with each
  strategy in turn (``PUT /v1/strategy``).
* In-process figures time ``Registry.route`` and ``Registry.pick`` directly,
  with 10, 1,000 and 10,000 entries, to show that a decision does not grow
  with the number of indexers.
* With two CPUs or more the balancer runs on one and wrk and this script on
  the other (``taskset -c``).  Every process started here is stopped here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
from harness import FAILED, BenchError, Placement, http, place, start
from rich.console import Console
from rich.table import Table

from p2plb.harness import Child, WrkResult, p2plb_child, rss_mib, run_wrk, wait_quiet
from p2plb.health import HealthPolicy
from p2plb.registry import Registry
from p2plb.strategies import STRATEGIES

FAKE_PORT_BASE = 30000  # fake indexer i "listens" on 30000 + i % 30000
SIZES = (10, 1_000, 10_000)
AIMS = {
    "reports_per_s": 5_000.0,
    "decision_us": 20.0,
    "status_ms": 200.0,
    "rss_mib": 150.0,
}
REPORT_LUA = """\
-- PUT /v1/indexers/{id}/load, each request for the next of COUNT ids, holding
-- the current member list (as real indexers do) so none is sent back.
local count = %(count)d
local next_id = 0
local headers = {["Content-Type"] = "application/json"}

request = function()
  local id = next_id
  next_id = (next_id + 1) %% count
  local body = string.format(
    '{"load": %%d, "state": "serving", "protocol": 1, "peers_version": %(version)d}',
    id %% 50)
  return wrk.format("PUT", string.format("/v1/indexers/fake-%%05d/load", id),
    headers, body)
end
"""

console = Console(stderr=True)


def fake_id(i: int) -> str:
    return f"fake-{i:05d}"


def fake_address(i: int) -> str:
    return f"http://127.0.0.1:{FAKE_PORT_BASE + i % 30000}"


# -- set-up over HTTP ---------------------------------------------------------------


async def fill_registry(url: str, count: int, concurrency: int) -> dict[str, float]:
    """Register ``count`` fake indexers, then have each report ``serving`` once.

    Returns how long each phase took, in seconds.
    """
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(method: str, path: str, body: dict[str, Any]) -> None:
            async with limit, session.request(method, url + path, json=body) as answer:
                if answer.status >= 300:
                    text = await answer.text()
                    raise BenchError(f"{method} {path}: {answer.status} {text[:200]}")
                await answer.read()

        started = time.perf_counter()
        await asyncio.gather(
            *(
                send(
                    "POST",
                    "/v1/indexers",
                    {
                        "id": fake_id(i),
                        "address": fake_address(i),
                        "capacity": (32, 64, 128)[i % 3],
                        "protocol": 1,
                    },
                )
                for i in range(count)
            )
        )
        registered = time.perf_counter()

        await asyncio.gather(
            *(
                send(
                    "PUT",
                    f"/v1/indexers/{fake_id(i)}/load",
                    {"load": i % 50, "state": "serving", "protocol": 1},
                )
                for i in range(count)
            )
        )
        reported = time.perf_counter()
    return {
        "register_s": registered - started,
        "first_reports_s": reported - registered,
    }


# -- in-process decisions -----------------------------------------------------------


def filled_registry(size: int, strategy: str) -> Registry:
    """A registry like the balancer's, with ``size`` serving indexers."""
    rng = random.Random(7)
    registry = Registry(
        clock=time.monotonic,
        rng=rng,
        policy=HealthPolicy(unhealthy_after=3600.0),
        strategy=strategy,
        forget_after=86400.0,
    )
    for i in range(size):
        capacity = (32, 64, 128)[i % 3]
        registry.register(fake_id(i), fake_address(i), capacity, state="serving")
        registry.report(fake_id(i), rng.randrange(capacity), "serving")
    return registry


def time_calls(call: Any, calls: int, repeats: int) -> float:
    """Median over ``repeats`` batches of the cost of one call, in microseconds."""
    costs = []
    for _ in range(repeats):
        started = time.perf_counter_ns()
        for _ in range(calls):
            call()
        costs.append((time.perf_counter_ns() - started) / calls / 1000.0)
    return statistics.median(costs)


def decision_costs(calls: int, repeats: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{strategy: {"route"|"pick": {size: µs}}}``."""
    costs: dict[str, dict[str, dict[str, float]]] = {}
    for strategy in STRATEGIES:
        costs[strategy] = {"route": {}, "pick": {}}
        for size in SIZES:
            registry = filled_registry(size, strategy)
            costs[strategy]["route"][str(size)] = time_calls(
                registry.route, calls, repeats
            )
            costs[strategy]["pick"][str(size)] = time_calls(
                registry.pick, calls, repeats
            )
    return costs


# -- the benchmark ------------------------------------------------------------------


def start_balancer(
    stack: contextlib.ExitStack, workdir: Path, placement: Placement
) -> Child:
    flags = ["--state-file", str(workdir / "state.json"), "--log-level", "info"]
    flags += ["--probe-interval", "1h", "--unhealthy-after", "6h"]
    flags += ["--forget-after", "24h", "--persist-interval", "1h"]
    balancer = p2plb_child(
        "balancer", "balancer", workdir, *flags, pin=placement.server
    )
    return start(stack, balancer, console.print)


def quiet(balancer: Child) -> None:
    """Hold the next measurement back while other work keeps the machine busy."""
    others = asyncio.run(wait_quiet([balancer.pid], limit=0.15, within=180.0))
    if others >= 0.15:
        console.print(f"[yellow]other processes use {others:.2f} CPUs[/yellow]")


def measure(
    balancer: Child, placement: Placement, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    url = balancer.url
    wrk: dict[str, Any] = {
        "threads": args.threads,
        "connections": args.connections,
        "duration": args.duration,
        "ours": [balancer.pid],
        "pin": placement.client,
    }
    out: dict[str, Any] = {"rss_mib": {"empty": rss_mib(balancer.pid)}}

    console.print(f"registering {args.indexers:,} fake indexers")
    out["setup"] = asyncio.run(fill_registry(url, args.indexers, args.concurrency))
    status = json.loads(http("GET", f"{url}/v1/status"))
    if status["healthy_indexers"] != args.indexers:
        raise BenchError(f"{status['healthy_indexers']} healthy, not {args.indexers}")
    out["rss_mib"]["filled"] = rss_mib(balancer.pid)

    quiet(balancer)
    console.print("load reports (wrk, ids in rotation)")
    script = workdir / "report.lua"
    members = json.loads(http("GET", f"{url}/v1/indexers?members_since=-1"))
    version = int(members["members_version"])
    script.write_text(REPORT_LUA % {"count": args.indexers, "version": version})
    out["reports"] = asdict(asyncio.run(run_wrk(url + "/", script=script, **wrk)))

    routes: dict[str, Any] = {}
    for strategy in STRATEGIES:
        http("PUT", f"{url}/v1/strategy", {"strategy": strategy})
        quiet(balancer)
        console.print(f"GET /v1/route with {strategy}")
        result: WrkResult = asyncio.run(run_wrk(f"{url}/v1/route?op=read", **wrk))
        routes[strategy] = asdict(result)
    out["routes"] = routes

    quiet(balancer)
    console.print("GET /v1/status x20")
    latencies, size = [], 0
    for _ in range(20):
        started = time.perf_counter()
        size = len(http("GET", f"{url}/v1/status"))
        latencies.append((time.perf_counter() - started) * 1000.0)
    out["status"] = {
        "median_ms": statistics.median(latencies),
        "max_ms": max(latencies),
        "bytes": size,
    }
    out["rss_mib"]["after"] = rss_mib(balancer.pid)

    quiet(balancer)
    console.print(f"in-process decisions at {', '.join(map(str, SIZES))} entries")
    out["decisions_us"] = decision_costs(args.calls, args.repeats)
    return out


# -- output -------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "[green]met[/green]" if ok else "[red]missed[/red]"


def show(summary: dict[str, Any]) -> None:
    m = summary["results"]
    out = Console(width=max(Console().width, 120))

    table = Table(
        title=f"p2plb balancer control plane, {summary['indexers']:,} fake indexers",
        caption=f"{summary['load_generator']}; {summary['placement']}",
    )
    for name in ("measure", "figure", "p50 ms", "p99 ms", "others' CPU", "aim", ""):
        table.add_column(name, justify="left" if name == "measure" else "right")
    reports = m["reports"]
    table.add_row(
        "PUT /v1/indexers/{id}/load",
        f"{reports['rps']:,.0f} /s",
        f"{reports['p50_ms']:.2f}",
        f"{reports['p99_ms']:.2f}",
        f"{reports['others_cpu']:.2f}",
        f">= {AIMS['reports_per_s']:,.0f} /s",
        verdict(reports["rps"] >= AIMS["reports_per_s"] and not reports["errors"]),
    )
    for strategy, route in m["routes"].items():
        table.add_row(
            f"GET /v1/route ({strategy})",
            f"{route['rps']:,.0f} /s",
            f"{route['p50_ms']:.2f}",
            f"{route['p99_ms']:.2f}",
            f"{route['others_cpu']:.2f}",
            "",
            "" if not route["errors"] else f"[red]{route['errors']} errors[/red]",
        )
    status = m["status"]
    table.add_row(
        f"GET /v1/status ({status['bytes'] / 1e6:.1f} MB), 20 calls",
        f"median {status['median_ms']:.0f} ms",
        "",
        f"max {status['max_ms']:.0f}",
        "",
        f"<= {AIMS['status_ms']:.0f} ms",
        verdict(status["max_ms"] <= AIMS["status_ms"]),
    )
    rss = m["rss_mib"]
    table.add_row(
        "balancer RSS (VmRSS): empty / filled / after",
        f"{rss['empty']['VmRSS']:.0f} / {rss['filled']['VmRSS']:.0f} / "
        f"{rss['after']['VmRSS']:.0f} MiB",
        "",
        f"peak {rss['after']['VmHWM']:.0f}",
        "",
        f"<= {AIMS['rss_mib']:.0f} MiB",
        verdict(max(r["VmRSS"] for r in rss.values()) <= AIMS["rss_mib"]),
    )
    setup = m["setup"]
    table.add_row(
        "set-up: registrations, then first reports (aiohttp)",
        f"{summary['indexers'] / setup['register_s']:,.0f} /s, "
        f"{summary['indexers'] / setup['first_reports_s']:,.0f} /s",
        "",
        "",
        "",
        "",
        "",
    )
    out.print(table)

    decisions = Table(
        title="In-process decision cost (µs per call, median of batches)",
        caption="Registry.route = pick + count it; Registry.pick alone",
    )
    decisions.add_column("strategy")
    decisions.add_column("call")
    for size in SIZES:
        decisions.add_column(f"{size:,}", justify="right")
    decisions.add_column("10k / 10", justify="right")
    decisions.add_column(f"<= {AIMS['decision_us']:g} µs", justify="right")
    for strategy, calls in m["decisions_us"].items():
        for call, by_size in calls.items():
            values = [by_size[str(size)] for size in SIZES]
            decisions.add_row(
                strategy,
                call,
                *(f"{v:.2f}" for v in values),
                f"{values[-1] / values[0]:.2f}x",
                verdict(max(values) <= AIMS["decision_us"]),
            )
    out.print(decisions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--indexers", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t")
    parser.add_argument("--connections", type=int, default=64, help="wrk -c")
    parser.add_argument("--concurrency", type=int, default=32, help="for set-up")
    parser.add_argument("--calls", type=int, default=20_000, help="per batch")
    parser.add_argument("--repeats", type=int, default=5, help="batches")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    placement = place(not args.no_pin)
    os.sched_setaffinity(0, placement.client_cpus)
    with (
        tempfile.TemporaryDirectory(prefix="p2plb-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        try:
            balancer = start_balancer(stack, workdir, placement)
            console.print(f"balancer pid {balancer.pid} at {balancer.url}")
            results = measure(balancer, placement, args, workdir)
        except FAILED as exc:
            console.print(f"[red]benchmark failed:[/red] {exc}")
            return 1

    summary = {
        "indexers": args.indexers,
        "fake_indexers": (
            "registered over HTTP at addresses nobody listens on; balancer run "
            "with --probe-interval 1h --unhealthy-after 6h --forget-after 24h "
            "--persist-interval 1h so they stay healthy and unprobed"
        ),
        "load_generator": (
            f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s"
        ),
        "placement": placement.note,
        "aims": AIMS,
        "results": results,
    }
    console.print(summary["fake_indexers"])
    show(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
