"""The indexer's HTTP API, against a real ``p2plb indexer`` process."""

from __future__ import annotations

import asyncio
import re
import signal
from typing import Any

import aiohttp
import pytest

from procs import Procs, request

LOAD = re.compile(r"^\d+/\d+$")


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, Any]:
    """One call to an indexer, which must put its load on every answer."""
    answer = await request(http, method, url, **kwargs)
    assert LOAD.match(answer[2]["P2PLB-Load"]), answer[2]
    return answer


async def test_whole_index_api(procs: Procs, http: aiohttp.ClientSession) -> None:
    url = procs.indexer("i1").url
    items = f"{url}/v1/indices/songs/items"

    assert (await call(http, "GET", f"{url}/v1/indices"))[:2] == (200, {"indices": []})
    status, body, _ = await call(http, "POST", items, json={"item": "b"})
    assert status == 200 and body["added"] == 1
    first_version = body["version"]
    assert re.fullmatch(r"[0-9a-f]{16}", first_version)

    status, body, _ = await call(
        http, "POST", items, json={"items": ["a", "c", "b", "a"]}
    )
    assert (status, body["added"]) == (200, 2)
    assert body["version"] > first_version

    status, body, _ = await call(http, "POST", items, json={"item": "b"})
    assert (status, body["added"]) == (200, 0)  # idempotent

    status, body, _ = await call(http, "GET", f"{url}/v1/indices/songs")
    assert (status, body) == (
        200,
        {"name": "songs", "items": ["a", "b", "c"], "next": None},
    )

    status, body, _ = await call(
        http, "POST", f"{items}/remove", json={"items": ["a", "zz"]}
    )
    assert (status, body["removed"]) == (200, 1)
    status, body, _ = await call(http, "DELETE", items, params={"item": "b"})
    assert (status, body["removed"]) == (200, 1)
    status, body, _ = await call(http, "DELETE", items, params={"item": "b"})
    assert (status, body["removed"]) == (200, 0)

    status, body, _ = await call(http, "GET", f"{url}/v1/indices/songs")
    assert body == {"name": "songs", "items": ["c"], "next": None}
    status, body, _ = await call(http, "GET", f"{url}/v1/indices")
    assert (status, body) == (200, {"indices": ["songs"]})

    await call(http, "DELETE", items, params={"item": "c"})
    status, body, _ = await call(http, "GET", f"{url}/v1/indices/songs")
    assert status == 404
    assert body == {
        "error": {
            "code": "index_not_found",
            "message": "name: index 'songs' has no items",
        }
    }
    assert (await call(http, "GET", f"{url}/v1/indices"))[1] == {"indices": []}


async def test_paging(procs: Procs, http: aiohttp.ClientSession) -> None:
    url = procs.indexer("i1").url
    names = [f"item{i:03d}" for i in range(25)]
    await call(http, "POST", f"{url}/v1/indices/p/items", json={"items": names[::-1]})

    seen: list[str] = []
    after = None
    pages = 0
    while True:
        params = {"limit": "10"} | ({"after": after} if after else {})
        status, body, _ = await call(http, "GET", f"{url}/v1/indices/p", params=params)
        assert status == 200
        seen += body["items"]
        pages += 1
        after = body["next"]
        if after is None:
            break
        assert after == body["items"][-1]
    assert (seen, pages) == (names, 3)

    status, body, _ = await call(
        http, "GET", f"{url}/v1/indices/p", params={"limit": "25"}
    )
    assert (len(body["items"]), body["next"]) == (25, None)
    status, body, _ = await call(
        http, "GET", f"{url}/v1/indices/p", params={"after": "zzz"}
    )
    assert (status, body["items"], body["next"]) == (200, [], None)


UNICODE_NAMES = ["歌曲", "música 🎶", "Ελληνικά", "עברית", "e\u0301"]
UNICODE_ITEMS = [
    "peer-🎵",
    "日本語のアイテム",
    "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗̻",
    "\u200b",
    "a" * 4096,
    "é" * 2048,
]


async def test_unicode_round_trips_and_survives_restart(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    indexer = procs.indexer("i1")
    for name in UNICODE_NAMES:
        status, body, _ = await call(
            http,
            "POST",
            f"{indexer.url}/v1/indices/{name}/items",
            json={"items": UNICODE_ITEMS},
        )
        assert (status, body["added"]) == (200, len(UNICODE_ITEMS))

    async def check(url: str) -> None:
        status, body, _ = await call(http, "GET", f"{url}/v1/indices")
        assert body == {"indices": sorted(UNICODE_NAMES)}
        for name in UNICODE_NAMES:
            status, body, _ = await call(http, "GET", f"{url}/v1/indices/{name}")
            assert (status, body["name"], body["items"]) == (
                200,
                name,
                sorted(UNICODE_ITEMS),
            )

    await check(indexer.url)
    assert indexer.stop() == 0
    await check(indexer.start().url)


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int, str, str]] = [
    (
        "POST",
        "/v1/indices/x/items",
        {"data": b"{"},
        400,
        "invalid_json",
        "body: not valid JSON (Input data was truncated)",
    ),
    (
        "POST",
        "/v1/indices/x/items",
        {"data": b""},
        400,
        "invalid_json",
        "body: expected a JSON object, got nothing",
    ),
    (
        "POST",
        "/v1/indices/x/items",
        {"json": {"item": 5}},
        400,
        "invalid_field",
        "item: expected `str`, got `int`",
    ),
    (
        "POST",
        "/v1/indices/x/items",
        {"json": {"items": [None]}},
        400,
        "invalid_field",
        "items: expected `str`, got `null`",
    ),
    (
        "POST",
        "/v1/indices/x/items",
        {"json": {"item": "a", "extra": 1}},
        400,
        "unknown_field",
        "extra: unknown field",
    ),
    (
        "POST",
        "/v1/indices/x/items",
        {"json": {"item": "a" * 4097}},
        400,
        "invalid_field",
        "item: must be at most 4096 bytes of UTF-8, got 4097",
    ),
    (
        "POST",
        "/v1/indices/x/items/remove",
        {"json": {}},
        400,
        "invalid_field",
        'item: give exactly one of "item" or "items"',
    ),
    (
        "POST",
        "/v1/indices/a%00b/items",
        {"json": {"item": "a"}},
        400,
        "invalid_field",
        "name: must not contain control characters (found '\\x00')",
    ),
    (
        "POST",
        "/v1/indices/" + "n" * 257 + "/items",
        {"json": {"item": "a"}},
        400,
        "invalid_field",
        "name: must be at most 256 characters, got 257",
    ),
    (
        "POST",
        "/v1/indices/x/items?force=1",
        {"json": {"item": "a"}},
        400,
        "unknown_field",
        "force: unknown query parameter",
    ),
    (
        "DELETE",
        "/v1/indices/x/items",
        {},
        400,
        "invalid_field",
        "item: query parameter is required",
    ),
    (
        "DELETE",
        "/v1/indices/x/items?item=",
        {},
        400,
        "invalid_field",
        "item: must not be empty",
    ),
    (
        "GET",
        "/v1/indices/x?limit=0",
        {},
        400,
        "invalid_field",
        "limit: must be a whole number from 1 to 10000, got '0'",
    ),
    (
        "GET",
        "/v1/indices/x?limit=ten",
        {},
        400,
        "invalid_field",
        "limit: must be a whole number from 1 to 10000, got 'ten'",
    ),
    (
        "GET",
        "/v1/indices/x?limit=10001",
        {},
        400,
        "invalid_field",
        "limit: must be a whole number from 1 to 10000, got '10001'",
    ),
    (
        "GET",
        "/v1/indices/x?limit=%205",
        {},
        400,
        "invalid_field",
        "limit: must be a whole number from 1 to 10000, got ' 5'",
    ),
    (
        "GET",
        "/v1/indices/x?limit=%D9%A3",
        {},
        400,
        "invalid_field",
        "limit: must be a whole number from 1 to 10000, got '\u0663'",
    ),
    (
        "GET",
        "/internal/v1/bucket?index=x&bucket=%D9%A3",
        {},
        400,
        "invalid_field",
        "bucket: must be a whole number from 0 to 63, got '\u0663'",
    ),
    (
        "GET",
        "/v1/indices/x?after=",
        {},
        400,
        "invalid_field",
        "after: must not be empty",
    ),
    (
        "GET",
        "/v1/indices/x?sort=desc",
        {},
        400,
        "unknown_field",
        "sort: unknown query parameter",
    ),
    (
        "GET",
        "/v1/indices/x?limit=1&limit=2",
        {},
        400,
        "invalid_field",
        "limit: given more than once",
    ),
    (
        "GET",
        "/v1/indices/x?after=a&after=b",
        {},
        400,
        "invalid_field",
        "after: given more than once",
    ),
    # Without the check this removed "keep" and ignored "c".
    (
        "DELETE",
        "/v1/indices/x/items?item=keep&item=c",
        {},
        400,
        "invalid_field",
        "item: given more than once",
    ),
    ("GET", "/healthz?x=1", {}, 400, "unknown_field", "x: unknown query parameter"),
    ("GET", "/v1/load?x=1", {}, 400, "unknown_field", "x: unknown query parameter"),
    (
        "GET",
        "/openapi.json?x=1",
        {},
        400,
        "unknown_field",
        "x: unknown query parameter",
    ),
    (
        "POST",
        "/v1/indices/%FF/items",
        {"json": {"item": "a"}},
        400,
        "invalid_field",
        "name: must be percent-encoded UTF-8; %FF does not decode as UTF-8",
    ),
    (
        "GET",
        "/v1/indices/%ED%A0%80",
        {},
        400,
        "invalid_field",
        "name: must be percent-encoded UTF-8; %ED does not decode as UTF-8",
    ),
    (
        "DELETE",
        "/v1/indices/x/items?item=%FF",
        {},
        400,
        "invalid_field",
        "item: must be percent-encoded UTF-8; %FF does not decode as UTF-8",
    ),
    (
        "GET",
        "/v1/indices/x?after=%ED%A0%80",
        {},
        400,
        "invalid_field",
        "after: must be percent-encoded UTF-8; %ED does not decode as UTF-8",
    ),
    (
        "GET",
        "/v1/indices/x?a%FF=1",
        {},
        400,
        "unknown_field",
        "a%FF: unknown query parameter",
    ),
    ("GET", "/v1/nothing", {}, 404, "not_found", "no such path: /v1/nothing"),
    (
        "PUT",
        "/v1/indices",
        {},
        405,
        "method_not_allowed",
        "PUT is not allowed on /v1/indices; use GET, HEAD",
    ),
]


async def test_bad_input_is_rejected_and_changes_nothing(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.indexer("i1").url
    await call(http, "POST", f"{url}/v1/indices/x/items", json={"item": "keep"})

    for method, path, kwargs, status, code, message in BAD_REQUESTS:
        got = await call(http, method, url + path, **kwargs)
        assert got[:2] == (status, {"error": {"code": code, "message": message}}), path

    assert (await call(http, "GET", f"{url}/v1/indices"))[1] == {"indices": ["x"]}
    assert (await call(http, "GET", f"{url}/v1/indices/x"))[1]["items"] == ["keep"]


async def test_body_limit(procs: Procs, http: aiohttp.ClientSession) -> None:
    url = procs.indexer("i1", "--max-body-size", "1KiB").url
    big = {"items": [f"{i:04d}" + "x" * 100 for i in range(20)]}

    status, body, _ = await call(http, "POST", f"{url}/v1/indices/x/items", json=big)

    assert status == 413
    assert body["error"]["code"] == "body_too_large"
    assert body["error"]["message"].startswith("body: must be at most 1024 bytes, got ")
    assert (await call(http, "GET", f"{url}/v1/indices"))[1] == {"indices": []}


async def test_health_and_load(procs: Procs, http: aiohttp.ClientSession) -> None:
    url = procs.indexer("i1", "--capacity", "8").url

    status, body, headers = await call(http, "GET", f"{url}/healthz")
    assert (status, body) == (200, {"status": "ok", "id": "i1", "state": "serving"})
    assert headers["P2PLB-Load"] == "0/8"
    status, body, _ = await call(http, "GET", f"{url}/v1/load")
    assert body == {
        "protocol": 1,
        "id": "i1",
        "load": 0,
        "capacity": 8,
        "serving": 0,
        "queued": 0,
        "state": "serving",
        "served": 0,
        "service_ms": None,
    }
    assert "P2PLB-Service-Ms" not in headers  # nothing served yet

    # An index request held a slot: from then on its service time is known,
    # on every answer and in the load report.
    _, _, headers = await call(
        http, "POST", f"{url}/v1/indices/timed/items", json={"item": "x"}
    )
    served_ms = float(headers["P2PLB-Service-Ms"])
    assert 0 < served_ms < 5_000
    status, body, headers = await call(http, "GET", f"{url}/healthz")
    assert float(headers["P2PLB-Service-Ms"]) == served_ms
    status, body, _ = await call(http, "GET", f"{url}/v1/load")
    assert (body["served"], body["service_ms"]) == (1, pytest.approx(served_ms))

    # A request rejected while it held a slot was served too, but its quick
    # answer says nothing of real work: the service time stays.
    status, body, _ = await call(http, "GET", f"{url}/v1/indices/a%00b")
    assert (status, body["error"]["code"]) == (400, "invalid_field")
    status, body, _ = await call(http, "GET", f"{url}/v1/load")
    assert (body["served"], body["service_ms"]) == (2, pytest.approx(served_ms))


async def test_overload_answers_503_while_health_answers(procs: Procs) -> None:
    """Capacity 1, queue 1: of many slow concurrent writes some get 503."""
    url = procs.indexer("i1", "--capacity", "1", "--queue-limit", "1").url
    big = {"items": [f"item-{n}-" + "x" * 200 for n in range(3000)]}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def write(n: int) -> tuple[int, Any, Any]:
            return await call(http, "POST", f"{url}/v1/indices/n{n}/items", json=big)

        writes = [asyncio.create_task(write(n)) for n in range(12)]
        await asyncio.sleep(0.05)
        health = await call(http, "GET", f"{url}/healthz")
        writes_pending_at_health = sum(not w.done() for w in writes)
        results = await asyncio.gather(*writes)

    assert health[0] == 200
    assert writes_pending_at_health > 0  # health did not wait behind the writes
    refused = [r for r in results if r[0] == 503]
    assert refused, [r[0] for r in results]
    assert {r[0] for r in results} == {200, 503}
    for _status, body, headers in refused:
        assert body["error"]["code"] == "overloaded"
        assert headers["Retry-After"] == "1"


async def test_sigterm_stops_cleanly(procs: Procs, http: aiohttp.ClientSession) -> None:
    indexer = procs.indexer("i1")
    await call(http, "POST", f"{indexer.url}/v1/indices/x/items", json={"item": "a"})
    indexer.signal(signal.SIGTERM)
    assert indexer.popen is not None
    assert indexer.popen.wait(20) == 0
    indexer.wait_for(r"indexer\.stopped id=i1 served=1")


async def test_advertise_url_defaults_to_bound_port(procs: Procs) -> None:
    indexer = procs.indexer("i1")
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", indexer.url)
    assert not indexer.url.endswith(":0")
    other = procs.indexer("i2", "--advertise-url", "http://idx.example:9999")
    assert other.url == "http://idx.example:9999"


async def test_acknowledged_writes_survive_kill_9(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    indexer = procs.indexer("i1")
    acknowledged: list[str] = []
    stop = asyncio.Event()
    enough = asyncio.Event()

    async def writer(w: int) -> None:
        n = 0
        while not stop.is_set():
            item = f"w{w}-{n}"
            try:
                status, _, _ = await call(
                    http,
                    "POST",
                    f"{indexer.url}/v1/indices/k/items",
                    json={"item": item},
                )
            except aiohttp.ClientError:
                return  # killed mid-request: not acknowledged
            if status == 200:
                acknowledged.append(item)
                if len(acknowledged) >= 200:
                    enough.set()
            n += 1

    writers = [asyncio.create_task(writer(w)) for w in range(8)]
    await enough.wait()
    indexer.kill()
    stop.set()
    await asyncio.gather(*writers)

    url = indexer.start().url
    status, body, _ = await call(
        http, "GET", f"{url}/v1/indices/k", params={"limit": "10000"}
    )
    assert status == 200
    missing = set(acknowledged) - set(body["items"])
    assert not missing, f"{len(missing)} acknowledged writes lost"


def test_a_second_indexer_on_the_same_data_dir_is_refused(procs: Procs) -> None:
    procs.indexer("i1")
    second = procs.indexer("i1", start=False)
    with pytest.raises(AssertionError, match="exited with 2"):
        second.start()
    assert "p2plb: error: --data-dir: data-i1 is in use by another running indexer" in (
        second.log()
    )
