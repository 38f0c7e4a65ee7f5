"""``p2plb bench --suite proxy`` and ``--suite control-plane``: raw speed figures.

Rules of this module:

* Both suites drive real processes with wrk, a closed-loop generator: they
  measure how many requests per second a path sustains, not tail latency
  under a given load (that is the balancing suite's job, open loop).
* With two CPUs the servers under test run on the first and wrk on the second
  (``taskset -c``); every wrk run records the CPU used by processes outside
  the benchmark.  Figures taken while others use well over 0.1 CPU are not
  comparable with quieter ones.
* ``proxy``: ``GET /v1/indices/bench`` through the p2plb proxy, through
  HAProxy ``balance leastconn`` (one thread, ``http-reuse always``), through
  a bare aiohttp forwarder (``p2plb.forwarder``: what aiohttp alone allows)
  and straight from one indexer (no hop: the ceiling), in front of three
  indexers of capacity 1024 without a service model.  The four take turns for
  ``rounds`` rounds, the order rotating each round so that a drift of the
  machine favours none; medians are reported, and p2plb / HAProxy is the
  figure of merit (aim >= 0.3, as in bench/proxy_vs_haproxy.py).
* ``control-plane``: one balancer holding 10,000 fake indexers (registered
  at addresses nobody listens on; probes, health and persistence pushed out
  to hours).  It measures load reports per second, ``GET /v1/route`` per
  second for each strategy, ``GET /v1/status`` latency, the balancer's RSS,
  and the in-process cost of a decision at 10, 1,000 and 10,000 entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from rich.console import Console, Group, RenderableType
from rich.table import Table

from p2plb.errors import UsageError
from p2plb.harness import (
    Child,
    WrkResult,
    p2plb_child,
    rss_mib,
    run_wrk,
    wait_quiet,
)
from p2plb.health import HealthPolicy
from p2plb.registry import Registry
from p2plb.strategies import STRATEGIES

if TYPE_CHECKING:
    from p2plb.benchmark import BenchOptions

__all__ = ["render_suite", "run_suite"]

PROXY_AIM = 0.3
CONTROL_AIMS = {
    "reports_per_s": 5_000.0,
    "decision_us": 20.0,
    "status_ms": 200.0,
    "rss_mib": 150.0,
}
_SIZES = (10, 1_000, 10_000)
_FAKE_PORT_BASE = 30000
_REPORT_LUA = """\
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


def _pins() -> tuple[list[str], list[str], str]:
    """Command prefixes for the servers and for wrk, and what was done."""
    cpus = sorted(os.sched_getaffinity(0))
    taskset = shutil.which("taskset")
    if taskset is None or len(cpus) < 2:
        return [], [], "not pinned (no taskset or one CPU)"
    server, client = str(cpus[0]), str(cpus[1])
    note = f"servers on CPU {server}, wrk on CPU {client} (taskset -c)"
    return [taskset, "-c", server], [taskset, "-c", client], note


async def run_suite(options: BenchOptions, console: Console) -> dict[str, Any]:
    """The figures of ``options.suite``; ``UsageError`` without wrk."""
    if shutil.which("wrk") is None:
        raise UsageError(f"--suite {options.suite} needs wrk (apt-get install wrk)")
    with contextlib.ExitStack() as dirs:
        if options.workdir is not None:
            workdir = options.workdir / options.suite
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(dirs.enter_context(tempfile.TemporaryDirectory("-bench")))
        if options.suite == "proxy":
            return await _proxy_suite(options, workdir, console)
        return await _control_plane_suite(options, workdir, console)


# -- proxy -------------------------------------------------------------------------


async def _proxy_suite(
    options: BenchOptions, workdir: Path, console: Console
) -> dict[str, Any]:
    from p2plb.benchcluster import INDEX, BenchCluster
    from p2plb.benchmark import Scenario

    server_pin, client_pin, note = _pins()
    rounds, duration = (1, 3.0) if options.quick else (3, 10.0)
    duration = options.duration or duration
    fast = Scenario("proxy", load=0.0, capacities=(1024,) * 3, service_time=0.0)
    async with contextlib.AsyncExitStack() as stack:
        cluster = await stack.enter_async_context(
            BenchCluster(workdir, fast, options, pin=server_pin)
        )
        await cluster.start(["haproxy/leastconn"])
        assert cluster.balancer is not None
        # The least an aiohttp proxy does, on the same CPU and backends: how
        # much of the gap to HAProxy is aiohttp's own.
        bare = Child(
            "aiohttp-bare",
            [*server_pin, sys.executable, "-m", "p2plb.forwarder", "--port", "0"]
            + [indexer.url for indexer in cluster.indexers],
            workdir,
            r"\bforwarder\.started url=(\S+)",
        )
        bare.spawn()
        stack.callback(bare.stop)
        await bare.wait_ready()
        path = f"/v1/indices/{INDEX}"
        urls = {
            "p2plb": cluster.balancer.url + path,
            "bare": bare.url + path,
            "haproxy": cluster.haproxy["leastconn"].url + path,
            "direct": cluster.indexers[0].url + path,
        }
        ours = [*cluster.pids, bare.pid]

        async def wrk(url: str, seconds: float) -> WrkResult:
            return await run_wrk(
                url,
                threads=1,
                connections=32,
                duration=seconds,
                ours=ours,
                pin=client_pin,
            )

        for url in urls.values():
            await wrk(url, 1.0)  # warm-up

        runs: dict[str, list[WrkResult]] = {name: [] for name in urls}
        order = list(urls)
        for round_no in range(rounds):
            shift = round_no % len(order)
            for name in order[shift:] + order[:shift]:
                result = await wrk(urls[name], duration)
                runs[name].append(result)
                console.print(
                    f"  round {round_no + 1}/{rounds} {name}: {result.rps:,.0f} "
                    f"req/s p99 {result.p99_ms:.2f} ms errors {result.errors} "
                    f"others' CPU {result.others_cpu:.2f}"
                )

    medians = {
        name: {
            "rps": statistics.median(r.rps for r in results),
            "p50_ms": statistics.median(r.p50_ms for r in results),
            "p99_ms": statistics.median(r.p99_ms for r in results),
            "errors": sum(r.errors for r in results),
            "others_cpu_max": max(r.others_cpu for r in results),
        }
        for name, results in runs.items()
    }
    return {
        "path": f"GET /v1/indices/{INDEX} (10 items), 3 indexers of capacity 1024",
        "load_generator": f"wrk -t1 -c32 -d{duration:g}s --latency",
        "rounds": rounds,
        "placement": note,
        "runs": {name: [asdict(r) for r in results] for name, results in runs.items()},
        "median": medians,
        "ratio": medians["p2plb"]["rps"] / max(medians["haproxy"]["rps"], 1e-9),
        "bare_ratio": medians["bare"]["rps"] / max(medians["haproxy"]["rps"], 1e-9),
        "aim_ratio": PROXY_AIM,
    }


# -- control plane ---------------------------------------------------------------


def _fake_id(i: int) -> str:
    return f"fake-{i:05d}"


async def _fill_registry(url: str, count: int) -> dict[str, float]:
    """Register ``count`` fake indexers, then have each report ``serving``."""
    limit = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as http:

        async def send(method: str, path: str, body: dict[str, Any]) -> None:
            async with limit, http.request(method, url + path, json=body) as answer:
                if answer.status >= 300:
                    text = await answer.text()
                    raise UsageError(f"{method} {path}: {answer.status} {text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(
            *(
                send(
                    "POST",
                    "/v1/indexers",
                    {
                        "id": _fake_id(i),
                        "address": f"http://127.0.0.1:{_FAKE_PORT_BASE + i % 30000}",
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
                    f"/v1/indexers/{_fake_id(i)}/load",
                    {"load": i % 50, "state": "serving", "protocol": 1},
                )
                for i in range(count)
            )
        )
    return {
        "register_s": registered - started,
        "first_reports_s": time.perf_counter() - registered,
    }


def _decision_us(size: int, strategy: str, calls: int) -> dict[str, float]:
    """Median cost in µs of ``Registry.route`` and ``Registry.pick`` at ``size``."""
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
        registry.register(_fake_id(i), f"http://127.0.0.1:{i + 1}", capacity)
        registry.report(_fake_id(i), rng.randrange(capacity), "serving")
    costs = {}
    for name, call in (("route", registry.route), ("pick", registry.pick)):
        batches = []
        for _ in range(5):
            started = time.perf_counter_ns()
            for _ in range(calls):
                call()
            batches.append((time.perf_counter_ns() - started) / calls / 1000.0)
        costs[name] = statistics.median(batches)
    return costs


async def _control_plane_suite(
    options: BenchOptions, workdir: Path, console: Console
) -> dict[str, Any]:
    server_pin, client_pin, note = _pins()
    count = 1_000 if options.quick else 10_000
    duration = options.duration or (3.0 if options.quick else 10.0)
    flags = ["--state-file", str(workdir / "state.json"), "--probe-interval", "1h"]
    flags += ["--unhealthy-after", "6h", "--forget-after", "24h"]
    flags += ["--persist-interval", "1h"]
    balancer = p2plb_child("balancer", "balancer", workdir, *flags, pin=server_pin)
    figures: dict[str, Any] = {"indexers": count, "placement": note}
    async with contextlib.AsyncExitStack() as stack:
        balancer.spawn()
        stack.push_async_callback(asyncio.to_thread, balancer.stop)
        await balancer.wait_ready()
        url, pid = balancer.url, balancer.pid
        figures["rss_mib"] = {"empty": rss_mib(pid)}

        console.print(f"  registering {count:,} fake indexers")
        figures["setup"] = await _fill_registry(url, count)
        figures["rss_mib"]["filled"] = rss_mib(pid)

        wrk: dict[str, Any] = {"threads": 1, "connections": 64, "ours": [pid]}
        wrk.update(duration=duration, pin=client_pin)
        # A full run waits (a minute at most) for others to go quiet before
        # each measurement: a shared machine moves these figures by 2x.
        quiet = 0.0 if options.quick else 60.0
        script = workdir / "report.lua"
        async with aiohttp.ClientSession() as http:
            members = f"{url}/v1/indexers"  # the whole list, with its version
            async with http.get(members) as answer:
                answer.raise_for_status()
                version = int((await answer.json())["members_version"])
        script.write_text(_REPORT_LUA % {"count": count, "version": version})
        console.print("  load reports (wrk, ids in rotation)")
        await wait_quiet([pid], limit=0.15, within=quiet)
        figures["reports"] = asdict(await run_wrk(url + "/", script=script, **wrk))

        routes = {}
        async with aiohttp.ClientSession() as http:
            for strategy in STRATEGIES:
                body = {"strategy": strategy}
                async with http.put(f"{url}/v1/strategy", json=body) as answer:
                    answer.raise_for_status()
                console.print(f"  GET /v1/route with {strategy}")
                await wait_quiet([pid], limit=0.15, within=quiet)
                result = await run_wrk(f"{url}/v1/route?op=read", **wrk)
                routes[strategy] = asdict(result)
            figures["routes"] = routes

            latencies, size = [], 0
            for _ in range(20):
                started = time.perf_counter()
                async with http.get(f"{url}/v1/status") as answer:
                    size = len(await answer.read())
                latencies.append((time.perf_counter() - started) * 1000.0)
        figures["status"] = {
            "median_ms": statistics.median(latencies),
            "max_ms": max(latencies),
            "bytes": size,
        }
        figures["rss_mib"]["after"] = rss_mib(pid)

    console.print(f"  in-process decisions at {', '.join(map(str, _SIZES))} entries")
    calls = 2_000 if options.quick else 20_000
    figures["decisions_us"] = {
        strategy: {str(size): _decision_us(size, strategy, calls) for size in _SIZES}
        for strategy in STRATEGIES
    }
    figures["aims"] = CONTROL_AIMS
    return figures


# -- output ------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "[green]met[/]" if ok else "[red]missed[/]"


def render_suite(suite: str, figures: dict[str, Any]) -> RenderableType:
    """The figures of the proxy or control-plane suite as rich tables."""
    if suite == "proxy":
        return _render_proxy(figures)
    return _render_control_plane(figures)


def _render_proxy(figures: dict[str, Any]) -> RenderableType:
    table = Table(
        title=f"{figures['path']}, median of {figures['rounds']} rounds",
        caption=f"{figures['load_generator']}; {figures['placement']}",
    )
    for name in ("path", "req/s", "p50 ms", "p99 ms", "errors", "others' CPU"):
        table.add_column(name, justify="left" if name == "path" else "right")
    labels = {
        "p2plb": "p2plb balancer (proxy)",
        "bare": "aiohttp forwarder, bare",
        "haproxy": "HAProxy leastconn",
        "direct": "one indexer, direct",
    }
    for name, label in labels.items():
        m = figures["median"][name]
        table.add_row(
            label,
            f"{m['rps']:,.0f}",
            f"{m['p50_ms']:.2f}",
            f"{m['p99_ms']:.2f}",
            str(m["errors"]),
            f"{m['others_cpu_max']:.2f}",
        )
    ratio, aim = figures["ratio"], figures["aim_ratio"]
    verdict = f"p2plb / HAProxy = {ratio:.2f}x (aim >= {aim:g}x: "
    bare = (
        f"bare aiohttp forwarder / HAProxy = {figures['bare_ratio']:.2f}x; "
        f"p2plb / bare = {ratio / max(figures['bare_ratio'], 1e-9):.2f}x"
    )
    return Group(table, verdict + _verdict(ratio >= aim) + ")", bare)


def _render_control_plane(figures: dict[str, Any]) -> RenderableType:
    aims = figures["aims"]
    table = Table(
        title=f"Balancer control plane, {figures['indexers']:,} fake indexers",
        caption=figures["placement"],
    )
    for name in ("measure", "figure", "p50 ms", "p99 ms", "others' CPU", "aim"):
        table.add_column(name, justify="left" if name == "measure" else "right")
    reports = figures["reports"]
    table.add_row(
        "PUT /v1/indexers/{id}/load",
        f"{reports['rps']:,.0f} /s",
        f"{reports['p50_ms']:.2f}",
        f"{reports['p99_ms']:.2f}",
        f"{reports['others_cpu']:.2f}",
        _verdict(reports["rps"] >= aims["reports_per_s"] and not reports["errors"]),
    )
    for strategy, route in figures["routes"].items():
        table.add_row(
            f"GET /v1/route ({strategy})",
            f"{route['rps']:,.0f} /s",
            f"{route['p50_ms']:.2f}",
            f"{route['p99_ms']:.2f}",
            f"{route['others_cpu']:.2f}",
            "" if not route["errors"] else f"[red]{route['errors']} errors[/]",
        )
    status = figures["status"]
    table.add_row(
        f"GET /v1/status ({status['bytes'] / 1e6:.1f} MB), 20 calls",
        f"median {status['median_ms']:.0f} ms",
        "",
        f"max {status['max_ms']:.0f}",
        "",
        _verdict(status["max_ms"] <= aims["status_ms"]),
    )
    rss = figures["rss_mib"]
    table.add_row(
        "balancer RSS: empty / filled / after",
        " / ".join(f"{rss[k]['VmRSS']:.0f}" for k in ("empty", "filled", "after"))
        + " MiB",
        "",
        "",
        "",
        _verdict(max(r["VmRSS"] for r in rss.values()) <= aims["rss_mib"]),
    )

    decisions = Table(title="In-process decision cost, µs per call (median)")
    decisions.add_column("strategy")
    decisions.add_column("call")
    for size in _SIZES:
        decisions.add_column(f"{size:,}", justify="right")
    decisions.add_column(f"<= {aims['decision_us']:g} µs", justify="right")
    for strategy, by_size in figures["decisions_us"].items():
        for call in ("route", "pick"):
            values = [by_size[str(size)][call] for size in _SIZES]
            decisions.add_row(
                strategy,
                call,
                *(f"{v:.2f}" for v in values),
                _verdict(max(values) <= aims["decision_us"]),
            )
    return Group(table, decisions)
