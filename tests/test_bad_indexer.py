"""An indexer that answers nonsense breaks neither the balancer nor the client.

A fake indexer (``FakeIndexer`` of test_incidents.py) registers with a real
``p2plb balancer`` and answers every request, probes included, with a
``P2PLB-Load`` or ``P2PLB-Service-Ms`` no p2plb indexer would send: digits of
other scripts, figures past 64 bits, negative, zero capacity, NaN.  The
balancer's status, metrics, lookaside and proxy must keep answering 200, its
probe loop must keep running, and the Python client must serve every call.
Bodies no indexer would send (nested too deeply, a bogus version, a cursor
that does not move) are the indexer's failure, never a crash or a hang.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from p2plb.client import AsyncClient
from p2plb.errors import Overloaded, Unreachable
from p2plb.proxy import parse_load_header
from p2plb.wire import MAX_CAPACITY, MAX_COUNT
from procs import Procs, eventually, request
from test_incidents import FakeIndexer, Handler

HUGE = "1" + "0" * 400
BAD_LOADS = ["²/10", f"{HUGE}/10", "-1/10", "5/0", "abc"]
BAD_SERVICES = ["nan", "inf", "-1", "1e400"]
CASES = [(load, "1.500") for load in BAD_LOADS] + [
    ("3/10", service) for service in BAD_SERVICES
]
DEEP = b"[" * 100_000 + b"]" * 100_000


async def serve(request: web.Request) -> web.Response:
    """Good answers to index calls, for an index "songs" holding "a"."""
    if request.path == "/v1/indices":
        return web.json_response({"indices": ["songs"]})
    if request.method == "GET":
        return web.json_response({"name": "songs", "items": ["a"], "next": None})
    return web.json_response({"added": 1, "version": "0000000000000001"})


def answering(
    status: int, body: bytes, *, seen: list[str | None] | None = None, **headers: str
) -> Handler:
    """One answer to every index call; ``seen`` collects the
    ``P2PLB-Min-Version`` each call asked for."""

    async def handle(request: web.Request) -> web.Response:
        if seen is not None:
            seen.append(request.headers.get("P2PLB-Min-Version"))
        return web.Response(
            status=status, body=body, headers=headers, content_type="application/json"
        )

    return handle


@pytest.fixture
async def odd() -> AsyncIterator[FakeIndexer]:
    started = await FakeIndexer("odd", serve).start()
    yield started
    await started.stop()


async def register(http: aiohttp.ClientSession, url: str, odd: FakeIndexer) -> None:
    """``odd`` joins the balancer at ``url`` and reports itself serving."""
    entry = {"id": "odd", "address": odd.url, "capacity": 10}
    assert (await request(http, "POST", f"{url}/v1/indexers", json=entry))[0] == 201
    report = {"load": 0, "state": "serving"}
    status, _, _ = await request(
        http, "PUT", f"{url}/v1/indexers/odd/load", json=report
    )
    assert status == 200


@pytest.mark.parametrize(
    "value",
    ["²/10", "١٢/10", "1/١٠", f"{HUGE}/10", "1/1000001", "9223372036854775808/1",
     "-1/10", "5/0", "abc", "", "/", "1/", "/1", "1/2/3", " 1/2", "1/2 ", "+1/2",
     "1_0/2", "0x1/2", "1.0/2"],
)  # fmt: skip
def test_a_malformed_load_header_is_none(value: str) -> None:
    assert parse_load_header(value) is None


def test_a_load_header_within_bounds_is_read() -> None:
    assert parse_load_header("0/1") == (0, 1)
    assert parse_load_header("12/64") == (12, 64)
    top = f"{MAX_COUNT}/{MAX_CAPACITY}"
    assert parse_load_header(top) == (MAX_COUNT, MAX_CAPACITY)
    assert parse_load_header(None) is None


async def test_malformed_headers_leave_balancer_and_client_working(
    procs: Procs, http: aiohttp.ClientSession, odd: FakeIndexer
) -> None:
    balancer = procs.balancer(
        "balancer", "--probe-interval", "0.05s", "--log-level", "debug"
    )
    url = balancer.url
    await register(http, url, odd)
    routed = AsyncClient(balancers=[url], rng=1)
    proxied = AsyncClient(balancers=[url], mode="proxy", rng=1)

    for load, service in CASES:
        odd.headers = {"P2PLB-Load": load, "P2PLB-Service-Ms": service}
        where = f"{load[:20]} {service}"

        # Through the proxy, and through probes: two whole rounds after the
        # headers changed, so at least one read them.
        for method, path, body in (
            ("GET", "/v1/indices/songs", None),
            ("POST", "/v1/indices/songs/items", {"item": "a"}),
        ):
            answer = await request(http, method, url + path, json=body)
            assert answer[0] == 200, (where, answer)
        seen = odd.probes

        async def probed(seen: int = seen) -> bool:
            return odd.probes >= seen + 2

        await eventually(probed)

        for path in ("/v1/status", "/metrics", "/v1/route", "/v1/routing-table"):
            async with http.get(url + path) as response:
                assert response.status == 200, (where, path, await response.text())
        row = (await request(http, "GET", f"{url}/v1/status"))[1]["indexers"][0]
        assert row["capacity"] == 10, where
        assert 0 <= row["current_load"] <= 3 + 1, (where, row)

        for client in (routed, proxied):
            assert await client.add_to_index("songs", "a") == 1, where
            assert await client.get_index("songs") == ["a"], where
            assert await client.list_indices() == ["songs"], where

    await routed.aclose()
    await proxied.aclose()
    log = balancer.log()
    assert "loop_failed" not in log and "request.failed" not in log, log[-3000:]
    said = re.findall(r"proxy\.malformed_header indexer=odd header=(\S+)", log)
    assert sorted(said) == ["P2PLB-Load", "P2PLB-Service-Ms"], said


async def test_the_proxy_passes_on_only_a_sane_retry_after(
    procs: Procs, http: aiohttp.ClientSession, odd: FakeIndexer
) -> None:
    # Passed on unchecked, "-1", a day or a date reached HTTP callers, which
    # may wait for whatever they are told.
    balancer = procs.balancer("balancer", "--probe-interval", "1h")
    await register(http, balancer.url, odd)
    overloaded = b'{"error": {"code": "overloaded", "message": "busy"}}'
    for value, passed_on in [
        ("7", "7"),
        ("0007", "7"),
        ("3600", "3600"),
        ("0", "1"),
        ("3601", "1"),
        ("86400", "1"),
        ("-1", "1"),
        ("2.5", "1"),
        ("nan", "1"),
        (HUGE, "1"),
        ("\u0661", "1"),
        ("Fri, 31 Dec 1999 23:59:59 GMT", "1"),
    ]:
        odd.handle = answering(503, overloaded, **{"Retry-After": value})
        status, body, headers = await request(
            http, "GET", f"{balancer.url}/v1/indices/songs"
        )
        assert (status, body["error"]["code"]) == (503, "overloaded")
        assert headers["Retry-After"] == passed_on, value


async def test_malformed_bodies_are_the_indexers_failure(
    procs: Procs, http: aiohttp.ClientSession, odd: FakeIndexer
) -> None:
    balancer = procs.balancer("balancer", "--probe-interval", "1h")
    url = balancer.url
    await register(http, url, odd)
    client = AsyncClient(balancers=[url], retries=0, rng=1)

    # Nested too deeply for msgspec: once a RecursionError, hence a 500 of the
    # balancer's own (the proxy reads the code of a 503 and the version of a
    # written 200) and a raw exception out of the client.
    for status, method, path in (
        (503, "GET", "/v1/indices/songs"),
        (200, "POST", "/v1/indices/songs/items"),
    ):
        odd.handle = answering(status, DEEP)
        async with http.request(method, url + path, json={"item": "a"}) as response:
            passed_on = (response.status, response.headers.get("P2PLB-Indexer"))
            assert (passed_on, await response.read()) == ((status, "odd"), DEEP)
    with pytest.raises(Unreachable, match="not JSON, or nested too deeply to read"):
        await client.get_index("songs")

    # A version that is not one is not asked for on later reads: no indexer
    # could ever serve P2PLB-Min-Version: zzzz.
    asked: list[str | None] = []
    odd.handle = answering(200, b'{"added": 1, "version": "zzzz"}', seen=asked)
    item = {"item": "a"}
    answer = await request(http, "POST", f"{url}/v1/indices/songs/items", json=item)
    assert answer[0] == 200
    await request(http, "GET", f"{url}/v1/indices/songs")
    assert asked == [None, None]

    # Items that are not strings, a cursor that does not move (the client
    # once asked for the same page for ever), counts that are not counts.
    odd.handle = answering(200, b'{"name": "songs", "items": [1], "next": null}')
    with pytest.raises(Unreachable, match="without a list of 'items'"):
        await client.get_index("songs")
    odd.handle = answering(200, b'{"name": "songs", "items": ["a"], "next": "a"}')
    async with asyncio.timeout(10):
        with pytest.raises(Unreachable, match="an index page with a bad next"):
            await client.get_index("songs")
    odd.handle = answering(200, b'{"indices": ["a", null]}')
    with pytest.raises(Unreachable, match="without a list of 'indices'"):
        await client.list_indices()
    odd.handle = answering(200, b'{"added": -1, "version": "0000000000000001"}')
    with pytest.raises(Unreachable, match="without a count of 'added'"):
        await client.add_to_index("songs", "a")

    # Retry-After that is not a whole number of seconds is no Retry-After.
    overloaded = b'{"error": {"code": "overloaded", "message": "busy"}}'
    for value in ("nan", "inf", "-1", "1e400", "١"):
        odd.handle = answering(503, overloaded, **{"Retry-After": value})
        with pytest.raises(Overloaded) as caught:
            await client.list_indices()
        assert caught.value.retry_after is None, value

    await client.aclose()
    assert "request.failed" not in balancer.log(), balancer.log()[-3000:]
