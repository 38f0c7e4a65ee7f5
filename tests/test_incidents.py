"""Failures that users of load balancers have hit, each replayed with exact outcomes.

The balancer is a real process; the indexers are small in-process servers that
register by ``POST /v1/indexers``, report by ``PUT .../load`` and answer index
calls exactly as a case needs, counting every call that reached them.  Cases
already covered elsewhere (issue 7, "Failures users of load balancers have
hit"):

* 1 capacity: ``test_balancer.py::test_registration_validation_changes_nothing``
  (a new id) and ``test_a_bad_capacity_leaves_a_known_indexer_as_it_was`` here.
* 4 in-flight counters: ``test_registry.py::test_inflight_never_goes_below_zero``.
* 7 state file: ``test_balancer.py::test_corrupt_state_file_is_set_aside`` and
  ``test_a_save_that_fails_halfway_leaves_the_previous_state_file`` here.
* 9 bad addresses: ``test_balancer.py::test_registration_validation_changes_nothing``.
* 10 unicode after a restart:
  ``test_indexer_api.py::test_unicode_round_trips_and_survives_restart``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from loopback import serve
from p2plb import AsyncClient
from p2plb.errors import NoHealthyIndexer
from p2plb.state import load_state, save_state
from procs import Proc, Procs, eventually, request

Handler = Callable[[web.Request], Awaitable[web.Response]]
QUIET = ("--probe-interval", "1h")


def error(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return web.Response(
        status=status, body=body, content_type="application/json", headers=headers
    )


async def page(request: web.Request) -> web.Response:
    """A good answer to any index call: a one-item page, or a write's count."""
    if request.method == "GET":
        name = request.match_info.get("rest", "").strip("/") or "x"
        return web.json_response({"name": name, "items": ["a"], "next": None})
    return web.json_response({"added": 1, "version": "0000000000000001"})


class FakeIndexer:
    """An indexer stand-in: ``/healthz`` answers ``healthz``, index calls ``handle``;
    every answer carries ``headers``."""

    def __init__(self, name: str, handle: Handler) -> None:
        self.name = name
        self.handle = handle
        self.healthz = 200
        self.headers: dict[str, str] = {}
        self.hits = 0
        self.probes = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakeIndexer:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_route("*", "/v1/indices{rest:.*}", self._index)
        self._runner, self.url = await serve(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        self.probes += 1
        if self.healthz != 200:
            answer = error(self.healthz, "storage_unavailable", "disk gone")
        else:
            answer = web.json_response({"status": "ok", "id": self.name})
        answer.headers.update(self.headers)
        return answer

    async def _index(self, request: web.Request) -> web.Response:
        self.hits += 1
        answer = await self.handle(request)
        answer.headers.update(self.headers)
        return answer


Fakes = Callable[[str, Handler], Awaitable[FakeIndexer]]


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    started: list[FakeIndexer] = []

    async def start(name: str, handle: Handler = page) -> FakeIndexer:
        fake = await FakeIndexer(name, handle).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """One balancer for the cases that need no timer of their own: probes
    never run, so only what a test registers and reports counts."""
    started = Procs(tmp_path_factory.mktemp("shared"))
    try:
        yield started.balancer("balancer", *QUIET, "--proxy-retries", "3")
    finally:
        started.close()


@pytest.fixture
async def balancer(shared: Proc, http: aiohttp.ClientSession) -> Proc:
    """The shared balancer, with no indexer registered."""
    listed = (await request(http, "GET", f"{shared.url}/v1/indexers"))[1]
    for entry in listed["indexers"]:
        url = f"{shared.url}/v1/indexers/{entry['id']}"
        assert (await request(http, "DELETE", url))[0] == 204
    return shared


async def join(
    http: aiohttp.ClientSession,
    balancer: Proc,
    id: str,
    address: str,
    *,
    capacity: int = 10,
    load: int = 0,
) -> None:
    """Register ``id`` at ``address`` and report it serving at ``load``."""
    body = {"id": id, "address": address, "capacity": capacity}
    status, answer, _ = await request(
        http, "POST", f"{balancer.url}/v1/indexers", json=body
    )
    assert status == 201, answer
    report = {"load": load, "state": "serving"}
    status, answer, _ = await request(
        http, "PUT", f"{balancer.url}/v1/indexers/{id}/load", json=report
    )
    assert status == 200, answer


async def status_rows(
    http: aiohttp.ClientSession, balancer: Proc
) -> dict[str, dict[str, Any]]:
    status, body, _ = await request(http, "GET", f"{balancer.url}/v1/status")
    assert status == 200
    return {row["id"]: row for row in body["indexers"]}


async def routes(
    http: aiohttp.ClientSession, balancer: Proc, n: int, spacing: float | None = None
) -> Counter[str]:
    """``n`` lookaside picks sent at once, as many clients asking together, or
    one after another ``spacing`` seconds apart."""

    async def one() -> str:
        status, body, _ = await request(http, "GET", f"{balancer.url}/v1/route")
        assert status == 200, body
        picked: str = body["id"]
        return picked

    if spacing is None:
        return Counter(await asyncio.gather(*(one() for _ in range(n))))
    picks: Counter[str] = Counter()
    for _ in range(n):
        picks[await one()] += 1
        await asyncio.sleep(spacing)
    return picks


def address(port: int) -> str:
    """An address nothing needs to answer at: lookaside picks never call it."""
    return f"http://127.0.0.1:{port}"


# -- 1. capacity ---------------------------------------------------------------------


CAPACITY_ERRORS: list[tuple[Any, str]] = [
    (0, "capacity: must be an integer from 1 to 1000000, got 0"),
    (-3, "capacity: must be an integer from 1 to 1000000, got -3"),
    ("10", "capacity: expected `int`, got `str`"),
    (2.5, "capacity: expected `int`, got `float`"),
    (None, "capacity: expected `int`, got `null`"),
    ("missing", "capacity: required field is missing"),
]


async def test_a_bad_capacity_leaves_a_known_indexer_as_it_was(
    balancer: Proc, http: aiohttp.ClientSession
) -> None:
    await join(http, balancer, "i1", address(9001), capacity=4, load=1)
    before = (await request(http, "GET", f"{balancer.url}/v1/indexers"))[1]

    for capacity, message in CAPACITY_ERRORS:
        body: dict[str, Any] = {"id": "i1", "address": address(9002)}
        if capacity != "missing":
            body["capacity"] = capacity
        status, answer, _ = await request(
            http, "POST", f"{balancer.url}/v1/indexers", json=body
        )
        assert (status, answer) == (
            400,
            {"error": {"code": "invalid_field", "message": message}},
        )

    after = (await request(http, "GET", f"{balancer.url}/v1/indexers"))[1]
    assert after == before
    assert [(e["address"], e["capacity"]) for e in after["indexers"]] == [
        (address(9001), 4)
    ]


# -- 2. no indexer healthy ------------------------------------------------------------


async def test_no_healthy_indexer_reaches_no_one_and_service_resumes(
    procs: Procs, http: aiohttp.ClientSession, fakes: Fakes
) -> None:
    balancer = procs.balancer(
        "balancer", "--probe-interval", "0.1s", "--probe-fall", "1", "--probe-rise", "1"
    )
    fake = await fakes("f1", page)
    await join(http, balancer, "f1", fake.url)

    fake.healthz = 503

    async def down() -> bool:
        return not (await status_rows(http, balancer))["f1"]["healthy"]

    await eventually(down, within=10)
    row = (await status_rows(http, balancer))["f1"]
    assert row["health_reason"] == "1 failed probe: probe answered HTTP 503"
    none = "no healthy indexer: 0 of 1 registered are healthy"
    for method, path in [
        ("GET", "/v1/indices/x"),
        ("GET", "/v1/indices"),
        ("POST", "/v1/indices/x/items"),
        ("GET", "/v1/route"),
    ]:
        status, body, _ = await request(
            http, method, balancer.url + path, json={"item": "a"}
        )
        assert (status, body) == (
            503,
            {"error": {"code": "no_healthy_indexer", "message": none}},
        ), path
    async with AsyncClient(balancers=[balancer.url], refresh_interval=0.1) as client:
        with pytest.raises(NoHealthyIndexer) as caught:
            await client.get_index("x")
        assert str(caught.value).startswith("no healthy indexer: 0 of 1 in the routing")
        assert fake.hits == 0, "no request may reach an unhealthy indexer"

        fake.healthz = 200

        async def up() -> bool:
            return bool((await status_rows(http, balancer))["f1"]["healthy"])

        await eventually(up, within=10)
        status, body, _ = await request(http, "GET", f"{balancer.url}/v1/indices/x")
        assert (status, body["items"]) == (200, ["a"])  # the very next request

        async def routed_again() -> bool:
            try:
                return await client.get_index("x") == ["a"]
            except NoHealthyIndexer:
                return False  # the client's table is a refresh behind

        await eventually(routed_again, within=5)
    assert fake.hits >= 2


# -- 3 and 4. lookaside picks ----------------------------------------------------------


@pytest.mark.parametrize("spacing", [None, 0.005, 0.02], ids=["at-once", "5ms", "20ms"])
async def test_a_new_idle_indexer_gets_at_most_40_percent_of_the_picks(
    balancer: Proc, http: aiohttp.ClientSession, spacing: float | None
) -> None:
    # One after another, the newcomer once got 66% (5 ms apart) and 100%
    # (20 ms apart): each answer counted for 50 ms only, though the balancer
    # had learnt nothing of the newcomer's load since.
    for n in (1, 2, 3):
        await join(http, balancer, f"i{n}", address(9000 + n), capacity=10, load=5)
    await join(http, balancer, "new", address(9004), capacity=10, load=0)

    picks = await routes(http, balancer, 200, spacing)

    assert sum(picks.values()) == 200
    assert 0 < picks["new"] <= 80, picks
    rows = await status_rows(http, balancer)
    assert {id: row["routed"] for id, row in rows.items() if row["routed"]} == picks


async def test_equal_indexers_share_lookaside_picks_evenly(
    balancer: Proc, http: aiohttp.ClientSession
) -> None:
    for n in (1, 2, 3):
        await join(http, balancer, f"i{n}", address(9000 + n), capacity=10, load=0)

    picks = await routes(http, balancer, 300)

    assert set(picks) == {"i1", "i2", "i3"}
    assert all(60 <= count <= 140 for count in picks.values()), picks
    rows = await status_rows(http, balancer)
    assert {id: row["routed"] for id, row in rows.items()} == picks


# -- 5. a retry storm ------------------------------------------------------------------


async def overloaded(request: web.Request) -> web.Response:
    return error(
        503, "overloaded", "at capacity", **{"Retry-After": "1", "P2PLB-Load": "9/4"}
    )


async def test_the_proxy_keeps_retries_within_its_budget_when_all_are_overloaded(
    procs: Procs, http: aiohttp.ClientSession, fakes: Fakes
) -> None:
    # A balancer of its own: its retry budget starts full, at the reserve.
    balancer = procs.balancer("balancer", *QUIET, "--proxy-retries", "3")
    first, second = await fakes("f1", overloaded), await fakes("f2", overloaded)
    await join(http, balancer, "f1", first.url, capacity=4)
    await join(http, balancer, "f2", second.url, capacity=4)

    answers = await asyncio.gather(
        *(request(http, "GET", f"{balancer.url}/v1/indices/songs") for _ in range(100))
    )

    attempts = first.hits + second.hits
    # 100 reads earn 20 retries and the reserve holds 10; with a retry count
    # alone every read would go to both indexers: 200 attempts.
    assert 100 < attempts <= 1.2 * 100 + 10 + 1, attempts
    for status, body, headers in answers:
        assert (status, body["error"]["code"], headers["Retry-After"]) == (
            503,
            "overloaded",
            "1",
        )
    rows = await status_rows(http, balancer)
    assert [(r["healthy"], r["errors"]) for r in rows.values()] == [(True, 0)] * 2
    # Each read that got no second attempt was refused one: operators see it.
    async with http.get(f"{balancer.url}/metrics") as answer:
        metrics = await answer.text()
    refused = re.search(r"^p2plb_proxy_retries_refused_total (\S+)$", metrics, re.M)
    assert refused is not None, metrics
    assert float(refused[1]) == 200 - attempts > 0


# -- 6. removal with reads in flight ---------------------------------------------------


@pytest.mark.parametrize("mode", ["proxy", "routed"])
async def test_a_read_in_flight_ends_well_after_its_indexer_is_removed(
    balancer: Proc, http: aiohttp.ClientSession, fakes: Fakes, mode: str
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return await page(request)

    leaving, staying = await fakes("leaving", slow), await fakes("staying", page)
    await join(http, balancer, "leaving", leaving.url)

    async with AsyncClient(
        balancers=[balancer.url], mode=mode, refresh_interval=0.1
    ) as client:
        read = asyncio.create_task(client.get_index("songs"))
        await asyncio.wait_for(arrived.wait(), 10)
        await join(http, balancer, "staying", staying.url)
        status, _, _ = await request(
            http, "DELETE", f"{balancer.url}/v1/indexers/leaving"
        )
        assert status == 204
        table = (await request(http, "GET", f"{balancer.url}/v1/routing-table"))[1]

        async def refreshed() -> bool:
            return bool((await client.stats())["table_version"] >= table["version"])

        await eventually(refreshed, within=10)

        release.set()
        assert await read == ["a"]
        for _ in range(20):
            assert await client.get_index("songs") == ["a"]

    assert (leaving.hits, staying.hits) == (1, 20)
    picks = await routes(http, balancer, 20)
    assert picks == {"staying": 20}
    rows = await status_rows(http, balancer)
    assert list(rows) == ["staying"]
    assert rows["staying"]["current_load"] <= 20  # lookaside picks, never below 0


# -- 7. a save that fails halfway ------------------------------------------------------


def test_a_save_that_fails_halfway_leaves_the_previous_state_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    save_state(path, {"registry": {"indexers": ["before"]}})
    real_write = os.write
    written = 0

    def disk_full(fd: int, data: Any) -> int:
        nonlocal written
        if written > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        written += real_write(fd, bytes(data[:11]))
        return min(len(data), 11)

    monkeypatch.setattr("p2plb.state.os.write", disk_full)
    with pytest.raises(OSError) as caught:
        save_state(path, {"registry": {"indexers": ["after"] * 100}})
    monkeypatch.undo()

    assert caught.value.errno == errno.ENOSPC
    document = load_state(path)
    assert document is not None
    assert document["registry"] == {"indexers": ["before"]}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no leftovers


# -- 8. healthy by /healthz, failing every real request --------------------------------


async def broken(request: web.Request) -> web.Response:
    return error(500, "internal_error", "an unexpected error occurred")


class Switch:
    """A handler that fails until ``fixed`` is set."""

    def __init__(self) -> None:
        self.fixed = False

    async def __call__(self, request: web.Request) -> web.Response:
        return await (page(request) if self.fixed else broken(request))


async def test_the_proxy_ejects_an_indexer_whose_requests_fail_and_takes_it_back(
    procs: Procs, http: aiohttp.ClientSession, fakes: Fakes
) -> None:
    balancer = procs.balancer(
        "balancer", "--probe-interval", "0.2s", "--eject-for", "1s"
    )
    switch = Switch()
    bad, good = await fakes("bad", switch), await fakes("good", page)
    await join(http, balancer, "bad", bad.url)
    await join(http, balancer, "good", good.url)

    for _ in range(40):
        status, body, _ = await request(http, "GET", f"{balancer.url}/v1/indices/x")
        assert (status, body["items"]) == (200, ["a"])

    assert (bad.hits, good.hits) == (3, 40)
    row = (await status_rows(http, balancer))["bad"]
    assert (row["healthy"], row["errors"], row["health_reason"]) == (
        False,
        3,
        "ejected after 3 failed requests: HTTP 500",
    )
    balancer.wait_for(
        r"indexer\.unhealthy id=bad reason=ejected after 3 failed requests: HTTP 500"
    )

    # Back after the ejection, on probation: one request at a time shows it
    # works before it is trusted again.
    switch.fixed = True

    async def back() -> bool:
        return bool((await status_rows(http, balancer))["bad"]["healthy"])

    await eventually(back, within=10)
    reason = (await status_rows(http, balancer))["bad"]["health_reason"]
    assert reason.endswith("; on probation"), reason
    hits = bad.hits

    async def trusted() -> bool:
        status, _, _ = await request(http, "GET", f"{balancer.url}/v1/indices/x")
        assert status == 200
        row = (await status_rows(http, balancer))["bad"]
        return bool(row["healthy"]) and "probation" not in row["health_reason"]

    await eventually(trusted, within=10)
    assert bad.hits >= hits + 5  # probation ends after 5 good requests in a row


async def test_routed_clients_avoid_an_indexer_whose_requests_fail(
    balancer: Proc,
    http: aiohttp.ClientSession,
    fakes: Fakes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    switch = Switch()
    bad, good = await fakes("bad", switch), await fakes("good", page)
    await join(http, balancer, "bad", bad.url)
    await join(http, balancer, "good", good.url)
    caplog.set_level(logging.INFO, logger="p2plb.routing")

    async with AsyncClient(balancers=[balancer.url], rng=7) as client:
        for _ in range(40):
            assert await client.get_index("x") == ["a"]
        stats = await client.stats()
        assert (bad.hits, good.hits) == (3, 40)
        assert stats["errors"] == {"bad": 3}
        assert stats["avoided"].keys() == {"bad"}
        assert re.fullmatch(
            r"3 failed requests in a row, the last: answered HTTP 500: an "
            r"unexpected error occurred; "
            r"tried again in [0-5]\.\d s",
            stats["avoided"]["bad"],
        ), stats["avoided"]
        avoided = [r.getMessage() for r in caplog.records if "avoided" in r.msg]
        assert avoided == [f"client.indexer_avoided id=bad address={bad.url} for_s=5.0"]

        # After 5 s it gets one request on probation; it works, so it is back.
        switch.fixed = True

        async def back() -> bool:
            await client.get_index("x")
            return bad.hits > 3

        await eventually(back, within=10)
        hits = bad.hits
        for _ in range(40):
            assert await client.get_index("x") == ["a"]
        assert bad.hits > hits, "back in rotation after its probation"


# -- 9. addresses ----------------------------------------------------------------------


async def test_an_ipv6_address_is_accepted_and_shown_with_brackets(
    balancer: Proc, http: aiohttp.ClientSession
) -> None:
    body = {"id": "v6", "address": "http://[2001:DB8::1]:9000", "capacity": 2}

    status, answer, _ = await request(
        http, "POST", f"{balancer.url}/v1/indexers", json=body
    )

    shown = "http://[2001:db8::1]:9000"
    assert (status, answer["address"]) == (201, shown)
    listed = (await request(http, "GET", f"{balancer.url}/v1/indexers"))[1]
    table = (await request(http, "GET", f"{balancer.url}/v1/routing-table"))[1]
    rows = await status_rows(http, balancer)
    assert [e["address"] for e in listed["indexers"]] == [shown]
    assert [e["address"] for e in table["indexers"]] == [shown]
    assert rows["v6"]["address"] == shown


# -- 10. names -------------------------------------------------------------------------


NAME_ERRORS = [
    ("n" * 10_000, "name: must be at most 256 characters, got 10000"),
    ("", "name: must not be empty"),
    ("a%00b", "name: must not contain control characters (found '\\x00')"),
]


async def test_bad_names_are_400_at_the_balancer_and_the_indexer(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer("balancer")
    indexer = procs.indexer("i1", "--balancer", balancer.url)

    for name, message in NAME_ERRORS:
        expected = (400, {"error": {"code": "invalid_field", "message": message}})
        for url in (balancer.url, indexer.url):
            for method, path in [
                ("GET", f"/v1/indices/{name}"),
                ("POST", f"/v1/indices/{name}/items"),
                ("POST", f"/v1/indices/{name}/items/remove"),
                ("DELETE", f"/v1/indices/{name}/items?item=a"),
            ]:
                got = await request(http, method, url + path, json={"item": "a"})
                assert got[:2] == expected, (url, method, message)

    assert (await request(http, "GET", f"{indexer.url}/v1/indices"))[1] == {
        "indices": []
    }


async def test_bad_queries_are_400_at_the_balancer_even_with_no_indexer(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # The balancer checked only the name before routing: with no healthy
    # indexer, ?limit=1&limit=2 answered 503 no_healthy_indexer, not 400.
    balancer = procs.balancer("balancer")
    indexer = procs.indexer("i1")  # registered nowhere: it answers the same
    for method, target in [
        ("GET", "/v1/indices/x?limit=1&limit=2"),
        ("GET", "/v1/indices/x?limit=0"),
        ("GET", "/v1/indices/x?limit=ten"),
        ("GET", "/v1/indices/x?after="),
        ("GET", "/v1/indices/x?after=%FF"),
        ("GET", "/v1/indices/x?nope=1"),
        ("GET", "/v1/indices?limit=5"),
        ("POST", "/v1/indices/x/items?item=a"),
        ("POST", "/v1/indices/x/items/remove?x=1"),
        ("DELETE", "/v1/indices/x/items"),
        ("DELETE", "/v1/indices/x/items?item="),
        ("DELETE", "/v1/indices/x/items?item=a&item=b"),
    ]:
        answers = [
            (await request(http, method, url + target, json={"item": "a"}))[:2]
            for url in (balancer.url, indexer.url)
        ]
        assert answers[0][0] == 400, (target, answers[0])
        assert answers[0] == answers[1], target

    # A sound query still goes looking for an indexer.
    status, body, _ = await request(
        http, "GET", f"{balancer.url}/v1/indices/x?limit=5&after=a"
    )
    assert (status, body["error"]["code"]) == (503, "no_healthy_indexer")


async def test_unicode_is_identical_through_the_balancer_after_a_restart(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer("balancer", "--probe-interval", "0.2s")
    indexer = procs.indexer(
        "i1", "--balancer", balancer.url, "--report-interval", "0.2s",
        "--drain-period", "0.1s",
    )  # fmt: skip
    names = ["歌曲", "música 🎶", "e\u0301", "a" * 256]
    items = ["peer-🎵", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̗̻", "\u200b", "é" * 2048]

    async def ready() -> bool:
        row = (await status_rows(http, balancer)).get("i1", {})
        return bool(row.get("healthy")) and row["state"] == "serving"

    await eventually(ready)
    async with AsyncClient(balancers=[balancer.url], mode="proxy") as client:
        for name in names:
            assert await client.add_to_index(name, items) == len(items)

    assert indexer.stop() == 0
    indexer.start()
    await eventually(ready)

    for mode in ("proxy", "routed"):
        async with AsyncClient(balancers=[balancer.url], mode=mode) as client:
            assert await client.list_indices() == sorted(names)
            for name in names:
                assert await client.get_index(name) == sorted(items), (mode, name)
