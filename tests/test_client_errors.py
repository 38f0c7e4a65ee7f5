"""How the client fails, retries and spends its retry budget, against small
in-process servers that answer exactly what a test needs."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from loopback import serve
from p2plb import AsyncClient
from p2plb.errors import (
    InsufficientReplicas,
    Overloaded,
    ReplicaBehind,
    RequestError,
    Timeout,
    Unreachable,
)

Handler = Callable[[web.Request], Awaitable[web.Response]]


def error(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = json.dumps({"error": {"code": code, "message": message}})
    return web.Response(
        status=status, body=body, content_type="application/json", headers=headers
    )


class Fake:
    """An indexer (and balancer) stand-in: counts index calls, answers ``handle``.

    Its routing table lists itself alone, so it serves routed, proxy and
    fallback clients alike.
    """

    def __init__(self, name: str, handle: Handler) -> None:
        self.name = name
        self.handle = handle
        self.calls: list[web.Request] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> Fake:
        app = web.Application()
        app.router.add_get("/v1/routing-table", self.table)
        app.router.add_route("*", "/v1/indices{rest:.*}", self.index)
        self._runner, self.url = await serve(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def table(self, request: web.Request) -> web.Response:
        row = {
            "id": self.name,
            "address": self.url,
            "capacity": 4,
            "load": 0,
            "state": "serving",
            "healthy": True,
            "zone": None,
        }
        return web.json_response(
            {"version": 1, "strategy": "round_robin", "indexers": [row]}
        )

    async def index(self, request: web.Request) -> web.Response:
        self.calls.append(request)
        return await self.handle(request)


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[[str, Handler], Awaitable[Fake]]]:
    started: list[Fake] = []

    async def start(name: str, handle: Handler) -> Fake:
        fake = await Fake(name, handle).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.stop()


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def overloaded(request: web.Request) -> web.Response:
    return error(
        503, "overloaded", "at capacity", **{"Retry-After": "1", "P2PLB-Load": "9/4"}
    )


# -- the retry budget --------------------------------------------------------------


async def test_retries_stay_within_the_budget_when_every_indexer_is_overloaded(
    fakes: Callable[[str, Handler], Awaitable[Fake]],
) -> None:
    first, second = await fakes("f1", overloaded), await fakes("f2", overloaded)

    async with AsyncClient(indexers=[first.url, second.url], retries=3) as client:
        answers = await asyncio.gather(
            *(client.get_index("songs") for _ in range(100)), return_exceptions=True
        )
        stats = await client.stats()

    attempts = len(first.calls) + len(second.calls)
    # 100 calls earn 20 retries, the reserve holds 10; without a budget: 400.
    assert 100 + 20 <= attempts <= 1.2 * 100 + 10 + 1
    assert stats["retries"] == attempts - 100
    assert all(isinstance(a, Overloaded) for a in answers)
    messages = {str(a).split(" (gave up")[0] for a in answers}
    assert messages == {
        f"indexer {first.url}: at capacity",
        f"indexer {second.url}: at capacity",
    }
    assert any(str(a).endswith("retry budget exhausted)") for a in answers)
    assert any(
        "(gave up after http://127.0.0.1:" in str(a) and " overloaded; " in str(a)
        for a in answers
    )


async def looped(request: web.Request) -> web.Response:
    """A balancer registered as an indexer, proxying the request back to itself."""
    return error(508, "loop_detected", "P2PLB-Via: this balancer forwarded ...")


@pytest.mark.parametrize("handle", [overloaded, looped], ids=["503", "508"])
async def test_a_retry_goes_to_another_indexer(
    fakes: Callable[[str, Handler], Awaitable[Fake]], handle: Handler
) -> None:
    async def fine(request: web.Request) -> web.Response:
        return web.json_response({"name": "s", "items": ["a"], "next": None})

    bad, good = await fakes("bad", handle), await fakes("good", fine)

    async with AsyncClient(indexers=[bad.url, good.url], rng=0) as client:
        results = [await client.get_index("s") for _ in range(10)]
        stats = await client.stats()

    assert results == [["a"]] * 10
    assert len(good.calls) == 10
    assert stats["retries"] == len(bad.calls) > 0
    assert stats["errors"] == {bad.url: len(bad.calls)}
    if handle is looped:
        # A failure, where a 503 is a load signal: avoided after three in a row.
        assert len(bad.calls) == 3


# -- each failure, its exception and its message -----------------------------------


async def test_answers_become_the_matching_exceptions(
    fakes: Callable[[str, Handler], Awaitable[Fake]],
) -> None:
    async def answer(request: web.Request) -> web.Response:
        name = request.path.split("/")[3]
        if name == "bad":
            return error(400, "invalid_field", "limit: too big")
        if name == "behind":
            return error(503, "replica_behind", "not caught up to 00000000000000ff")
        if name == "full":
            return error(503, "insufficient_replicas", "1 of 2 replicas")
        if name == "boom":
            return error(500, "internal_error", "something broke")
        if name == "slow":
            await asyncio.sleep(1.0)
        return error(404, "index_not_found", f"name: index {name!r} has no items")

    fake = await fakes("f1", answer)
    where = f"indexer {fake.url}"

    async with AsyncClient(indexers=[fake.url], retries=1, timeout=0.2) as client:
        with pytest.raises(RequestError) as bad:
            await client.get_index("bad")
        assert (bad.value.status, bad.value.code) == (400, "invalid_field")
        assert str(bad.value) == f"{where}: limit: too big"

        with pytest.raises(ReplicaBehind) as behind:
            await client.get_index("behind")
        assert str(behind.value) == (
            f"{where}: not caught up to 00000000000000ff (gave up after "
            f"{fake.url} replica_behind; {fake.url} replica_behind)"
        )

        calls = len(fake.calls)
        with pytest.raises(InsufficientReplicas) as full:
            await client.add_to_index("full", "x")
        assert str(full.value) == f"{where}: 1 of 2 replicas"
        assert len(fake.calls) == calls + 1, "not retried: it may still apply"

        with pytest.raises(Unreachable) as boom:
            await client.get_index("boom")
        assert str(boom.value).startswith(
            f"{where} answered HTTP 500: something broke (gave up after"
        )

        with pytest.raises(Timeout) as slow:
            await client.get_index("slow")
        assert str(slow.value) == (
            "no indexer answered within 0.2 s (gave up after "
            f"{fake.url} timed out; {fake.url} timed out)"
        )

        assert await client.get_index("nothing") is None


async def test_the_timeout_bounds_the_whole_call_and_a_hung_indexer_costs_half(
    fakes: Callable[[str, Handler], Awaitable[Fake]],
) -> None:
    hung = asyncio.Event()

    async def never(request: web.Request) -> web.Response:
        await hung.wait()
        return web.json_response({"indices": []})

    async def quick(request: web.Request) -> web.Response:
        return web.json_response({"indices": ["songs"]})

    stuck = await fakes("stuck", never)
    fine = await fakes("fine", quick)
    loop = asyncio.get_running_loop()

    # Alone, a hung indexer is retried on itself until the deadline, not
    # retries x timeout (which took 4 s with timeout=1 s).
    async with AsyncClient(indexers=[stuck.url], retries=3, timeout=1) as client:
        began = loop.time()
        with pytest.raises(Timeout) as caught:
            await client.list_indices()
        took = loop.time() - began
    assert str(caught.value).startswith("no indexer answered within 1 s (gave up")
    assert 0.9 < took < 2.0, took

    # Beside a working one, the call succeeds after half the deadline at most.
    indexers = [stuck.url, fine.url]
    for seed in range(4):  # whichever the first pick is
        async with AsyncClient(indexers=indexers, timeout=2, rng=seed) as client:
            assert await client.list_indices() == ["songs"]
    hung.set()


async def test_a_refused_connection_is_unreachable() -> None:
    url = dead_url()
    async with AsyncClient(indexers=[url], retries=0) as client:
        with pytest.raises(Unreachable) as caught:
            await client.add_to_index("songs", "x")

    assert str(caught.value) == (f"indexer {url}: cannot connect (connection refused)")
    assert isinstance(caught.value.__cause__, Exception)


async def test_an_unknown_host_says_it_cannot_be_resolved() -> None:
    url = "http://no-such-host.invalid:7401"
    async with AsyncClient(indexers=[url], retries=0) as client:
        with pytest.raises(Unreachable) as caught:
            await client.list_indices()

    assert str(caught.value).startswith(
        f"indexer {url}: cannot resolve host 'no-such-host.invalid' ("
    ), caught.value


# -- read your writes: the version goes out on every path --------------------------


@pytest.mark.parametrize("path", ["routed", "proxy", "fallback"])
async def test_reads_carry_the_highest_version_written(
    fakes: Callable[[str, Handler], Awaitable[Fake]], path: str
) -> None:
    versions = iter(["00000000000000a0", "00000000000000b0", "000000000000009f"])

    async def answer(request: web.Request) -> web.Response:
        if request.method == "POST":
            return web.json_response({"added": 1, "version": next(versions)})
        return web.json_response({"indices": ["s"]})

    fake = await fakes("f1", answer)
    if path == "fallback":
        client = AsyncClient(balancers=[dead_url()], indexers=[fake.url])
    else:
        client = AsyncClient(balancers=[fake.url], mode=path)

    async with client:
        await client.list_indices()
        for _ in range(3):
            await client.add_to_index("s", "x")
        await client.list_indices()
        stats = await client.stats()

    sent = [r.headers.get("P2PLB-Min-Version") for r in fake.calls if r.method == "GET"]
    assert sent == [None, "00000000000000b0"]
    assert stats["min_version"] == "00000000000000b0"
    assert stats["in_fallback"] is (path == "fallback")
