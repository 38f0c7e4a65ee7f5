"""The proxy never passes a broken answer on as a success, and counts it.

A real ``p2plb balancer`` in front of a real indexer and of a raw TCP server
that promises a body it never sends in full: the proxy must fail that attempt
over to the real indexer, count an error against the liar, and show it in
``/v1/status`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from p2plb.client import AsyncClient
from p2plb.errors import LoopDetected
from procs import Procs, eventually, request


class Liar:
    """Answers ``/healthz`` well and every other request with a cut body."""

    def __init__(self) -> None:
        self.hits = 0
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> Liar:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        if head.startswith(b"GET /healthz "):
            body = b'{"status": "ok"}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
        else:
            self.hits += 1
            # 200 and a length of 100, then 22 bytes and a hang-up.
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\nP2PLB-Load: 0/1000\r\n\r\n"
                b'{"name": "x", "items":'
            )
        await writer.drain()
        writer.close()


@pytest.fixture
async def liar() -> AsyncIterator[Liar]:
    started = await Liar().start()
    yield started
    await started.stop()


async def test_a_truncated_answer_is_never_a_success(
    procs: Procs, http: aiohttp.ClientSession, liar: Liar
) -> None:
    balancer = procs.balancer("balancer", "--probe-interval", "1h")
    good = procs.indexer("i1", "--balancer", balancer.url, "--report-interval", "1h")
    # Written before the liar registers: it could hold no second copy.
    status, _, _ = await request(
        http, "POST", f"{good.url}/v1/indices/songs/items", json={"item": "a"}
    )
    assert status == 200
    # Both look idle: least_load breaks the tie at random, request by request.
    body = {"id": "liar", "address": liar.url, "capacity": 1000}
    assert (await request(http, "POST", f"{balancer.url}/v1/indexers", json=body))[
        0
    ] == 201
    report = {"load": 0, "state": "serving"}
    url = f"{balancer.url}/v1/indexers/liar/load"
    assert (await request(http, "PUT", url, json=report))[0] == 200

    async def both_serving() -> bool:
        status = (await request(http, "GET", f"{balancer.url}/v1/status"))[1]
        return [(r["id"], r["state"]) for r in status["indexers"]] == [
            ("i1", "serving"),
            ("liar", "serving"),
        ]

    await eventually(both_serving, within=10)

    sent = 0
    while liar.hits < 3 and sent < 200:
        sent += 1
        async with http.get(f"{balancer.url}/v1/indices/songs") as answer:
            raw = await answer.read()
            # Whole and from the real indexer, whatever the liar promised.
            assert answer.status == 200, raw
            assert json.loads(raw) == {"name": "songs", "items": ["a"], "next": None}
            assert answer.headers["P2PLB-Indexer"] == "i1"
    assert liar.hits == 3
    for _ in range(10):  # three failures in a row: ejected, tried no more
        assert (await request(http, "GET", f"{balancer.url}/v1/indices/songs"))[
            0
        ] == 200
    assert liar.hits == 3

    rows = {
        r["id"]: r
        for r in (await request(http, "GET", f"{balancer.url}/v1/status"))[1][
            "indexers"
        ]
    }
    assert rows["liar"]["errors"] == 3
    assert (rows["liar"]["healthy"], rows["liar"]["health_reason"]) == (
        False,
        "ejected after 3 failed requests: truncated answer",
    )
    assert rows["i1"]["errors"] == 0

    async with http.get(f"{balancer.url}/metrics") as answer:
        metrics = await answer.text()
    for line in (
        'p2plb_indexer_errors_total{indexer="liar"} 3.0',
        'p2plb_indexer_errors_total{indexer="i1"} 0.0',
        'p2plb_indexer_routed_total{indexer="liar"} 3.0',
        f'p2plb_indexer_routed_total{{indexer="i1"}} {sent + 10}.0',
        'p2plb_indexer_healthy{indexer="liar"} 0.0',
        'p2plb_health_transitions_total{to="unhealthy"} 1.0',
        'p2plb_proxy_latency_seconds_count{outcome="error"} 3.0',
        f'p2plb_proxy_latency_seconds_count{{outcome="ok"}} {sent + 10}.0',
    ):
        assert line in metrics, line
    assert re.search(r'p2plb_indexer_requests_total\{indexer="i1"\} \d', metrics)


async def test_a_balancer_registered_as_an_indexer_is_one_hop_and_a_failure(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # Its own address as an indexer once made one request about 257 nested
    # hops, until the connection pool ran out.
    balancer = procs.balancer("balancer", "--probe-interval", "1h")
    url = balancer.url
    instance = balancer.wait_for(r"balancer\.started .*\binstance=(\w+)").group(1)
    itself = {"id": "self", "address": url, "capacity": 10}
    assert (await request(http, "POST", f"{url}/v1/indexers", json=itself))[0] == 201
    report = {"load": 0, "state": "serving"}
    assert (await request(http, "PUT", f"{url}/v1/indexers/self/load", json=report))[
        0
    ] == 200

    status, body, _ = await request(http, "GET", f"{url}/v1/indices/songs")
    assert (status, body["error"]) == (
        508,
        {
            "code": "loop_detected",
            "message": f"P2PLB-Via: this balancer (instance {instance}) forwarded "
            "this request to itself: an indexer registered here has this "
            "balancer's address; remove that entry",
        },
    )
    row = (await request(http, "GET", f"{url}/v1/status"))[1]["indexers"][0]
    assert (row["routed"], row["errors"]) == (1, 1)  # one hop, a failure
    balancer.wait_for(
        rf"proxy\.loop_detected indexer=self address={re.escape(url)}: a balancer, "
        "not an indexer; remove this entry"
    )
    client = AsyncClient(balancers=[url], retries=1, rng=1)
    with pytest.raises(LoopDetected):
        await client.list_indices()
    await client.aclose()

    # Beside a real indexer, every request is served, by the indexer (which
    # cannot catch up with a balancer, and stops trying after --sync-timeout).
    procs.indexer("i1", "--balancer", url, "--sync-timeout", "0.5s")

    async def serving() -> bool:
        rows = (await request(http, "GET", f"{url}/v1/status"))[1]["indexers"]
        return [r["state"] for r in rows] == ["serving", "serving"]

    await eventually(serving)
    for _ in range(10):
        status, _, headers = await request(http, "GET", f"{url}/v1/indices")
        assert (status, headers["P2PLB-Indexer"]) == (200, "i1")

    # What another balancer forwarded is refused the same way.
    status, body, _ = await request(
        http, "GET", f"{url}/v1/indices", headers={"P2PLB-Via": "b2"}
    )
    assert (status, body["error"]["message"]) == (
        508,
        f"P2PLB-Via: balancer instance 'b2' forwarded this request to this "
        f"balancer (instance {instance}), which is no indexer: remove the entry "
        "with this balancer's address from that one",
    )
    assert balancer.log().count("proxy.loop_detected") == 1
