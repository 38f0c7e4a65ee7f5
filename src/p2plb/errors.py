"""Every error p2plb raises, in one place.

The hierarchy::

    P2PLBError
    ├── UsageError            the caller asked for something wrong
    │   ├── ConfigError       a setting failed validation (servers and CLI)
    │   └── RequestError      an HTTP request was rejected; carries status and code
    ├── RemoteError           another node failed or refused
    │   ├── NoHealthyIndexer  no indexer can take the request
    │   ├── Overloaded        the indexer answered 503 overloaded
    │   ├── ReplicaBehind     the indexer has not caught up to the version asked for
    │   ├── InsufficientReplicas  the write did not reach enough indexers
    │   ├── Superseded        this indexer's registration was replaced
    │   ├── LoopDetected      an "indexer" is a balancer: the request came back
    │   └── Unreachable       connection refused, reset, or an unreadable answer
    ├── Timeout               a remote node did not answer in time
    └── StorageError          the local database failed

``RequestError`` is both what a server raises inside a handler (the server turns
it into the JSON error body of design.md) and what a client raises when it gets
such a body back for a mistake of its caller.  ``error_from_body`` does that
conversion in one place so every client maps codes the same way.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import aiohttp

__all__ = [
    "ConfigError",
    "InsufficientReplicas",
    "LoopDetected",
    "NoHealthyIndexer",
    "Overloaded",
    "P2PLBError",
    "RemoteError",
    "ReplicaBehind",
    "RequestError",
    "StorageError",
    "Superseded",
    "Timeout",
    "Unreachable",
    "UsageError",
    "describe_failure",
    "error_from_body",
]


class P2PLBError(Exception):
    """Base of every error raised by p2plb."""


class UsageError(P2PLBError):
    """The caller asked for something that cannot work, whatever the cluster does."""


class ConfigError(UsageError):
    """A setting is missing or invalid; the message names the setting."""


class RequestError(UsageError):
    """An HTTP request was rejected with a 4xx status and an error code.

    Raised by server handlers (and turned into the response body) and by
    clients when a server rejected what their caller asked.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}


class RemoteError(P2PLBError):
    """Another node failed, refused, or is not there."""

    status: int | None = None
    code: str = "remote_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class NoHealthyIndexer(RemoteError):
    """No indexer is healthy, so nothing can serve the request."""

    status = 503
    code = "no_healthy_indexer"


class Overloaded(RemoteError):
    """An indexer is at capacity and its queue is full; try again later."""

    status = 503
    code = "overloaded"


class ReplicaBehind(RemoteError):
    """The indexer has not yet caught up to the version the read asked for."""

    status = 503
    code = "replica_behind"


class InsufficientReplicas(RemoteError):
    """A write was not durable on enough indexers; it may still apply later."""

    status = 503
    code = "insufficient_replicas"


class Superseded(RemoteError):
    """This indexer's registration was replaced by a newer one with its id."""

    status = 409
    code = "superseded"


class LoopDetected(RemoteError):
    """``508 loop_detected``: a balancer was sent a request a balancer forwarded.

    Balancers forward index requests to indexers only, and indexers never
    forward, so a forwarded request (``P2PLB-Via``) reaching a balancer means
    an indexer entry holds a balancer's address, maybe its own.  The balancer
    that forwarded it counts that as a failure of that entry and tries
    another; a client does the same.  An indexer answers it to a replication
    push from itself (a stale entry at its own address), which must never
    count as a second copy.
    """

    status = 508
    code = "loop_detected"


class Unreachable(RemoteError):
    """A node could not be reached, or its answer could not be read."""

    code = "unreachable"


class Timeout(P2PLBError):
    """A remote node did not answer within the time allowed."""


class StorageError(P2PLBError):
    """The local SQLite database failed; the operation was not applied."""


_REMOTE_BY_CODE: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        NoHealthyIndexer,
        Overloaded,
        ReplicaBehind,
        InsufficientReplicas,
        Superseded,
        LoopDetected,
    )
}


def error_from_body(
    status: int, body: Any, *, where: str, retry_after: float | None = None
) -> P2PLBError:
    """Turn an error answer of a p2plb server into the matching exception.

    ``where`` names the node that answered, so the message says whom to blame.
    """
    code = "unknown"
    message = f"HTTP {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", code))
        message = str(body["error"].get("message", message))
    remote = _REMOTE_BY_CODE.get(code)
    if remote is not None:
        return remote(f"{where}: {message}", retry_after=retry_after)
    if 400 <= status < 500:
        return RequestError(status, code, f"{where}: {message}")
    return Unreachable(f"{where} answered HTTP {status}: {message}")


def describe_failure(exc: aiohttp.ClientError) -> str:
    """What went wrong on the connection, in words a user can act on."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        reason = getattr(exc.certificate_error, "verify_message", None)
        return (
            f"TLS certificate not trusted ({reason or exc.certificate_error}); "
            "pass the cluster's CA with ca_file= or --ca-file"
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS failed ({exc})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, socket.gaierror):
            # Its errno is a resolver code (-2), which os.strerror cannot name.
            return f"cannot resolve host {exc.host!r} ({exc.os_error.strerror})"
        if exc.os_error.errno is not None:
            return f"cannot connect ({os.strerror(exc.os_error.errno).lower()})"
        return f"cannot connect ({exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnected before answering"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the answer was cut short"
    return f"connection broken ({exc or type(exc).__name__})"
