"""Tables for people: the balancer status as rich renders it in a terminal."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

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
    title = (
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
        table.add_row(
            str(row.get("id")),
            str(row.get("address")),
            "[green]healthy[/]" if row.get("healthy") else "[red]unhealthy[/]",
            str(row.get("state")),
            f"{row.get('current_load')}/{row.get('capacity')}",
            f"{row.get('load_percentage')}",
            str(row.get("requests")),
            str(row.get("routed")),
            str(row.get("errors")),
            _ms(latency.get("p50")),
            _ms(latency.get("p99")),
            str(row.get("health_reason")),
        )
    console.print(table)
