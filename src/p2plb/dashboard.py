"""The balancer's dashboard: ``GET /dashboard`` as one self-contained HTML page.

Rules of this module:

* The page is drawn from the ``GET /v1/status`` payload and from nothing else,
  so the page and the JSON cannot disagree.  ``render`` does no I/O and keeps
  no state: the server hands it the payload it would have sent as JSON.
* Every value taken from the payload goes through ``html.escape``.  Zones come
  from indexers and health reasons quote remote errors: neither is ours.
* No script, no external asset.  The page reloads itself with
  ``<meta http-equiv="refresh">``, and ``HEADERS`` carries a policy that lets
  the browser load nothing else, so a mistake in escaping still runs no code.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import msgspec

from p2plb.wire import Status, StatusRow, check_whole_number

__all__ = ["HEADERS", "QUERY", "refresh_seconds", "render"]

#: The query parameters ``GET /dashboard`` (and ``GET /``) take.
QUERY = frozenset({"refresh"})
DEFAULT_REFRESH = 2
MAX_REFRESH = 3600

#: Sent with the page.  ``no-store``: a dashboard read from a cache would show
#: figures that look live and are not.
HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}

# Load bar colours: below 70 % an indexer has room, from 90 % it is about to
# answer 503 overloaded.
_BUSY_FROM = 70.0
_FULL_FROM = 90.0

_COLUMNS = ("id", "address", "zone", "health", "state", "load")
_NUMBER_COLUMNS = ("requests", "routed", "errors", "p50 ms", "p99 ms")
_NONE = '<span class="muted">-</span>'

_STYLE = """
:root { color-scheme: light dark; --ok: #2e9d4f; --busy: #d59a12; --full: #d1453b;
  --muted: #777; --line: #8884; --panel: #8881; }
* { box-sizing: border-box; }
body { margin: 1.5rem; font: 14px/1.4 system-ui, sans-serif; }
h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
.sub { color: var(--muted); margin: 0 0 1rem; }
.totals { display: flex; flex-wrap: wrap; gap: .6rem; margin: 0 0 1.2rem;
  padding: 0; list-style: none; }
.totals li { background: var(--panel); border: 1px solid var(--line);
  border-radius: 6px; padding: .4rem .8rem; min-width: 8rem; }
.totals span { display: block; color: var(--muted); font-size: .8rem; }
.totals b { font-size: 1.15rem; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; }
th, td { padding: .35rem .6rem; border-bottom: 1px solid var(--line);
  text-align: left; vertical-align: top; }
th { font-size: .8rem; color: var(--muted); font-weight: 600; white-space: nowrap; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.muted, .reason { color: var(--muted); }
.reason { font-size: .8rem; }
.badge { font-weight: 600; }
.badge.ok { color: var(--ok); }
.badge.bad { color: var(--full); }
tr.down td { background: #d1453b14; }
.bar { width: 9rem; height: .45rem; margin-top: .2rem; border-radius: 3px;
  background: var(--line); overflow: hidden; }
.bar span { display: block; height: 100%; }
.bar .ok { background: var(--ok); }
.bar .busy { background: var(--busy); }
.bar .full { background: var(--full); }
.empty { padding: 1rem; border: 1px dashed var(--line); color: var(--muted); }
"""


def refresh_seconds(raw: str | None) -> int:
    """The ``refresh`` query parameter: whole seconds from 1 to an hour."""
    if raw is None:
        return DEFAULT_REFRESH
    return check_whole_number(raw, "refresh", 1, MAX_REFRESH, unit="seconds")


def render(status: Mapping[str, Any], *, refresh: int = DEFAULT_REFRESH) -> str:
    """The whole page for a ``GET /v1/status`` payload, reloading every ``refresh`` s.

    Indexers are listed by id, whatever order the payload has them in.
    """
    view = msgspec.convert(status, Status)
    rows = sorted(view.indexers, key=lambda row: row.id)
    title = f"p2plb balancer: {view.healthy_indexers}/{view.total_indexers} healthy"

    head = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="refresh" content="{refresh}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_text(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
    )
    intro = (
        "<body>\n<h1>p2plb balancer</h1>\n"
        f'<p class="sub">Refreshes every {refresh} s.</p>\n'
    )
    listing = _table(rows) if rows else '<p class="empty">No indexers registered.</p>\n'
    return head + intro + _totals(view) + listing + "</body>\n</html>\n"


def _totals(view: Status) -> str:
    figures = (
        ("healthy indexers", f"{view.healthy_indexers} / {view.total_indexers}"),
        ("requests", f"{view.total_requests:,}"),
        ("routed", f"{view.routed_requests:,}"),
        ("uptime", _duration(view.uptime_seconds)),
        ("strategy", view.strategy),
    )
    items = "".join(
        f"<li><span>{_text(name)}</span><b>{_text(value)}</b></li>\n"
        for name, value in figures
    )
    return f'<ul class="totals">\n{items}</ul>\n'


def _table(rows: list[StatusRow]) -> str:
    header = "".join(f'<th scope="col">{name}</th>' for name in _COLUMNS)
    header += "".join(
        f'<th scope="col" class="num">{name}</th>' for name in _NUMBER_COLUMNS
    )
    body = "".join(_row(row) for row in rows)
    return (
        f"<table>\n<thead><tr>{header}</tr></thead>\n"
        f"<tbody>\n{body}</tbody>\n</table>\n"
    )


def _row(row: StatusRow) -> str:
    health = "healthy" if row.healthy else "unhealthy"
    cells = (
        f"<td><b>{_text(row.id)}</b></td>",
        f"<td>{_text(row.address)}</td>",
        f"<td>{_optional(row.zone)}</td>",
        f'<td><span class="badge {"ok" if row.healthy else "bad"}">{health}</span>'
        f'<div class="reason">{_text(row.health_reason)}</div></td>',
        f"<td>{_text(row.state)}</td>",
        f"<td>{_load(row)}</td>",
        _number(row.requests),
        _number(row.routed),
        _number(row.errors),
        f'<td class="num">{_ms(row.latency_ms.p50)}</td>',
        f'<td class="num">{_ms(row.latency_ms.p99)}</td>',
    )
    css = "" if row.healthy else ' class="down"'
    return f"<tr{css}>{''.join(cells)}</tr>\n"


def _load(row: StatusRow) -> str:
    percent = min(100.0, max(0.0, row.load_percentage))
    if percent >= _FULL_FROM:
        level = "full"
    elif percent >= _BUSY_FROM:
        level = "busy"
    else:
        level = "ok"
    return (
        f"{row.current_load}/{row.capacity} "
        f'<span class="muted">({percent:.1f}%)</span>'
        f'<div class="bar"><span class="{level}" style="width: {percent:.1f}%">'
        "</span></div>"
    )


def _duration(seconds: float) -> str:
    """``93784.0`` -> ``1 d 2 h``: the two largest units are enough to read."""
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86_400)
    hours, rest = divmod(rest, 3_600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def _number(value: int) -> str:
    return f'<td class="num">{value:,}</td>'


def _ms(value: float | None) -> str:
    return _NONE if value is None else f"{value:.1f}"


def _optional(value: str | None) -> str:
    return _NONE if value is None else _text(value)


def _text(value: str) -> str:
    return html.escape(value, quote=True)
