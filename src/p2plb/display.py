"""Tables for people: the balancer status as rich renders it in a terminal.

Every value shown is a ``rich.text.Text``, never a string: rich reads a string
as markup, so an IPv6 address (``http://[fe80::1]:7401``) lost its host and a
health reason holding ``[/]`` made the command fail with a ``MarkupError``.
Nor is any value trusted to be of the type p2plb sends: a balancer of another
version, or a hostile one, may put a string where a number goes, an object
where a string goes, or terminal escapes in a reason.  ``admin`` has checked
the shape the table needs (rows are objects, nesting is shallow); every cell
is shown whatever it holds, with control characters escaped.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["printable", "print_status"]

_COLUMNS = (
    "id",
    "address",
    "health",
    "state",
    "load",
    "load %",
    "requests",
    "routed",
    "errors",
    "p50 ms",
    "p99 ms",
    "reason",
)
_TEXT_COLUMNS = frozenset({"id", "address", "health", "state", "reason"})


def printable(text: str) -> str:
    """``text`` with its control characters escaped, as ``repr`` writes them.

    Rich keeps ESC, and a terminal obeys what follows it; a newline would cut
    a one-line error in two.
    """
    if text.isprintable():
        return text
    return "".join(
        repr(char)[1:-1] if unicodedata.category(char) == "Cc" else char
        for char in text
    )


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict | list):
        return printable(json.dumps(value))
    return str(value)


def _get(mapping: dict[str, Any], key: str) -> str:
    return _plain(mapping.get(key))


def _ms(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.1f}"
    return _plain(value)


def _health(value: Any) -> Text:
    if value is True:
        return Text("healthy", "green")
    if value is False:
        return Text("unhealthy", "red")
    return Text(_plain(value))


def print_status(
    balancer: str, status: dict[str, Any], console: Console | None = None
) -> None:
    # Off a terminal (a pipe, a file) rich would wrap at 80 columns; a status
    # table is read whole, so let it be as wide as it needs.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    title = Text(
        f"{balancer}  strategy={_get(status, 'strategy')}  "
        f"healthy={_get(status, 'healthy_indexers')}/"
        f"{_get(status, 'total_indexers')}  "
        f"requests={_get(status, 'total_requests')}  "
        f"routed={_get(status, 'routed_requests')}  "
        f"uptime={_get(status, 'uptime_seconds')}s"
    )
    table = Table(title=title, title_justify="left")
    for column in _COLUMNS:
        numeric = column not in _TEXT_COLUMNS
        table.add_column(column, justify="right" if numeric else "left")
    for row in status.get("indexers", []):
        latency = row.get("latency_ms")
        if not isinstance(latency, dict):
            latency = {}
        cells = (
            _get(row, "id"),
            _get(row, "address"),
            _health(row.get("healthy")),
            _get(row, "state"),
            f"{_get(row, 'current_load')}/{_get(row, 'capacity')}",
            _get(row, "load_percentage"),
            _get(row, "requests"),
            _get(row, "routed"),
            _get(row, "errors"),
            _ms(latency.get("p50")),
            _ms(latency.get("p99")),
            _get(row, "health_reason"),
        )
        table.add_row(*(c if isinstance(c, Text) else Text(c) for c in cells))
    console.print(table)
