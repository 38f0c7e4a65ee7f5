"""The commands that talk to a running cluster: operator and index commands.

``status`` and ``strategy`` ask the balancers through ``p2plb.admin``; ``add``,
``remove``, ``get`` and ``list`` make one call each with the Python client.  They
register on the ``p2plb`` group of ``p2plb.cli``, which imports this module.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import click

from p2plb.admin import Answer, get_status, get_strategy, set_strategy
from p2plb.cli import (
    DEFAULT_BALANCER,
    F,
    T,
    _as_given,
    _balancer_urls,
    _ca_option,
    _fail,
    _given_as,
    _run,
    cli,
)
from p2plb.client import AsyncClient
from p2plb.display import print_status, printable
from p2plb.errors import ConfigError, P2PLBError, RequestError, UsageError
from p2plb.tls import client_context
from p2plb.wire import check_address

__all__ = [
    "add_command",
    "get_command",
    "list_command",
    "remove_command",
    "status",
    "strategy",
]

# -- operator commands: what the balancers say -------------------------------------


def _balancer_option(func: F) -> F:
    func = _ca_option(func)
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


def _admin_token_option(func: F) -> F:
    """For the commands that change something; ``status`` changes nothing."""
    return click.option(
        "--admin-token",
        envvar="P2PLB_ADMIN_TOKEN",
        show_envvar=True,
        default=None,
        metavar="TOKEN",
        help="Token for changes that need admin rights.",
    )(func)


def _tls(ca_file: str | None) -> ssl.SSLContext:
    try:
        return client_context(ca_file)
    except ConfigError as exc:
        _fail(_as_given(str(exc), {"--ca-file": _given_as("ca_file", "--ca-file")}))


def _said(error: P2PLBError, names: Mapping[str, str] | None = None) -> str:
    """One line for ``error``: what a remote node said may hold newlines."""
    return printable(_as_given(str(error), names))


def _errors(answers: Sequence[Answer]) -> bool:
    failed = False
    for answer in answers:
        if answer.error is not None:
            click.echo(f"p2plb: error: {_said(answer.error)}", err=True)
            failed = True
    return failed


@cli.command()
@_balancer_option
def status(balancers: tuple[str, ...], as_json: bool, ca_file: str | None) -> None:
    """Show each balancer's view of its indexers, as a table (--json for machines).

    Exit code 1 when a balancer given did not answer or answered an error;
    what the others answered is still shown.
    """
    urls = _balancer_urls(balancers)
    answers = _run(get_status(urls, _tls(ca_file)))
    if as_json:
        shown = [
            {"balancer": a.balancer, "status": a.body}
            if a.error is None
            else {"balancer": a.balancer, "error": str(a.error)}
            for a in answers
        ]
        click.echo(json.dumps(shown, indent=2))
    else:
        for answer in answers:
            if answer.body is not None:
                print_status(answer.balancer, answer.body)
    if _errors(answers):
        sys.exit(1)


@cli.command()
@click.argument("name", required=False)
@_balancer_option
@_admin_token_option
def strategy(
    name: str | None,
    balancers: tuple[str, ...],
    as_json: bool,
    admin_token: str | None,
    ca_file: str | None,
) -> None:
    """Show the active strategy, or set it to NAME on every balancer given.

    NAME is one of least_load, round_robin, random, p2c, least_latency.

    Exit code 1 when a balancer given did not answer or answered an error;
    what the others answered is still shown.
    """
    urls = _balancer_urls(balancers)
    if name is None:
        answers = _run(get_strategy(urls, admin_token, _tls(ca_file)))
    else:
        answers = _run(set_strategy(urls, name, admin_token, _tls(ca_file)))

    # admin kept only answers whose strategy is a string.
    seen: dict[str, str] = {
        a.balancer: a.body["strategy"] for a in answers if a.body is not None
    }
    if as_json:
        click.echo(json.dumps({"strategies": seen}, indent=2))
    else:
        for balancer_url, active in seen.items():
            click.echo(f"{balancer_url}  {printable(active)}")
    failed = _errors(answers)
    if len(set(seen.values())) > 1:
        click.echo(
            "p2plb: warning: balancers disagree on the strategy: "
            + ", ".join(f"{b}={printable(s)}" for b, s in seen.items()),
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


# The client names what it checks by its own arguments.
_ARGUMENTS = {"index": "INDEX", "item": "ITEM", "items": "ITEM"}


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
    _tls(ca_file)  # checked here: the client would call a bad one ca_file

    async def run() -> T:
        async with AsyncClient(urls, direct, mode=mode, ca_file=ca_file) as client:
            return await call(client)

    try:
        return _run(run())
    except UsageError as exc:
        _fail(_said(exc, _ARGUMENTS))
    except P2PLBError as exc:
        _fail(_said(exc), code=1)


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

    Control characters (a newline, ESC) are shown escaped, as \\n or \\x1b, so
    that one line is one item; --json gives the items exactly.  An index with
    no items is not found: exit code 1 (with --json, items is null).

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
            click.echo(printable(item))
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

    Control characters are shown escaped, as by get; --json gives names exactly.

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
            click.echo(printable(name))
