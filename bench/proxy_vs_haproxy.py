"""Reads through the p2plb proxy next to HAProxy, in front of the same indexers.

Usage: .venv/bin/python bench/proxy_vs_haproxy.py [--rounds 3] [--duration 10]

Rules of this benchmark:

* Three real ``p2plb indexer`` processes (capacity 1024) register with a real
  ``p2plb balancer``; each holds the same small index.  HAProxy is configured
  as the nearest equivalent: ``balance leastconn``, one thread, HTTP mode,
  keep-alive to the backends with ``http-reuse always``.
* wrk reads ``GET /v1/indices/bench`` through the p2plb proxy, through
  HAProxy, and straight from one indexer (the ceiling: no proxy hop).  After
  a warm-up of each, the three take turns for ``--rounds`` rounds, the order
  rotating every round so a slow drift of the machine favours none; the
  medians are reported, with p2plb / HAProxy as the figure of merit.
* With two CPUs the proxies run on one and wrk on the other (``taskset -c``);
  the indexers go where ``--indexer-cpu`` says (by default anywhere).  Each run
  records the CPU used by processes outside the benchmark.
* Below ``--profile-below`` (or with ``--profile``) one more p2plb run is
  sampled with py-spy, and the functions the balancer spends its time in are
  printed, by own time and by time including callees.
* Every process started here is stopped here, on success, failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness import (
    BenchError,
    Child,
    Placement,
    WrkResult,
    free_port,
    http,
    p2plb_ready,
    place,
    run_wrk,
    wait_quiet,
)
from rich.console import Console
from rich.table import Table

INDEX = "bench"
TARGETS = ("p2plb", "haproxy", "direct")
AIM_RATIO = 0.3
HAPROXY = "/usr/sbin/haproxy"
HAPROXY_CONFIG = """\
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    timeout queue 10s

frontend bench
    bind 127.0.0.1:{port}
    default_backend indexers

backend indexers
    balance leastconn
{servers}
"""

console = Console(stderr=True)


# -- the cluster --------------------------------------------------------------------


def stop_and_say(child: Child) -> None:
    console.print(f"stopped {child.stop()}")


def p2plb_child(
    name: str, pin: list[str], workdir: Path, kind: str, *flags: str
) -> Child:
    args = [*pin, sys.executable, "-m", "p2plb", kind, "--port", "0", *flags]
    return Child(name, args, workdir, p2plb_ready(kind))


def start_cluster(
    stack: contextlib.ExitStack,
    workdir: Path,
    placement: Placement,
    args: argparse.Namespace,
) -> dict[str, Child]:
    """The balancer and its indexers, serving the index; ``{name: child}``."""
    balancer = p2plb_child(
        "balancer",
        placement.server,
        workdir,
        "balancer",
        "--state-file",
        str(workdir / "state.json"),
    )
    stack.callback(stop_and_say, balancer)
    balancer.start()

    pin = {
        "any": [],
        "proxy": placement.server,
        "client": placement.client,
    }[args.indexer_cpu]
    children = {"balancer": balancer}
    for n in range(1, args.indexers + 1):
        indexer = p2plb_child(
            f"i{n}",
            pin,
            workdir,
            "indexer",
            "--id",
            f"i{n}",
            "--data-dir",
            str(workdir / f"i{n}"),
            "--capacity",
            str(args.capacity),
            "--balancer",
            balancer.url,
        )
        stack.callback(stop_and_say, indexer)
        indexer.start()
        children[indexer.name] = indexer

    wait_serving(balancer.url, args.indexers)
    fill_index(children, args.items)
    return children


def wait_serving(url: str, count: int, timeout: float = 60.0) -> None:
    """Until the balancer's table shows ``count`` healthy ``serving`` indexers."""
    deadline = time.monotonic() + timeout
    while True:
        table = json.loads(http("GET", f"{url}/v1/routing-table"))
        ready = [
            row
            for row in table["indexers"]
            if row["healthy"] and row["state"] == "serving"
        ]
        if len(ready) >= count:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(ready)} of {count} indexers serving: {table}")
        time.sleep(0.2)


def fill_index(children: dict[str, Child], items: int, timeout: float = 30.0) -> None:
    """Write the items through the proxy; wait until every indexer has them."""
    wanted = [f"item-{i:04d}" for i in range(items)]
    balancer = children["balancer"].url
    http("POST", f"{balancer}/v1/indices/{INDEX}/items", {"items": wanted})

    deadline = time.monotonic() + timeout
    for name, child in children.items():
        if name == "balancer":
            continue
        got: object = None
        while True:
            try:
                got = json.loads(http("GET", f"{child.url}/v1/indices/{INDEX}"))
            except OSError as exc:
                got = exc
            if isinstance(got, dict) and got["items"] == wanted:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{name} did not get the {items} items: {got}")
            time.sleep(0.1)


def start_haproxy(
    stack: contextlib.ExitStack,
    workdir: Path,
    placement: Placement,
    backends: list[str],
) -> Child:
    port = free_port()
    servers = "\n".join(
        f"    server {name} {url.removeprefix('http://')}"
        for name, url in zip(("i1", "i2", "i3", "i4", "i5"), backends, strict=False)
    )
    config = workdir / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, servers=servers))
    check = subprocess.run(
        [HAPROXY, "-c", "-f", str(config)], capture_output=True, text=True, check=False
    )
    if check.returncode != 0:
        raise BenchError(f"haproxy rejects its config:\n{check.stdout}{check.stderr}")

    haproxy = Child(
        "haproxy", [*placement.server, HAPROXY, "-db", "-f", str(config)], workdir, None
    )
    stack.callback(stop_and_say, haproxy)
    haproxy.start()
    haproxy.url = f"http://127.0.0.1:{port}"

    deadline = time.monotonic() + 10.0
    while True:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1.0),
        ):
            return haproxy
        if time.monotonic() > deadline:
            raise BenchError(f"haproxy does not listen on {port}:\n{haproxy.log()}")
        time.sleep(0.05)


# -- measuring ----------------------------------------------------------------------


def measure(
    urls: dict[str, str],
    ours: list[int],
    placement: Placement,
    args: argparse.Namespace,
) -> dict[str, list[WrkResult]]:
    wrk = {"threads": args.threads, "connections": args.connections, "ours": ours}
    for name in TARGETS:
        console.print(f"warm-up {name} {args.warmup:g}s")
        run_wrk(placement.client, urls[name], duration=args.warmup, **wrk)

    results: dict[str, list[WrkResult]] = {name: [] for name in TARGETS}
    for round_no in range(args.rounds):
        shift = round_no % len(TARGETS)
        for name in TARGETS[shift:] + TARGETS[:shift]:
            others = wait_quiet(ours)
            if others >= 0.15:
                console.print(f"[yellow]others use {others:.2f} CPUs[/yellow]")
            result = run_wrk(
                placement.client, urls[name], duration=args.duration, **wrk
            )
            results[name].append(result)
            console.print(
                f"round {round_no + 1}/{args.rounds} {name}: "
                f"{result.rps:,.0f} req/s p50 {result.p50_ms:.2f} ms "
                f"p99 {result.p99_ms:.2f} ms errors {result.errors} "
                f"others' CPU {result.others_cpu:.2f}"
            )
    return results


def profile(
    url: str,
    balancer_pid: int,
    ours: list[int],
    placement: Placement,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Sample the balancer with py-spy under one more wrk run."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    raw = args.profile_dir / "balancer.folded"
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    seconds = max(2, int(args.duration) - 2)

    wait_quiet(ours)
    with subprocess.Popen(
        [
            *placement.client,
            "wrk",
            f"-t{args.threads}",
            f"-c{args.connections}",
            f"-d{args.duration:g}s",
            url,
        ],
        stdout=subprocess.DEVNULL,
    ) as wrk:
        try:
            time.sleep(1.0)
            sampled = subprocess.run(
                [
                    *placement.client,
                    py_spy,
                    "record",
                    "--pid",
                    str(balancer_pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    "250",
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
            wrk.wait(args.duration + 30)
    if sampled.returncode != 0:
        raise BenchError(f"py-spy failed:\n{sampled.stdout}{sampled.stderr}")
    folded = fold(raw.read_text(), args.top)
    folded["busy"] = folded["samples"] / (250.0 * seconds)
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


def summarize(
    results: dict[str, list[WrkResult]], args: argparse.Namespace, note: str
) -> dict[str, Any]:
    medians = {
        name: {
            "rps": statistics.median(r.rps for r in runs),
            "p50_ms": statistics.median(r.p50_ms for r in runs),
            "p99_ms": statistics.median(r.p99_ms for r in runs),
            "errors": sum(r.errors for r in runs),
            "others_cpu_max": max(r.others_cpu for r in runs),
        }
        for name, runs in results.items()
    }
    return {
        "path": f"GET /v1/indices/{INDEX} ({args.items} items)",
        "indexers": args.indexers,
        "capacity": args.capacity,
        "load_generator": (
            f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency"
        ),
        "rounds": args.rounds,
        "placement": note,
        "runs": {name: [asdict(r) for r in runs] for name, runs in results.items()},
        "median": medians,
        "ratio": medians["p2plb"]["rps"] / medians["haproxy"]["rps"],
        "aim_ratio": AIM_RATIO,
    }


def show(summary: dict[str, Any]) -> None:
    out = Console(width=max(Console().width, 120))
    table = Table(
        title=f"{summary['path']}, median of {summary['rounds']} rounds",
        caption=f"{summary['load_generator']}; {summary['placement']}",
    )
    for name in ("path", "req/s", "each round", "p50 ms", "p99 ms", "errors"):
        table.add_column(name, justify="left" if name == "path" else "right")
    table.add_column("others' CPU (max)", justify="right")
    labels = {
        "p2plb": "p2plb balancer (proxy)",
        "haproxy": "HAProxy leastconn",
        "direct": "one indexer, direct",
    }
    for name in TARGETS:
        median = summary["median"][name]
        rounds = " ".join(f"{run['rps']:,.0f}" for run in summary["runs"][name])
        table.add_row(
            labels[name],
            f"{median['rps']:,.0f}",
            rounds,
            f"{median['p50_ms']:.2f}",
            f"{median['p99_ms']:.2f}",
            str(median["errors"]),
            f"{median['others_cpu_max']:.2f}",
        )
    out.print(table)
    met = summary["ratio"] >= summary["aim_ratio"]
    out.print(
        f"p2plb / HAProxy = {summary['ratio']:.2f}x "
        f"(aim >= {summary['aim_ratio']:g}x: "
        f"{'[green]met[/green]' if met else '[red]missed[/red]'})"
    )

    sampled = summary.get("profile")
    if sampled is None:
        return
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="per target")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c")
    parser.add_argument("--indexers", type=int, default=3, choices=range(1, 6))
    parser.add_argument("--capacity", type=int, default=1024)
    parser.add_argument("--items", type=int, default=10)
    parser.add_argument(
        "--indexer-cpu",
        choices=("any", "proxy", "client"),
        default="any",
        help="CPU of the indexers: anywhere, the proxies' or wrk's",
    )
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--profile", action="store_true", help="always profile")
    parser.add_argument("--profile-below", type=float, default=AIM_RATIO)
    parser.add_argument("--profile-dir", type=Path, default=Path("/tmp/p2plb-prof"))
    parser.add_argument("--top", type=int, default=20, help="functions shown")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    placement = place(not args.no_pin)
    os.sched_setaffinity(0, placement.client_cpus)
    where = {"any": "anywhere", "proxy": "on the proxies' CPU", "client": "with wrk"}
    note = f"{placement.note}; indexers {where[args.indexer_cpu]}"
    with (
        tempfile.TemporaryDirectory(prefix="p2plb-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        try:
            children = start_cluster(stack, workdir, placement, args)
            indexers = [c.url for n, c in children.items() if n != "balancer"]
            haproxy = start_haproxy(stack, workdir, placement, indexers)
            ours = [c.pid for c in (*children.values(), haproxy)]
            path = f"/v1/indices/{INDEX}"
            urls = {
                "p2plb": children["balancer"].url + path,
                "haproxy": haproxy.url + path,
                "direct": indexers[0] + path,
            }
            answers = {name: http("GET", url) for name, url in urls.items()}
            if len(set(answers.values())) != 1:
                raise BenchError(f"the three paths answer differently: {answers}")
            console.print(
                f"balancer {children['balancer'].url}, haproxy {haproxy.url}, "
                f"indexers {' '.join(indexers)}; answer {len(answers['direct'])} B"
            )

            summary = summarize(measure(urls, ours, placement, args), args, note)
            if args.profile or summary["ratio"] < args.profile_below:
                console.print("profiling the balancer with py-spy")
                summary["profile"] = profile(
                    urls["p2plb"], children["balancer"].pid, ours, placement, args
                )
        except BenchError as exc:
            console.print(f"[red]benchmark failed:[/red] {exc}")
            return 1

    show(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
