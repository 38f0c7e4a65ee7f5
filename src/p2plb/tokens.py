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


def _bearer(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authorized_as(header: str | None, tokens: dict[str, str | None]) -> str | None:
    """The first role whose token the header carries, or whose token is unset.

    Raises ``401 missing_token`` without a header and ``403 wrong_token`` with
    a token that matches no role.
    """
    open_roles = [role for role, token in tokens.items() if not token]
    if open_roles:
        return open_roles[0]
    given = _bearer(header)
    if given is None:
        roles = " or ".join(tokens)
        raise RequestError(
            401, "missing_token", f"Authorization: a Bearer {roles} token is required"
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
