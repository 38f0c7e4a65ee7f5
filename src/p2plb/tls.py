"""TLS for every p2plb connection: servers with a certificate, clients verifying.

A server given ``--tls-cert`` and ``--tls-key`` speaks HTTPS only.  Every
client side (indexers reporting and replicating, the balancer's proxy and
probes, the CLI and the Python client) verifies ``https://`` peers against
``--ca-file`` when given, else the system's trust store; ``http://`` peers are
reached in clear as before.  Verification is never switched off: a cluster
with its own CA passes that CA, it does not skip the check.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from p2plb.errors import ConfigError

__all__ = ["client_context", "server_context"]


def server_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The context a server listens with, or None for plain HTTP."""
    if not cert and not key:
        return None
    if not cert or not key:
        missing = "--tls-cert" if not cert else "--tls-key"
        raise ConfigError(f"{missing}: TLS needs both --tls-cert and --tls-key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"--tls-cert: cannot load {cert} with key {key}: {exc}"
        ) from exc
    return context


def client_context(ca_file: str | None) -> ssl.SSLContext:
    """The context used to reach ``https://`` peers: always verifying."""
    if ca_file is not None and not Path(ca_file).is_file():
        raise ConfigError(f"--ca-file: no such file: {ca_file}")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca-file: cannot load {ca_file}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
