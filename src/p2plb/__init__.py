"""p2plb: a load balancer for peer-to-peer indexing systems."""

from __future__ import annotations

from p2plb import errors
from p2plb.client import AsyncClient
from p2plb.config import BalancerConfig, IndexerConfig
from p2plb.sync import Client

__all__ = [
    "AsyncClient",
    "BalancerConfig",
    "Client",
    "IndexerConfig",
    "__version__",
    "errors",
]

__version__ = "0.1.0"
