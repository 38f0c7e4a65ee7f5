"""Read throughput of one indexer, measured next to a minimal aiohttp app.

Usage: .venv/bin/python bench/indexer_read.py [--rounds 3] [--duration 10]

Rules of this benchmark:

* Two servers in their own processes: a real ``p2plb indexer`` holding one
  100-item index, and a minimal aiohttp app answering the very bytes the
  indexer answers.  Both run on uvloop with no access log, so the gap between
  them is what p2plb adds (routing, validation, limiter, SQLite, encoding).
* ``wrk`` loads one server at a time.  After a warm-up of each, the two take
  turns for ``--rounds`` rounds, the order flipping every round so a slow drift
  of the machine does not favour one side; the medians are reported.
* With two CPUs or more, the servers run on one CPU and wrk on another
  (``taskset -c``), so load generator and server never compete.
* Every process started here is stopped here, on success, failure, Ctrl-C or
  SIGTERM: servers get SIGTERM, then SIGKILL if they outlive a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from harness import FAILED, BenchError, Placement, http, place, start
from rich.console import Console
from rich.table import Table

from p2plb.harness import Child, WrkResult, p2plb_child, run_wrk

INDEX = "bench"
ITEMS = 100
TARGETS = ("indexer", "minimal")
MINIMAL_READY = r"\bminimal\.started .*?\burl=(\S+)"

console = Console(stderr=True)


# -- the minimal app, run in a child process of its own -------------------------


async def serve_minimal(body: bytes) -> None:
    """Answer ``GET /v1/indices/{name}`` with ``body`` until SIGTERM or SIGINT."""
    from aiohttp import web

    async def get_index(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/indices/{name}", get_index)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = runner.addresses[0][1]
    print(f"minimal.started url=http://127.0.0.1:{port}", file=sys.stderr, flush=True)

    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run_minimal(body_file: str) -> None:
    import uvloop

    uvloop.run(serve_minimal(Path(body_file).read_bytes()))


def fill_index(base_url: str) -> bytes:
    """Write the 100 items in one POST; return the indexer's answer to a read."""
    items = [f"bench-item-{i:04d}" for i in range(ITEMS)]
    http("POST", f"{base_url}/v1/indices/{INDEX}/items", {"items": items})

    body = http("GET", f"{base_url}/v1/indices/{INDEX}")
    got = json.loads(body)
    if got.get("items") != items:
        raise BenchError(f"the index reads back wrong: {body[:200]!r}")
    return body


def wrk(
    url: str, placement: Placement, args: argparse.Namespace, duration: float
) -> WrkResult:
    return asyncio.run(
        run_wrk(
            url,
            threads=args.threads,
            connections=args.connections,
            duration=duration,
            pin=placement.client,
        )
    )


# -- the benchmark -----------------------------------------------------------------


def start_servers(
    stack: contextlib.ExitStack, workdir: Path, placement: Placement, capacity: int
) -> dict[str, Child]:
    flags = ["--id", "bench", "--data-dir", str(workdir / "data")]
    flags += ["--capacity", str(capacity)]
    indexer = p2plb_child("indexer", "indexer", workdir, *flags, pin=placement.server)
    start(stack, indexer, console.print)
    body = fill_index(indexer.url)

    body_file = workdir / "answer.json"
    body_file.write_bytes(body)
    args = [*placement.server, sys.executable, __file__, "--serve-minimal"]
    minimal = Child("minimal", [*args, str(body_file)], workdir, MINIMAL_READY)
    start(stack, minimal, console.print)

    # Same bytes on both sides, or the comparison means nothing.
    if http("GET", f"{minimal.url}/v1/indices/{INDEX}") != body:
        raise BenchError("the minimal app does not answer the indexer's bytes")
    console.print(
        f"indexer pid {indexer.pid} at {indexer.url}, minimal pid {minimal.pid} "
        f"at {minimal.url}; answer {len(body)} bytes"
    )
    return {"indexer": indexer, "minimal": minimal}


def measure(
    servers: dict[str, Child], placement: Placement, args: argparse.Namespace
) -> dict[str, list[WrkResult]]:
    urls = {name: f"{s.url}/v1/indices/{INDEX}" for name, s in servers.items()}
    for name in TARGETS:
        console.print(f"warm-up {name} {args.warmup:g}s")
        wrk(urls[name], placement, args, args.warmup)

    results: dict[str, list[WrkResult]] = {name: [] for name in TARGETS}
    for round_no in range(args.rounds):
        order = TARGETS if round_no % 2 == 0 else TARGETS[::-1]
        for name in order:
            result = wrk(urls[name], placement, args, args.duration)
            results[name].append(result)
            console.print(
                f"round {round_no + 1}/{args.rounds} {name}: "
                f"{result.rps:,.0f} req/s p50 {result.p50_ms:.2f} ms "
                f"p99 {result.p99_ms:.2f} ms errors {result.errors}"
            )
    return results


def summarize(
    results: dict[str, list[WrkResult]], args: argparse.Namespace, placement: Placement
) -> dict[str, Any]:
    medians = {
        name: {
            "rps": statistics.median(r.rps for r in runs),
            "p50_ms": statistics.median(r.p50_ms for r in runs),
            "p99_ms": statistics.median(r.p99_ms for r in runs),
            "errors": sum(r.errors for r in runs),
        }
        for name, runs in results.items()
    }
    return {
        "path": f"GET /v1/indices/{INDEX} ({ITEMS} items)",
        "load_generator": (
            f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency"
        ),
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "placement": placement.note,
        "load_average": os.getloadavg(),
        "runs": {name: [asdict(r) for r in runs] for name, runs in results.items()},
        "median": medians,
        "ratio": medians["indexer"]["rps"] / medians["minimal"]["rps"],
    }


def show(summary: dict[str, Any]) -> None:
    table = Table(
        title=f"{summary['path']}, median of {summary['rounds']} rounds",
        caption=f"{summary['load_generator']}; {summary['placement']}",
    )
    table.add_column("server")
    table.add_column("req/s", justify="right")
    table.add_column("each round", justify="right")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_column("errors", justify="right")
    for name in TARGETS:
        median = summary["median"][name]
        rounds = " ".join(f"{run['rps']:,.0f}" for run in summary["runs"][name])
        table.add_row(
            name,
            f"{median['rps']:,.0f}",
            rounds,
            f"{median['p50_ms']:.2f}",
            f"{median['p99_ms']:.2f}",
            str(median["errors"]),
        )

    out = Console()
    out.print(table)
    verdict = "meets" if summary["ratio"] >= 0.6 else "is below"
    out.print(
        f"indexer / minimal = {summary['ratio']:.2f} ({verdict} the aim of 0.60); "
        f"load average {', '.join(f'{x:.2f}' for x in summary['load_average'])}"
    )


def _terminated(signum: int, frame: object) -> NoReturn:
    raise SystemExit(128 + signum)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="s per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="s per server")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--capacity", type=int, default=1024, help="of the indexer")
    parser.add_argument("--no-pin", action="store_true", help="skip taskset")
    parser.add_argument("--json", metavar="PATH", help="also write results here")
    parser.add_argument("--serve-minimal", metavar="BODY", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration < 1 or args.connections < args.threads:
        parser.error("need --rounds >= 1, --duration >= 1, --connections >= --threads")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_minimal:
        run_minimal(args.serve_minimal)
        return 0
    if shutil.which("wrk") is None:
        console.print("wrk is not installed: apt-get install wrk")
        return 2

    # SIGTERM unwinds like Ctrl-C, so the finally clauses stop the servers.
    signal.signal(signal.SIGTERM, _terminated)
    placement = place(not args.no_pin)
    try:
        with contextlib.ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            servers = start_servers(stack, workdir, placement, args.capacity)
            results = measure(servers, placement, args)
    except FAILED as exc:
        console.print(f"[red]bench failed:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("interrupted; servers stopped")
        return 130

    summary = summarize(results, args, placement)
    show(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
