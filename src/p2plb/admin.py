"""Operator calls to one or more balancers: status and strategy.

Balancers share nothing (design.md "Processes"), so every call goes to each
balancer given, concurrently, and the answers are kept per balancer: the CLI
shows all of them and says when they disagree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

import aiohttp

from p2plb.errors import P2PLBError, Timeout, Unreachable, error_from_body
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
    data = encode(body) if body is not None else None
    try:
        async with session.request(
            method, balancer + path, data=data, headers=headers
        ) as response:
            try:
                payload = await response.json(content_type=None)
            except ValueError:
                payload = None
            if response.status >= 400 or not isinstance(payload, dict):
                where = f"balancer {balancer}"
                return Answer(
                    balancer,
                    error=error_from_body(response.status, payload, where=where),
                )
            return Answer(balancer, body=payload)
    except TimeoutError:
        return Answer(
            balancer, error=Timeout(f"balancer {balancer} did not answer in time")
        )
    except aiohttp.ClientError as exc:
        reason = str(exc) or type(exc).__name__
        return Answer(
            balancer, error=Unreachable(f"balancer {balancer} is unreachable: {reason}")
        )


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
