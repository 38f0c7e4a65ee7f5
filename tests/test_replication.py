"""Replicated indices with real processes: durability, read-your-writes, catch-up."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from typing import Any

import aiohttp
import pytest

from p2plb.hlc import format_version
from procs import Proc, Procs, eventually, request

QUICK = (
    "--report-interval", "0.3s",
    "--membership-interval", "0.2s",
    "--anti-entropy-interval", "0.5s",
    "--sync-timeout", "5s",
)  # fmt: skip


async def start_cluster(
    procs: Procs, n: int, *extra: str, balancer_flags: tuple[str, ...] = ()
) -> tuple[Proc, dict[str, Proc]]:
    balancer = procs.balancer("balancer", "--probe-interval", "0.2s", *balancer_flags)
    indexers = {
        f"i{i}": procs.indexer(f"i{i}", "--balancer", balancer.url, *QUICK, *extra)
        for i in range(1, n + 1)
    }
    return balancer, indexers


async def serving(http: aiohttp.ClientSession, balancer: Proc, ids: set[str]) -> None:
    async def ready() -> bool:
        _, body, _ = await request(http, "GET", f"{balancer.url}/v1/status")
        rows = {r["id"]: r for r in body["indexers"]}
        return set(rows) == ids and all(
            r["healthy"] and r["state"] == "serving" for r in rows.values()
        )

    # A fresh cluster waits out --sync-timeout before it serves, and three
    # Python processes start slowly on a busy machine: room for both.
    await eventually(ready, within=30)


async def contents(http: aiohttp.ClientSession, url: str) -> dict[str, list[str]]:
    _, listed, _ = await request(http, "GET", f"{url}/v1/indices")
    result = {}
    for name in listed["indices"]:
        _, body, _ = await request(
            http, "GET", f"{url}/v1/indices/{name}", params={"limit": "10000"}
        )
        result[name] = body["items"]
    return result


async def converged(http: aiohttp.ClientSession, indexers: list[Proc]) -> None:
    async def same() -> bool:
        seen = [await contents(http, p.url) for p in indexers]
        return all(s == seen[0] for s in seen)

    await eventually(same, within=10)


async def add(http: aiohttp.ClientSession, url: str, index: str, items: Any) -> Any:
    status, body, headers = await request(
        http, "POST", f"{url}/v1/indices/{index}/items", json={"items": items}
    )
    assert status == 200, body
    return body, headers


async def test_acknowledged_writes_survive_kill_9_of_the_indexer_that_took_them(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await start_cluster(procs, 3)
    await serving(http, balancer, set(indexers))
    taker = indexers["i1"]

    written = [f"item-{n}" for n in range(100)]
    for item in written:  # one write each, acknowledged one by one
        await add(http, taker.url, "songs", [item])
    taker.kill()

    async def held(other: str) -> set[str]:
        url = f"{indexers[other].url}/v1/indices/songs?limit=1000"
        return set((await request(http, "GET", url))[1]["items"])

    # Each write was durable on two indexers when acknowledged: at the kill,
    # every one is on a survivor, though a push to the third may have been
    # in flight ...
    assert await held("i2") | await held("i3") == set(written)

    # ... and anti-entropy between the survivors fills that in.
    async def both() -> bool:
        return await held("i2") == await held("i3") == set(written)

    await eventually(both)


async def test_read_your_writes_through_the_proxy_on_every_write(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await start_cluster(procs, 3)
    await serving(http, balancer, set(indexers))
    url = balancer.url
    await request(http, "PUT", f"{url}/v1/strategy", json={"strategy": "round_robin"})

    readers: set[str] = set()
    for n in range(100):
        status, body, _ = await request(
            http, "POST", f"{url}/v1/indices/ryw/items", json={"item": f"x{n:03d}"}
        )
        assert status == 200
        status, body, headers = await request(
            http, "GET", f"{url}/v1/indices/ryw", params={"limit": "1000"}
        )
        assert status == 200, body
        assert f"x{n:03d}" in body["items"], (n, headers.get("P2PLB-Indexer"))
        readers.add(headers["P2PLB-Indexer"])
    assert readers == set(indexers)  # the reads really went everywhere


async def test_min_version_header_is_checked(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer("balancer", "--probe-interval", "0.2s")
    one = procs.indexer("i1", "--balancer", balancer.url, *QUICK, "--read-wait", "1s")
    # i2 waits at most a millisecond: too short for i1 to answer its call for
    # a heartbeat, so a version i1 has not promised yet is refused.
    two = procs.indexer("i2", "--balancer", balancer.url, *QUICK, "--read-wait", "1ms")
    await serving(http, balancer, {"i1", "i2"})
    two.wait_for(r"replication\.peer_added id=i1")
    body, _ = await add(http, one.url, "v", ["a"])
    ok = {"P2PLB-Min-Version": body["version"]}
    assert (await request(http, "GET", f"{one.url}/v1/indices/v", headers=ok))[0] == 200

    ahead = format_version((int(time.time() * 1000) + 30_000) << 16)
    status, answer, headers = await request(
        http, "GET", f"{two.url}/v1/indices/v", headers={"P2PLB-Min-Version": ahead}
    )
    assert (status, answer["error"]["code"]) == (503, "replica_behind")
    assert answer["error"]["message"] == (
        f"indexer i2 has not caught up to version {ahead} yet; try another indexer"
    )
    assert headers["Retry-After"] == "1"
    # i1 may wait: it asks i2 to tick past the version, and serves.
    status, _, _ = await request(
        http, "GET", f"{one.url}/v1/indices/v", headers={"P2PLB-Min-Version": ahead}
    )
    assert status == 200

    bad = {"P2PLB-Min-Version": "yesterday"}
    status, answer, _ = await request(
        http, "GET", f"{one.url}/v1/indices/v", headers=bad
    )
    assert (status, answer["error"]["code"]) == (400, "invalid_field")
    assert answer["error"]["message"].startswith("P2PLB-Min-Version: ")


async def test_a_lone_indexer_acknowledges_alone(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await start_cluster(procs, 1)
    await serving(http, balancer, {"i1"})
    body, _ = await add(http, balancer.url, "solo", ["a", "b"])
    assert body["added"] == 2
    indexers["i1"].wait_for(r"replication\.serving id=i1 reason=no peer")


async def test_writes_while_an_indexer_is_down_then_catch_up(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await start_cluster(procs, 3)
    await serving(http, balancer, set(indexers))
    await add(http, indexers["i1"].url, "a", ["before"])
    await converged(http, list(indexers.values()))

    indexers["i3"].kill()
    items = [f"while-down-{n}" for n in range(300)]
    for start in range(0, 300, 50):
        await add(http, indexers["i1"].url, "a", items[start : start + 50])
    await request(
        http, "POST", f"{indexers['i2'].url}/v1/indices/a/items/remove",
        json={"item": "before"},
    )  # fmt: skip

    indexers["i3"].start()
    indexers["i3"].wait_for(r"replication\.serving id=i3 reason=caught up with i[12]")
    await converged(http, list(indexers.values()))
    final = await contents(http, indexers["i3"].url)
    assert final == {"a": sorted(items)}


async def test_a_new_empty_indexer_joins_a_populated_cluster(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await start_cluster(procs, 2)
    await serving(http, balancer, set(indexers))
    for index in ("x", "y", "z"):
        await add(http, balancer.url, index, [f"{index}{n}" for n in range(200)])

    newcomer = procs.indexer("i9", "--balancer", balancer.url, *QUICK)
    newcomer.wait_for(r"replication\.serving id=i9 reason=caught up with i[12]")

    assert await contents(http, newcomer.url) == await contents(
        http, indexers["i1"].url
    )


async def test_concurrent_add_and_remove_of_one_item_end_the_same_everywhere(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await start_cluster(procs, 2)
    await serving(http, balancer, set(indexers))
    one, two = indexers["i1"].url, indexers["i2"].url

    async def churn(url: str, path: str, n: int) -> None:
        await request(
            http, "POST", f"{url}/v1/indices/c/{path}", json={"item": f"k{n}"}
        )

    await add(http, one, "c", ["keep"])
    await asyncio.gather(
        *(churn(one, "items", n) for n in range(50)),
        *(churn(two, "items/remove", n) for n in range(50)),
    )
    await converged(http, list(indexers.values()))
    final = await contents(http, one)
    assert "keep" in final["c"]


@pytest.mark.slow
async def test_a_removal_stays_removed_after_a_long_absent_peer_returns(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await start_cluster(procs, 3)
    await serving(http, balancer, set(indexers))
    items = [f"r{n}" for n in range(50)]
    await add(http, indexers["i1"].url, "r", items)
    await converged(http, list(indexers.values()))

    indexers["i3"].kill()  # holds every item as present
    status, _, _ = await request(
        http, "POST", f"{indexers['i1'].url}/v1/indices/r/items/remove",
        json={"items": items[:25]},
    )  # fmt: skip
    assert status == 200
    await asyncio.sleep(1.5)  # several anti-entropy rounds without it

    indexers["i3"].start()
    indexers["i3"].wait_for(r"replication\.serving id=i3")
    await converged(http, list(indexers.values()))
    await asyncio.sleep(1.5)  # and it stays that way
    for proc in indexers.values():
        assert await contents(http, proc.url) == {"r": sorted(items[25:])}


async def test_insufficient_replicas_when_no_second_copy_is_possible(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # Probes slow: the balancer keeps the dead indexer registered.
    balancer = procs.balancer("balancer", "--probe-interval", "1h")
    flags = (*QUICK, "--write-timeout", "0.5s")
    one = procs.indexer("i1", "--balancer", balancer.url, *flags)
    two = procs.indexer("i2", "--balancer", balancer.url, *flags)
    await serving(http, balancer, {"i1", "i2"})
    one.wait_for(r"replication\.peer_added id=i2")  # i1 counts on a second copy
    two.kill()

    status, body, _ = await request(
        http, "POST", f"{one.url}/v1/indices/d/items", json={"item": "lonely"}
    )
    assert (status, body["error"]["code"]) == (503, "insufficient_replicas")
    assert body["error"]["message"] == (
        "the write is durable on 1 of the 2 indexers required; it may still apply later"
    )


def tombstones(proc: Proc) -> int:
    path = proc.workdir / f"data-{proc.name}" / "index.sqlite3"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        count: int = conn.execute(
            "SELECT count(*) FROM entries WHERE present = 0"
        ).fetchone()[0]
    return count


@pytest.mark.slow
async def test_tombstones_go_after_the_grace_and_an_absent_peer_resyncs(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # The balancer forgets a dead indexer within about a second, so the others
    # may drop tombstones it never saw; when it returns it must not bring the
    # removed items back.
    balancer = procs.balancer(
        "balancer", "--probe-interval", "0.2s", "--unhealthy-after", "1s",
        "--forget-after", "1s",
    )  # fmt: skip
    flags = (*QUICK, "--tombstone-grace", "2s")
    indexers = {
        f"i{n}": procs.indexer(f"i{n}", "--balancer", balancer.url, *flags)
        for n in (1, 2, 3)
    }
    await serving(http, balancer, set(indexers))
    items = [f"t{n}" for n in range(20)]
    await add(http, indexers["i1"].url, "t", items)
    await converged(http, list(indexers.values()))

    indexers["i3"].kill()
    await request(
        http, "POST", f"{indexers['i1'].url}/v1/indices/t/items/remove",
        json={"items": items[:10]},
    )  # fmt: skip
    for proc in (indexers["i1"], indexers["i2"]):
        proc.wait_for(r"replication\.tombstones_dropped count=10", timeout=20)

    # One may pull a tombstone back from the other before that one dropped it
    # too; it goes again on its next round.
    async def dropped() -> bool:
        return tombstones(indexers["i1"]) == tombstones(indexers["i2"]) == 0

    await eventually(dropped, within=10)

    indexers["i3"].start()
    indexers["i3"].wait_for(r"replication\.discarding away_s=\d+ grace_s=2")
    indexers["i3"].wait_for(r"replication\.serving id=i3 reason=caught up")
    await converged(http, list(indexers.values()))
    for proc in indexers.values():
        assert await contents(http, proc.url) == {"t": sorted(items[10:])}


async def test_a_far_future_min_version_is_refused_and_changes_nothing(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # Found by a new user: one read asking for version 8000000000000000 moved
    # a peer's clock to the end of its range and every write failed after it.
    balancer, indexers = await start_cluster(procs, 2)
    await serving(http, balancer, set(indexers))
    indexers["i1"].wait_for(r"replication\.peer_added id=i2")

    for url in (indexers["i1"].url, balancer.url):
        status, body, _ = await request(
            http,
            "GET",
            f"{url}/v1/indices/x",
            headers={"P2PLB-Min-Version": "8000000000000000"},
        )
        assert (status, body["error"]["code"]) == (400, "invalid_field")
        assert body["error"]["message"] == (
            "P2PLB-Min-Version: 8000000000000000 lies more than 60 s ahead of "
            "this indexer's clock; no write can have been given it"
        )

    for proc in indexers.values():
        reply, _ = await add(http, proc.url, "after", [proc.name])
        assert reply["added"] == 1
        status, health, _ = await request(http, "GET", f"{proc.url}/healthz")
        assert (status, health["status"]) == (200, "ok")


def saved_states(balancer: Proc) -> dict[str, str]:
    """The state of each indexer in the balancer's state file."""
    path = balancer.workdir / f"{balancer.name}-state.json"
    try:
        rows = json.loads(path.read_text())["registry"]["indexers"]
    except (OSError, ValueError):
        return {}
    return {row["id"]: row["state"] for row in rows}


SERVING = re.compile(
    r"^(\S+) INFO p2plb\.replication replication\.serving id=\S+ reason=(.*)$",
    re.MULTILINE,
)


async def test_a_whole_cluster_restarted_at_once_takes_no_syncing_source(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # Found in a log: after kill -9 of the whole cluster, the balancer, restored
    # from its state file, still listed every indexer as serving, and an
    # indexer "caught up" with a peer that was itself still catching up.
    # Member lists refreshed seldom: each indexer keeps the balancer's first
    # word on its peers for the whole of its catch-up.
    balancer, indexers = await start_cluster(
        procs, 3,
        "--report-interval", "5s",
        "--membership-interval", "5s",
        "--sync-timeout", "3s",
        balancer_flags=("--persist-interval", "0.2s"),
    )  # fmt: skip
    await serving(http, balancer, set(indexers))
    items = [f"s{n}" for n in range(30)]
    await add(http, indexers["i1"].url, "songs", items)

    async def saved() -> bool:
        return saved_states(balancer) == dict.fromkeys(indexers, "serving")

    await eventually(saved)
    for proc in [balancer, *indexers.values()]:
        proc.kill()
        proc.keep_port()

    balancer.start()
    balancer.wait_for(r"state\.restored path=\S+ indexers=3")
    for proc in indexers.values():
        proc.spawn()
    for proc in indexers.values():
        proc.wait_started()

    served: dict[str, tuple[str, str]] = {}
    for name, proc in indexers.items():
        match = proc.wait_for(SERVING, timeout=15)
        served[name] = (match.group(1), match.group(2))
    for name, (at, reason) in served.items():
        source = re.fullmatch(r"caught up with (\S+) \(\d+ operations\)", reason)
        if source is None:
            assert reason == "sync timeout", (name, served)
        else:  # the source served before it was taken as one
            assert served[source.group(1)][0] <= at, (name, served)
    async with aiohttp.ClientSession() as fresh:  # the old connections are dead
        await converged(fresh, list(indexers.values()))
        assert await contents(fresh, indexers["i3"].url) == {"songs": sorted(items)}


async def test_an_idle_cluster_does_not_write_to_disk(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # Found with --log-level debug: each idle indexer committed (one fsync
    # each) 5 to 15 times a second, for heartbeats that changed nothing.  Each
    # commit logs storage.committed at DEBUG; each push received is logged by
    # the access log at DEBUG too.
    _, indexers = await start_cluster(procs, 3, "--log-level", "debug")
    await add(http, indexers["i1"].url, "songs", ["a", "b"])
    await converged(http, list(indexers.values()))
    await asyncio.sleep(1.0)  # the last watermarks settle, by heartbeats

    def counts(pattern: str) -> dict[str, int]:
        return {n: len(re.findall(pattern, p.log())) for n, p in indexers.items()}

    commits, pushes = counts("storage.committed"), counts("POST /internal/v1/push")
    await asyncio.sleep(3.0)

    assert counts("storage.committed") == commits
    heard = counts("POST /internal/v1/push")
    assert all(heard[n] >= pushes[n] + 10 for n in indexers), (pushes, heard)


async def test_an_indexer_is_never_its_own_second_copy(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer, indexers = await start_cluster(procs, 2)
    await serving(http, balancer, set(indexers))
    one, two = indexers["i1"], indexers["i2"]
    # A stale entry under another id at i1's own address, as left by the
    # port's previous process: i1's probes keep it healthy.
    stale = {"id": "old", "address": one.url, "capacity": 64}
    status, _, _ = await request(
        http, "POST", f"{balancer.url}/v1/indexers", json=stale
    )
    assert status == 201
    one.wait_for(r"replication\.self_listed id=old address=\S+: registered at this")

    # With i2 stopped, only i1 holds a write: it must not count the stale
    # entry (itself) as the second copy.
    two.kill()
    status, body, _ = await request(
        http, "POST", f"{one.url}/v1/indices/solo/items", json={"item": "x"}
    )
    assert (status, body["error"]["code"]) == (503, "insufficient_replicas"), body
    assert "replication.peer_added id=old" not in one.log()

    # A push from an indexer to itself is refused, whatever led it there.
    push = {"origin": "i1", "ops": [], "upto": 1}
    status, body, _ = await request(
        http, "POST", f"{one.url}/internal/v1/push", json=push
    )
    assert (status, body["error"]["code"]) == (508, "loop_detected"), body
