"""Operator calls to one or more balancers: status and strategy.

Balancers share nothing (design.md "Processes"), so every call goes to each
balancer given, concurrently, and the answers are kept per balancer: the CLI
shows all of them and says when they disagree.  A request goes through
``p2plb.transport``, so a failed connection is described as the client
describes it (and the TLS hint is the same).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

import aiohttp

from p2plb import transport
from p2plb.errors import P2PLBError, Unreachable
from p2plb.wire import encode

__all__ = ["Answer", "get_status", "get_strategy", "set_strategy"]

_TIMEOUT = 5.0  # an operator waits this long for a balancer at most


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
        message = f"{where} answered HTTP {answer.status} with no JSON object"
        return Answer(balancer, error=Unreachable(message))
    return Answer(balancer, body=payload)


async def _each(
    balancers: Sequence[str],
    method: str,
    path: str,
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
        return list(
            await asyncio.gather(
                *(_call(session, method, b, path, body, headers) for b in balancers)
            )
        )


async def get_status(
    balancers: Sequence[str], tls: SSLContext | None = None
) -> list[Answer]:
    """``GET /v1/status`` of each balancer: public, so no token is sent."""
    return await _each(balancers, "GET", "/v1/status", tls=tls)


async def get_strategy(
    balancers: Sequence[str], token: str | None = None, tls: SSLContext | None = None
) -> list[Answer]:
    return await _each(balancers, "GET", "/v1/strategy", token=token, tls=tls)


async def set_strategy(
    balancers: Sequence[str],
    name: str,
    token: str | None = None,
    tls: SSLContext | None = None,
) -> list[Answer]:
    body = {"strategy": name}
    return await _each(balancers, "PUT", "/v1/strategy", body, token, tls)
