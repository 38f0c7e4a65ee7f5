"""``p2plb.Client`` and ``p2plb.AsyncClient`` against real balancer and indexer
processes: every method, both modes, fallback and return, read your writes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

import p2plb.client as client_module
from p2plb import AsyncClient, Client
from p2plb.errors import NoHealthyIndexer, RequestError, Unreachable, UsageError
from p2plb.wire import encode
from procs import Proc, Procs

FAST = ("--report-interval", "0.3s")
MODES = ["routed", "proxy"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def dead_url() -> str:
    """A loopback address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def wait_until(check: Callable[[], bool], within: float = 15.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > within:
            raise AssertionError(f"condition not met within {within}s")
        time.sleep(0.05)
    return time.monotonic() - started


def serving(balancer: Proc, n: int) -> None:
    """Wait until the balancer's table lists ``n`` healthy serving indexers."""

    def ready() -> bool:
        with urllib.request.urlopen(f"{balancer.url}/v1/routing-table") as answer:
            rows = json.load(answer)["indexers"]
        return len(rows) == n and all(
            r["healthy"] and r["state"] == "serving" for r in rows
        )

    wait_until(ready)


def cluster(procs: Procs, n: int, *balancer_flags: str) -> tuple[Proc, list[Proc]]:
    balancer = procs.balancer("balancer", *balancer_flags)
    indexers = [
        procs.indexer(f"i{k}", "--balancer", balancer.url, *FAST)
        for k in range(1, n + 1)
    ]
    serving(balancer, n)
    return balancer, indexers


# -- every method ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_sync_client_every_method(procs: Procs, mode: str) -> None:
    balancer, _ = cluster(procs, 1)

    with Client(balancers=[balancer.url], mode=mode, rng=1, page_size=2) as client:
        assert client.add_to_index("songs", "peer-17") == 1
        assert client.add_to_index("songs", "peer-17") == 0
        assert client.add_to_index("songs", ["b", "a", "peer-17", "c"]) == 3
        assert client.get_index("songs") == ["a", "b", "c", "peer-17"]  # 2 pages
        assert client.remove_from_index("songs", "a") == 1
        assert client.remove_from_index("songs", ["a", "zz", "b"]) == 1
        assert client.get_index("songs") == ["c", "peer-17"]
        assert client.get_index("missing") is None
        assert client.add_to_index("albums", "x") == 1
        assert client.list_indices() == ["albums", "songs"]

        assert client.lb_add_to_index("albums", ["y"]) == 1
        assert client.lb_remove_from_index("albums", "x") == 1
        assert client.lb_get_index("albums") == ["y"]
        assert client.lb_list_indices() == ["albums", "songs"]

        stats = client.stats()
    version = stats.pop("min_version")
    assert isinstance(version, str) and len(version) == 16
    assert stats == {
        "mode": mode,
        "balancer": balancer.url,
        "balancers": [balancer.url],
        "in_fallback": False,
        "fallbacks": 0,
        "retries": 0,
        "requests": {"i1": 15},
        "errors": {},
        "avoided": {},
        "table_version": stats["table_version"],
        "table_source": "balancer",
        "strategy": "least_load",
    }
    assert isinstance(stats["table_version"], int)


@pytest.mark.parametrize("mode", MODES)
def test_names_and_items_with_reserved_url_characters(procs: Procs, mode: str) -> None:
    balancer, _ = cluster(procs, 1)
    name, items = "a b?c#d%20é", ["x&y=z", "q?r", "50%", "naïve/slash"]

    with Client(balancers=[balancer.url], mode=mode, page_size=1) as client:
        assert client.add_to_index(name, items) == 4
        assert client.get_index(name) == sorted(items)
        assert client.list_indices() == [name]


@pytest.mark.parametrize("mode", MODES)
def test_batches_beyond_one_request_go_as_several(procs: Procs, mode: str) -> None:
    balancer, indexers = cluster(procs, 1)
    many = [f"item-{n:05d}" for n in range(25_000)]  # 10,000 a request at most
    large = [f"{n:03d}" + "x" * 4000 for n in range(300)]  # 1.2 MB of JSON

    with Client(balancers=[balancer.url], mode=mode) as client:
        assert client.add_to_index("many", many) == 25_000
        assert client.add_to_index("large", large) == 300
        assert client.get_index("many") == many
        assert client.get_index("large") == large
        assert client.remove_from_index("many", many[::2]) == 12_500
        assert client.get_index("many") == many[1::2]
        requests = client.stats()["requests"]["i1"]

    # 3 + 3 writes, 25 + 1 pages, 2 removes, 13 pages.
    assert requests == 6 + 26 + 2 + 13


@given(
    st.lists(
        st.text(min_size=1, max_size=300).filter(lambda t: "\x00" not in t),
        min_size=1,
        max_size=60,
    ),
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=50, max_value=4000),
)
def test_batches_keep_every_item_in_order_within_both_limits(
    items: list[str], max_items: int, max_bytes: int
) -> None:
    with (
        mock.patch.object(client_module, "MAX_BATCH_ITEMS", max_items),
        mock.patch.object(client_module, "BATCH_BYTES", max_bytes),
    ):
        batches = list(client_module._batches(items))

    assert [item for batch in batches for item in batch] == items
    for batch in batches:
        assert 1 <= len(batch) <= max_items
        size = sum(len(encode(item)) + 1 for item in batch)
        assert size <= max_bytes or len(batch) == 1


async def test_async_client_every_method(procs: Procs) -> None:
    balancer, _ = cluster(procs, 1)
    other = procs.balancer("other")

    async with AsyncClient(balancers=[dead_url()], rng=2) as client:
        with pytest.raises(Unreachable, match="^no balancer answered"):
            await client.list_indices()
        await client.set_load_balancer([other.url, balancer.url])
        assert await client.add_to_index("songs", ["b", "a"]) == 2
        assert await client.remove_from_index("songs", "b") == 1
        assert await client.get_index("songs") == ["a"]
        assert await client.get_index("nothing") is None
        assert await client.list_indices() == ["songs"]
        assert await client.lb_add_to_index("songs", "c") == 1
        assert await client.lb_remove_from_index("songs", ["c"]) == 1
        assert await client.lb_get_index("songs") == ["a"]
        assert await client.lb_list_indices() == ["songs"]
        stats = await client.stats()

    # "other" knows no indexer, so the client kept to the one that does.
    assert stats["balancer"] == balancer.url
    assert stats["balancers"] == [other.url, balancer.url]
    assert (stats["in_fallback"], stats["fallbacks"]) == (False, 1)
    assert stats["requests"] == {"i1": 9}
    with pytest.raises(UsageError, match="this client is closed; create a new one"):
        await client.list_indices()


# -- errors ------------------------------------------------------------------------

BAD_CALLS: list[tuple[str, tuple[Any, ...], str]] = [
    ("add_to_index", ("a/b", "x"), "index: must not contain '/'"),
    ("add_to_index", ("", "x"), "index: must not be empty"),
    ("get_index", ("a\x07",), "index: must not contain control characters"),
    ("add_to_index", ("s", ""), "item: must not be empty"),
    ("add_to_index", ("s", []), "items: must hold at least one item"),
    ("add_to_index", ("s", ["ok", 3]), "items: must be strings, got int"),
    (
        "remove_from_index",
        ("s", "x" * 4097),
        "item: must be at most 4096 bytes of UTF-8, got 4097",
    ),
    ("get_index", (123,), "index: must be a str, got int"),
    ("add_to_index", (None, "x"), "index: must be a str, got NoneType"),
    ("add_to_index", ("s", 5), "item: must be a str or a list of str, got int"),
    ("add_to_index", ("s", None), "item: must be a str or a list of str, got NoneType"),
    ("add_to_index", ("s", b"x"), "item: must be a str, got bytes; decode it first"),
    ("remove_from_index", ("s", [b"x"]), "items: must be strings, got bytes"),
]


@pytest.mark.parametrize(("method", "args", "message"), BAD_CALLS)
def test_bad_arguments_are_refused_before_any_network(
    method: str, args: tuple[Any, ...], message: str
) -> None:
    with Client(balancers=[dead_url()]) as client:
        with pytest.raises(RequestError) as caught:
            getattr(client, method)(*args)
        stats = client.stats()

    assert (caught.value.status, caught.value.code) == (400, "invalid_field")
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, UsageError)
    assert (stats["table_source"], stats["fallbacks"]) == ("none", 0), "never started"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mode": "fast"}, 'mode: must be "routed" or "proxy", got \'fast\''),
        (
            {"balancers": ["localhost"]},
            "balancers: must be http://host:port or https://host:port, got 'localhost'",
        ),
        ({"balancers": []}, "balancers: give at least one balancer or indexer URL"),
        ({"retries": -1}, "retries: must be 0 or more, got -1"),
        ({"timeout": 0}, "timeout: must be more than 0 seconds, got 0"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    arguments = {"balancers": ["http://127.0.0.1:7400"]} | options
    with pytest.raises(RequestError, match="^" + message.replace("(", r"\(")):
        Client(**arguments)


@pytest.mark.parametrize("mode", MODES)
def test_no_indexer_at_all_is_no_healthy_indexer(procs: Procs, mode: str) -> None:
    balancer = procs.balancer("balancer")

    with Client(balancers=[balancer.url], mode=mode) as client:
        with pytest.raises(NoHealthyIndexer) as caught:
            client.get_index("songs")
        assert client.stats()["retries"] == 0

    if mode == "routed":
        expected = (
            "no healthy indexer: 0 of 0 in the routing table "
            "(routing table version 0, 0 indexers)"
        )
    else:
        expected = (
            f"balancer {balancer.url}: no healthy indexer: "
            "0 of 0 registered are healthy"
        )
    assert str(caught.value) == expected


def test_no_balancer_and_no_indexers_is_unreachable() -> None:
    url = dead_url()
    with Client(balancers=[url]) as client, pytest.raises(Unreachable) as caught:
        client.list_indices()

    assert str(caught.value) == (
        f"no balancer answered (balancer {url}: cannot connect (connection "
        "refused)) and no indexers were given to call directly (indexers=[...], "
        "or --indexer)"
    )


# -- fallback ----------------------------------------------------------------------


def test_indexers_given_work_when_no_balancer_is_ever_reachable(procs: Procs) -> None:
    indexer = procs.indexer("i1")

    with Client(balancers=[dead_url()], indexers=[indexer.url]) as client:
        assert client.add_to_index("songs", ["a", "b"]) == 2
        assert client.get_index("songs") == ["a", "b"]
        stats = client.stats()
    with Client(indexers=[indexer.url]) as client:
        assert client.list_indices() == ["songs"]
        alone = client.stats()

    assert (stats["in_fallback"], stats["fallbacks"]) == (True, 1)
    assert stats["table_source"] == "indexers"
    assert stats["requests"] == {indexer.url: 2}
    assert (alone["balancer"], alone["in_fallback"]) == (None, True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_killed_balancer_loses_no_call_and_the_client_returns(
    procs: Procs, mode: str
) -> None:
    port = free_port()
    balancer, _ = cluster(procs, 2, "--port", str(port))
    failed: list[BaseException] = []
    calls = 0

    def some_calls(client: Client, n: int) -> None:
        nonlocal calls
        for _ in range(n):
            calls += 1
            try:
                client.add_to_index("songs", f"item-{calls}")
                client.get_index("songs")
            except Exception as exc:
                failed.append(exc)

    with Client(balancers=[balancer.url], mode=mode, rng=3) as client:
        some_calls(client, 5)
        balancer.kill()
        some_calls(client, 5)

        def fell_back() -> bool:
            some_calls(client, 1)
            return bool(client.stats()["in_fallback"])

        wait_until(fell_back, within=5)
        again = procs.balancer("balancer", "--port", str(port))
        assert again.url == balancer.url

        def returned() -> bool:
            some_calls(client, 1)
            return not client.stats()["in_fallback"]

        took = wait_until(returned, within=8)
        some_calls(client, 5)
        stats = client.stats()

    assert failed == []
    assert took < 6
    assert (stats["fallbacks"], stats["balancer"]) == (1, balancer.url)
    assert sum(stats["requests"].values()) >= 2 * calls


# -- read your writes ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_every_read_sees_the_write_before_it(procs: Procs, mode: str) -> None:
    # 100 write-then-read pairs, in 10 streams of 10 sharing one client; round
    # robin sends most reads to an indexer other than the one that took the
    # write, which must catch up to the version the client sends.
    balancer, _ = cluster(procs, 3, "--strategy", "round_robin")
    missing: list[str] = []

    async with AsyncClient(balancers=[balancer.url], mode=mode, rng=4) as client:

        async def stream(s: int) -> None:
            for k in range(10):
                item = f"item-{s}-{k}"
                await client.add_to_index("ryw", item)
                if item not in (await client.get_index("ryw") or []):
                    missing.append(item)

        await asyncio.gather(*(stream(s) for s in range(10)))
        stats = await client.stats()

    assert missing == []
    assert len(stats["requests"]) == 3, "all three indexers served"


async def test_concurrent_calls_share_one_client(procs: Procs) -> None:
    balancer, _ = cluster(procs, 2)

    async with AsyncClient(balancers=[balancer.url]) as client:
        added = await asyncio.gather(
            *(client.add_to_index("many", f"x{k}") for k in range(50))
        )
        assert sum(added) == 50
        assert len(await client.get_index("many") or []) == 50


async def test_fifty_real_clients_on_a_fresh_table_spread_their_reads(
    procs: Procs,
) -> None:
    balancer, indexers = cluster(procs, 3)
    async with AsyncClient(balancers=[balancer.url]) as writer:
        await writer.add_to_index("herd", "x")

    def served() -> list[int]:
        counts = []
        for indexer in indexers:
            with urllib.request.urlopen(f"{indexer.url}/v1/load") as answer:
                counts.append(json.load(answer)["served"])
        return counts

    before = served()
    # Fifty processes' worth of clients, each with its own table fetched at
    # start, each making one read: all see the same loads, yet must not all
    # pick the same indexer.
    clients = [AsyncClient(balancers=[balancer.url]) for _ in range(50)]
    try:
        reads = await asyncio.gather(*(c.get_index("herd") for c in clients))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    assert reads == [["x"]] * 50

    shares = [after - then for after, then in zip(served(), before, strict=True)]
    assert sum(shares) == 50, shares
    assert max(shares) <= 2 * 50 / 3, shares  # at most twice the fair share
