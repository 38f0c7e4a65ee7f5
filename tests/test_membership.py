"""Indexers find their way back: after a 404, a balancer restart, a replacement.

Real ``p2plb balancer`` and ``p2plb indexer`` processes on loopback.  The
balancer's port is fixed for each test, so that a restarted balancer is found
again at the address the indexers were given.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from typing import Any

import aiohttp

from procs import Proc, Procs, eventually, request

FAST = ("--report-interval", "0.3s", "--membership-interval", "0.2s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def listed(http: aiohttp.ClientSession, balancer: Proc) -> dict[str, str]:
    status, body, _ = await request(http, "GET", f"{balancer.url}/v1/indexers")
    assert status == 200
    return {entry["id"]: entry["address"] for entry in body["indexers"]}


async def test_an_indexer_the_balancer_forgot_registers_again(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer()
    indexer = procs.indexer("i1", "--balancer", balancer.url, *FAST)

    async def back() -> bool:
        return await listed(http, balancer) == {"i1": indexer.url}

    await eventually(back, within=10)
    assert (await request(http, "DELETE", f"{balancer.url}/v1/indexers/i1"))[0] == 204
    assert await listed(http, balancer) == {}

    # Its next report gets 404, and it registers again at once.
    await eventually(back, within=10)
    indexer.wait_for(r"reporter\.registered balancer=\S+ id=i1 .* new=True")


async def test_indexers_register_again_with_a_restarted_balancer(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    balancer = procs.balancer("balancer", "--port", str(port))
    indexers = [
        procs.indexer(f"i{n}", "--balancer", balancer.url, *FAST) for n in (1, 2)
    ]
    expected = {proc.name: proc.url for proc in indexers}

    async def all_listed() -> bool:
        return await listed(http, balancer) == expected

    await eventually(all_listed, within=10)

    # Killed, state file gone: the new balancer knows nobody until they report.
    balancer.kill()
    (procs.workdir / "balancer-state.json").unlink(missing_ok=True)
    balancer = procs.balancer("balancer", "--port", str(port))
    assert await listed(http, balancer) == {}
    await eventually(all_listed, within=10)


async def test_a_replaced_indexer_is_told_and_stops_reporting(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer()
    old = procs.indexer("i1", "--balancer", balancer.url, *FAST)

    async def registered() -> bool:
        return "i1" in await listed(http, balancer)

    await eventually(registered, within=10)

    # Another process registers with the same id elsewhere: a restart on
    # another host.  The old one's next report is refused and it says so.
    elsewhere = {"id": "i1", "address": "http://127.0.0.1:9", "capacity": 1,
                 "instance": "the-new-one"}  # fmt: skip
    status, _, _ = await request(
        http, "POST", f"{balancer.url}/v1/indexers", json=elsewhere
    )
    assert status == 200
    old.wait_for(
        r"ERROR p2plb\.reporter reporter\.superseded balancer=\S+ id=i1 "
        r"address=\S+: another indexer registered with this id"
    )
    assert await listed(http, balancer) == {"i1": "http://127.0.0.1:9"}
    # Absence takes waiting: three report intervals without another attempt.
    await asyncio.sleep(1.0)
    assert await listed(http, balancer) == {"i1": "http://127.0.0.1:9"}
    assert old.log().count("reporter.superseded") == 1


async def test_a_balancer_restored_from_before_a_restart_in_place_keeps_it(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # The state file holds x1's first process; x1 is killed and restarted at
    # the same address, registers again, and the balancer is killed before it
    # saves that.  Restored, it must not tell the live process it was replaced.
    port, indexer_port = free_port(), free_port()
    balancer = procs.balancer(
        "balancer", "--port", str(port), "--persist-interval", "0.1s"
    )
    state = procs.workdir / "balancer-state.json"
    at = ("--port", str(indexer_port), "--balancer", balancer.url, *FAST)
    indexer = procs.indexer("x1", *at)

    def saved_instance() -> str | None:
        rows = json.loads(state.read_bytes())["registry"]["indexers"]
        return rows[0]["instance"] if rows else None

    async def saved() -> bool:
        return saved_instance() is not None

    await eventually(saved, within=10)
    first_state = state.read_bytes()

    indexer.kill()
    indexer = procs.indexer("x1", *at)
    indexer.wait_for(r"reporter\.registered balancer=\S+ id=x1 .* new=False")
    balancer.kill()
    # The saves since (the restart in place among them) never happened.
    state.write_bytes(first_state)
    balancer = procs.balancer(
        "balancer", "--port", str(port), "--persist-interval", "1h"
    )
    balancer.wait_for(r"state\.restored path=\S+ indexers=1 ")

    async def row() -> dict[str, Any]:
        status = (await request(http, "GET", f"{balancer.url}/v1/status"))[1]
        found: dict[str, Any] = status["indexers"][0]
        return found

    async def reported() -> bool:
        assert "reporter.superseded" not in indexer.log(), indexer.log()
        return (await row())["last_report_age_s"] is not None

    await eventually(reported, within=10)
    balancer.wait_for(
        rf"indexer\.instance_changed id=x1 address={indexer.url}; restarted in place"
    )
    await asyncio.sleep(1.0)  # absence takes waiting: about three reports
    assert "reporter.superseded" not in indexer.log()
    now = await row()
    assert (now["id"], now["healthy"], now["state"]) == ("x1", True, "serving")
    assert now["last_report_age_s"] < 1.0

    # And it can still leave: its DELETE names its address.
    assert indexer.stop() == 0
    indexer.wait_for(r"reporter\.unregistered balancer=\S+ status=204")
    assert await listed(http, balancer) == {}


def p2plb(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2plb", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_a_strategy_change_reaches_the_balancers_that_answer(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer()
    dead = f"http://127.0.0.1:{free_port()}"

    changed = p2plb("strategy", "p2c", "--balancer", balancer.url, "--balancer", dead)

    assert changed.returncode == 1
    assert changed.stdout == f"{balancer.url}  p2c\n"
    assert changed.stderr == (
        f"p2plb: error: balancer {dead}: cannot connect (connection refused)\n"
    )
    status, body, _ = await request(http, "GET", f"{balancer.url}/v1/strategy")
    assert (status, body) == (200, {"strategy": "p2c"})


async def test_peers_are_the_union_of_what_every_balancer_lists(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    first, second = procs.balancer("b1"), procs.balancer("b2")
    joined = ("--balancer", first.url, "--balancer", second.url, *FAST)
    one = procs.indexer("i1", *joined)
    two = procs.indexer("i2", *joined)

    async def both_listed() -> bool:
        names = {"i1", "i2"}
        return (
            set(await listed(http, first)) == set(await listed(http, second)) == names
        )

    await eventually(both_listed, within=10)
    one.wait_for(r"replication\.peer_added id=i2 ")

    # i2 stops (so it cannot register again) and the second balancer alone
    # forgets it.  i1 hears both lists many times over: the first still lists
    # i2, so i2 stays its peer and its stream is not dropped and re-added.
    two.signal(signal.SIGSTOP)
    try:
        status, _, _ = await request(http, "DELETE", f"{second.url}/v1/indexers/i2")
        assert status == 204
        assert set(await listed(http, second)) == {"i1"}
        await asyncio.sleep(2.0)  # absence takes waiting: about 6 reports each
        assert "replication.peer_removed id=i2" not in one.log()

        # Once no balancer lists it, it is no peer any more.
        status, _, _ = await request(http, "DELETE", f"{first.url}/v1/indexers/i2")
        assert status == 204
        one.wait_for(r"replication\.peer_removed id=i2", timeout=10)
    finally:
        two.signal(signal.SIGCONT)
