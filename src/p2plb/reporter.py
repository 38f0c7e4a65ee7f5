"""The indexer's side of membership: register with each balancer, report load.

Each balancer gets its own loop, so a dead balancer never delays reports to the
others (balancers share nothing, design.md "Processes").  A loop:

1. registers (``POST /v1/indexers``) until a balancer accepts, backing off with
   jitter while it is unreachable;
2. reports load and state every ``report_interval`` (``PUT .../load``), with a
   little jitter so a fleet started together does not report in lockstep;
3. registers again when a report gets ``404`` (the balancer restarted without
   state, or forgot us);
4. stops, and says so at ERROR, on ``409 superseded``: another process took our
   id at a new address, and two indexers must not claim one id.

On shutdown, ``unregister`` removes the indexer from every balancer, so routed
clients see it leave before its connections start being refused.

Replication learns its peers from the balancers' member lists.  Balancers share
nothing, so their lists may differ for a while (one restarted without its state
file, or an admin removed an indexer from one only): the peers handed on are
the union of the lists of every balancer that answers, an id taking the entry
of the list heard most recently.  Taking only the last answer's list instead
would drop and re-add a peer's replication stream each time the two disagreeing
balancers answered in turn.  A balancer that stops answering no longer counts;
when none answers, the last union stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from ssl import SSLContext
from typing import Any

import aiohttp

from p2plb.errors import describe_failure, error_from_body
from p2plb.wire import PROTOCOL, encode

__all__ = ["Reporter"]

logger = logging.getLogger(__name__)

_JSON = {"Content-Type": "application/json"}


class Reporter:
    def __init__(
        self,
        *,
        indexer_id: str,
        address: str,
        capacity: int,
        instance: str,
        balancers: tuple[str, ...],
        interval: float,
        load_report: Callable[[], dict[str, Any]],
        on_peers: Callable[[list[dict[str, Any]]], None] | None = None,
        membership_interval: float = 1.0,
        token: str | None = None,
        rng: random.Random | None = None,
        ssl: SSLContext | None = None,
    ) -> None:
        self._ssl = ssl
        self.indexer_id = indexer_id
        self.address = address
        self.capacity = capacity
        self.instance = instance
        self.balancers = balancers
        self.interval = interval
        self.load_report = load_report
        self.on_peers = on_peers
        self.membership_interval = membership_interval
        self.superseded = False
        self._headers = dict(_JSON)
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._rng = rng or random.Random()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._registered: set[str] = set()
        self._kicked = asyncio.Event()
        self._peers_version: dict[str, int] = {}
        self._views = MemberViews()
        self._published: list[dict[str, Any]] | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(2.0, min(self.interval, 5.0)))
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(ssl=self._ssl or True)
        )
        for balancer in self.balancers:
            self._tasks.append(asyncio.create_task(self._run(balancer)))
        if self.balancers and self.on_peers is not None:
            self._tasks.append(asyncio.create_task(self._watch_members()))

    def kick(self) -> None:
        """Report now, not at the next interval: the state just changed."""
        self._kicked.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._kicked.wait(), seconds)
        # Every loop wakes on the same kick: clear it once they had a chance.
        await asyncio.sleep(0)
        self._kicked.clear()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def unregister(self) -> None:
        """Leave every balancer (best effort, a few seconds at most)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._session is None or self.superseded:
            return
        await asyncio.gather(*(self._leave(b) for b in self.balancers))

    async def _leave(self, balancer: str) -> None:
        assert self._session is not None
        url = f"{balancer}/v1/indexers/{self.indexer_id}"
        try:
            headers = self._headers | {
                "P2PLB-Instance": self.instance,
                "P2PLB-Address": self.address,
            }
            async with self._session.delete(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=2)
            ) as response:
                if response.status == 409:
                    # Replaced by a newer process of this id: its entry stays.
                    logger.warning(
                        "reporter.unregister_superseded balancer=%s id=%s: another "
                        "process registered this id since; its entry was left alone",
                        balancer,
                        self.indexer_id,
                    )
                    return
                if response.status not in (204, 404):
                    # 403 with a cluster token: the balancer holds another
                    # instance of this id (see Registry.unregister).
                    answer = await _json(response)
                    logger.warning(
                        "reporter.unregister_refused balancer=%s status=%d code=%s "
                        "error=%s",
                        balancer,
                        response.status,
                        _code(answer),
                        error_from_body(response.status, answer, where=balancer),
                    )
                    return
                logger.info(
                    "reporter.unregistered balancer=%s status=%d",
                    balancer,
                    response.status,
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning(
                "reporter.unregister_failed balancer=%s error=%s", balancer, _why(exc)
            )

    # -- one loop per balancer -------------------------------------------------------

    async def _run(self, balancer: str) -> None:
        backoff = 0.2
        reachable = True
        refused: tuple[int, str] | None = None  # the refusal last logged
        while True:
            try:
                if balancer not in self._registered:
                    await self._register(balancer)
                    backoff = 0.2
                done = await self._report(balancer)
                if done:
                    return
                if not reachable:
                    logger.info("reporter.balancer_back balancer=%s", balancer)
                reachable, refused = True, None
                await self._pause(self.interval * self._rng.uniform(0.9, 1.0))
            except (aiohttp.ClientError, TimeoutError, _Rejected) as exc:
                self._lost(balancer)
                # A refusal (a wrong token) is retried like an outage, since the
                # operator may fix it on the balancer's side, but said as what
                # it is: once, until it changes.
                refusal = exc.refusal() if isinstance(exc, _Rejected) else None
                if refusal is not None and refusal != refused:
                    logger.error(
                        "reporter.refused balancer=%s status=%d code=%s error=%s%s",
                        balancer,
                        *refusal,
                        _why(exc),
                        _TOKEN_HINTS.get(refusal[1], ""),
                    )
                elif refusal is None and (reachable or refused is not None):
                    logger.warning(
                        "reporter.balancer_unreachable balancer=%s error=%s",
                        balancer,
                        _why(exc),
                    )
                reachable, refused = False, refusal
                # Retry registration soon (a restarted balancer should see us
                # within a second or two), but never faster than the interval
                # once it has been down for a while.
                await asyncio.sleep(
                    min(backoff, self.interval) * self._rng.uniform(0.5, 1)
                )
                backoff = min(backoff * 2, self.interval)

    async def _register(self, balancer: str) -> None:
        assert self._session is not None
        body = {
            "protocol": PROTOCOL,
            "id": self.indexer_id,
            "address": self.address,
            "capacity": self.capacity,
            "instance": self.instance,
        }
        async with self._session.post(
            f"{balancer}/v1/indexers", data=encode(body), headers=self._headers
        ) as response:
            answer = await _json(response)
            if response.status not in (200, 201):
                raise _Rejected(
                    f"registration answered {response.status}: {answer}",
                    response.status,
                    _code(answer),
                )
        self._registered.add(balancer)
        logger.info(
            "reporter.registered balancer=%s id=%s address=%s new=%s",
            balancer,
            self.indexer_id,
            self.address,
            response.status == 201,
        )
        self._peers(answer, balancer)

    async def _report(self, balancer: str) -> bool:
        """One load report; True when this loop must end (superseded)."""
        assert self._session is not None
        body = self.load_report() | {
            "protocol": PROTOCOL,
            "address": self.address,
            "instance": self.instance,
            "peers_version": self._peers_version.get(balancer),
        }
        url = f"{balancer}/v1/indexers/{self.indexer_id}/load"
        async with self._session.put(
            url, data=encode(body), headers=self._headers
        ) as r:
            answer = await _json(r)
            status = r.status
        if status == 200:
            self._peers(answer, balancer)
            return False
        if status == 404:
            logger.info("reporter.unknown_to_balancer balancer=%s", balancer)
            self._registered.discard(balancer)
            raise _Rejected("balancer forgot this indexer; registering again")
        if status == 409:
            self.superseded = True
            logger.error(
                "reporter.superseded balancer=%s id=%s address=%s: another indexer "
                "registered with this id at a new address; this one stops reporting",
                balancer,
                self.indexer_id,
                self.address,
            )
            return True
        raise _Rejected(
            f"load report answered {status}: {answer}", status, _code(answer)
        )

    async def _watch_members(self) -> None:
        """Fetch the registered indexers every ``membership_interval``.

        Replication needs a fresher view than the report interval gives: a
        write counts the copies it needs from it (design.md "Durability").
        The balancer answers ``null`` while the list has not changed.
        """
        assert self._session is not None
        turn = 0
        while True:
            balancer = self.balancers[turn % len(self.balancers)]
            params = {}
            if balancer in self._peers_version:
                params["members_since"] = str(self._peers_version[balancer])
            try:
                async with self._session.get(
                    f"{balancer}/v1/indexers", params=params
                ) as response:
                    answer = await _json(response)
                if response.status == 200 and isinstance(answer, dict):
                    answer = {
                        "peers": answer.get("indexers"),
                        "peers_version": answer.get("members_version"),
                    }
                    self._peers(answer, balancer)
                else:
                    turn += 1
            except (aiohttp.ClientError, TimeoutError):
                self._lost(balancer)
                turn += 1  # try the next balancer
            await asyncio.sleep(self.membership_interval)

    def _peers(self, answer: Any, balancer: str) -> None:
        if self.on_peers is None or not isinstance(answer, dict):
            return
        peers = answer.get("peers")
        version = answer.get("peers_version")
        if isinstance(peers, list):
            self._views.heard(balancer, [p for p in peers if isinstance(p, dict)])
            if isinstance(version, int):
                self._peers_version[balancer] = version
            self._publish()
        elif peers is None and version != self._peers_version.get(balancer):
            self._peers_version.pop(balancer, None)  # out of step: ask in full

    def _lost(self, balancer: str) -> None:
        """``balancer`` failed to answer: its list no longer counts."""
        self._peers_version.pop(balancer, None)  # ask in full when it is back
        if self._views.forget(balancer):
            self._publish()

    def _publish(self) -> None:
        merged = self._views.merged()
        if merged is None or merged == self._published or self.on_peers is None:
            return
        self._published = merged
        self.on_peers(merged)


class MemberViews:
    """The member list of each balancer that answers, and their union.

    No I/O and no clock: which list is newer is the order they were heard in.
    """

    def __init__(self) -> None:
        self._views: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self._heard = 0

    def heard(self, balancer: str, members: list[dict[str, Any]]) -> None:
        self._heard += 1
        self._views[balancer] = (self._heard, members)

    def forget(self, balancer: str) -> bool:
        """Drop ``balancer``'s list; True when there was one."""
        return self._views.pop(balancer, None) is not None

    def merged(self) -> list[dict[str, Any]] | None:
        """Every member any balancer lists, by id; None when no list is held."""
        if not self._views:
            return None
        union: dict[str, dict[str, Any]] = {}
        for _, members in sorted(self._views.values(), key=lambda v: v[0]):
            for member in members:
                union[str(member.get("id"))] = member  # the newer list wins
        return [union[key] for key in sorted(union)]


class _Rejected(Exception):
    """A balancer answered, but not with what the protocol expects."""

    def __init__(
        self, message: str, status: int | None = None, code: str = "unknown"
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    def refusal(self) -> tuple[int, str] | None:
        """(status, code) when the balancer said no: a 4xx other than 404,
        which means it forgot this indexer, which registers again."""
        if self.status is None or self.status == 404 or not 400 <= self.status < 500:
            return None
        return self.status, self.code


async def _json(response: aiohttp.ClientResponse) -> Any:
    try:
        return await response.json(content_type=None)
    except (ValueError, RecursionError):  # not JSON, or nested past all use
        return None


def _code(answer: Any) -> str:
    """The code of an error answer, if it is a word fit for a log line."""
    error = answer.get("error") if isinstance(answer, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, str) and code.isascii() and code.isidentifier():
        return code[:64]
    return "unknown"


# What to do about a refusal an operator can fix on this side.
_TOKEN_HINTS = {
    "missing_token": "; that balancer needs its cluster token: start this indexer "
    "with --cluster-token or P2PLB_CLUSTER_TOKEN",
    "wrong_token": "; this indexer's --cluster-token (or P2PLB_CLUSTER_TOKEN) is "
    "not that balancer's",
}


def _why(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientError):
        # As the client says it: an untrusted CA, a refused connection...
        return describe_failure(exc)
    return str(exc) or type(exc).__name__
