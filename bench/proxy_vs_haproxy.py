"""Where the p2plb proxy spends its time, after ``p2plb bench --suite proxy``.

Usage: .venv/bin/python bench/proxy_vs_haproxy.py [--quick] [--profile]

Rules of this benchmark:

* The figures (p2plb proxy, HAProxy ``leastconn`` and one indexer direct,
  wrk ``-t1 -c32``, rounds in rotating order, medians, p2plb / HAProxy against
  the aim of 0.3) come from ``p2plb bench --suite proxy``, called here as a
  library; see docs/benchmarks.md.  This script adds the one thing the suite
  lacks: a py-spy profile of the balancer.
* Below ``--profile-below`` (or with ``--profile``) a fresh balancer with
  three indexers of capacity 1024 is started, one more wrk run goes through
  its proxy, and py-spy samples the balancer meanwhile; the functions its
  event loop spends its time in are printed, by own time and by time
  including callees.  The balancer runs on the first CPU, wrk and py-spy on
  the second (``taskset -c``), the indexers anywhere.
* Every process started here is stopped here, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import FAILED, BenchError, Placement, http, place, start
from rich.console import Console
from rich.table import Table

from p2plb.benchmark import BenchOptions
from p2plb.benchsuites import PROXY_AIM, render_suite, run_suite
from p2plb.harness import Child, p2plb_child

INDEX = "bench"
ITEMS = [f"item-{i:02d}" for i in range(10)]
RATE_HZ = 250

console = Console(stderr=True)


# -- a cluster to profile -------------------------------------------------------------


def start_cluster(
    stack: contextlib.ExitStack, workdir: Path, placement: Placement
) -> Child:
    """A balancer and three indexers serving the index; returns the balancer."""
    state = str(workdir / "state.json")
    balancer = p2plb_child(
        "balancer", "balancer", workdir, "--state-file", state, pin=placement.server
    )
    start(stack, balancer, console.print)
    indexers = []
    for n in (1, 2, 3):
        flags = ["--id", f"i{n}", "--data-dir", str(workdir / f"i{n}")]
        flags += ["--capacity", "1024", "--balancer", balancer.url]
        indexer = p2plb_child(f"i{n}", "indexer", workdir, *flags)
        indexers.append(start(stack, indexer, console.print))

    deadline = time.monotonic() + 60.0
    while True:
        rows = json.loads(http("GET", f"{balancer.url}/v1/routing-table"))["indexers"]
        if sum(r["healthy"] and r["state"] == "serving" for r in rows) == 3:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"indexers not serving after 60 s: {rows}")
        time.sleep(0.2)

    http("POST", f"{balancer.url}/v1/indices/{INDEX}/items", {"items": ITEMS})
    for indexer in indexers:
        url = f"{indexer.url}/v1/indices/{INDEX}"
        while json.loads(http("GET", url))["items"] != ITEMS:
            if time.monotonic() > deadline:
                raise BenchError(f"{indexer.name} did not get the {INDEX} index")
            time.sleep(0.1)
    return balancer


def profile(
    balancer: Child, placement: Placement, args: argparse.Namespace
) -> dict[str, Any]:
    """Sample the balancer with py-spy under one wrk run through its proxy."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    raw = args.profile_dir / "balancer.folded"
    seconds = max(2, int(args.duration) - 2)

    url = f"{balancer.url}/v1/indices/{INDEX}"
    wrk = [*placement.client, "wrk", "-t1", "-c32", f"-d{args.duration:g}s", url]
    with subprocess.Popen(wrk, stdout=subprocess.DEVNULL) as load:
        try:
            time.sleep(1.0)
            sampled = subprocess.run(
                [
                    *placement.client,
                    py_spy,
                    "record",
                    "--pid",
                    str(balancer.pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    str(RATE_HZ),
                    "--format",
                    "raw",
                    "--output",
                    str(raw),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            load.wait(args.duration + 30)
    if sampled.returncode != 0:
        raise BenchError(f"py-spy failed:\n{sampled.stdout}{sampled.stderr}")

    folded = fold(raw.read_text(), args.top)
    folded["busy"] = folded["samples"] / (RATE_HZ * seconds)
    return folded


def fold(text: str, top: int) -> dict[str, Any]:
    """Own time and inclusive time per function, from py-spy's folded stacks.

    Only the main thread (the event loop) counts: py-spy may take a worker of
    the default thread pool, waiting on its queue, for a busy thread.  A frame
    reads ``function (file:line)``; the line is dropped so that all the
    samples of one function add up.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = elsewhere = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        if "runpy" not in stack.split(";", 1)[0]:
            elsewhere += samples  # a helper thread, not the event loop
            continue
        total += samples
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, 100.0 * n / total) for f, n in counter.most_common(top)]

    skip = ("<module>", "_run", "run ", "Runner.run", "click/", "runpy", "cli.py")
    callers = [
        (f, n)
        for f, n in inclusive.most_common()
        if not any(s in f for s in skip) and n < total
    ]
    return {
        "samples": total,
        "other_thread_samples": elsewhere,
        "own": share(own),
        "inclusive": [(f, 100.0 * n / total) for f, n in callers[:top]],
    }


def _function(frame: str) -> str:
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "src/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


# -- output -------------------------------------------------------------------------


def show_profile(sampled: dict[str, Any]) -> None:
    out = Console(width=max(Console().width, 120))
    for kind, title in (("own", "own time"), ("inclusive", "time with callees")):
        functions = Table(
            title=f"Balancer's event loop under wrk, py-spy: {title}",
            caption=f"{sampled['samples']:,} samples; the loop was busy "
            f"{sampled['busy']:.0%} of the time",
        )
        functions.add_column("function (module)")
        functions.add_column("% of samples", justify="right")
        for function, percent in sampled[kind]:
            functions.add_row(function, f"{percent:.1f}")
        out.print(functions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of 3 s")
    parser.add_argument("--duration", type=float, help="s per run (default 10)")
    parser.add_argument("--profile", action="store_true", help="always profile")
    parser.add_argument("--profile-below", type=float, default=PROXY_AIM)
    parser.add_argument("--profile-dir", type=Path, default=Path("/tmp/p2plb-prof"))
    parser.add_argument("--top", type=int, default=20, help="functions shown")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    options = BenchOptions(suite="proxy", quick=args.quick, duration=args.duration)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    placement = place(True)
    try:
        figures = asyncio.run(run_suite(options, console))
        Console().print(render_suite("proxy", figures))
        if args.profile or figures["ratio"] < args.profile_below:
            console.print("profiling the balancer with py-spy")
            os.sched_setaffinity(0, placement.client_cpus)
            with (
                tempfile.TemporaryDirectory(prefix="p2plb-bench-") as tmp,
                contextlib.ExitStack() as stack,
            ):
                balancer = start_cluster(stack, Path(tmp), placement)
                figures["profile"] = profile(balancer, placement, args)
            show_profile(figures["profile"])
    except FAILED as exc:
        console.print(f"[red]benchmark failed:[/red] {exc}")
        return 1

    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
