from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from procs import Procs


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    """Real p2plb processes on loopback, all killed when the test ends."""
    started = Procs(tmp_path)
    try:
        yield started
    finally:
        started.close()
