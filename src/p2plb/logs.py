"""Logging set-up, for the CLI only: the library never configures handlers.

Every line is ``time level logger event key=value ...`` on standard error, so
``grep indexer.unhealthy`` finds what happened to which indexer.
"""

from __future__ import annotations

import logging
import sys
import time

__all__ = ["configure"]


class _UTCFormatter(logging.Formatter):
    def formatTime(  # noqa: N802 (the name is logging's)
        self, record: logging.LogRecord, datefmt: str | None = None
    ) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _UTCFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger("p2plb")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # aiohttp's own warnings (bad requests from clients) go to the same place.
    aiohttp_logger = logging.getLogger("aiohttp")
    aiohttp_logger.handlers[:] = [handler]
    aiohttp_logger.setLevel(logging.WARNING)
    aiohttp_logger.propagate = False
    access = logging.getLogger("p2plb.access")
    access.setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
