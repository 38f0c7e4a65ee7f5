"""A balancer that refuses an indexer (a wrong token) is said to refuse it, not to
be unreachable; the indexer keeps trying, since the operator may fix the token on
the balancer's side."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Iterator

import pytest
from aiohttp import web

from loopback import serve
from p2plb.reporter import Reporter
from procs import Procs

WRONG = {"error": {"code": "wrong_token", "message": "the token is not valid here"}}
MISSING = {"error": {"code": "missing_token", "message": "a token is required"}}


class Balancer:
    """Answers registrations and load reports with what the test sets."""

    def __init__(self) -> None:
        self.status, self.body = 403, WRONG
        self.attempts = 0
        self.url = ""
        self._counted = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.Response:
        async with self._counted:
            self.attempts += 1
            self._counted.notify_all()
        if self.status == 201 and request.method != "POST":
            return web.json_response(self.body)  # a load report taken: 200
        return web.json_response(self.body, status=self.status)

    async def attempted(self, more: int) -> None:
        """Wait for ``more`` requests beyond those made so far."""
        target = self.attempts + more
        async with asyncio.timeout(10), self._counted:
            await self._counted.wait_for(lambda: self.attempts >= target)


@pytest.fixture
async def balancer() -> AsyncIterator[Balancer]:
    fake = Balancer()
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    fake.url = "http://127.0.0.1:{}".format(*runner.addresses[0][1:2])
    try:
        yield fake
    finally:
        await runner.cleanup()


class Lines(logging.Handler):
    """(level, message) of each record, whatever propagation the CLI left."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture
def logged() -> Iterator[list[tuple[str, str]]]:
    """What the reporter logs at INFO and above."""
    reporter, lines = logging.getLogger("p2plb.reporter"), Lines()
    reporter.addHandler(lines)
    level, reporter.level = reporter.level, logging.INFO
    try:
        yield lines.lines
    finally:
        reporter.removeHandler(lines)
        reporter.setLevel(level)


async def test_a_refusal_is_logged_once_until_it_changes(
    balancer: Balancer, logged: list[tuple[str, str]]
) -> None:
    reporter = Reporter(
        indexer_id="i1",
        address="http://127.0.0.1:1",
        capacity=1,
        instance="a",
        balancers=(balancer.url,),
        interval=0.05,
        load_report=dict,
        rng=random.Random(0),
    )
    await reporter.start()
    try:
        await balancer.attempted(3)
        balancer.status, balancer.body = 401, MISSING
        await balancer.attempted(3)
        balancer.status, balancer.body = 201, {"peers": []}
        await balancer.attempted(3)
    finally:
        await reporter.stop()

    url = balancer.url
    assert logged == [
        ("ERROR", f"reporter.refused balancer={url} status=403 code=wrong_token "
         f"error=registration answered 403: {WRONG}; this indexer's "
         "--cluster-token (or P2PLB_CLUSTER_TOKEN) is not that balancer's"),
        ("ERROR", f"reporter.refused balancer={url} status=401 code=missing_token "
         f"error=registration answered 401: {MISSING}; that balancer needs its "
         "cluster token: start this indexer with --cluster-token or "
         "P2PLB_CLUSTER_TOKEN"),
        ("INFO", f"reporter.registered balancer={url} id=i1 "
         "address=http://127.0.0.1:1 new=True"),
        ("INFO", f"reporter.balancer_back balancer={url}"),
    ]  # fmt: skip


async def test_an_indexer_with_the_wrong_token_says_it_is_refused(
    procs: Procs,
) -> None:
    tokens = ("--cluster-token", "right", "--admin-token", "admin")
    balancer = procs.balancer("balancer", *tokens)
    indexer = procs.indexer(
        "i1", "--balancer", balancer.url, "--cluster-token", "wrong",
        "--report-interval", "0.3s",
    )  # fmt: skip

    indexer.wait_for(
        rf"ERROR p2plb\.reporter reporter\.refused balancer={balancer.url} "
        r"status=403 code=wrong_token error=registration answered 403"
    )
    await asyncio.sleep(1.0)  # a few more attempts, refused the same way

    assert indexer.running
    assert indexer.log().count("reporter.refused") == 1
    assert "reporter.balancer_unreachable" not in indexer.log()


async def test_answers_nested_past_all_use_do_not_end_the_reporting(
    logged: list[tuple[str, str]],
) -> None:
    seen = 0
    enough = asyncio.Event()

    async def deep(request: web.Request) -> web.Response:
        nonlocal seen
        seen += 1
        if seen >= 6:  # a registration and several reports
            enough.set()
        status = 201 if request.method == "POST" else 200
        body = "[" * 100_000 + "]" * 100_000
        return web.Response(text=body, status=status, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", deep)
    runner, url = await serve(app)
    reporter = Reporter(
        indexer_id="i1",
        address="http://127.0.0.1:1",
        capacity=1,
        instance="a",
        balancers=(url,),
        interval=0.05,
        load_report=dict,
        on_peers=lambda peers: None,
        rng=random.Random(0),
    )
    await reporter.start()
    try:
        async with asyncio.timeout(10):
            await enough.wait()
        crashed = [t for t in reporter._tasks if t.done()]
    finally:
        await reporter.stop()
        await runner.cleanup()

    assert crashed == []
    assert ("INFO", f"reporter.registered balancer={url} id=i1 "
            "address=http://127.0.0.1:1 new=True") in logged  # fmt: skip
