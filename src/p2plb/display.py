"""Tables for people: the balancer status as rich renders it in a terminal.

Every value shown is a ``rich.text.Text``, never a string: rich reads a string
as markup, so an IPv6 address (``http://[fe80::1]:7401``) lost its host and a
health reason holding ``[/]`` made the command fail with a ``MarkupError``.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["print_status"]

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


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def print_status(
    balancer: str, status: dict[str, Any], console: Console | None = None
) -> None:
    # Off a terminal (a pipe, a file) rich would wrap at 80 columns; a status
    # table is read whole, so let it be as wide as it needs.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    title = Text(
        f"{balancer}  strategy={status.get('strategy')}  "
        f"healthy={status.get('healthy_indexers')}/{status.get('total_indexers')}  "
        f"requests={status.get('total_requests')}  "
        f"routed={status.get('routed_requests')}  "
        f"uptime={status.get('uptime_seconds')}s"
    )
    table = Table(title=title, title_justify="left")
    for column in _COLUMNS:
        numeric = column not in _TEXT_COLUMNS
        table.add_column(column, justify="right" if numeric else "left")
    for row in status.get("indexers", []):
        latency = row.get("latency_ms") or {}
        healthy = bool(row.get("healthy"))
        cells = (
            row.get("id"),
            row.get("address"),
            Text(*(("healthy", "green") if healthy else ("unhealthy", "red"))),
            row.get("state"),
            f"{row.get('current_load')}/{row.get('capacity')}",
            row.get("load_percentage"),
            row.get("requests"),
            row.get("routed"),
            row.get("errors"),
            _ms(latency.get("p50")),
            _ms(latency.get("p99")),
            row.get("health_reason"),
        )
        table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in cells))
    console.print(table)
