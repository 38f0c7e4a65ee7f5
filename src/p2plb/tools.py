"""The commands that run something whole: ``demo``, ``simulate`` and ``bench``.

Each starts what it needs (a cluster on loopback, a simulation, a benchmark
harness), reports, and cleans up.  They register on the ``p2plb`` group of
``p2plb.cli``, which imports this module.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

import click

from p2plb.cli import T, _as_given, _fail, _run, cli
from p2plb.config import STRATEGY_NAMES
from p2plb.errors import P2PLBError, UsageError
from p2plb.logs import configure

__all__ = ["bench", "demo", "simulate"]


@cli.command()
@click.option(
    "--duration",
    type=click.FloatRange(min=1.0),
    default=15.0,
    show_default=True,
    help="Seconds of workload (an indexer is killed halfway).",
)
@click.option(
    "--indexers",
    type=click.IntRange(3, 16),
    default=3,
    show_default=True,
    help="Indexers to start: one is killed, and a write needs two copies.",
)
@click.option(
    "--strategy",
    type=click.Choice(STRATEGY_NAMES),
    default="least_load",
    show_default=True,
    help="The balancer's strategy.",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="Leave the cluster up at the end, to explore with p2plb status.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the corpus sample, the workload and the indexer killed.",
)
@click.option(
    "--quick", is_flag=True, help="A short run: a small corpus, 3 s of workload."
)
def demo(
    duration: float,
    indexers: int,
    strategy: str,
    keep_running: bool,
    seed: int,
    quick: bool,
) -> None:
    """Start a balancer and indexers on loopback and put them to work.

    Loads an inverted index of the standard library's docstrings (word ->
    modules) through the client, runs a read-heavy workload with words drawn
    by their frequency, kills one indexer with SIGKILL halfway, and shows
    where the requests went.  Everything runs in a temporary directory that
    is removed at the end, unless --keep-running.

    Example: p2plb demo --duration 30 --strategy p2c
    """
    configure("WARNING")
    from rich.console import Console

    from p2plb.demo import DemoOptions, run_demo

    options = DemoOptions(duration, indexers, strategy, keep_running, seed, quick)
    # SIGTERM (and SIGHUP) stop the demo the way Ctrl-C does: its cluster and
    # directory are cleaned up rather than left running.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    # Off a terminal rich would wrap at 80 columns; the report is wider.
    console = Console(width=None if sys.stdout.isatty() else 120)
    try:
        code = _run(run_demo(options, console))
    except P2PLBError as exc:
        _fail(str(exc), code=1)
    except KeyboardInterrupt:
        _fail("interrupted; the cluster was stopped", code=130)
    sys.exit(code)


# What p2plb.simulation calls the settings it checks, as simulate takes them.
_SIMULATE_NAMES = {
    "scenario": "SCENARIO",
    "strategies": "--strategy",
    "duration": "--duration",
    "indexers": "--indexers",
    "load": "--load",
    "report_interval": "--report-interval",
}


@cli.command()
@click.argument("scenario", default="steady")
@click.option(
    "--strategy",
    "strategies",
    multiple=True,
    metavar="NAME",
    help="A policy to run (repeat); default: every strategy and reference.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--duration", type=float, default=None, help="Simulated seconds.")
@click.option("--indexers", type=int, default=None, help="Indexers (large only).")
@click.option("--load", type=float, default=None, help="Offered load, 0-1.")
@click.option(
    "--report-interval",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds between load reports.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def simulate(
    scenario: str,
    strategies: tuple[str, ...],
    seed: int,
    duration: float | None,
    indexers: int | None,
    load: float | None,
    report_interval: float,
    as_json: bool,
) -> None:
    """Simulate a scenario with the balancer's own strategy classes.

    SCENARIO is steady, antagonist, stale or large.  Besides the product's
    strategies it runs references: unweighted round robin, ideal
    join-the-shortest-queue and one central queue.  Deterministic per --seed.

    Example: p2plb simulate antagonist --strategy least_load --strategy p2c
    """
    from rich.console import Console

    from p2plb.simulation import render
    from p2plb.simulation import simulate as run_simulation

    try:
        report = run_simulation(
            scenario,
            strategies=list(strategies) or None,
            seed=seed,
            duration=duration,
            indexers=indexers,
            load=load,
            report_interval=report_interval,
        )
    except P2PLBError as exc:
        _fail(_as_given(str(exc), _SIMULATE_NAMES))
    if as_json:
        click.echo(report.to_json(indent=2))
    else:
        Console(width=None if sys.stdout.isatty() else 140).print(render(report))


@cli.command()
@click.argument(
    "scenarios", nargs=-1, type=click.Choice(["steady", "antagonist", "stale"])
)
@click.option("--quick", is_flag=True, help="A short run of every scenario (~3 min).")
@click.option(
    "--suite",
    type=click.Choice(["balancing", "proxy", "control-plane"]),
    default="balancing",
    show_default=True,
    help="balancing: latency per contender; proxy: throughput against HAProxy; "
    "control-plane: reports, decisions, status and memory at scale.",
)
@click.option(
    "--contender",
    "contenders",
    multiple=True,
    metavar="NAME",
    help="proxy/least_load, routed/p2c, haproxy/leastconn, or a family "
    "(proxy, routed, haproxy); repeat. Default: all.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds per contender.",
)
@click.option(
    "--warmup", type=click.FloatRange(min=0), default=None, help="Seconds not measured."
)
@click.option(
    "--load",
    type=click.FloatRange(min=0, max=2, min_open=True),
    default=None,
    help="Offered load as a fraction of the indexers' capacity (0.8: 80%).",
)
@click.option(
    "--capacities",
    default=None,
    metavar="1,1,2,2,4,4",
    help="One indexer per number, of that capacity. Default: the scenario's.",
)
@click.option(
    "--service-time",
    default=None,
    metavar="20ms",
    help="Mean of the indexers' exponential service time.",
)
@click.option(
    "--queue-limit",
    type=click.IntRange(min=0),
    default=64,
    show_default=True,
    help="Requests each indexer queues beyond its capacity before 503.",
)
@click.option(
    "--connections",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Connections the load generator keeps open to its target.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the arrival schedule every contender faces.",
)
@click.option("--no-haproxy", is_flag=True, help="Leave HAProxy out.")
@click.option(
    "--quiet-timeout",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Wait up to this long before each contender for other processes to "
    "leave the CPUs idle (0: do not wait). Default: 30, 0 with --quick.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Keep every process's log and data here (default: a temporary dir).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the whole report as JSON to this file.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also plot latency per contender and share per indexer (PNG; needs "
    "pip install 'p2plb[bench]').",
)
def bench(
    scenarios: tuple[str, ...],
    quick: bool,
    suite: str,
    contenders: tuple[str, ...],
    duration: float | None,
    warmup: float | None,
    load: float | None,
    capacities: str | None,
    service_time: str | None,
    queue_limit: int,
    connections: int,
    seed: int,
    no_haproxy: bool,
    quiet_timeout: float | None,
    workdir: str | None,
    json_path: str | None,
    plot_path: str | None,
) -> None:
    """Measure p2plb's balancing side by side with HAProxy, on real processes.

    Starts a balancer and indexers with a synthetic service time, drives
    open-loop Poisson load at a fraction of their capacity, and measures every
    contender on the same indexers: each strategy through the proxy, each in
    routed mode, and HAProxy leastconn and roundrobin when haproxy is installed.

    Example: p2plb bench steady --json steady.json --plot steady.png
    """
    configure("WARNING")
    from pathlib import Path

    from rich.console import Console

    from p2plb.benchmark import BenchOptions, plot, render, require_matplotlib
    from p2plb.benchmark import run_bench as run_benchmark
    from p2plb.config import parse_duration

    try:
        options = BenchOptions(
            scenarios=scenarios or ("steady", "antagonist", "stale"),
            suite=suite,
            quick=quick,
            contenders=contenders,
            duration=duration,
            warmup=warmup,
            load=load,
            capacities=_flag("--capacities", _capacities, capacities),
            service_time=_flag("--service-time", parse_duration, service_time),
            queue_limit=queue_limit,
            connections=connections,
            seed=seed,
            haproxy=not no_haproxy,
            quiet_timeout=quiet_timeout,
            workdir=Path(workdir) if workdir else None,
        )
        if plot_path:
            require_matplotlib()
    except UsageError as exc:
        _fail(str(exc))
    # As in the demo: SIGTERM and SIGHUP stop the processes the bench
    # started (balancer, indexers, HAProxy) rather than leave them running.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    console = Console(width=None if sys.stdout.isatty() else 140)
    try:
        report = _run(run_benchmark(options, console))
    except UsageError as exc:
        _fail(str(exc))
    except P2PLBError as exc:
        _fail(str(exc), code=1)
    except KeyboardInterrupt:
        _fail("interrupted; every process it started was stopped", code=130)
    console.print(render(report))
    if json_path:
        Path(json_path).write_text(report.to_json())
    if plot_path:
        plot(report, plot_path)


def _flag(flag: str, parse: Callable[[str], T], value: str | None) -> T | None:
    """``value`` parsed, or None when not given; a bad one ends the command."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        _fail(f"{flag}: {exc}")


def _capacities(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"expected whole numbers separated by commas, got {text!r}"
        ) from None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
