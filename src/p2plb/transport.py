"""One HTTP request to one node, and what its answer or its failure means.

Rules of this module:

* ``send`` reads an answer whole and does not judge its status: the caller
  decides what a 4xx or a 503 means for it, and ``Answer.error()`` turns one
  into the matching ``p2plb.errors`` exception, naming the node (``where``).
* No aiohttp exception leaves ``send``: a deadline passed is ``Timeout``, any
  other failure to get an answer (refused, reset, TLS, cut short) is
  ``Unreachable``, each chained with ``from`` and naming the node.
* A body that is not what the API promises (not JSON, not an object, no count)
  is ``Unreachable`` too: the node is at fault, not the caller.  So is JSON
  nested too deeply to decode.  A malformed header (``P2PLB-Load``,
  ``P2PLB-Service-Ms``, ``Retry-After``) is read as absent.
"""

from __future__ import annotations

import re
import ssl
from typing import Any

import aiohttp
import msgspec
from multidict import CIMultiDictProxy
from yarl import URL

from p2plb.errors import (
    P2PLBError,
    Timeout,
    Unreachable,
    describe_failure,
    error_from_body,
)
from p2plb.proxy import LOAD_HEADER, parse_load_header
from p2plb.routing import Table
from p2plb.servicetime import SERVICE_HEADER, parse_service_header
from p2plb.wire import MAX_COUNT

__all__ = [
    "Answer",
    "as_object",
    "count",
    "fetch_table",
    "open_session",
    "send",
    "strings",
]

_TABLE_TIMEOUT = 2.0
_SECONDS = re.compile(r"[0-9]{1,9}")


class Answer:
    """One HTTP answer, read whole."""

    __slots__ = ("headers", "raw", "status", "where")

    def __init__(
        self, status: int, raw: bytes, headers: CIMultiDictProxy[str], where: str
    ) -> None:
        self.status, self.raw, self.headers, self.where = status, raw, headers, where

    def json(self) -> Any:
        try:
            return msgspec.json.decode(self.raw)
        except (msgspec.DecodeError, RecursionError):
            raise Unreachable(
                f"{self.where} answered HTTP {self.status} with a body that is not "
                "JSON, or nested too deeply to read"
            ) from None

    def load(self) -> tuple[int, int] | None:
        return parse_load_header(self.headers.get(LOAD_HEADER))

    def service(self) -> float | None:
        """The indexer's recent service time in seconds, if the answer says."""
        return parse_service_header(self.headers.get(SERVICE_HEADER))

    def error(self) -> P2PLBError:
        try:
            body = msgspec.json.decode(self.raw)
        except (msgspec.DecodeError, RecursionError):
            body = None
        return error_from_body(
            self.status, body, where=self.where, retry_after=self.retry_after()
        )

    def retry_after(self) -> float | None:
        """``Retry-After`` in seconds, if it is the whole number p2plb sends.

        ``float`` would also take "nan", "inf" and "-1"; the HTTP-date form is
        not read (no p2plb server sends it).
        """
        value = self.headers.get("Retry-After")
        if value is None or _SECONDS.fullmatch(value) is None:
            return None
        return float(value)


def open_session(
    tls: ssl.SSLContext, session_timeout: float, connect_timeout: float
) -> aiohttp.ClientSession:
    """The connections of one client, to every balancer and indexer it calls."""
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=256, keepalive_timeout=30, ssl=tls
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=session_timeout, connect=connect_timeout),
    )


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes | None,
    headers: dict[str, str],
    where: str,
    session_timeout: float,
    limit: aiohttp.ClientTimeout | None = None,
) -> Answer:
    """Send one request; ``limit`` overrides the session's ``session_timeout``."""
    options: dict[str, Any] = {} if limit is None else {"timeout": limit}
    try:
        async with session.request(
            method, URL(url, encoded=True), data=body, headers=headers, **options
        ) as response:
            raw = await response.read()
            return Answer(response.status, raw, response.headers, where)
    except TimeoutError as exc:
        seconds = (limit.total if limit else None) or session_timeout
        raise Timeout(f"{where} did not answer within {round(seconds, 2):g} s") from exc
    except aiohttp.ClientError as exc:
        raise Unreachable(f"{where}: {describe_failure(exc)}") from exc


async def fetch_table(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    session_timeout: float,
    connect_timeout: float,
) -> Table:
    """The routing table of the balancer at ``url``, with a shorter deadline."""
    where = f"balancer {url}"
    limit = aiohttp.ClientTimeout(
        total=min(session_timeout, _TABLE_TIMEOUT), connect=connect_timeout
    )
    answer = await send(
        session,
        "GET",
        url + "/v1/routing-table",
        None,
        headers,
        where,
        session_timeout,
        limit,
    )
    if answer.status != 200:
        raise answer.error()
    try:
        return Table.parse(answer.json())
    except ValueError as exc:
        raise Unreachable(
            f"{where} sent a routing table it cannot read: {exc}"
        ) from None


def as_object(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise Unreachable(f"expected a JSON object, got {answer!r}")
    return answer


def count(answer: dict[str, Any], key: str) -> int:
    value = answer.get(key)
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise Unreachable(f"an answer without a count of {key!r}: {answer!r:.200}")
    return value


def strings(answer: dict[str, Any], key: str) -> list[str]:
    """``answer[key]``, which must be a list of strings."""
    value = answer.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Unreachable(f"an answer without a list of {key!r}: {answer!r:.200}")
    return value
