"""Catch-up on start: only a peer that says it is serving counts as a source.

The peer here is a stand-in served in this process, so that what it says of
itself is the test's choice; the balancer's member list calls it serving in
every case, as a balancer restored from an old state file would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from loopback import serve
from p2plb.peers import Peer, Refused
from p2plb.replication import ReplicationSettings, Replicator
from p2plb.storage import Storage
from procs import eventually

SYNC_TIMEOUT = 0.6


class FakePeer:
    """Answers a catch-up's summary with the state it is given, and any push."""

    def __init__(self, state: str | None, replicator: Replicator) -> None:
        self.state = state
        self.replicator = replicator
        self.asked_while: list[str] = []  # the asker's state at each summary
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakePeer:
        app = web.Application()
        app.router.add_get("/internal/v1/summary", self._summary)
        app.router.add_post("/internal/v1/push", self._push)
        self._runner, self.url = await serve(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _summary(self, request: web.Request) -> web.Response:
        self.asked_while.append(self.replicator.state)
        body: dict[str, Any] = {"protocol": 1, "marks": {}, "indices": {}}
        if self.state is not None:
            body["state"] = self.state
        return web.json_response(body)

    async def _push(self, request: web.Request) -> web.Response:
        return web.json_response({"protocol": 1, "mark": 0})


@pytest.fixture
async def replicator(tmp_path: Path) -> AsyncIterator[Replicator]:
    storage = Storage(tmp_path / "index.sqlite3", "i1")
    await storage.open()
    settings = ReplicationSettings(sync_timeout=SYNC_TIMEOUT, anti_entropy=3600)
    node = Replicator("i1", storage, settings=settings)
    yield node
    await node.stop()
    await storage.close()


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ("serving", "caught up with p1 (0 operations)"),
        ("syncing", "sync timeout"),
        (None, "sync timeout"),  # a peer too old to say is no source either
    ],
)
async def test_only_a_peer_serving_by_its_own_word_is_a_source(
    replicator: Replicator,
    caplog: pytest.LogCaptureFixture,
    state: str | None,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="p2plb.replication")
    peer = await FakePeer(state, replicator).start()
    try:
        started = time.monotonic()
        await replicator.start(expect_members=True)
        replicator.set_members([{"id": "p1", "address": peer.url, "state": "serving"}])

        async def serving() -> bool:
            return replicator.state == "serving"

        await eventually(serving, within=5)
        took = time.monotonic() - started
    finally:
        await peer.stop()

    served = [r.getMessage() for r in caplog.records if "replication.serving" in r.msg]
    assert served == [f"replication.serving id=i1 reason={reason}"]
    if state == "serving":
        assert peer.asked_while == ["syncing"]
    else:
        # Asked again and again while it waited, and never taken at its word.
        assert len(peer.asked_while) >= 2
        assert set(peer.asked_while) == {"syncing"}
        assert took >= SYNC_TIMEOUT
        assert any("replication.sync_timeout" in r.msg for r in caplog.records)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ("[1, 2]", "answered list, not an object"),
        ("<html>", "answered what is not JSON"),
        ("[" * 100_000 + "]" * 100_000, "answered what is not JSON"),
    ],
)
async def test_a_summary_that_is_no_object_is_a_refusal(
    replicator: Replicator, body: str, why: str
) -> None:
    async def summary(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/internal/v1/summary", summary)
    runner, url = await serve(app)
    await replicator.start(expect_members=False)
    try:
        with pytest.raises(Refused) as caught:
            await replicator.sync_with(Peer("p1", url))
    finally:
        await runner.cleanup()
    assert str(caught.value) == f"/internal/v1/summary {why}"
