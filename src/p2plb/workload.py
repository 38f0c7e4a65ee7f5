"""A synthetic service model for indexers, for benchmarks only.

Real index requests take well under a millisecond, so balancing strategies
cannot be told apart on them.  With ``--service-time`` each index request also
holds its capacity slot for an exponentially distributed time with that mean
(an M/M/c server per indexer), and with ``--antagonist FACTOR/PERIOD`` that
time is multiplied by FACTOR during every other PERIOD (a noisy neighbour).
The request still runs the real code path; only the work is modelled.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ServiceModel", "parse_antagonist"]

_ANTAGONIST = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")


def parse_antagonist(value: object) -> tuple[float, float]:
    """``"5/5s"`` -> (factor 5.0, period 5.0 s)."""
    match = _ANTAGONIST.match(str(value))
    if match is None:
        raise ValueError(f"expected FACTOR/PERIOD like 5/5s, got {value!r}")
    factor = float(match.group(1))
    period = float(match.group(2)) * (0.001 if match.group(3) == "ms" else 1.0)
    if factor < 1 or period <= 0:
        raise ValueError(f"factor must be >= 1 and period > 0, got {value!r}")
    return factor, period


@dataclass
class ServiceModel:
    mean: float
    factor: float = 1.0
    period: float = 0.0
    rng: random.Random | None = None
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._rng = self.rng or random.Random()
        self._started = self.clock()

    def slowdown(self) -> float:
        """The factor in force now: slow during odd periods."""
        if self.period <= 0:
            return 1.0
        phase = int((self.clock() - self._started) / self.period)
        return self.factor if phase % 2 == 1 else 1.0

    def draw(self) -> float:
        return self._rng.expovariate(1.0 / self.mean) * self.slowdown()

    async def serve(self) -> None:
        await asyncio.sleep(self.draw())
