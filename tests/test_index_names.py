"""Index names that URLs make hard, on an indexer and through the balancer.

design.md allows any 1 to 256 characters of UTF-8 but control characters and
'/'.  A name travels percent-encoded in the path, where the HTTP libraries on
the way decode leniently and drop dot segments; these tests hold every hop to
the name exactly as it was meant.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from p2plb import AsyncClient
from procs import Procs, eventually, request
from test_client_errors import Fake


def raw(url: str) -> URL:
    """``url`` sent as written: aiohttp would otherwise requote it and drop
    dot segments."""
    return URL(url, encoded=True)


def error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


NOT_UTF8 = [
    ("%FF", "%FF does not decode as UTF-8"),
    ("%ED%A0%80", "%ED does not decode as UTF-8"),
    ("a%zz", "'%zz' is not an escape"),
]


async def test_a_name_that_is_not_utf8_is_refused_on_every_path(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # The balancer has no indexer: what it answers, it answers itself.
    urls = [procs.indexer("i1").url, procs.balancer().url]

    for url in urls:
        for segment, reason in NOT_UTF8:
            for method, path in (
                ("POST", f"/v1/indices/{segment}/items"),
                ("POST", f"/v1/indices/{segment}/items/remove"),
                ("DELETE", f"/v1/indices/{segment}/items?item=a"),
                ("GET", f"/v1/indices/{segment}"),
            ):
                status, body, _ = await request(
                    http, method, raw(url + path), json={"item": "a"}
                )
                message = f"name: must be percent-encoded UTF-8; {reason}"
                assert (status, body) == (400, error("invalid_field", message)), (
                    url,
                    path,
                )

    status, body, _ = await request(http, "GET", f"{urls[0]}/v1/indices")
    assert (status, body) == (200, {"indices": []})


async def test_an_escaped_percent_names_its_own_index(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.indexer("i1").url

    status, body, _ = await request(
        http, "POST", raw(f"{url}/v1/indices/%25FF/items"), json={"item": "a"}
    )
    assert (status, body["added"]) == (200, 1)

    status, body, _ = await request(http, "GET", raw(f"{url}/v1/indices/%25FF"))
    assert (status, body) == (200, {"name": "%FF", "items": ["a"], "next": None})
    status, body, _ = await request(http, "GET", f"{url}/v1/indices")
    assert (status, body) == (200, {"indices": ["%FF"]})


# Names design.md allows that a URL carries only with care, each with the path
# segments that name it: percent-encoded as the client sends it, and as a
# caller may type it.
ODD_NAMES = {
    "a{b}": ["a%7Bb%7D", "a{b}"],
    "{}": ["%7B%7D", "{}"],
    ".": ["%2E", "."],
    "..": ["%2E%2E", "..", ".%2E"],
    "...": ["...", "%2E%2E%2E"],
}


async def test_odd_names_work_on_every_path(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer()
    indexer = procs.indexer(
        "i1", "--balancer", balancer.url, "--report-interval", "0.3s"
    )
    await eventually(lambda: serving(http, balancer.url))

    # The proxy forwards the query as sent, not requoted from its decoded form
    # (which had turned %FF into U+FFFD, a valid item).
    for url in (indexer.url, balancer.url):
        status, body, _ = await request(
            http, "DELETE", raw(f"{url}/v1/indices/x/items?item=%FF")
        )
        message = "item: must be percent-encoded UTF-8; %FF does not decode as UTF-8"
        assert (status, body) == (400, error("invalid_field", message)), url

    for name, segments in ODD_NAMES.items():
        for url in (indexer.url, balancer.url):
            for segment in segments:
                await add_get_remove(http, url, segment, name)
        for mode in ("routed", "proxy"):
            async with AsyncClient(balancers=[balancer.url], mode=mode) as client:
                assert await client.add_to_index(name, ["x", "y"]) == 2, mode
                assert await client.get_index(name) == ["x", "y"], mode
                assert await client.list_indices() == [name], mode
                assert await client.remove_from_index(name, ["x", "y"]) == 2, mode
                assert await client.get_index(name) is None, mode


async def serving(http: aiohttp.ClientSession, url: str) -> bool:
    _, table, _ = await request(http, "GET", f"{url}/v1/routing-table")
    return [(row["healthy"], row["state"]) for row in table["indexers"]] == [
        (True, "serving")
    ]


async def add_get_remove(
    http: aiohttp.ClientSession, url: str, segment: str, name: str
) -> None:
    """Every index operation at ``url`` on the index ``segment`` names."""
    index = f"{url}/v1/indices/{segment}"
    status, body, _ = await request(
        http, "POST", raw(index + "/items"), json={"items": ["a", "b"]}
    )
    assert (status, body["added"]) == (200, 2), index

    status, body, _ = await request(http, "GET", raw(index))
    assert (status, body) == (200, {"name": name, "items": ["a", "b"], "next": None})
    status, body, _ = await request(http, "GET", f"{url}/v1/indices")
    assert (status, body) == (200, {"indices": [name]}), index

    status, body, _ = await request(http, "DELETE", raw(index + "/items?item=a"))
    assert (status, body["removed"]) == (200, 1), index
    status, body, _ = await request(
        http, "POST", raw(index + "/items/remove"), json={"item": "b"}
    )
    assert (status, body["removed"]) == (200, 1), index

    status, body, _ = await request(http, "GET", raw(index))
    message = f"name: index {name!r} has no items"
    assert (status, body) == (404, error("index_not_found", message)), index


async def test_the_client_escapes_dot_names_so_no_hop_drops_them() -> None:
    """'.' and '..' left bare would reach another path through any hop that
    removes dot segments; a stand-in server shows what the client sends."""

    async def answer(request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.json_response({"name": "-", "items": ["a"], "next": None})
        return web.json_response({"added": 1, "removed": 1, "version": "0" * 16})

    fake = await Fake("f1", answer).start()
    try:
        for mode in ("routed", "proxy"):
            async with AsyncClient(balancers=[fake.url], mode=mode) as client:
                for name in (".", "..", "..."):
                    assert await client.add_to_index(name, "a") == 1
                    assert await client.get_index(name) == ["a"]
                    assert await client.remove_from_index(name, "a") == 1
    finally:
        await fake.stop()

    sent = [(call.method, call.rel_url.raw_path) for call in fake.calls]
    expected: list[tuple[str, str]] = []
    for segment in ("%2E", "%2E%2E", "..."):
        index = f"/v1/indices/{segment}"
        expected += [("POST", f"{index}/items"), ("GET", index)]
        expected += [("POST", f"{index}/items/remove")]
    assert sent == 2 * expected  # routed, then proxy
