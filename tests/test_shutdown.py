"""SIGTERM with real processes: the steps of a clean stop, then a prompt exit.

design.md: an indexer unregisters, keeps serving for its drain period, then
stops; a balancer saves its state.  Once the last step is logged, nothing may
hold the process: no task, thread, session or executor left behind.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time

import aiohttp

from procs import Proc, Procs, request

DRAIN = 1.0
MARGIN = 1.0  # for the stop's own steps and a loaded machine; no tight timing


def stop_and_time(proc: Proc) -> float:
    """SIGTERM, then the seconds until the process has exited."""
    assert proc.popen is not None
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    proc.popen.wait(30)
    return time.monotonic() - started


def events(proc: Proc, names: tuple[str, ...]) -> list[str]:
    """The events among ``names`` in the order the process logged them."""
    pattern = "|".join(re.escape(name) for name in names)
    return re.findall(rf"\b({pattern})\b", proc.log())


async def test_an_indexer_exits_right_after_its_drain(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer("balancer", "--probe-interval", "0.2s")
    flags = ("--balancer", balancer.url, "--drain-period", f"{DRAIN}s")
    one = procs.indexer("i1", *flags, "--report-interval", "0.3s")
    procs.indexer("i2", *flags)  # a peer: push streams, sessions, pulls
    one.wait_for(r"replication\.peer_added id=i2")
    status, _, _ = await request(
        http, "POST", f"{one.url}/v1/indices/x/items", json={"item": "a"}
    )
    assert status == 200  # and the connection stays open (keep-alive)

    took = stop_and_time(one)

    steps = ("server.signal", "reporter.unregistered", "indexer.draining")
    steps += ("storage.closed", "indexer.stopped")
    assert events(one, steps) == list(steps)
    assert one.popen is not None and one.popen.returncode == 0
    assert DRAIN <= took < DRAIN + MARGIN, took


async def test_an_idle_balancer_exits_at_once(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    balancer = procs.balancer("balancer", "--probe-interval", "0.2s")
    indexer = procs.indexer("i1", "--balancer", balancer.url)
    indexer.wait_for(r"reporter\.registered")
    await request(http, "GET", f"{balancer.url}/v1/status")

    took = stop_and_time(balancer)

    steps = ("server.signal", "balancer.stopped")
    assert events(balancer, steps) == list(steps)
    assert balancer.popen is not None and balancer.popen.returncode == 0
    assert took < MARGIN, took


async def test_a_request_in_flight_at_sigterm_is_answered_and_kept(
    procs: Procs, http: aiohttp.ClientSession
) -> None:
    # The benchmark service model holds each write's slot for about 2 s.
    indexer = procs.indexer("i1", "--service-time", "2s", "--shutdown-timeout", "60s")
    url = f"{indexer.url}/v1/indices/t/items"
    for attempt in range(20):
        item = f"late-{attempt}"
        write = asyncio.ensure_future(request(http, "POST", url, json={"item": item}))
        # In flight once the indexer counts it as serving; a draw too short to
        # be seen is simply tried again.
        while not write.done():
            load = (await request(http, "GET", f"{indexer.url}/v1/load"))[1]
            if load["serving"] == 1:
                break
            await asyncio.sleep(0.01)
        if not write.done():
            break
        await write
    else:
        raise AssertionError("no write was ever seen in flight")

    indexer.signal(signal.SIGTERM)
    status, body, _ = await write
    assert (status, body["added"]) == (200, 1), body
    assert indexer.popen is not None and indexer.popen.wait(60) == 0
    log = indexer.log()
    assert log.index("server.signal") < log.index("indexer.stopped")

    indexer.start()  # the same data directory
    status, got, _ = await request(http, "GET", f"{indexer.url}/v1/indices/t")
    assert status == 200 and item in got["items"], got
