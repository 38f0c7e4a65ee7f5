"""Limits on what one client may take from a server: URL and header size, time
without a whole request, page size, body size on the balancer.  The indexer's
body size limit (413) is tested in ``test_indexer_api.py::test_body_limit``."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import pytest

from p2plb import AsyncClient
from procs import Proc, Procs, eventually, request


async def raw_status(
    http: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, str, str]:
    async with http.get(url, headers=headers or None) as response:
        return response.status, response.content_type, await response.text()


async def test_over_long_urls_and_headers_get_a_clear_4xx(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer("balancer")
    indexer = procs.indexer("i1")

    for server in (balancer, indexer):
        long_url = f"{server.url}/v1/indices/{'n' * 20_000}"
        status, body, _ = await request(http, "GET", long_url)
        assert (status, body) == (
            414,
            {
                "error": {
                    "code": "uri_too_long",
                    "message": "URL: path and query must be at most 16384 bytes, "
                    "got 20012",
                }
            },
        )

        # Past what the HTTP parser reads, it answers itself, in plain text.
        huge_url = f"{server.url}/v1/indices/{'n' * 70_000}"
        status, kind, text = await raw_status(http, huge_url)
        assert (status, kind) == (400, "text/plain")
        assert text.startswith("Got more than 65536 bytes when reading"), text

        status, kind, text = await raw_status(
            http, f"{server.url}/healthz", **{"X-Big": "v" * 9000}
        )
        assert (status, kind) == (400, "text/plain")
        assert text.startswith("Got more than 8190 bytes when reading"), text

        assert (await request(http, "GET", f"{server.url}/healthz"))[0] == 200


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection."""
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(4096), 0.1)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the server kept the connection open for {seconds} s")


@pytest.mark.parametrize("kind", ["indexer", "balancer"])
async def test_slow_and_idle_clients_are_cut_off(procs: Procs, kind: str) -> None:
    if kind == "indexer":
        server = procs.indexer("i1", "--idle-timeout", "1s")
    else:
        server = procs.balancer("balancer", "--idle-timeout", "1s")
    host, port = server.url.removeprefix("http://").split(":")

    # A client that sends its headers one byte at a time is cut off, at most
    # the idle timeout after it connected, without an answer.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    trickle = b"X-Slow: " + b"v" * 200

    async def send_slowly() -> None:
        for byte in trickle:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.1)

    sender = asyncio.create_task(send_slowly())
    try:
        assert await closed_within(reader, 15) == b""
    finally:
        sender.cancel()
        writer.close()

    # An idle connection after a whole request and answer is closed too.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await closed_within(reader, 15)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer


async def test_a_trickled_body_gets_408_and_holds_no_slot(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # One slot and no queue: if the slow sender held the slot, the quick
    # request below would be answered 503 overloaded.
    indexer = procs.indexer(
        "i1", "--capacity", "1", "--queue-limit", "0", "--body-timeout", "1s"
    )
    balancer = procs.balancer("balancer", "--body-timeout", "1s")

    for server in (indexer, balancer):
        host, port = server.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/indices/slow/items HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )

        async def send_slowly(writer: asyncio.StreamWriter) -> None:
            for _ in range(40):
                writer.write(b" ")
                await asyncio.sleep(0.1)

        sender = asyncio.create_task(send_slowly(writer))
        try:
            if server is indexer:
                quick = await request(
                    http,
                    "POST",
                    f"{indexer.url}/v1/indices/quick/items",
                    json={"item": "a"},
                )
                assert quick[0] == 200, quick
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            body = await asyncio.wait_for(reader.read(4096), 5)
        finally:
            sender.cancel()
            writer.close()
        assert head.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), head
        assert msgspec.json.decode(body) == {
            "error": {
                "code": "request_timeout",
                "message": "body: not received within 1 s (--body-timeout)",
            }
        }

    status, answer, _ = await request(http, "GET", f"{indexer.url}/v1/indices/slow")
    assert (status, answer["error"]["code"]) == (404, "index_not_found")


async def serving(http: aiohttp.ClientSession, balancer: Proc) -> None:
    async def ready() -> bool:
        table = (await request(http, "GET", f"{balancer.url}/v1/routing-table"))[1]
        return [r["state"] for r in table["indexers"] if r["healthy"]] == ["serving"]

    await eventually(ready)


async def test_page_size_caps_and_pages_after_the_longest_item(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer("balancer", "--probe-interval", "0.2s")
    indexer = procs.indexer(
        "i1", "--balancer", balancer.url, "--report-interval", "0.2s"
    )
    await serving(http, balancer)
    # The longest items percent-encode to 12 KiB: paging "after" one of them,
    # under the longest name, must still fit the URL limit.
    name = "é" * 256
    items = [f"{k}" + "é" * 2047 for k in range(3)]
    status, _, _ = await request(
        http, "POST", f"{indexer.url}/v1/indices/{name}/items", json={"items": items}
    )
    assert status == 200

    for url in (balancer.url, indexer.url):
        for limit, expected in [("10000", 200), ("10001", 400), ("0", 400)]:
            status, body, _ = await request(
                http, "GET", f"{url}/v1/indices/{name}", params={"limit": limit}
            )
            assert status == expected, (url, limit, body)
            if expected == 400:
                assert body["error"] == {
                    "code": "invalid_field",
                    "message": "limit: must be a whole number from 1 to 10000, "
                    f"got {limit!r}",
                }

    for mode in ("routed", "proxy"):
        async with AsyncClient(
            balancers=[balancer.url], mode=mode, page_size=1
        ) as client:
            assert await client.get_index(name) == sorted(items), mode


async def test_a_client_hanging_up_mid_body_is_no_server_error(procs: Procs) -> None:
    indexer = procs.indexer("i1")
    host, port = indexer.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/indices/cut/items HTTP/1.1\r\nHost: x\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"item"'
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.3)  # absence takes waiting: let the server see the EOF

    # The next request is served, and nothing was logged as a failure.
    async with aiohttp.ClientSession() as http:
        status, _, _ = await request(http, "GET", f"{indexer.url}/v1/indices")
    assert status == 200
    assert "request.failed" not in indexer.log()
    assert "Traceback" not in indexer.log()


async def test_the_balancer_refuses_an_over_large_body_before_any_indexer(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer("balancer", "--max-body-size", "1KiB")
    indexer = procs.indexer("i1", "--balancer", balancer.url)

    async def joined() -> bool:
        listed = await request(http, "GET", f"{balancer.url}/v1/indexers")
        return len(listed[1]["indexers"]) == 1

    await eventually(joined)
    big = {"items": [f"{i:04d}" + "x" * 100 for i in range(20)]}
    status, body, _ = await request(
        http, "POST", f"{balancer.url}/v1/indices/x/items", json=big
    )
    assert status == 413
    assert body["error"]["code"] == "body_too_large"
    assert body["error"]["message"].startswith("body: must be at most 1024 bytes")
    # Nothing reached the indexer.
    assert (await request(http, "GET", f"{indexer.url}/v1/indices"))[1] == {
        "indices": []
    }
