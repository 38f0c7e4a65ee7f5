"""The ``p2plb`` command: parses arguments and calls into the package.

Server flags are generated from the settings declared in ``p2plb.config``, so a
flag, its environment variable and its TOML key can never drift apart.  Every
failure a user can cause ends in one line on standard error and a non-zero exit
code, never a traceback.

This module holds the group, the helpers its commands share, the server commands
and ``main``; the commands that talk to a running cluster are in
``p2plb.commands``, those that run a demo, a simulation or a benchmark in
``p2plb.tools``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from p2plb import __version__
from p2plb.config import (
    BALANCER_SETTINGS,
    INDEXER_SETTINGS,
    BalancerConfig,
    IndexerConfig,
    Setting,
    build_config,
    env_name,
    read_config_file,
)
from p2plb.errors import ConfigError, P2PLBError, RequestError
from p2plb.logs import configure
from p2plb.wire import check_address

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"p2plb: error: {message}", err=True)
    sys.exit(code)


# The library's hints speak to Python callers as well, naming its arguments;
# a user of the command line gave flags, so the CLI's errors name only those.
_LIBRARY_HINTS = (
    ("ca_file= or --ca-file", "--ca-file"),
    ("(indexers=[...], or --indexer)", "(with --indexer)"),
)


def _as_given(message: str, names: Mapping[str, str] | None = None) -> str:
    """A library's ``message`` in the words of the command line.

    A message that starts with the field at fault (``items: must not be
    empty``) names it as the user gave it, by ``names`` (``ITEM: ...``).
    """
    field, colon, reason = message.partition(": ")
    if colon and names and field in names:
        message = names[field] + colon + reason
    for library, flag in _LIBRARY_HINTS:
        message = message.replace(library, flag)
    return message


def _given_as(parameter: str, flag: str) -> str:
    """``flag``, or its environment variable when that is what set ``parameter``."""
    context = click.get_current_context()
    if context.get_parameter_source(parameter) is not ParameterSource.ENVIRONMENT:
        return flag
    option = next(p for p in context.command.params if p.name == parameter)
    return str(option.envvar)


def _default_text(setting: Setting) -> str:
    default = setting.default
    if default is None or default == ():
        return ""
    if isinstance(default, float):
        return f" [default: {default:g}s]"
    if isinstance(default, bool):
        return " [default: off]" if not default else " [default: on]"
    return f" [default: {default}]"


# What a flag's value looks like in --help, by the function that parses it.
_METAVARS = {
    "parse_duration": "DURATION",
    "_parse_size": "SIZE",
    "parse": "N",  # _int_at_least's parser
    "_parse_text": "TEXT",
    "_parse_url": "URL",
    "_parse_urls": "URL",
    "_parse_strategy": "NAME",
    "_parse_log_level": "LEVEL",
    "_parse_id": "ID",
    "parse_antagonist": "FACTOR/PERIOD",
}


def _metavar(setting: Setting) -> str:
    name = setting.parse.__name__
    if setting.name.endswith(("_file", "_dir", "_cert", "_key")):
        return "PATH"
    if setting.name.endswith("_token"):
        return "TOKEN"
    if setting.name == "host":
        return "HOST"
    return _METAVARS.get(name, "VALUE")


def _server_options(settings: Sequence[Setting]) -> Callable[[F], F]:
    """One flag per setting, with its environment variable, in declared order."""

    def decorate(func: F) -> F:
        for setting in reversed(settings):
            help_text = setting.help + _default_text(setting)
            if setting.parse.__name__ == "_parse_bool":
                # Not envvar=: click would refuse "maybe" in three lines of its
                # own; _load reads the variable and config parses it.
                func = click.option(
                    setting.flag,
                    setting.name,
                    is_flag=True,
                    default=None,
                    help=f"{help_text}  [env var: {env_name(setting)}]",
                )(func)
                continue
            func = click.option(
                setting.flag,
                setting.name,
                multiple=setting.many,
                default=None,
                envvar=env_name(setting),
                show_envvar=True,
                metavar=_metavar(setting),
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
            metavar="PATH",
            envvar="P2PLB_CONFIG",
            show_envvar=True,
            help="TOML file with settings (keys named like the flags).",
        )(func)

    return decorate


def _load(kind: str, values: dict[str, Any]) -> IndexerConfig | BalancerConfig:
    config_file = values.pop("config_file", None)
    print_config = values.pop("print_config", False)
    settings = INDEXER_SETTINGS if kind == "indexer" else BALANCER_SETTINGS
    context = click.get_current_context()
    # A bad value is reported under the name the user gave it by.
    labels: dict[str, str] = {}
    for setting in settings:
        variable = env_name(setting)
        if values.get(setting.name) is None and variable in os.environ:
            values[setting.name] = os.environ[variable]  # the flags of _parse_bool
            labels[setting.name] = variable
        elif context.get_parameter_source(setting.name) is ParameterSource.ENVIRONMENT:
            labels[setting.name] = variable
    try:
        from_file = read_config_file(config_file, kind) if config_file else {}
        config = build_config(kind, values, from_file, labels=labels)
    except ConfigError as exc:
        _fail(str(exc))
    if print_config:
        shown = dataclasses.asdict(config)
        shown.pop("strategy_given", None)  # how it was set, not a setting
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
    label = "--balancer" if given else "P2PLB_BALANCERS"
    try:
        urls = [check_address(u, field=label) for u in _split_list(raw)]
    except RequestError as exc:
        _fail(exc.message)
    if not urls:
        _fail(f"{label}: give at least one balancer URL")
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
        metavar="PATH",
        help="CA bundle to verify https:// balancers and indexers with.",
    )(func)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="p2plb")


# The commands of the other modules register themselves on ``cli`` when they are
# imported; they come last because they use the helpers above.  --help lists the
# commands sorted by name, whichever module holds them.
from p2plb import commands, tools  # noqa: E402, F401
