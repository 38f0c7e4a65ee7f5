"""The balancers of one client: which one is in use, fallback, and the return.

Rules of this module:

* The client stays with one balancer until it fails, then moves to the next;
  ``rotation()`` is the order to try them in, the current one first.
* When none answers, the client falls back: calls go directly to indexers from
  the last routing table or from the ``indexers`` given.  Refreshes then become
  probes with jittered exponential backoff (0.2 s doubling up to 5 s), and the
  first balancer to send a table ends the fallback.
* A balancer whose table has no indexer serving reads (one restarted without
  its state knows none until they report) counts as failing while another
  balancer, or the last table, can do better.
* Nothing here sends a request: ``refresh`` is given the function that fetches
  a table from one balancer.
* The events are the client's and are logged under its name, ``p2plb.client``,
  so one grep finds everything a client did.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from p2plb.errors import P2PLBError
from p2plb.routing import RoutingTable, Table

__all__ = ["Balancers"]

logger = logging.getLogger("p2plb.client")

_PROBE_FIRST, _PROBE_MAX = 0.2, 5.0  # seconds between balancer probes in fallback
_PROBE_STEPS = 16  # doublings after which the wait stays at _PROBE_MAX


class Balancers:
    """The balancer URLs of a client, the one in use, and whether it fell back."""

    def __init__(
        self, urls: list[str], table: RoutingTable, rng: random.Random
    ) -> None:
        self.urls = urls
        self.current = 0
        self.in_fallback = False
        self.fallbacks = 0
        self.why_fallback = ""
        self._fell_back_at = 0.0
        self._probes = 0
        self._table = table
        self._rng = rng
        self._lock = asyncio.Lock()

    def replace(self, urls: list[str]) -> None:
        self.urls, self.current = urls, 0

    def in_use(self) -> str | None:
        return self.urls[self.current] if self.urls else None

    def rotation(self) -> list[str]:
        """The balancers, the current one first, then the others in order."""
        return self.urls[self.current :] + self.urls[: self.current]

    def wait(self, refresh_interval: float) -> float:
        """Seconds until the next refresh; in fallback, until the next probe."""
        if self.in_fallback:
            # Stop counting once at the ceiling: 2 ** probes would overflow a
            # float after about an hour without a balancer, killing the loop.
            self._probes = min(self._probes + 1, _PROBE_STEPS)
            ceiling: float = min(_PROBE_MAX, _PROBE_FIRST * 2 ** (self._probes - 1))
            return ceiling * self._rng.uniform(0.5, 1.0)
        self._probes = 0
        return refresh_interval * self._rng.uniform(0.9, 1.1)

    async def refresh(self, fetch: Callable[[str], Awaitable[Table]]) -> bool:
        """Fetch the table from the current balancer, else the next; else fall back."""
        async with self._lock:
            failures: list[str] = []
            empty: tuple[str, Table] | None = None
            for url in self.rotation():
                try:
                    table = await fetch(url)
                except P2PLBError as exc:
                    failures.append(str(exc))
                    if not self.in_fallback:
                        logger.info(
                            "client.balancer_failed balancer=%s error=%s", url, exc
                        )
                    continue
                if not table.readable():
                    failures.append(f"balancer {url} lists no indexer serving reads")
                    empty = empty or (url, table)
                    continue
                self._table.apply(table)
                self.use(url)
                return True

            if empty is not None and not self._table.readable():
                self._table.apply(empty[1])
                self.use(empty[0])
                return True
            if self.urls:
                self.fall_back("; ".join(failures))
            return False

    def use(self, url: str) -> None:
        """``url`` answered: make it the current balancer, and end any fallback."""
        index = self.urls.index(url) if url in self.urls else None
        if index is not None and index != self.current:
            logger.info("client.balancer_switched to=%s", url)
            self.current = index
        if self.in_fallback:
            self.in_fallback = False
            waited = time.monotonic() - self._fell_back_at
            logger.info("client.returned balancer=%s after_s=%.1f", url, waited)

    def fall_back(self, error: str) -> None:
        if self.in_fallback:
            return
        self.in_fallback = True
        self.fallbacks += 1
        self._fell_back_at = time.monotonic()
        self.why_fallback = error
        logger.info(
            "client.fallback balancer=%s error=%s using=%s",
            ",".join(self.urls) or "none",
            error,
            self.source(),
        )

    def source(self) -> str:
        """Where direct calls take their indexers from, in words."""
        if self._table.source == "balancer":
            version = self._table.version
            return f"routing table version {version}, {len(self._table)} indexers"
        if self._table.source == "indexers":
            return f"the {len(self._table)} indexers given"
        return "no routing table"
