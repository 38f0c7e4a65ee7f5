"""The ``p2plb`` command: parses arguments and calls into the package.

Server flags are generated from the settings declared in ``p2plb.config``, so a
flag, its environment variable and its TOML key can never drift apart.  Every
failure a user can cause ends in one line on standard error and a non-zero exit
code, never a traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

import click

from p2plb import __version__
from p2plb.admin import Answer, get_status, get_strategy, set_strategy
from p2plb.client import AsyncClient
from p2plb.config import (
    BALANCER_SETTINGS,
    INDEXER_SETTINGS,
    STRATEGY_NAMES,
    BalancerConfig,
    IndexerConfig,
    Setting,
    build_config,
    env_name,
    read_config_file,
)
from p2plb.errors import ConfigError, P2PLBError, RequestError, UsageError
from p2plb.logs import configure
from p2plb.tls import client_context
from p2plb.wire import check_address

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"p2plb: error: {message}", err=True)
    sys.exit(code)


def _default_text(setting: Setting) -> str:
    default = setting.default
    if default is None or default == ():
        return ""
    if isinstance(default, float):
        return f" [default: {default:g}s]"
    if isinstance(default, bool):
        return " [default: off]" if not default else " [default: on]"
    return f" [default: {default}]"


def _server_options(settings: Sequence[Setting]) -> Callable[[F], F]:
    """One flag per setting, with its environment variable, in declared order."""

    def decorate(func: F) -> F:
        for setting in reversed(settings):
            help_text = setting.help + _default_text(setting)
            if setting.parse.__name__ == "_parse_bool":
                func = click.option(
                    setting.flag,
                    setting.name,
                    is_flag=True,
                    default=None,
                    envvar=env_name(setting),
                    show_envvar=True,
                    help=help_text,
                )(func)
                continue
            func = click.option(
                setting.flag,
                setting.name,
                multiple=setting.many,
                default=None,
                envvar=env_name(setting),
                show_envvar=True,
                metavar="URL" if setting.many else "VALUE",
                help=help_text,
            )(func)
        func = click.option(
            "--print-config",
            is_flag=True,
            help="Print the resolved settings as JSON (tokens hidden) and exit.",
        )(func)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            envvar="P2PLB_CONFIG",
            show_envvar=True,
            help="TOML file with settings (keys named like the flags).",
        )(func)

    return decorate


def _load(kind: str, values: dict[str, Any]) -> IndexerConfig | BalancerConfig:
    config_file = values.pop("config_file", None)
    print_config = values.pop("print_config", False)
    try:
        from_file = read_config_file(config_file, kind) if config_file else {}
        config = build_config(kind, values, from_file)
    except ConfigError as exc:
        _fail(str(exc))
    if print_config:
        shown = dataclasses.asdict(config)
        for key in ("cluster_token", "admin_token"):
            if shown.get(key):
                shown[key] = "<hidden>"
        click.echo(json.dumps(shown, indent=2, sort_keys=True))
        sys.exit(0)
    return config


T = TypeVar("T")


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run a server coroutine on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(main)
    return uvloop.run(main)


def _serve(main: Coroutine[Any, Any, None]) -> None:
    try:
        _run(main)
    except ConfigError as exc:
        _fail(str(exc))
    except P2PLBError as exc:
        _fail(str(exc), code=1)
    except KeyboardInterrupt:  # pragma: no cover - signals are handled in run_server
        pass


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="p2plb")
def cli() -> None:
    """p2plb: a load balancer for peer-to-peer indexing systems.

    Run `p2plb COMMAND --help` for the flags of a command.  Every server flag can
    also be given as an environment variable (P2PLB_ and the flag's name in
    capitals) or as a key in a TOML file given with --config.
    """


@cli.command()
@_server_options(INDEXER_SETTINGS)
def indexer(**values: Any) -> None:
    """Run an indexer: serves the index API over its SQLite replica.

    It answers on --host/--port, gives others --advertise-url, and (with
    --balancer) registers with each balancer and reports its load.

    Example: p2plb indexer --id i1 --port 7401 --data-dir ./data/i1
    """
    config = _load("indexer", values)
    assert isinstance(config, IndexerConfig)
    configure(config.log_level)

    from p2plb.indexer import run_indexer

    _serve(run_indexer(config))


@cli.command()
@_server_options(BALANCER_SETTINGS)
def balancer(**values: Any) -> None:
    """Run a balancer: registry of indexers, routing, statistics and a proxy.

    Indexers register with it (p2plb indexer --balancer URL); clients route
    through its routing table, ask it with /v1/route, or use it as a proxy.

    Example: p2plb balancer --port 7400 --state-file ./balancer-state.json
    """
    config = _load("balancer", values)
    assert isinstance(config, BalancerConfig)
    configure(config.log_level)

    from p2plb.balancer import run_balancer

    _serve(run_balancer(config))


DEFAULT_BALANCER = "http://127.0.0.1:7400"


def _balancer_urls(given: Sequence[str]) -> list[str]:
    """--balancer (repeatable), else P2PLB_BALANCERS, else the local default."""
    raw: object = list(given) or os.environ.get("P2PLB_BALANCERS") or [DEFAULT_BALANCER]
    try:
        urls = [check_address(u, field="balancer") for u in _split_list(raw)]
    except RequestError as exc:
        _fail("--balancer: " + exc.message.split(": ", 1)[-1])
    if not urls:
        _fail("--balancer: give at least one balancer URL")
    return urls


def _split_list(raw: object) -> list[str]:
    items = raw if isinstance(raw, list) else [raw]
    return [p for item in items for p in str(item).replace(",", " ").split()]


def _ca_option(func: F) -> F:
    return click.option(
        "--ca-file",
        envvar="P2PLB_CA_FILE",
        show_envvar=True,
        default=None,
        help="CA bundle to verify https:// balancers and indexers with.",
    )(func)


def _balancer_option(func: F) -> F:
    func = _ca_option(func)
    func = click.option(
        "--admin-token",
        envvar="P2PLB_ADMIN_TOKEN",
        show_envvar=True,
        default=None,
        help="Token for changes that need admin rights.",
    )(func)
    func = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of a table."
    )(func)
    return click.option(
        "--balancer",
        "balancers",
        multiple=True,
        metavar="URL",
        help=f"Balancer to ask; repeat for several (env P2PLB_BALANCERS; "
        f"default {DEFAULT_BALANCER}).",
    )(func)


def _tls(ca_file: str | None) -> ssl.SSLContext:
    try:
        return client_context(ca_file)
    except ConfigError as exc:
        _fail(str(exc))


def _errors(answers: Sequence[Answer]) -> bool:
    failed = False
    for answer in answers:
        if answer.error is not None:
            click.echo(f"p2plb: error: {answer.error}", err=True)
            failed = True
    return failed


@cli.command()
@_balancer_option
def status(
    balancers: tuple[str, ...],
    as_json: bool,
    admin_token: str | None,
    ca_file: str | None,
) -> None:
    """Show each balancer's view of its indexers, as a table (--json for machines)."""
    urls = _balancer_urls(balancers)
    answers = _run(get_status(urls, admin_token, _tls(ca_file)))
    if as_json:
        shown = [
            {"balancer": a.balancer, "status": a.body}
            if a.error is None
            else {"balancer": a.balancer, "error": str(a.error)}
            for a in answers
        ]
        click.echo(json.dumps(shown, indent=2))
    else:
        from p2plb.display import print_status

        for answer in answers:
            if answer.body is not None:
                print_status(answer.balancer, answer.body)
    if _errors(answers):
        sys.exit(1)


@cli.command()
@click.argument("name", required=False)
@_balancer_option
def strategy(
    name: str | None,
    balancers: tuple[str, ...],
    as_json: bool,
    admin_token: str | None,
    ca_file: str | None,
) -> None:
    """Show the active strategy, or set it to NAME on every balancer given.

    NAME is one of least_load, round_robin, random, p2c.
    """
    urls = _balancer_urls(balancers)
    if name is None:
        answers = _run(get_strategy(urls, admin_token, _tls(ca_file)))
    else:
        answers = _run(set_strategy(urls, name, admin_token, _tls(ca_file)))

    seen = {a.balancer: a.body.get("strategy") for a in answers if a.body is not None}
    if as_json:
        click.echo(json.dumps({"strategies": seen}, indent=2))
    else:
        for balancer_url, active in seen.items():
            click.echo(f"{balancer_url}  {active}")
    failed = _errors(answers)
    if len(set(seen.values())) > 1:
        click.echo(
            "p2plb: warning: balancers disagree on the strategy: "
            + ", ".join(f"{b}={s}" for b, s in seen.items()),
            err=True,
        )
    if failed:
        sys.exit(1)


# -- index commands: the Python client, one call each ------------------------------


def _index_options(func: F) -> F:
    func = _ca_option(func)
    func = click.option(
        "--mode",
        type=click.Choice(["routed", "proxy"]),
        default="routed",
        show_default=True,
        help="routed: call the indexer the routing table picks; proxy: go through "
        "the balancer.",
    )(func)
    func = click.option(
        "--json", "as_json", is_flag=True, help="Print JSON instead of text."
    )(func)
    func = click.option(
        "--indexer",
        "indexers",
        multiple=True,
        metavar="URL",
        help="Indexer to call directly when no balancer answers; repeat for several.",
    )(func)
    return click.option(
        "--balancer",
        "balancers",
        multiple=True,
        metavar="URL",
        help=f"Balancer to use; repeat for several, the first that answers is used "
        f"(env P2PLB_BALANCERS; default {DEFAULT_BALANCER}).",
    )(func)


def _index_call(
    balancers: tuple[str, ...],
    indexers: tuple[str, ...],
    mode: str,
    call: Callable[[AsyncClient], Coroutine[Any, Any, T]],
    ca_file: str | None = None,
) -> T:
    """Run ``call`` with a client; every failure ends in one line and an exit code."""
    # With only --indexer given, no balancer is tried (not even the default).
    only_indexers = indexers and not balancers and not os.environ.get("P2PLB_BALANCERS")
    urls = [] if only_indexers else _balancer_urls(balancers)
    try:
        direct = [check_address(u, field="--indexer") for u in indexers]
    except RequestError as exc:
        _fail(exc.message)

    async def run() -> T:
        async with AsyncClient(urls, direct, mode=mode, ca_file=ca_file) as client:
            return await call(client)

    try:
        return _run(run())
    except UsageError as exc:
        _fail(str(exc))
    except P2PLBError as exc:
        _fail(str(exc), code=1)


@cli.command(name="add")
@click.argument("index")
@click.argument("items", nargs=-1, required=True, metavar="ITEM...")
@_index_options
def add_command(
    index: str,
    items: tuple[str, ...],
    balancers: tuple[str, ...],
    indexers: tuple[str, ...],
    as_json: bool,
    mode: str,
    ca_file: str | None,
) -> None:
    """Add ITEMs to the index INDEX; prints how many were new (added N).

    Example:

    \b
        p2plb add songs peer-17 peer-42 --balancer http://127.0.0.1:7400
    """
    count = _index_call(
        balancers,
        indexers,
        mode,
        lambda c: c.add_to_index(index, list(items)),
        ca_file,
    )
    click.echo(json.dumps({"added": count}) if as_json else f"added {count}")


@cli.command(name="remove")
@click.argument("index")
@click.argument("items", nargs=-1, required=True, metavar="ITEM...")
@_index_options
def remove_command(
    index: str,
    items: tuple[str, ...],
    balancers: tuple[str, ...],
    indexers: tuple[str, ...],
    as_json: bool,
    mode: str,
    ca_file: str | None,
) -> None:
    """Remove ITEMs from the index INDEX; prints how many were there (removed N).

    Example:

    \b
        p2plb remove songs peer-17 --balancer http://127.0.0.1:7400
    """
    count = _index_call(
        balancers,
        indexers,
        mode,
        lambda c: c.remove_from_index(index, list(items)),
        ca_file,
    )
    click.echo(json.dumps({"removed": count}) if as_json else f"removed {count}")


@cli.command(name="get")
@click.argument("index")
@_index_options
def get_command(
    index: str,
    balancers: tuple[str, ...],
    indexers: tuple[str, ...],
    as_json: bool,
    mode: str,
    ca_file: str | None,
) -> None:
    """Print the items of INDEX, one per line, sorted.

    An index with no items is not found: exit code 1 (with --json, items is
    null).

    Example:

    \b
        p2plb get songs --balancer http://127.0.0.1:7400
        p2plb get songs --indexer http://127.0.0.1:7401 --json
    """
    items = _index_call(
        balancers, indexers, mode, lambda c: c.get_index(index), ca_file
    )
    if as_json:
        click.echo(json.dumps({"index": index, "items": items}))
    else:
        for item in items or ():
            click.echo(item)
    if items is None:
        _fail(f"index {index!r} not found (it has no items)", code=1)


@cli.command(name="list")
@_index_options
def list_command(
    balancers: tuple[str, ...],
    indexers: tuple[str, ...],
    as_json: bool,
    mode: str,
    ca_file: str | None,
) -> None:
    """Print the names of the indices that have items, one per line, sorted.

    Example:

    \b
        p2plb list --balancer http://127.0.0.1:7400
        P2PLB_BALANCERS=http://10.0.0.5:7400 p2plb list --json
    """
    names = _index_call(balancers, indexers, mode, lambda c: c.list_indices(), ca_file)
    if as_json:
        click.echo(json.dumps({"indices": names}))
    else:
        for name in names:
            click.echo(name)


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
        _fail(str(exc))
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
@click.option("--duration", type=float, default=None, help="Seconds per contender.")
@click.option("--warmup", type=float, default=None, help="Seconds not measured.")
@click.option("--load", type=float, default=None, help="Offered load, 0-1.")
@click.option("--capacities", default=None, metavar="1,1,2,2,4,4")
@click.option("--service-time", default=None, metavar="20ms")
@click.option("--queue-limit", type=int, default=64, show_default=True)
@click.option("--connections", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-haproxy", is_flag=True, help="Leave HAProxy out.")
@click.option("--quiet-timeout", type=float, default=None)
@click.option("--workdir", type=click.Path(file_okay=False), default=None)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None)
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
            capacities=(
                tuple(int(c) for c in capacities.split(",")) if capacities else None
            ),
            service_time=parse_duration(service_time) if service_time else None,
            queue_limit=queue_limit,
            connections=connections,
            seed=seed,
            haproxy=not no_haproxy,
            quiet_timeout=quiet_timeout,
            workdir=Path(workdir) if workdir else None,
        )
        if plot_path:
            require_matplotlib()
    except ValueError as exc:
        _fail(f"{exc}")
    except UsageError as exc:
        _fail(str(exc))
    console = Console(width=None if sys.stdout.isatty() else 140)
    try:
        report = _run(run_benchmark(options, console))
    except UsageError as exc:
        _fail(str(exc))
    except P2PLBError as exc:
        _fail(str(exc), code=1)
    console.print(render(report))
    if json_path:
        Path(json_path).write_text(report.to_json())
    if plot_path:
        plot(report, plot_path)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="p2plb")
