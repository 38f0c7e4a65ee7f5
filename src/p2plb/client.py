"""The asynchronous client: the index API, routed, retried, with fallback.

Rules of this module:

* Arguments are checked with ``p2plb.wire`` before anything is sent; a bad one
  is ``RequestError(400, "invalid_field")`` and no request leaves the client.
* ``mode="routed"`` (the default) picks an indexer in the client, from the
  routing table (``p2plb.routing``), and calls it directly; ``mode="proxy"``
  sends each call to the balancer, which forwards and retries.  In both modes
  a background task refreshes the table from the current balancer every
  ``refresh_interval``, so the client can fall back at any moment.
* The client stays with one balancer until it fails (refused, reset, timed
  out), then moves to the next.  When none answers, the very call that found
  out goes directly to an indexer, from the last table or from the
  ``indexers`` given; the background task probes the balancers with jittered
  exponential backoff and the client returns to the first that answers.
* Index operations are idempotent, so a failed attempt is retried on another
  indexer after a refusal, reset, timeout, other 5xx (``508 loop_detected``
  included), ``503 overloaded`` or ``503 replica_behind``, up to ``retries``
  times, if the retry budget (``p2plb.budget``) allows.  Nothing is retried
  when no indexer is healthy.
* ``timeout`` bounds a whole call, retries and fallback included.  An attempt
  that still leaves room for another gets half of the time left, so a hung
  indexer (or balancer) costs half the deadline, not all of it, and the call
  can still succeed elsewhere.
* Read your writes: every write answer carries a version; the highest seen
  goes out as ``P2PLB-Min-Version`` on every read, by every path.
* Only errors of ``p2plb.errors`` leave this module, each naming the node at
  fault: a 4xx is a ``RequestError`` with the server's code, a 503 code its
  ``RemoteError`` class, a connection problem ``Unreachable``, a timeout
  ``Timeout``.

The balancers and the fallback are tracked in ``p2plb.fallback``; one request to
one node, and what its answer or failure means, is ``p2plb.transport``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Final
from urllib.parse import quote

import aiohttp

from p2plb.aliases import AsyncAliases
from p2plb.budget import (
    RETRYABLE,
    RetryBudget,
    backoff,
    gave_up,
    reason,
    retry_after_of,
)
from p2plb.errors import (
    ConfigError,
    LoopDetected,
    NoHealthyIndexer,
    Overloaded,
    P2PLBError,
    ReplicaBehind,
    RequestError,
    Timeout,
    Unreachable,
    UsageError,
)
from p2plb.fallback import Balancers
from p2plb.hlc import is_version
from p2plb.proxy import INDEXER_HEADER, MIN_VERSION_HEADER
from p2plb.routing import Outcome, RoutingTable, Table, Target
from p2plb.tls import client_context
from p2plb.transport import (
    Answer,
    as_object,
    count,
    fetch_table,
    open_session,
    send,
    strings,
)
from p2plb.wire import (
    MAX_BATCH_ITEMS,
    check_address,
    check_item,
    check_name,
    encode,
    invalid,
)

__all__ = ["MODES", "AsyncClient"]

logger = logging.getLogger(__name__)

#: JSON bytes of items in one request: half the indexers' default body limit
#: (1 MiB), leaving room for the envelope and for escapes.
BATCH_BYTES = 512 * 1024

MODES = ("routed", "proxy")
_FELL_BACK: Final = object()


class AsyncClient(AsyncAliases):
    """The p2plb index API for asyncio code; see design.md "Python client"."""

    def __init__(
        self,
        balancers: str | Sequence[str] | None = None,
        indexers: Sequence[str] = (),
        *,
        mode: str = "routed",
        refresh_interval: float = 1.0,
        timeout: float = 10.0,
        connect_timeout: float = 2.0,
        retries: int = 3,
        page_size: int = 1000,
        token: str | None = None,
        rng: int | random.Random | None = None,
        ca_file: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise invalid("mode", f'must be "routed" or "proxy", got {mode!r}')
        balancer_urls = _addresses(balancers, "balancers")
        self._indexers = _addresses(indexers, "indexers")
        if not balancer_urls and not self._indexers:
            raise invalid("balancers", "give at least one balancer or indexer URL")
        for field, seconds in (
            ("refresh_interval", refresh_interval),
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
        ):
            if not seconds > 0:
                raise invalid(field, f"must be more than 0 seconds, got {seconds!r}")
        if retries < 0:
            raise invalid("retries", f"must be 0 or more, got {retries}")
        if not 1 <= page_size <= 10_000:
            raise invalid("page_size", f"must be from 1 to 10000, got {page_size}")

        self.mode = mode
        self.refresh_interval = refresh_interval
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retries = retries
        self.page_size = page_size
        self._rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        try:
            self._tls = client_context(ca_file)  # for https:// peers only
        except ConfigError as exc:
            raise invalid("ca_file", str(exc).split(": ", 1)[-1]) from None
        self._table = RoutingTable(clock=time.monotonic, rng=self._rng)
        self._balancers = Balancers(balancer_urls, self._table, self._rng)
        self._budget = RetryBudget(clock=time.monotonic)
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

        self._retries = 0
        self._min_version: str | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the background refresh and close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    # -- the index API -------------------------------------------------------------

    async def add_to_index(self, index: str, item_or_items: str | Sequence[str]) -> int:
        """Add one item or a batch; returns how many were new.

        A batch too large for one request goes as several, one after another;
        if one fails, those before it stay applied (adding again is harmless).
        """
        path, bodies = _items_requests(index, item_or_items, "/items")
        return sum([count(await self._write(path, b), "added") for b in bodies])

    async def remove_from_index(
        self, index: str, item_or_items: str | Sequence[str]
    ) -> int:
        """Remove one item or a batch; returns how many were there.

        Large batches go as several requests, as with ``add_to_index``.
        """
        path, bodies = _items_requests(index, item_or_items, "/items/remove")
        return sum([count(await self._write(path, b), "removed") for b in bodies])

    async def get_index(self, index: str) -> list[str] | None:
        """Every item of ``index``, sorted, following pages to the end; or None."""
        path = _index_path(index)
        items: list[str] = []
        after: str | None = None
        while True:
            query = f"?limit={self.page_size}"
            if after is not None:
                query += f"&after={_quote(after)}"
            try:
                page = await self._call("read", "GET", path + query)
            except RequestError as exc:
                if exc.code != "index_not_found":
                    raise
                return items or None  # emptied between two pages: what was read
            found, cursor = strings(page, "items"), page.get("next")
            # Pages are sorted: a cursor that does not move forward would
            # have this loop ask for the same page for ever.
            if not isinstance(cursor, str | None) or (
                cursor is not None and after is not None and cursor <= after
            ):
                raise Unreachable(f"an index page with a bad next: {page!r:.200}")
            items.extend(found)
            if cursor is None:
                return items
            after = cursor

    async def list_indices(self) -> list[str]:
        """The sorted names of the indices that have items."""
        answer = await self._call("read", "GET", "/v1/indices")
        return strings(answer, "indices")

    async def set_load_balancer(self, url: str | Sequence[str]) -> None:
        """Replace the balancers (one URL or several) and fetch a table from them."""
        urls = _addresses(url, "url")
        if not urls:
            raise invalid("url", "give at least one balancer URL")
        self._balancers.replace(urls)
        logger.info("client.balancers_set balancers=%s", ",".join(urls))
        if self._task is not None:
            await self._refresh()

    async def stats(self) -> dict[str, Any]:
        """Where requests went, what failed, and whether the client fell back."""
        return {
            "mode": self.mode,
            "balancer": self._balancers.in_use(),
            "balancers": list(self._balancers.urls),
            "in_fallback": self._balancers.in_fallback,
            "fallbacks": self._balancers.fallbacks,
            "retries": self._retries,
            "requests": dict(self._table.requests),
            "errors": dict(self._table.errors),
            "avoided": self._table.avoided(),
            "table_version": self._table.version,
            "table_source": self._table.source,
            "strategy": self._table.strategy,
            "min_version": self._min_version,
        }

    # -- one call, by one path or another -----------------------------------------

    async def _write(self, path: str, body: bytes) -> dict[str, Any]:
        answer = await self._call("write", "POST", path, body)
        version = answer.get("version")
        newer = self._min_version is None or str(version) > self._min_version
        if isinstance(version, str) and newer and is_version(version):
            self._min_version = version
        return answer

    async def _call(
        self, op: str, method: str, path: str, body: bytes | None = None
    ) -> dict[str, Any]:
        await self._start()
        self._budget.deposit()
        headers = self._headers
        if op == "read" and self._min_version is not None:
            headers = {**headers, MIN_VERSION_HEADER: self._min_version}
        deadline = time.monotonic() + self.timeout
        if self.mode == "proxy" and not self._balancers.in_fallback:
            answer = await self._via_balancer(method, path, body, headers, deadline)
            if answer is not _FELL_BACK:
                return as_object(answer)
        answer = await self._direct(op, method, path, body, headers, deadline)
        return as_object(answer)

    async def _via_balancer(
        self,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        deadline: float,
    ) -> Any:
        """The balancer's answer, or ``_FELL_BACK`` when no balancer answered."""
        failures: list[str] = []
        for url in self._balancers.rotation():
            retry = 0
            while True:
                where = f"balancer {url}"
                # Half the time left: the fallback must still fit after it.
                seconds = (deadline - time.monotonic()) / 2
                if seconds <= 0:
                    raise Timeout(
                        f"no answer within {self.timeout:g} s: "
                        + "; ".join(failures or ["the balancers kept answering 503"])
                    )
                try:
                    answer = await self._send(
                        method, url + path, body, headers, where, seconds
                    )
                except (Unreachable, Timeout) as exc:
                    failures.append(str(exc))
                    logger.info("client.balancer_failed balancer=%s error=%s", url, exc)
                    break
                self._balancers.use(url)

                indexer, load = answer.headers.get(INDEXER_HEADER), answer.load()
                if indexer is not None:
                    self._table.count(indexer, ok=answer.status < 500)
                    if load is not None:
                        self._table.observe_load(indexer, *load, answer.service())
                if answer.status < 400:
                    return answer.json()
                error = answer.error()
                if not isinstance(error, Overloaded | ReplicaBehind):
                    raise error
                if retry >= self.retries or not self._budget.spend():
                    raise error
                retry += 1
                self._retries += 1
                await asyncio.sleep(
                    backoff(retry, self._rng, retry_after=error.retry_after)
                )
        self._balancers.fall_back("; ".join(failures))
        return _FELL_BACK

    async def _direct(
        self,
        op: str,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        deadline: float,
    ) -> Any:
        """Call indexers from the table, retrying another one on a failure."""
        if self._table.source == "none":
            raise Unreachable(
                f"no balancer answered ({self._balancers.why_fallback}) and no "
                "indexers were given to call directly (indexers=[...], or --indexer)"
            )
        tried: list[str] = []
        attempts: list[str] = []
        last: P2PLBError | None = None
        for attempt in range(1 + self.retries):
            # Another indexer while there is one not tried yet, then any again.
            target = self._table.pick(op, exclude=tried)
            again = target is None and bool(tried)
            if again:
                target = self._table.pick(op)
            if target is None:
                if last is None:
                    raise NoHealthyIndexer(
                        f"{self._table.describe_none(op)} ({self._balancers.source()})"
                    )
                break

            # Retry-After speaks for the indexer that sent it: it is waited
            # for only when the retry has to go back to an indexer tried.
            if last is not None:
                if not self._budget.spend():
                    attempts.append("retry budget exhausted")
                    break
                self._retries += 1
                after = retry_after_of(last) if again else None
                pause = backoff(attempt, self._rng, retry_after=after)
                if time.monotonic() + pause >= deadline:
                    attempts.append(f"no time left of {self.timeout:g} s")
                    break
                await asyncio.sleep(pause)

            left = deadline - time.monotonic()
            seconds = left if attempt == self.retries else left / 2
            tried.append(target.id)
            try:
                return await self._attempt(target, method, path, body, headers, seconds)
            except RETRYABLE as exc:
                last = exc
                attempts.append(f"{target.id} {reason(exc)}")

        assert last is not None
        if isinstance(last, Timeout):
            # Attempts had parts of the deadline; the caller knows the whole.
            last = Timeout(f"no indexer answered within {self.timeout:g} s")
        raise gave_up(last, attempts) from last

    async def _attempt(
        self,
        target: Target,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        seconds: float,
    ) -> Any:
        where = (
            f"indexer {target.address}"
            if target.id == target.address
            else f"indexer {target.id} ({target.address})"
        )
        self._table.begin(target.id)
        outcome: Outcome = "failed"
        load = service = None
        failure = ""
        try:
            answer = await self._send(
                method, target.address + path, body, headers, where, seconds
            )
            load, service = answer.load(), answer.service()
            if answer.status < 400:
                payload = answer.json()
                outcome = "ok"
                return payload
            error = answer.error()
            if isinstance(error, RequestError):
                outcome = "ok"  # the indexer works; the request was wrong
            elif not isinstance(error, Unreachable | LoopDetected):
                outcome = "busy"  # a 503 with a code: a load signal, not a fault
            raise error
        except asyncio.CancelledError:
            outcome = "cancelled"  # the caller went away: not the indexer's fault
            raise
        except P2PLBError as exc:
            failure = str(exc).removeprefix(where).lstrip(": ")
            raise
        finally:
            self._table.finish(target.id, outcome, load, service, failure)

    async def _send(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: dict[str, str],
        where: str,
        seconds: float,
    ) -> Answer:
        assert self._session is not None
        limit = aiohttp.ClientTimeout(
            total=seconds, connect=min(seconds, self.connect_timeout)
        )
        return await send(
            self._session, method, url, body, headers, where, self.timeout, limit
        )

    # -- balancers, the table and fallback ----------------------------------------

    async def _start(self) -> None:
        if self._closed:
            raise UsageError("this client is closed; create a new one")
        if self._task is not None:
            return
        async with self._start_lock:
            if self._task is not None:
                return
            self._session = open_session(self._tls, self.timeout, self.connect_timeout)
            if self._indexers:
                self._table.use_static(self._indexers)
            if self._balancers.urls:
                await self._refresh()
            else:
                self._balancers.fall_back("no balancer given")
            self._task = asyncio.create_task(self._maintain())

    async def _maintain(self) -> None:
        """Refresh the table every interval; in fallback, probe with backoff."""
        while True:
            await asyncio.sleep(self._balancers.wait(self.refresh_interval))
            try:
                await self._refresh()
            except Exception:  # the loop must outlive any surprise
                logger.exception("client.refresh_crashed")

    async def _refresh(self) -> bool:
        return await self._balancers.refresh(self._fetch_table)

    async def _fetch_table(self, url: str) -> Table:
        assert self._session is not None
        return await fetch_table(
            self._session, url, self._headers, self.timeout, self.connect_timeout
        )


def _addresses(value: str | Sequence[str] | None, field: str) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else list(value)
    return [check_address(v, field=field) for v in values]


def _index_path(index: object) -> str:
    # Type checks first: callers without type checking pass anything, and a
    # TypeError from deep inside would not be a p2plb error.
    if not isinstance(index, str):
        raise invalid("index", f"must be a str, got {type(index).__name__}")
    return f"/v1/indices/{_segment(index)}"


def _items_requests(
    index: str, item_or_items: str | Sequence[str], suffix: str
) -> tuple[str, list[bytes]]:
    path = _index_path(index) + suffix
    if isinstance(item_or_items, str):
        return path, [encode({"item": check_item(item_or_items)})]
    if isinstance(item_or_items, bytes | bytearray):
        raise invalid("item", "must be a str, got bytes; decode it first")
    if not isinstance(item_or_items, Iterable):
        raise invalid(
            "item",
            f"must be a str or a list of str, got {type(item_or_items).__name__}",
        )
    items = list(item_or_items)
    if not items:
        raise invalid("items", "must hold at least one item")
    for item in items:
        if not isinstance(item, str):
            raise invalid("items", f"must be strings, got {type(item).__name__}")
        check_item(item, field="items")
    return path, [encode({"items": chunk}) for chunk in _batches(items)]


def _batches(items: list[str]) -> Iterator[list[str]]:
    """``items`` in runs that each fit one request at any indexer's defaults:
    at most ``MAX_BATCH_ITEMS`` items and about ``BATCH_BYTES`` of JSON."""
    start, size = 0, 0
    for end, item in enumerate(items):
        cost = len(encode(item)) + 1  # as JSON, with its comma
        if end > start and (
            end - start == MAX_BATCH_ITEMS or size + cost > BATCH_BYTES
        ):
            yield items[start:end]
            start, size = end, 0
        size += cost
    yield items[start:]


def _quote(text: str) -> str:
    return quote(text, safe="")


def _segment(index: str) -> str:
    """``index`` checked, as one path segment.

    '.' and '..' go as '%2E' and '%2E%2E': left as they are, any hop (the
    server, a proxy, an HTTP library) may remove them as dot segments
    (RFC 3986 5.2.4), and the request would reach another path.
    """
    segment = _quote(check_name(index, field="index"))
    return segment.replace(".", "%2E") if segment in (".", "..") else segment
