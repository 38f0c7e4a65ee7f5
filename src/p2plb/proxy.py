"""The balancer as a proxy: the index API forwarded to the chosen indexer.

Rules of this module:

* The request body is read (bounded) before the first attempt, so a failed
  attempt can be replayed on another indexer: every index operation is
  idempotent (design.md "Request paths").
* An attempt fails over to another indexer on a connection error, a timeout, a
  truncated answer, ``503 overloaded`` / ``503 replica_behind`` (load signals)
  and other 5xx (health signals).  A 4xx is the caller's mistake and is passed
  on at once.
* Retries are paid from one retry budget for the whole proxy
  (``p2plb.budget.RetryBudget``): when every indexer answers ``503``, a fixed
  retry count would multiply their load by ``1 + retries`` exactly when they
  can least take it; the budget holds retries to about a fifth of the calls.
  A retry after a refused connection is free: the request never reached that
  indexer, so retrying it adds no load anywhere (a killed indexer costs no
  reads while the budget is spent).
* A truncated answer is never passed on as a success: the body is read whole
  before the status is sent back.
* Every forwarded request carries ``P2PLB-Via`` (this balancer's instance),
  and a request that carries it is refused with ``508 loop_detected``:
  indexers never forward, so it can only have come back because an indexer
  entry holds a balancer's address (its own address once made one request
  about 257 nested hops, until the connection pool ran out).  The 508 is a
  failure of that entry, like a 5xx, and the request goes to another.
* Each answer's ``P2PLB-Load`` and ``P2PLB-Service-Ms`` headers update the
  registry's view of that indexer, which is fresher than its last report.  What
  an indexer sends is never trusted to be well formed: a malformed header is
  ignored, a body that does not decode is no error code and no version.  A
  ``Retry-After`` is passed on to the caller only as whole seconds from 1 to
  ``MAX_RETRY_AFTER``, else as ``DEFAULT_RETRY_AFTER``: an HTTP client may
  wait for whatever it is told ("-1", an hour and more, a date).

Known shortcoming: the proxy runs in one Python process, about 0.2x
HAProxy's requests per second on one CPU (``p2plb bench --suite proxy``), where
a bare aiohttp forwarder reaches 0.28x: aiohttp's client and server machinery
take most of its time, the socket writes a third; routed clients keep the
balancer off the data path, and several balancer processes behind SO_REUSEPORT
would scale it further.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from yarl import URL

from p2plb.budget import RetryBudget
from p2plb.errors import (
    LoopDetected,
    NoHealthyIndexer,
    RequestError,
    describe_failure,
)
from p2plb.hlc import is_version
from p2plb.registry import Registry
from p2plb.servicetime import SERVICE_HEADER, parse_service_header
from p2plb.web import read_body
from p2plb.wire import MAX_CAPACITY, MAX_COUNT, check_whole_number

__all__ = [
    "LOAD_HEADER",
    "MIN_VERSION_HEADER",
    "VIA_HEADER",
    "Proxy",
    "parse_load_header",
]

logger = logging.getLogger(__name__)

LOAD_HEADER = "P2PLB-Load"
MIN_VERSION_HEADER = "P2PLB-Min-Version"
INDEXER_HEADER = "P2PLB-Indexer"
VIA_HEADER = "P2PLB-Via"

# Answers that say "try another indexer" without saying this one is broken:
# load signals, and a write this indexer took but could not copy to a peer
# (its peers are the problem, not this indexer).
_LOAD_SIGNALS = frozenset({"overloaded", "replica_behind", "insufficient_replicas"})
_PASSED_HEADERS = ("Content-Type", "Retry-After", LOAD_HEADER, SERVICE_HEADER)
MAX_RETRY_AFTER = 3600
DEFAULT_RETRY_AFTER = "1"  # what a p2plb indexer sends when overloaded


# ASCII digits only: ``str.isdigit`` and ``int`` also take "²" and "١٢", and
# an unbounded figure overflowed the float arithmetic of the strategies.
_LOAD = re.compile(r"([0-9]{1,19})/([0-9]{1,7})")


def parse_load_header(value: str | None) -> tuple[int, int] | None:
    """``"12/64"`` -> ``(12, 64)``; ``None`` for anything malformed.

    Load and capacity must lie within the bounds a load report and a
    registration are held to (``MAX_COUNT``, ``MAX_CAPACITY``); whatever an
    indexer writes there, this never raises.
    """
    match = None if value is None else _LOAD.fullmatch(value)
    if match is None:
        return None
    load, capacity = int(match[1]), int(match[2])
    if load > MAX_COUNT or not 1 <= capacity <= MAX_CAPACITY:
        return None
    return load, capacity


class Proxy:
    def __init__(
        self,
        registry: Registry,
        *,
        timeout: float,
        retries: int,
        max_body_size: int,
        body_timeout: float = 30.0,
        keepalive: float = 30.0,
        observe: Callable[[str, float, bool], None] | None = None,
        ssl: SSLContext | None = None,
        budget: RetryBudget | None = None,
        via: str = "",
    ) -> None:
        self.registry = registry
        self.via = via or secrets.token_hex(8)  # names this balancer's requests
        self._ssl = ssl
        self.timeout = timeout
        self.retries = retries
        self.keepalive = keepalive
        self.max_body_size = max_body_size
        self.body_timeout = body_timeout
        self.observe = observe
        self.budget = budget or RetryBudget(clock=time.monotonic)
        self.budget_refusals = 0  # retries refused for want of budget
        self.versions = _Versions()
        self._told = _Once()
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Keep-alive shorter than the indexers' --idle-timeout (75 s unless
        # told otherwise) so the proxy, not the indexer, closes an idle
        # connection: a request never lands on a socket the indexer is closing
        # at the same moment.
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=256,
            keepalive_timeout=self.keepalive,
            enable_cleanup_closed=True,
            ssl=self._ssl or True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(self, request: web.Request, *, op: str) -> web.Response:
        """Send ``request`` to an indexer, failing over up to ``retries`` times
        while the retry budget allows."""
        self._refuse_forwarded(request)
        body = (
            await read_body(request, self.max_body_size, self.body_timeout)
            if request.can_read_body
            else b""
        )
        headers = {
            "Content-Type": request.headers.get("Content-Type", "application/json"),
            VIA_HEADER: self.via,
        }
        index = request.match_info.get("name")
        if op == "read":
            # Read-your-writes for plain HTTP callers: ask for at least the
            # newest version this proxy acknowledged on that index.
            asked = request.headers.get(MIN_VERSION_HEADER)
            wanted = self.versions.floor(index, asked)
            if wanted:
                headers[MIN_VERSION_HEADER] = wanted

        self.budget.deposit()
        tried: set[str] = set()
        failures: list[str] = []
        last_answer: web.Response | None = None
        free = True  # the first attempt, or a retry after a refused connection
        for _ in range(1 + self.retries):
            entry = self.registry.pick(op, exclude=tried)
            if entry is None:
                break
            if not free and not self.budget.spend():
                self.budget_refusals += 1
                failures.append("retry budget exhausted")
                break
            tried.add(entry.id)
            outcome = await self._attempt(
                entry.id, entry.address, request, body, headers
            )
            if isinstance(outcome, _Failed):
                failures.append(f"{entry.id} ({outcome.detail})")
                free = not outcome.reached
                continue
            answer, final = outcome
            if final:
                if op == "write" and answer.status == 200 and index is not None:
                    self.versions.acknowledged(index, answer.body)
                return answer
            last_answer = answer
            free = False
            failures.append(f"{entry.id} (HTTP {answer.status})")

        if last_answer is not None:
            return last_answer
        if not failures:
            raise NoHealthyIndexer(self.registry.describe_none(op))
        raise NoHealthyIndexer(
            "no healthy indexer could serve the request; tried " + ", ".join(failures)
        )

    def _refuse_forwarded(self, request: web.Request) -> None:
        """``508 loop_detected`` for a request a balancer forwarded here."""
        via = request.headers.get(VIA_HEADER)
        if via is None:
            return
        if via == self.via:
            raise LoopDetected(
                f"{VIA_HEADER}: this balancer (instance {self.via}) forwarded this "
                "request to itself: an indexer registered here has this "
                "balancer's address; remove that entry"
            )
        raise LoopDetected(
            f"{VIA_HEADER}: balancer instance {via!r:.40} forwarded this request to "
            f"this balancer (instance {self.via}), which is no indexer: remove the "
            "entry with this balancer's address from that one"
        )

    async def _attempt(
        self,
        indexer_id: str,
        address: str,
        request: web.Request,
        body: bytes,
        headers: dict[str, str],
    ) -> tuple[web.Response, bool] | _Failed:
        """One try: (answer, final), or why it failed."""
        assert self._session is not None
        token = self.registry.begin(indexer_id)
        started = time.perf_counter()
        # The path and query exactly as the caller encoded them: rebuilt from
        # their decoded form, yarl would requote them, turning '%FF' into
        # U+FFFD, and drop dot segments (/v1/indices/%2E%2E/items would become
        # /v1/items).
        url = URL(address + request.rel_url.raw_path_qs, encoded=True)
        try:
            async with self._session.request(
                request.method, url, data=body, headers=headers
            ) as upstream:
                payload = await upstream.read()
                status = upstream.status
                passed = {
                    k: upstream.headers[k]
                    for k in _PASSED_HEADERS
                    if k in upstream.headers
                }
        except (aiohttp.ClientError, TimeoutError) as exc:
            detail = _describe(exc)
            elapsed = time.perf_counter() - started
            self.registry.finish(token, ok=False, latency_s=elapsed, detail=detail)
            if self.observe is not None:
                self.observe(indexer_id, elapsed, False)
            logger.info(
                "proxy.attempt_failed indexer=%s path=%s error=%s",
                indexer_id,
                request.path,
                detail,
            )
            return _Failed(detail, reached=not _refused(exc))
        except BaseException:
            # The caller went away: not the indexer's fault.
            self.registry.finish(token, ok=True, latency_s=0.0)
            raise
        elapsed = time.perf_counter() - started

        # Health counts only what says the indexer is broken: a 503 for load or
        # a 4xx for a bad request is the indexer working as designed.
        self.note_load(indexer_id, passed)
        if "Retry-After" in passed:
            passed["Retry-After"] = self._retry_after(indexer_id, passed["Retry-After"])
        code = _error_code(payload) if status in (503, 508) else None
        load_signal = status == 503 and code in _LOAD_SIGNALS
        broken = status >= 500 and not load_signal
        detail = f"HTTP {status}" if broken else ""
        if status == 508 and code == LoopDetected.code:
            detail = "loop detected: that address is a p2plb balancer"
            if self._told.first((indexer_id, address, LoopDetected.code)):
                logger.warning(
                    "proxy.loop_detected indexer=%s address=%s: a balancer, not "
                    "an indexer; remove this entry",
                    indexer_id,
                    address,
                )
        self.registry.finish(token, ok=not broken, latency_s=elapsed, detail=detail)
        if self.observe is not None:
            self.observe(indexer_id, elapsed, not broken)

        passed[INDEXER_HEADER] = indexer_id
        answer = web.Response(body=payload, status=status, headers=passed)
        return answer, status < 500

    def note_load(self, indexer_id: str, headers: Mapping[str, str]) -> None:
        """The ``P2PLB-Load`` and ``P2PLB-Service-Ms`` headers of an indexer's
        answer (proxied, or to a probe): fresher than its last report.

        A malformed header is ignored, and said at DEBUG once per indexer: the
        indexer's reports still carry its load.
        """
        load, service = headers.get(LOAD_HEADER), headers.get(SERVICE_HEADER)
        parsed = parse_load_header(load)
        if parsed is None:
            if load is not None:
                self._malformed(indexer_id, LOAD_HEADER, load)
            return
        seconds = parse_service_header(service)
        if seconds is None and service is not None:
            self._malformed(indexer_id, SERVICE_HEADER, service)
        self.registry.observe_load(indexer_id, *parsed, seconds)

    def _retry_after(self, indexer_id: str, value: str) -> str:
        try:
            seconds = check_whole_number(value, "Retry-After", 1, MAX_RETRY_AFTER)
        except RequestError:
            self._malformed(indexer_id, "Retry-After", value)
            return DEFAULT_RETRY_AFTER
        return str(seconds)

    def _malformed(self, indexer_id: str, header: str, value: str) -> None:
        if self._told.first((indexer_id, header)):
            logger.debug(
                "proxy.malformed_header indexer=%s header=%s value=%.60r; ignored",
                indexer_id,
                header,
                value,
            )


@dataclass(frozen=True)
class _Failed:
    """An attempt that got no answer; ``reached`` if the request may have
    reached the indexer (anything but a refused connection)."""

    detail: str
    reached: bool


def _refused(exc: BaseException) -> bool:
    return isinstance(exc, aiohttp.ClientConnectorError) and isinstance(
        exc.os_error, ConnectionRefusedError
    )


def _decoded(payload: bytes) -> Any:
    """An indexer's answer as JSON, or ``None``: whatever it sent, no exception
    (msgspec raises ``RecursionError`` on deep nesting)."""
    try:
        return msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return None


def _error_code(payload: bytes) -> str | None:
    document = _decoded(payload)
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        code = document["error"].get("code")
        return code if isinstance(code, str) else None
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientSSLError):
        return describe_failure(exc)  # names the certificate problem and the fix
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "truncated answer"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected"
    return str(exc) or type(exc).__name__


class _Once:
    """Whether something was said already, per key, in bounded memory.

    Past ``limit`` keys it forgets them all and says each once more: a few
    repeated lines, rather than memory that grows with every indexer ever seen.
    """

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._seen: set[Hashable] = set()

    def first(self, key: Hashable) -> bool:
        if key in self._seen:
            return False
        if len(self._seen) >= self.limit:
            self._seen.clear()
        self._seen.add(key)
        return True


class _Versions:
    """The newest version acknowledged per index, in bounded memory.

    Versions are fixed-width hex, so string order is version order.  When the
    map is full the oldest index is forgotten and its version folds into a
    floor that every read then asks for: stricter than needed, never wrong.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self.newest: dict[str, str] = {}
        self.floor_version = ""
        self.overall = ""

    def acknowledged(self, index: str, body: Any) -> None:
        document = _decoded(body)
        version = document.get("version") if isinstance(document, dict) else None
        if not is_version(version):
            # Kept, a malformed version would go out on every later read as
            # P2PLB-Min-Version, which no indexer could ever satisfy.
            return
        if version > self.newest.get(index, ""):
            self.newest.pop(index, None)
            self.newest[index] = version  # most recent last
        self.overall = max(self.overall, version)
        if len(self.newest) > self.limit:
            oldest = next(iter(self.newest))
            self.floor_version = max(self.floor_version, self.newest.pop(oldest))

    def floor(self, index: str | None, asked: str | None) -> str:
        known = self.overall if index is None else self.newest.get(index, "")
        return max(known, self.floor_version, (asked or "").strip())
