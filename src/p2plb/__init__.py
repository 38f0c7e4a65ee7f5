"""p2plb: a load balancer for peer-to-peer indexing systems."""

from __future__ import annotations

from p2plb import errors
from p2plb.config import BalancerConfig, IndexerConfig

__all__ = ["BalancerConfig", "IndexerConfig", "__version__", "errors"]

__version__ = "0.1.0"
