"""The balancer with real ``p2plb balancer`` and ``p2plb indexer`` processes."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from p2plb.cli import cli
from procs import Proc, Procs, eventually, request

FAST = ("--report-interval", "0.3s")


async def status_of(http: aiohttp.ClientSession, balancer: Proc) -> dict[str, Any]:
    code, body, _ = await request(http, "GET", f"{balancer.url}/v1/status")
    assert code == 200
    result: dict[str, Any] = body
    return result


def by_id(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in status["indexers"]}


async def cluster(
    procs: Procs, n: int, *balancer_flags: str, indexer_flags: tuple[str, ...] = FAST
) -> tuple[Proc, list[Proc]]:
    balancer = procs.balancer("balancer", *balancer_flags)
    indexers = [
        procs.indexer(f"i{i}", "--balancer", balancer.url, *indexer_flags)
        for i in range(1, n + 1)
    ]
    return balancer, indexers


async def all_serving(http: aiohttp.ClientSession, balancer: Proc, n: int) -> None:
    async def ready() -> bool:
        status = await status_of(http, balancer)
        rows = status["indexers"]
        return len(rows) == n and all(
            r["healthy"] and r["state"] == "serving" for r in rows
        )

    await eventually(ready)


async def test_indexers_join_report_and_are_counted(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await cluster(procs, 2)
    await all_serving(http, balancer, 2)

    for _ in range(3):  # served directly: counted through the indexer's reports
        await request(http, "GET", f"{indexers[0].url}/v1/indices")

    async def counted() -> bool:
        return by_id(await status_of(http, balancer))["i1"]["requests"] == 3

    await eventually(counted)
    status = await status_of(http, balancer)
    row = by_id(status)["i1"]
    assert set(status) == {
        "healthy_indexers", "total_indexers", "total_requests", "routed_requests",
        "uptime_seconds", "strategy", "indexers",
    }  # fmt: skip
    assert (status["healthy_indexers"], status["total_indexers"]) == (2, 2)
    assert status["total_requests"] == 3 and status["strategy"] == "least_load"
    assert row["address"] == indexers[0].url and row["capacity"] == 64
    assert set(row) == {
        "id", "address", "zone", "capacity", "current_load", "load_percentage",
        "healthy", "state", "health_reason", "last_report_age_s", "requests",
        "routed", "errors", "latency_ms",
    }  # fmt: skip
    assert row["health_reason"].startswith("report ")
    assert 0 <= row["last_report_age_s"] < 2


REGISTRATION_ERRORS: list[tuple[dict[str, Any], str, str]] = [
    (
        {"id": "i", "address": "http://127.0.0.1:1"},
        "invalid_field",
        "capacity: required field is missing",
    ),
    (
        {"id": "i", "address": "http://127.0.0.1:1", "capacity": 0},
        "invalid_field",
        "capacity: must be an integer from 1 to 1000000, got 0",
    ),
    (
        {"id": "i", "address": "http://127.0.0.1:1", "capacity": -5},
        "invalid_field",
        "capacity: must be an integer from 1 to 1000000, got -5",
    ),
    (
        {"id": "i", "address": "http://127.0.0.1:1", "capacity": "8"},
        "invalid_field",
        "capacity: expected `int`, got `str`",
    ),
    (
        {"id": "i", "address": "http://127.0.0.1:1", "capacity": 1.5},
        "invalid_field",
        "capacity: expected `int`, got `float`",
    ),
    (
        {"id": "i", "address": "2001:db8::1:9000", "capacity": 1},
        "invalid_field",
        "address: must be http://host:port or https://host:port, "
        "got '2001:db8::1:9000'",
    ),
    (
        {"id": "i", "address": "127.0.0.1:80", "capacity": 1},
        "invalid_field",
        "address: must be http://host:port or https://host:port, got '127.0.0.1:80'",
    ),
    (
        {"id": "i", "address": "ftp://x:1", "capacity": 1},
        "invalid_field",
        "address: must be http://host:port or https://host:port, got 'ftp://x:1'",
    ),
    (
        {"id": "i", "address": "http://x:70000", "capacity": 1},
        "invalid_field",
        "address: must be http://host:port or https://host:port, got 'http://x:70000' "
        "(Port out of range 0-65535)",
    ),
    (
        {"id": "i", "address": "http://127.0.0.1\x00:80", "capacity": 1},
        "invalid_field",
        "address: must be http://host:port or https://host:port, "
        "got 'http://127.0.0.1\\x00:80': no spaces or control characters",
    ),
    (
        {"id": "i", "address": "http://exa mple:80", "capacity": 1},
        "invalid_field",
        "address: must be http://host:port or https://host:port, "
        "got 'http://exa mple:80': no spaces or control characters",
    ),
    (
        {"id": "i", "address": "http://x:1", "capacity": 1, "zone": "\x1b[2J"},
        "invalid_field",
        "zone: must not contain control characters (found '\\x1b')",
    ),
    (
        {"id": "i", "address": "http://x:1", "capacity": 1, "zone": "a\nb"},
        "invalid_field",
        "zone: must not contain control characters (found '\\n')",
    ),
    (
        {"id": "a b", "address": "http://x:1", "capacity": 1},
        "invalid_field",
        "id: must be 1 to 128 of letters, digits, '.', '_', ':', '-'; got 'a b'",
    ),
    (
        {"id": "nl\n", "address": "http://x:1", "capacity": 1},
        "invalid_field",
        "id: must be 1 to 128 of letters, digits, '.', '_', ':', '-'; got 'nl\\n'",
    ),
    (
        {"id": "..", "address": "http://x:1", "capacity": 1},
        "invalid_field",
        "id: must not be '..', which a URL path drops as a dot segment",
    ),
    (
        {"id": 7, "address": "http://x:1", "capacity": 1},
        "invalid_field",
        "id: expected `str`, got `int`",
    ),
]


async def test_registration_validation_changes_nothing(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.balancer().url
    for body, code, message in REGISTRATION_ERRORS:
        status, answer, _ = await request(http, "POST", f"{url}/v1/indexers", json=body)
        assert (status, answer) == (400, {"error": {"code": code, "message": message}})

    status, answer, _ = await request(http, "POST", f"{url}/v1/indexers", data=b"{")
    assert (status, answer["error"]["code"]) == (400, "invalid_json")
    status, answer, _ = await request(
        http, "PUT", f"{url}/v1/indexers/i1/load", json={"load": -1}
    )
    assert (status, answer["error"]["message"]) == (
        400,
        "load: must be an integer >= 0, got -1",
    )
    for service_ms, message in [
        (-1, "service_ms: must be milliseconds from 0 to 3600000 (an hour), got -1"),
        (1e9, "service_ms: must be milliseconds from 0 to 3600000 (an hour), "
              "got 1e+09"),
        ("fast", "service_ms: expected `float | null`, got `str`"),
    ]:  # fmt: skip
        status, answer, _ = await request(
            http,
            "PUT",
            f"{url}/v1/indexers/i1/load",
            json={"load": 0, "service_ms": service_ms},
        )
        assert (status, answer) == (
            400,
            {"error": {"code": "invalid_field", "message": message}},
        )
    listed = (await request(http, "GET", f"{url}/v1/indexers"))[1]
    assert listed["indexers"] == []


async def test_register_unregister_report_and_superseded(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.balancer().url
    first = {"id": "i1", "address": "http://127.0.0.1:9001", "capacity": 4,
             "instance": "a"}  # fmt: skip

    status, body, _ = await request(http, "POST", f"{url}/v1/indexers", json=first)
    assert status == 201
    assert (body["id"], body["address"], body["capacity"], body["peers"]) == (
        "i1", "http://127.0.0.1:9001", 4, [],
    )  # fmt: skip
    assert (await request(http, "POST", f"{url}/v1/indexers", json=first))[0] == 200

    moved = first | {"address": "http://127.0.0.1:9002", "instance": "b"}
    assert (await request(http, "POST", f"{url}/v1/indexers", json=moved))[0] == 200
    listed = (await request(http, "GET", f"{url}/v1/indexers"))[1]["indexers"]
    assert [(e["id"], e["address"]) for e in listed] == [
        ("i1", "http://127.0.0.1:9002")
    ]

    old = {"load": 1, "state": "serving", "address": first["address"], "instance": "a"}
    status, body, _ = await request(http, "PUT", f"{url}/v1/indexers/i1/load", json=old)
    assert (status, body["error"]["code"]) == (409, "superseded")
    new = old | {"address": moved["address"], "instance": "b"}
    status, body, _ = await request(http, "PUT", f"{url}/v1/indexers/i1/load", json=new)
    assert (status, body["peers"]) == (200, [])
    timed = new | {"service_ms": 3.25}
    assert (await request(http, "PUT", f"{url}/v1/indexers/i1/load", json=timed))[
        0
    ] == 200
    table = (await request(http, "GET", f"{url}/v1/routing-table"))[1]
    assert [row["service_ms"] for row in table["indexers"]] == [3.25]

    # The member list is sent again only when it changed.
    held = new | {"peers_version": body["peers_version"]}
    status, body, _ = await request(
        http, "PUT", f"{url}/v1/indexers/i1/load", json=held
    )
    assert (status, body) == (
        200,
        {"peers": None, "peers_version": held["peers_version"]},
    )
    since = {"members_since": str(held["peers_version"])}
    listed = (await request(http, "GET", f"{url}/v1/indexers", params=since))[1]
    assert listed == {"indexers": None, "members_version": held["peers_version"]}
    other = {"id": "i2", "address": "http://127.0.0.1:9003", "capacity": 1}
    await request(http, "POST", f"{url}/v1/indexers", json=other)
    status, body, _ = await request(
        http, "PUT", f"{url}/v1/indexers/i1/load", json=held
    )
    assert [p["id"] for p in body["peers"]] == ["i2"]
    assert body["peers_version"] > held["peers_version"]
    await request(http, "DELETE", f"{url}/v1/indexers/i2")

    status, body, _ = await request(http, "PUT", f"{url}/v1/indexers/zz/load", json=new)
    assert (status, body["error"]["code"]) == (404, "indexer_not_found")
    bad = {"P2PLB-Instance": "b", "P2PLB-Address": "127.0.0.1:9002"}
    status, body, _ = await request(
        http, "DELETE", f"{url}/v1/indexers/i1", headers=bad
    )
    assert (status, body["error"]["message"]) == (
        400,
        "P2PLB-Address: must be http://host:port or https://host:port, got "
        "'127.0.0.1:9002'",
    )
    # The process replaced at 9001 removes nothing; the one at 9002 itself.
    for address, expected in (("http://127.0.0.1:9001", 409), (moved["address"], 204)):
        sender = {"P2PLB-Instance": "c", "P2PLB-Address": address}
        status, _, _ = await request(
            http, "DELETE", f"{url}/v1/indexers/i1", headers=sender
        )
        assert status == expected
    await request(http, "POST", f"{url}/v1/indexers", json=moved)
    assert (await request(http, "DELETE", f"{url}/v1/indexers/i1"))[0] == 204
    status, body, _ = await request(http, "DELETE", f"{url}/v1/indexers/i1")
    assert (status, body["error"]["code"]) == (404, "indexer_not_found")


async def test_members_since_is_a_whole_number(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.balancer().url
    for raw, shown in [("-1", "-1"), ("%D9%A3", "\u0663"), ("%201", " 1")]:
        status, body, _ = await request(
            http, "GET", f"{url}/v1/indexers?members_since={raw}"
        )
        message = (
            f"members_since: must be a whole number from 0 to {2**63 - 1}, "
            f"got {shown!r}"
        )
        assert (status, body) == (
            400,
            {"error": {"code": "invalid_field", "message": message}},
        )
    status, body, _ = await request(http, "GET", f"{url}/v1/indexers?members_since=0")
    assert (status, body) == (200, {"indexers": None, "members_version": 0})


QUERY_ERRORS: list[tuple[str, str, str, str]] = [
    ("GET", "/v1/route?op=read&op=write", "invalid_field", "op: given more than once"),
    ("GET", "/v1/route?index=a&index=b", "invalid_field",
     "index: given more than once"),
    ("GET", "/v1/indexers?members_since=0&members_since=0", "invalid_field",
     "members_since: given more than once"),
    ("GET", "/dashboard?refresh=5&refresh=9", "invalid_field",
     "refresh: given more than once"),
    ("GET", "/v1/strategy?x=1", "unknown_field", "x: unknown query parameter"),
    ("PUT", "/v1/strategy?x=1", "unknown_field", "x: unknown query parameter"),
    ("GET", "/healthz?x=1", "unknown_field", "x: unknown query parameter"),
    ("GET", "/openapi.json?x=1", "unknown_field", "x: unknown query parameter"),
    ("GET", "/v1/status?x=1&x=2", "unknown_field", "x: unknown query parameter"),
]  # fmt: skip


async def test_query_parameters_are_known_and_given_once(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.balancer().url

    for method, path, code, message in QUERY_ERRORS:
        status, body, _ = await request(
            http, method, url + path, json={"strategy": "p2c"}
        )
        error = {"error": {"code": code, "message": message}}
        assert (status, body) == (400, error), path

    assert (await request(http, "GET", f"{url}/v1/strategy"))[1] == {
        "strategy": "least_load"
    }


async def test_metrics_take_any_query_parameters(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    url = procs.balancer().url
    async with http.get(f"{url}/metrics?module=p2plb&target=x&target=y") as answer:
        assert answer.status == 200
        assert "p2plb_" in await answer.text()


async def test_a_replaced_indexer_that_stops_leaves_its_replacement(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # No tokens: the instance of a DELETE was once checked only with them, and
    # the replaced process removed its replacement's entry as it stopped.
    balancer = procs.balancer()
    quiet = ("--balancer", balancer.url, "--report-interval", "1h")
    old = procs.indexer("mv", *quiet, "--drain-period", "0.1s", name="mv-a")

    async def listed() -> list[tuple[str, str]]:
        body = (await request(http, "GET", f"{balancer.url}/v1/indexers"))[1]
        return [(row["id"], row["address"]) for row in body["indexers"]]

    async def at(url: str) -> bool:
        return await listed() == [("mv", url)]

    await eventually(lambda: at(old.url))
    new = procs.indexer("mv", *quiet, name="mv-b")
    await eventually(lambda: at(new.url))

    assert old.stop() == 0  # before its next report could tell it
    old.wait_for(r"reporter\.(unregistered|unregister_superseded) ")
    assert await listed() == [("mv", new.url)]
    old.wait_for(r"reporter\.unregister_superseded balancer=\S+ id=mv: ")
    balancer.wait_for(
        r"indexer\.unregister_refused id=mv instance=\S+ reason=superseded"
    )
    assert "indexer.unregistered id=mv" not in balancer.log()


async def test_kill_9_leaves_rotation_within_the_probe_window(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await cluster(
        procs, 3, "--probe-interval", "0.2s", "--probe-fall", "2"
    )
    await all_serving(http, balancer, 3)

    indexers[1].kill()

    async def ejected() -> bool:
        return not by_id(await status_of(http, balancer))["i2"]["healthy"]

    took = await eventually(ejected, within=5)
    assert took < 3
    row = by_id(await status_of(http, balancer))["i2"]
    assert "probe" in row["health_reason"], row
    balancer.wait_for(r"indexer\.unhealthy id=i2 reason=")
    for _ in range(30):
        status, body, _ = await request(http, "GET", f"{balancer.url}/v1/route")
        assert status == 200 and body["id"] != "i2"


async def test_clean_shutdown_unregisters_then_drains(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await cluster(
        procs, 2, indexer_flags=(*FAST, "--drain-period", "1.5s")
    )
    await all_serving(http, balancer, 2)

    indexers[0].signal(signal.SIGTERM)
    indexers[0].wait_for(r"indexer\.draining id=i1")

    listed = (await request(http, "GET", f"{balancer.url}/v1/indexers"))[1]
    assert [e["id"] for e in listed["indexers"]] == ["i2"]
    status, _, _ = await request(http, "GET", f"{indexers[0].url}/v1/indices")
    assert status == 200  # still serving while draining
    assert indexers[0].popen is not None and indexers[0].popen.wait(10) == 0


async def test_proxy_serves_the_index_api_and_retries_elsewhere(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # Probes and reports slow, so the balancer still believes in a dead indexer.
    balancer, indexers = await cluster(
        procs, 2, "--probe-interval", "1h", indexer_flags=("--report-interval", "1h")
    )
    await all_serving(http, balancer, 2)
    url = balancer.url

    status, body, headers = await request(
        http, "POST", f"{url}/v1/indices/x/items", json={"items": ["a", "b"]}
    )
    assert (status, body["added"]) == (200, 2)
    writer = headers["P2PLB-Indexer"]
    assert headers["P2PLB-Load"].endswith("/64")

    # Without replication yet, keep the indexer that holds the data and kill
    # the other: every read must still succeed, retried on the live one.
    for proc in indexers:
        if proc.name != writer:
            proc.kill()
    for _ in range(20):
        status, body, headers = await request(http, "GET", f"{url}/v1/indices/x")
        assert (status, body["items"], headers["P2PLB-Indexer"]) == (
            200,
            ["a", "b"],
            writer,
        )

    status, body, _ = await request(http, "GET", f"{url}/v1/indices/x?limit=0")
    assert (status, body["error"]["code"]) == (400, "invalid_field")  # passed on as is
    rows = by_id(await status_of(http, balancer))
    dead = next(r for r in rows.values() if r["id"] != writer)
    assert dead["errors"] >= 1 and not dead["healthy"]


async def test_no_healthy_indexer(procs: Procs, http: aiohttp.ClientSession) -> None:
    url = procs.balancer().url
    for path in ("/v1/indices/x", "/v1/route?op=read"):
        status, body, _ = await request(http, "GET", url + path)
        assert status == 503
        assert body["error"]["code"] == "no_healthy_indexer", path
    status, body, _ = await request(http, "GET", f"{url}/v1/route?op=delete")
    assert (status, body["error"]["message"]) == (
        400,
        'op: must be "read" or "write", got \'delete\'',
    )


async def test_strategy_at_run_time(procs: Procs, http: aiohttp.ClientSession) -> None:
    url = procs.balancer("b", "--strategy", "p2c").url
    assert (await request(http, "GET", f"{url}/v1/strategy"))[1] == {"strategy": "p2c"}

    status, body, _ = await request(
        http, "PUT", f"{url}/v1/strategy", json={"strategy": "round_robin"}
    )
    assert (status, body) == (200, {"strategy": "round_robin"})
    status, body, _ = await request(
        http, "PUT", f"{url}/v1/strategy", json={"strategy": "fastest"}
    )
    assert (status, body["error"]) == (
        400,
        {
            "code": "invalid_strategy",
            "message": "strategy: must be one of least_load, round_robin, random, "
            "p2c, least_latency; got 'fastest'",
        },
    )
    status, body, _ = await request(
        http, "PUT", f"{url}/v1/strategy", json={"strategy": "random", "now": True}
    )
    assert (status, body["error"]["code"]) == (400, "unknown_field")
    table = (await request(http, "GET", f"{url}/v1/routing-table"))[1]
    assert table["strategy"] == "round_robin"


async def test_restart_restores_registry_strategy_and_counters(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, _ = await cluster(
        procs, 2, "--probe-interval", "0.3s", indexer_flags=("--report-interval", "1h")
    )
    await all_serving(http, balancer, 2)
    await request(http, "PUT", f"{balancer.url}/v1/strategy", json={"strategy": "p2c"})
    for _ in range(5):
        await request(http, "GET", f"{balancer.url}/v1/route")
    before = await status_of(http, balancer)

    assert balancer.stop() == 0
    balancer.wait_for(r"balancer\.stopped")
    # Probes an hour apart and reports an hour apart: only the probe made at
    # start can bring the restored indexers back.  The --strategy given loses
    # to the restored one (design.md), and says so.
    balancer = procs.balancer(
        "balancer", "--probe-interval", "1h", "--strategy", "round_robin"
    )
    balancer.wait_for(r"state\.restored path=\S+ indexers=2 strategy=p2c")
    balancer.wait_for(
        r"WARNING p2plb\.balancer balancer\.strategy_restored strategy=p2c "
        r"given=round_robin; the state file's strategy wins"
    )

    async def probed_back() -> bool:
        return (await status_of(http, balancer))["healthy_indexers"] == 2

    await eventually(probed_back, within=5)  # probed at once, no report needed
    after = await status_of(http, balancer)
    assert after["strategy"] == "p2c"
    assert after["routed_requests"] == before["routed_requests"] == 5
    assert [r["id"] for r in after["indexers"]] == [r["id"] for r in before["indexers"]]


async def test_strategy_and_membership_changes_survive_a_crash_soon_after(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # They were saved at the next --persist-interval only: killed seconds
    # after a strategy change, a balancer came back with the old strategy.
    quiet = ("--persist-interval", "1h", "--probe-interval", "1h")
    balancer = procs.balancer("balancer", *quiet)
    path = procs.workdir / "balancer-state.json"

    def saved() -> tuple[str, list[str]]:
        registry = json.loads(path.read_bytes())["registry"]
        return registry["strategy"], [row["id"] for row in registry["indexers"]]

    async def saved_as(expected: tuple[str, list[str]]) -> None:
        async def check() -> bool:
            return saved() == expected

        await eventually(check, within=5)

    async def change(method: str, path: str, body: Any = None) -> None:
        status, answer, _ = await request(http, method, balancer.url + path, json=body)
        assert status in (200, 201, 204), answer

    entry = {"id": "i1", "address": "http://127.0.0.1:9", "capacity": 4}
    for method, target, body, (strategy, ids) in [
        ("PUT", "/v1/strategy", {"strategy": "p2c"}, ("p2c", [])),
        ("POST", "/v1/indexers", entry, ("p2c", ["i1"])),
        ("DELETE", "/v1/indexers/i1", None, ("p2c", [])),
    ]:
        await change(method, target, body)
        await saved_as((strategy, ids))
        balancer.kill()
        balancer = procs.balancer("balancer", *quiet)
        balancer.wait_for(
            rf"state\.restored path=\S+ indexers={len(ids)} strategy={strategy}\n"
        )


def state_file(**changes: Any) -> bytes:
    """A sound state file holding one indexer, but for ``changes`` (to the
    file's top, the registry or its row, wherever the key is)."""
    row = {"id": "i1", "address": "http://127.0.0.1:9", "capacity": 4,
           "zone": None, "instance": None, "state": "serving",
           "reported_load": 0, "requests": 0, "routed": 0, "errors": 0,
           "served": None}  # fmt: skip
    registry = {"version": 1, "strategy": "least_load", "total_requests": 0,
                "routed_requests": 0, "indexers": [row]}  # fmt: skip
    document = {"format": 1, "saved_at": 1.0, "registry": registry}
    for key, value in changes.items():
        holder = next(h for h in (document, registry, row) if key in h)
        holder[key] = value
    return json.dumps(document).encode()


BIG = 10**400
# Each with the reason the balancer gives; None: whatever the parser says.
CORRUPT: dict[str, tuple[bytes, str | None]] = {
    "empty": (b"", "empty (0 bytes, no content)"),
    "truncated": (b'{"format": 1, "saved_at": 1.0, "registry": {"strat', None),
    "nul-filled": (b"\x00" * 4096, "empty (4096 bytes, no content)"),
    "wrong-shape-list": (b"[1, 2, 3]", "expected a JSON object, got list"),
    "wrong-shape-registry": (
        b'{"format": 1, "registry": {"indexers": "nope"}}',
        "snapshot: missing routed_requests, strategy, total_requests, version",
    ),
    "unhashable-strategy": (
        b'{"format": 1, "registry": {"version": 1, "strategy": [], '
        b'"total_requests": 0, "routed_requests": 0, "indexers": []}}',
        "snapshot.strategy: unknown strategy []",
    ),
    "nested-too-deeply": (
        b"[" * 100_000 + b"]" * 100_000,
        "not valid JSON (nested too deeply)",
    ),
    # Out of the API's bounds: once restored, and status and metrics then
    # answered 500 for as long as each save wrote the value back.
    "format-true": (state_file(format=True), "unknown format True"),
    "load-past-64-bits": (
        state_file(reported_load=BIG),
        "snapshot.indexers[0].reported_load: expected an integer from 0 to "
        f"9223372036854775807, got {BIG}",
    ),
    "capacity-past-the-api": (
        state_file(capacity=10**30),
        "snapshot.indexers[0].capacity: must be an integer from 1 to 1000000, "
        f"got {10**30}",
    ),
    "total-past-64-bits": (
        state_file(total_requests=BIG),
        f"snapshot.total_requests: expected an integer from 0 to "
        f"9223372036854775807, got {BIG}",
    ),
}


@pytest.mark.parametrize(("content", "reason"), CORRUPT.values(), ids=CORRUPT.keys())
async def test_corrupt_state_file_is_set_aside(
    procs: Procs, http: aiohttp.ClientSession, content: bytes, reason: str | None
) -> None:
    state = procs.workdir / "balancer-state.json"
    state.write_bytes(content)

    balancer = procs.balancer()

    said = re.escape(reason) if reason else ".*"
    balancer.wait_for(
        rf"state\.corrupt path=\S+ reason={said} moved_to=\S+; starting empty\n"
    )
    aside = list(procs.workdir.glob("balancer-state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert (await request(http, "GET", f"{balancer.url}/healthz"))[0] == 200
    assert (await status_of(http, balancer))["total_indexers"] == 0
    async with http.get(f"{balancer.url}/metrics") as response:
        assert response.status == 200
    assert balancer.stop() == 0
    saved = json.loads(state.read_text())  # a clean save replaced it
    assert saved["format"] == 1


async def test_metrics(procs: Procs, http: aiohttp.ClientSession) -> None:
    balancer, _ = await cluster(procs, 1)
    await all_serving(http, balancer, 1)
    await request(http, "GET", f"{balancer.url}/v1/indices")

    async with http.get(f"{balancer.url}/metrics") as response:
        text = await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
    for line in (
        "p2plb_indexers_healthy 1.0",
        "p2plb_indexers_total 1.0",
        'p2plb_indexer_healthy{indexer="i1"} 1.0',
        'p2plb_indexer_routed_total{indexer="i1"} 1.0',
        'p2plb_route_decisions_total{path="proxy",strategy="least_load"} 1.0',
    ):
        assert line in text, line
    assert 'p2plb_proxy_latency_seconds_count{outcome="ok"} 1.0' in text
    assert 'p2plb_indexer_load_ratio{indexer="i1"}' in text
    # The proxied answer carried the indexer's service time.
    assert re.search(r'p2plb_indexer_service_seconds\{indexer="i1"\} \d', text), text


def p2plb(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2plb", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


async def test_status_and_strategy_commands(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    one, _ = await cluster(procs, 1)
    two = procs.balancer("b2")
    await all_serving(http, one, 1)

    shown = p2plb("status", "--balancer", one.url)
    assert shown.returncode == 0, shown.stderr
    assert "i1" in shown.stdout and "healthy" in shown.stdout
    as_json = json.loads(p2plb("status", "--json", "--balancer", one.url).stdout)
    assert as_json[0]["balancer"] == one.url
    assert as_json[0]["status"]["indexers"][0]["id"] == "i1"

    changed = p2plb(
        "strategy", "round_robin", "--balancer", one.url, "--balancer", two.url
    )
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.splitlines() == [
        f"{one.url}  round_robin",
        f"{two.url}  round_robin",
    ]

    await request(http, "PUT", f"{two.url}/v1/strategy", json={"strategy": "p2c"})
    shown = p2plb("strategy", "--balancer", one.url, "--balancer", two.url)
    assert shown.stderr == (
        "p2plb: warning: balancers disagree on the strategy: "
        f"{one.url}=round_robin, {two.url}=p2c\n"
    )
    bad = p2plb("strategy", "fastest", "--balancer", one.url)
    assert bad.returncode == 1
    assert bad.stderr == (
        f"p2plb: error: balancer {one.url}: strategy: must be one of least_load, "
        "round_robin, random, p2c, least_latency; got 'fastest'\n"
    )


class FakeStatus(BaseHTTPRequestHandler):
    """A balancer that answers ``GET /v1/status`` with ``STATUS``."""

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        body = json.dumps(FAKE_STATUS).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


FAKE_STATUS = {
    "healthy_indexers": 0, "total_indexers": 1, "total_requests": 0,
    "routed_requests": 0, "uptime_seconds": 1.0, "strategy": "least_load",
    "indexers": [{
        "id": "v6", "address": "http://[fe80::1]:7401", "zone": None,
        "capacity": 4, "current_load": 0, "load_percentage": 0.0,
        "healthy": False, "state": "serving",
        "health_reason": "probe failed: [/] [bold]not bold[/bold]",
        "last_report_age_s": None, "requests": 0, "routed": 0, "errors": 0,
        "latency_ms": {"p50": None, "p99": None},
    }],
}  # fmt: skip


def test_status_shows_every_value_as_it_is() -> None:
    # rich reads strings as markup: the IPv6 host vanished ("http://:7401")
    # and "[/]" in a reason stopped the command with a MarkupError.
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeStatus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = CliRunner().invoke(cli, ["status", "--balancer", url])
    finally:
        server.shutdown()
        server.server_close()

    assert result.exit_code == 0, result.output
    assert "http://[fe80::1]:7401" in result.output
    assert "probe failed: [/] [bold]not bold[/bold]" in result.output
    assert "unhealthy" in result.output


def test_unreachable_balancer_is_one_line(tmp_path: Path) -> None:
    result = p2plb("status", "--balancer", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr == (
        "p2plb: error: balancer http://127.0.0.1:9: cannot connect "
        "(connection refused)\n"
    )
    bad = p2plb("status", "--balancer", "localhost:7400")
    assert (bad.returncode, bad.stderr) == (
        2,
        "p2plb: error: --balancer: must be http://host:port or https://host:port, "
        "got 'localhost:7400'\n",
    )


def test_an_unwritable_state_file_is_refused_at_start(tmp_path: Path) -> None:
    result = p2plb("balancer", "--port", "0", "--state-file", "/proc/p2plb/state.json")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "p2plb: error: --state-file: cannot write /proc/p2plb/state.json: "
        "No such file or directory"
    )
