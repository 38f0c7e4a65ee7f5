"""Operator calls to one or more balancers: status and strategy.

Balancers share nothing (design.md "Processes"), so every call goes to each
balancer given, concurrently, and the answers are kept per balancer: the CLI
shows all of them and says when they disagree.

A balancer may be broken, of another version, or hostile, and the CLI must
still end in a table or one line.  So a request goes through
``p2plb.transport``, which describes a failed connection as the client does,
and an answer is kept only in the shape the CLI reads: a JSON object nested
no deeper than ``_MAX_DEPTH`` (deeper JSON decodes, yet printing it overflows
the stack), with ``indexers`` a list of objects or ``strategy`` a string.
Anything else is that balancer's error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

import aiohttp

from p2plb import transport
from p2plb.errors import P2PLBError, Unreachable
from p2plb.wire import encode

__all__ = ["Answer", "get_status", "get_strategy", "set_strategy"]

_TIMEOUT = 5.0  # an operator waits this long for a balancer at most
_MAX_DEPTH = 16  # a status is four levels deep: room to grow, none to overflow

# What is wrong with the body of an answer, for one command; None when nothing.
Check = Callable[[dict[str, Any]], str | None]


@dataclass(frozen=True)
class Answer:
    """What one balancer answered, or why it did not."""

    balancer: str
    body: dict[str, Any] | None = None
    error: P2PLBError | None = None


async def _call(
    session: aiohttp.ClientSession,
    method: str,
    balancer: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    check: Check,
) -> Answer:
    where = f"balancer {balancer}"
    data = encode(body) if body is not None else None
    try:
        answer = await transport.send(
            session, method, balancer + path, data, headers, where, _TIMEOUT
        )
        if answer.status >= 400:
            raise answer.error()
        payload = answer.json()
    except P2PLBError as exc:
        return Answer(balancer, error=exc)

    if not isinstance(payload, dict):
        problem: str | None = "no JSON object"
    elif _deeper_than(payload, _MAX_DEPTH):
        problem = f"JSON nested more than {_MAX_DEPTH} levels deep"
    else:
        problem = check(payload)
    if problem is not None:
        message = f"{where} answered HTTP {answer.status} with {problem}"
        return Answer(balancer, error=Unreachable(message))
    return Answer(balancer, body=payload)


def _deeper_than(value: Any, limit: int) -> bool:
    # A loop, not recursion: it looks for what recursion cannot hold.
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if not isinstance(node, dict | list):
            continue
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        pending.extend((child, depth + 1) for child in children)
    return False


def _status_check(body: dict[str, Any]) -> str | None:
    rows = body.get("indexers", [])
    if isinstance(rows, list) and all(isinstance(row, dict) for row in rows):
        return None
    return "'indexers' not a list of objects"


def _strategy_check(body: dict[str, Any]) -> str | None:
    if isinstance(body.get("strategy"), str):
        return None
    return "'strategy' not a string"


async def _each(
    balancers: Sequence[str],
    method: str,
    path: str,
    check: Check,
    body: dict[str, Any] | None = None,
    token: str | None = None,
    tls: SSLContext | None = None,
) -> list[Answer]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=_TIMEOUT),
        connector=aiohttp.TCPConnector(ssl=tls or True),
    ) as session:
        calls = (
            _call(session, method, b, path, body, headers, check) for b in balancers
        )
        return list(await asyncio.gather(*calls))


async def get_status(
    balancers: Sequence[str], tls: SSLContext | None = None
) -> list[Answer]:
    """``GET /v1/status`` of each balancer: public, so no token is sent."""
    return await _each(balancers, "GET", "/v1/status", _status_check, tls=tls)


async def get_strategy(
    balancers: Sequence[str], token: str | None = None, tls: SSLContext | None = None
) -> list[Answer]:
    return await _each(
        balancers, "GET", "/v1/strategy", _strategy_check, token=token, tls=tls
    )


async def set_strategy(
    balancers: Sequence[str],
    name: str,
    token: str | None = None,
    tls: SSLContext | None = None,
) -> list[Answer]:
    body = {"strategy": name}
    return await _each(
        balancers, "PUT", "/v1/strategy", _strategy_check, body, token, tls
    )
