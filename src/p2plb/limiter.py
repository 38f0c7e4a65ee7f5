"""Admission control for index requests: a capacity, a short queue, then 503.

An indexer serves at most ``capacity`` index requests at once.  The next
``queue_limit`` wait in FIFO order; beyond that a request is refused at once with
``503 overloaded`` and ``Retry-After``, which callers treat as a load signal, not a
health failure.  Refusing early keeps latency bounded for the requests that are
admitted, instead of letting an unbounded queue grow until every request times
out (the usual failure of a server without admission control).

The load the indexer reports is ``serving + waiting`` (design.md "Load").

Health, load and replication requests never go through the limiter, so an
overloaded indexer still answers its balancer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from contextlib import suppress

from p2plb.errors import Overloaded

__all__ = ["Limiter"]

logger = logging.getLogger(__name__)


class Limiter:
    def __init__(self, capacity: int, queue_limit: int, *, retry_after: float = 1.0):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if queue_limit < 0:
            raise ValueError("queue_limit must not be negative")
        self.capacity = capacity
        self.queue_limit = queue_limit
        self.retry_after = retry_after
        self.serving = 0
        self.refused = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def load(self) -> int:
        return self.serving + len(self._waiters)

    def slot(self) -> Limiter:
        """Hold one of the ``capacity`` slots for the duration of the block."""
        # The limiter is its own context manager: every index request enters
        # it, and a generator-based one costs a few microseconds more each.
        return self

    async def __aenter__(self) -> None:
        if self.serving < self.capacity and not self._waiters:
            self.serving += 1  # the common case, without awaiting anything
            return
        await self._acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    async def _acquire(self) -> None:
        if self.serving < self.capacity and not self._waiters:
            self.serving += 1
            return
        if len(self._waiters) >= self.queue_limit:
            self.refused += 1
            logger.debug(
                "limiter.refused serving=%d waiting=%d", self.serving, self.waiting
            )
            raise Overloaded(
                f"indexer is at capacity ({self.serving} serving, "
                f"{len(self._waiters)} queued); retry later",
                retry_after=self.retry_after,
            )

        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            # Cancelled while queued (the caller went away).  If the slot had
            # already been handed over, pass it on; otherwise leave the queue.
            if waiter.done() and not waiter.cancelled():
                self._release()
            else:
                self._remove_waiter(waiter)
            raise

    def _release(self) -> None:
        # Hand the slot straight to the oldest waiter, so ``serving`` never dips
        # and a newcomer cannot overtake the queue.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.serving -= 1

    def _remove_waiter(self, waiter: asyncio.Future[None]) -> None:
        with suppress(ValueError):
            self._waiters.remove(waiter)
