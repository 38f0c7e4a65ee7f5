"""Bearer tokens: who may change the cluster (design.md "Access").

Two roles: the cluster token (indexers registering, reporting, replicating)
and the admin token (operators changing the strategy or removing an indexer).
A role with no token configured is open, which the config allows only on
loopback or with ``--insecure``.  Tokens are compared in constant time and
never logged.
"""

from __future__ import annotations

import hmac

from p2plb.errors import RequestError

__all__ = ["authorized_as", "require"]


def _bearer(header: str) -> str | None:
    """The token of ``Bearer <token>``; None for another scheme, or no token."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def authorized_as(header: str | None, tokens: dict[str, str | None]) -> str | None:
    """The first role whose token the header carries, or whose token is unset.

    Raises ``401 missing_token`` without a Bearer token (no header, or another
    scheme such as Basic: no token of ours was offered) and ``403 wrong_token``
    with a token that matches no role.
    """
    open_roles = [role for role, token in tokens.items() if not token]
    if open_roles:
        return open_roles[0]
    roles = " or ".join(tokens)
    given = None if header is None else _bearer(header)
    if given is None:
        message = (
            f"a Bearer {roles} token is required"
            if header is None
            else f'expected a Bearer {roles} token, as "Bearer <token>"'
        )
        raise RequestError(
            401,
            "missing_token",
            f"Authorization: {message}",
            headers={"WWW-Authenticate": "Bearer"},  # RFC 6750 section 3
        )
    for role, token in tokens.items():
        assert token is not None
        if hmac.compare_digest(given.encode(), token.encode()):
            return role
    raise RequestError(403, "wrong_token", "Authorization: the token is not valid here")


def require(header: str | None, tokens: dict[str, str | None]) -> str:
    role = authorized_as(header, tokens)
    assert role is not None
    return role
