"""The dashboard: the renderer on payloads made here, then a real balancer."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any

import aiohttp
import pytest

from p2plb.dashboard import HEADERS, refresh_seconds, render
from p2plb.errors import RequestError
from p2plb.openapi import document
from procs import Procs, request
from test_balancer import all_serving, status_of
from test_openapi import check_answer

SCRIPT = "<script>alert(1)</script>"


def row(id: str, **fields: Any) -> dict[str, Any]:
    """One indexer as ``GET /v1/status`` shows it: healthy, idle, unless told."""
    return {
        "id": id,
        "address": f"http://127.0.0.1:{7400 + len(id)}",
        "zone": None,
        "capacity": 64,
        "current_load": 0,
        "load_percentage": 0.0,
        "healthy": True,
        "state": "serving",
        "health_reason": "report 0.4 s ago",
        "last_report_age_s": 0.4,
        "requests": 0,
        "routed": 0,
        "errors": 0,
        "latency_ms": {"p50": None, "p99": None},
    } | fields


def payload(*rows: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "healthy_indexers": sum(r["healthy"] for r in rows),
        "total_indexers": len(rows),
        "total_requests": 0,
        "routed_requests": 0,
        "uptime_seconds": 0.0,
        "strategy": "least_load",
        "indexers": list(rows),
    } | fields


class Page(HTMLParser):
    """What a person reads: the totals, the table's cells, the other text.

    Also the refresh the page asks for and its load bars (class, style).
    """

    def __init__(self, page: str) -> None:
        super().__init__()
        self.totals: list[str] = []
        self.rows: list[list[str]] = []
        self.text: list[str] = []
        self.refresh: str | None = None
        self.bars: list[tuple[str, str]] = []
        self._cell: list[str] | None = None
        self._in_style = False
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "meta" and named.get("http-equiv") == "refresh":
            self.refresh = named["content"]
        self._in_style = tag == "style"
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th", "li"):
            self._cell = []
        if tag == "span" and named.get("style"):
            self.bars.append((str(named["class"]), str(named["style"])))

    def handle_endtag(self, tag: str) -> None:
        self._in_style = False
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None
        if tag == "li" and self._cell is not None:
            self.totals.append(" ".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        elif data.strip() and not self._in_style:
            self.text.append(data.strip())


HEADER = [
    "id", "address", "zone", "health", "state", "load", "requests", "routed",
    "errors", "p50 ms", "p99 ms",
]  # fmt: skip


def test_totals_then_one_row_per_indexer_sorted_by_id() -> None:
    status = payload(
        row(
            "i2",
            zone="eu-west",
            current_load=12,
            load_percentage=18.8,
            requests=5120,
            routed=190,
            latency_ms={"p50": 1.9, "p99": 7.5},
        ),
        row(
            "i10",
            healthy=False,
            state="syncing",
            health_reason="probe failed: connection refused",
            errors=3,
        ),
        row("i1", current_load=60, load_percentage=93.75),
        total_requests=10412,
        routed_requests=377,
        uptime_seconds=3600.0,
        strategy="p2c",
    )

    page = Page(render(status, refresh=5))

    assert page.refresh == "5"
    assert page.totals == [
        "healthy indexers 2 / 3",
        "requests 10,412",
        "routed 377",
        "uptime 1 h 00 min",
        "strategy p2c",
    ]
    assert page.rows == [
        HEADER,
        ["i1", "http://127.0.0.1:7402", "-", "healthy report 0.4 s ago", "serving",
         "60/64 (93.8%)", "0", "0", "0", "-", "-"],
        ["i10", "http://127.0.0.1:7403", "-",
         "unhealthy probe failed: connection refused", "syncing", "0/64 (0.0%)",
         "0", "0", "3", "-", "-"],
        ["i2", "http://127.0.0.1:7402", "eu-west", "healthy report 0.4 s ago",
         "serving", "12/64 (18.8%)", "5,120", "190", "0", "1.9", "7.5"],
    ]  # fmt: skip
    assert page.bars == [
        ("full", "width: 93.8%"),
        ("ok", "width: 0.0%"),
        ("ok", "width: 18.8%"),
    ]
    assert page.text == ["p2plb balancer: 2/3 healthy", "p2plb balancer",
                         "Refreshes every 5 s."]  # fmt: skip


def test_an_unhealthy_indexer_is_marked_and_says_why() -> None:
    status = payload(row("i1", healthy=False, health_reason="no report for 61.2 s"))

    page = render(status)

    assert '<tr class="down">' in page
    assert '<span class="badge bad">unhealthy</span>' in page
    assert '<div class="reason">no report for 61.2 s</div>' in page


@pytest.mark.parametrize(
    ("percentage", "level"),
    [(0.0, "ok"), (69.9, "ok"), (70.0, "busy"), (89.9, "busy"), (90.0, "full"),
     (100.0, "full")],
)  # fmt: skip
def test_the_load_bar_shows_the_percentage(percentage: float, level: str) -> None:
    page = Page(render(payload(row("i1", load_percentage=percentage))))

    assert page.bars == [(level, f"width: {percentage:.1f}%")]
    assert page.rows[1][5] == f"0/64 ({percentage:.1f}%)"


def test_every_value_is_escaped() -> None:
    status = payload(
        row(
            "i1",
            zone=SCRIPT,
            health_reason='probe failed: "<i>" & <img src=x onerror=alert(1)>',
            healthy=False,
        ),
        strategy="least_load",
    )

    html = render(status)
    page = Page(html)

    assert "<script" not in html and "<img" not in html and "<i>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "probe failed: &quot;&lt;i&gt;&quot; &amp; &lt;img" in html
    assert page.rows[1][2] == SCRIPT  # what a person reads is the text itself
    assert page.rows[1][3] == (
        'unhealthy probe failed: "<i>" & <img src=x onerror=alert(1)>'
    )


def test_an_empty_registry_says_so() -> None:
    html = render(payload())
    page = Page(html)

    assert "<table" not in html
    assert "No indexers registered." in page.text
    assert page.totals[0] == "healthy indexers 0 / 0"
    assert page.refresh == "2"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.0, "0 s"), (59.9, "59 s"), (61.0, "1 min 01 s"), (3600.0, "1 h 00 min"),
     (93784.0, "1 d 2 h")],
)  # fmt: skip
def test_uptime_reads_in_its_two_largest_units(seconds: float, shown: str) -> None:
    page = Page(render(payload(uptime_seconds=seconds)))

    assert page.totals[3] == f"uptime {shown}"


def test_the_page_is_self_contained() -> None:
    html = render(payload(row("i1")))

    assert "<script" not in html and "src=" not in html and "href=" not in html
    assert "@import" not in html and "url(" not in html


@pytest.mark.parametrize(
    ("raw", "seconds"), [(None, 2), ("1", 1), ("30", 30), ("3600", 3600)]
)
def test_refresh_accepts_whole_seconds_up_to_an_hour(
    raw: str | None, seconds: int
) -> None:
    assert refresh_seconds(raw) == seconds


@pytest.mark.parametrize(
    "raw", ["0", "3601", "-1", "abc", "", " 5", "+5", "1.5", "1e3", "\u0663", "²"]
)
def test_refresh_refuses_anything_else(raw: str) -> None:
    with pytest.raises(RequestError) as info:
        refresh_seconds(raw)

    assert (info.value.status, info.value.code, info.value.message) == (
        400,
        "invalid_field",
        f"refresh: must be a whole number of seconds from 1 to 3600, got {raw!r}",
    )


# -- a real balancer ----------------------------------------------------------------


async def test_the_dashboard_of_a_real_balancer(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer()
    indexer = procs.indexer("i1", "--balancer", balancer.url)
    await all_serving(http, balancer, 1)
    stranger = {"id": "i0", "address": "http://127.0.0.1:9", "capacity": 2,
                "zone": SCRIPT}  # fmt: skip
    status, _, _ = await request(
        http, "POST", f"{balancer.url}/v1/indexers", json=stranger
    )
    assert status == 201

    async with http.get(f"{balancer.url}/dashboard?refresh=7") as response:
        html = await response.text()
        headers = response.headers
        assert response.status == 200

    assert headers["Content-Type"] == "text/html; charset=utf-8"
    for name, value in HEADERS.items():
        assert headers[name] == value
    page = Page(html)
    assert page.refresh == "7"
    assert page.totals[0] in ("healthy indexers 2 / 2", "healthy indexers 1 / 2")
    assert [cells[0] for cells in page.rows] == ["id", "i0", "i1"]
    assert page.rows[1][1:3] == ["http://127.0.0.1:9", SCRIPT]
    assert page.rows[2][1:3] == [indexer.url, "-"]
    assert page.rows[2][4:6] == ["serving", "0/64 (0.0%)"]
    assert "<script" not in html

    async with http.head(f"{balancer.url}/dashboard") as response:
        assert response.status == 200


async def test_root_redirects_to_the_dashboard(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.balancer().url

    for query, location in [
        ("", "/dashboard"),
        ("?refresh=10", "/dashboard?refresh=10"),
    ]:
        async with http.get(f"{url}/{query}", allow_redirects=False) as response:
            assert (response.status, response.headers["Location"]) == (302, location)
    async with http.get(f"{url}/") as response:  # followed, as a browser would
        assert response.status == 200 and response.url.path == "/dashboard"


BAD_QUERIES = [
    ("?refresh=0", "invalid_field",
     "refresh: must be a whole number of seconds from 1 to 3600, got '0'"),
    ("?refresh=abc", "invalid_field",
     "refresh: must be a whole number of seconds from 1 to 3600, got 'abc'"),
    ("?foo=1", "unknown_field", "foo: unknown query parameter"),
]  # fmt: skip


async def test_bad_queries_get_the_error_of_every_endpoint(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.balancer().url
    doc = document("balancer")

    for path in ("/dashboard", "/"):
        for query, code, message in BAD_QUERIES:
            status, body, _ = await request(
                http, "GET", f"{url}{path}{query}", allow_redirects=False
            )

            assert (status, body) == (
                400,
                {"error": {"code": code, "message": message}},
            ), path + query
            check_answer(doc, path, "GET", status, body)


async def test_public_as_the_status_is_when_tokens_are_set(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    tokens = ("--cluster-token", "c-secret", "--admin-token", "a-secret")
    balancer = procs.balancer("balancer", *tokens)

    await status_of(http, balancer)  # no token needed for the JSON ...
    async with http.get(f"{balancer.url}/dashboard") as response:
        assert response.status == 200  # ... nor for the page
