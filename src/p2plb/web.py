"""HTTP plumbing shared by the indexer and the balancer servers.

Handlers raise errors from ``p2plb.errors``; the middleware here is the one place
that turns them into the JSON error body of design.md, so every server answers
every failure the same way, including the ones aiohttp raises itself (unknown
path, wrong method, body too large).  An unexpected exception is logged with its
traceback and answered ``500 internal_error`` without details, so a bug never
leaks internals to a caller.

Known shortcoming: what aiohttp's HTTP parser refuses before any handler runs
(a header line over ``MAX_HEADER_LINE``, an unknown method, broken chunking, a
``Content-Encoding`` it cannot decode such as ``br``) is answered by aiohttp
itself, a plain-text ``400`` without the JSON error body or ``P2PLB-Load``.
Its ``RequestHandler.handle_error`` is where that text is made; overriding it
means subclassing aiohttp internals, which this project's version range
(aiohttp 3.9 to 3.x) does not keep stable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from p2plb.errors import RemoteError, RequestError, StorageError
from p2plb.wire import (
    check_item,
    check_name,
    check_whole_number,
    decode_percent,
    encode,
    invalid,
)

__all__ = [
    "DEFAULT_PAGE",
    "INDEX",
    "MAX_PAGE",
    "MAX_HEADER_LINE",
    "MAX_REQUEST_LINE",
    "MAX_URL",
    "check_index",
    "check_item_query",
    "check_page",
    "check_query",
    "error_middleware",
    "error_response",
    "index_name",
    "json_response",
    "read_body",
]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_JSON = "application/json"

#: The path of one index.  It matches an empty name too, so that one gets
#: ``400 invalid_field`` naming ``name`` rather than ``404 not_found``, and
#: braces, which names may hold (aiohttp's default pattern refuses them).
INDEX = "/v1/indices/{name:[^/]*}"
_NAME_SEGMENT = INDEX[: INDEX.index("{")].count("/")
DEFAULT_PAGE = 1000
MAX_PAGE = 10_000

#: The longest path and query the application takes; longer gets ``414``.  It
#: fits the longest request p2plb itself sends: a 256-character name and a
#: 4096-byte ``after`` item, both percent-encoded (3 bytes per byte).
MAX_URL = 16 * 1024
#: What the HTTP parser accepts before it answers a plain ``400`` itself.
MAX_REQUEST_LINE = 64 * 1024
MAX_HEADER_LINE = 8190


def json_response(
    payload: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON answer encoded with msgspec, which is several times faster than json."""
    return web.Response(
        body=encode(payload), status=status, content_type=_JSON, headers=headers
    )


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    body = {"error": {"code": code, "message": message}}
    return json_response(body, status=status, headers=headers)


async def read_body(request: web.Request, limit: int, time_limit: float) -> bytes:
    """The request body, or ``413 body_too_large`` past ``limit`` bytes.

    The declared length is checked first so a large upload is refused before it
    is read; aiohttp's own limit (``client_max_size``) catches bodies that lie.
    The whole body must arrive within ``time_limit`` seconds, else ``408
    request_timeout``: ``--idle-timeout`` covers only the request line and the
    headers, and without a deadline a client trickling its body byte by byte
    would hold the handler (at an indexer, a capacity slot) for as long as it
    liked.  aiohttp keeps what it read, so a second call returns at once.
    """
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(declared, limit)
    try:
        async with asyncio.timeout(time_limit):
            body = await request.read()
    except TimeoutError:
        raise RequestError(
            408,
            "request_timeout",
            f"body: not received within {time_limit:g} s (--body-timeout)",
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(None, limit) from None
    except ConnectionResetError:
        # The caller hung up mid-body: its mistake or its crash, not ours, and
        # nobody is left to read the answer.
        logger.debug("request.body_cut path=%s", request.path)
        raise RequestError(
            400, "invalid_json", "body: the connection closed before it was whole"
        ) from None
    except RequestPayloadError as exc:
        # A body that cannot be decoded, e.g. "Content-Encoding: gzip" on bytes
        # that are not gzip: the caller's mistake, not a server failure.
        reason = str(exc.__cause__ or exc).split("\n")[-1].strip()
        raise RequestError(
            400, "invalid_json", f"body: could not be read ({reason})"
        ) from None
    if len(body) > limit:
        raise _too_large(len(body), limit)
    return body


def _too_large(size: int | None, limit: int) -> RequestError:
    got = f"{size} bytes" if size is not None else "more"
    return RequestError(
        413, "body_too_large", f"body: must be at most {limit} bytes, got {got}"
    )


def index_name(request: web.Request) -> str:
    """The name in an ``INDEX`` path, decoded strictly from the path as sent.

    aiohttp's own ``match_info`` would take '%FF' as the text "%FF".
    """
    segment = request.rel_url.raw_path.split("/")[_NAME_SEGMENT]
    return check_name(decode_percent(segment, "name"))


_NO_QUERY: frozenset[str] = frozenset()


def check_query(request: web.Request, allowed: frozenset[str] = _NO_QUERY) -> None:
    """Refuse a query parameter the route does not take, or one given twice.

    Every route calls this but ``/metrics`` and the messages between p2plb
    nodes (registering, unregistering, load reports, replication), which
    ignore what they do not know (design.md "HTTP API").  Taking the first of
    two values would drop the other without a word: ``DELETE
    ...?item=b&item=c`` removed only b.  Values must be percent-encoded
    UTF-8, which ``request.query`` does not check (see ``decode_percent``); it
    splits the query as done here, so after this it holds exactly what was
    sent.
    """
    seen: set[str] = set()
    for pair in request.rel_url.raw_query_string.split("&"):
        if not pair:
            continue
        raw_key, _, raw_value = pair.partition("=")
        key = _query_key(raw_key)
        if key not in allowed:
            raise RequestError(400, "unknown_field", f"{key}: unknown query parameter")
        if key in seen:
            raise invalid(key, "given more than once")
        seen.add(key)
        decode_percent(_plus_as_space(raw_value), key)


# The checks of the index API's paths and queries, in the order the indexer
# makes them: the balancer makes them too before it forwards a request, so that
# a bad one is 400 whether or not an indexer is up to say so.  Bodies are left
# to the indexer, which reads them anyway.


def check_index(request: web.Request) -> str:
    """``POST /v1/indices/{name}/items`` and ``.../items/remove``: the name."""
    check_query(request)
    return index_name(request)


def check_page(request: web.Request) -> tuple[str, int, str | None]:
    """``GET /v1/indices/{name}``: the name, ``limit`` and ``after``."""
    check_query(request, _PAGE_QUERY)
    name = index_name(request)
    raw = request.query.get("limit")
    limit = (
        DEFAULT_PAGE if raw is None else check_whole_number(raw, "limit", 1, MAX_PAGE)
    )
    after = request.query.get("after")
    if after is not None:
        check_item(after, field="after")
    return name, limit, after


def check_item_query(request: web.Request) -> tuple[str, str]:
    """``DELETE /v1/indices/{name}/items?item=``: the name and the item."""
    check_query(request, _ITEM_QUERY)
    name = index_name(request)
    if "item" not in request.query:
        raise invalid("item", "query parameter is required")
    return name, check_item(request.query["item"])


_PAGE_QUERY = frozenset({"limit", "after"})
_ITEM_QUERY = frozenset({"item"})


def _query_key(raw: str) -> str:
    """A key decoded; one that is not percent-encoded UTF-8 as it was sent
    (no route takes such a key, so it is named as unknown)."""
    try:
        return decode_percent(_plus_as_space(raw), "query")
    except RequestError:
        return raw


def _plus_as_space(raw: str) -> str:
    return raw.replace("+", "%20")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    if len(request.raw_path) > MAX_URL:
        return error_response(
            414,
            "uri_too_long",
            f"URL: path and query must be at most {MAX_URL} bytes, "
            f"got {len(request.raw_path)}",
        )
    try:
        return await handler(request)
    except RequestError as exc:
        return error_response(exc.status, exc.code, exc.message, headers=exc.headers)
    except RemoteError as exc:
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return error_response(exc.status or 502, exc.code, exc.message, headers=headers)
    except StorageError as exc:
        logger.error("request.storage_failed path=%s error=%s", request.path, exc)
        return error_response(500, "storage_error", "the indexer's storage failed")
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "body_too_large", "body: too large")
    except web.HTTPNotFound:
        return error_response(404, "not_found", f"no such path: {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; use {allowed}",
            headers={"Allow": allowed},
        )
    except web.HTTPException:
        raise
    except Exception:
        logger.exception(
            "request.failed method=%s path=%s", request.method, request.path
        )
        return error_response(500, "internal_error", "an unexpected error occurred")
