from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from procs import Procs


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-minutes",
        type=float,
        default=None,
        help="how long tests/test_chaos.py runs (default 1; P2PLB_CHAOS_MINUTES)",
    )


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Real p2plb processes on loopback, all killed when the test ends."""
    started = Procs(tmp_path)
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
