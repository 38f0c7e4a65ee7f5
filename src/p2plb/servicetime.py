"""How long an indexer takes to serve one index request, as a recent mean.

Rules of this module:

* The service time of a request is how long it held one of the indexer's
  ``--capacity`` slots: the work, without the wait in the queue.  The queue is
  already counted as load; a latency that included it would count it twice in
  ``least_latency`` (expected delay = service time x (load + 1) / capacity).
* The indexer keeps the mean itself, over every request it serves, and sends it
  on every answer (``P2PLB-Service-Ms``) and in every load report
  (``service_ms``).  Whoever called takes the freshest figure, as with
  ``P2PLB-Load``: one answer is enough for a routed client that rarely calls
  this indexer to know how fast it is now.
* No I/O: time is passed in, so the simulator drives the same mean on its
  simulated clock.

The mean decays with time, not with the number of samples: a sample arriving
``dt`` seconds after the previous one has weight ``1 - exp(-dt / decay)``, so
the mean covers about the last ``decay`` seconds whatever the request rate, and
the first sample after a quiet spell replaces most of what came before.  An
indexer that was slow and is fast again is seen as fast on its next answer
(the irregular-interval EWMA of Eckner, "Algorithms for Unevenly Spaced Time
Series", 2019; Finagle's peak-EWMA balancer decays the same way).
"""

from __future__ import annotations

import math
import re

__all__ = [
    "DECAY",
    "SERVICE_HEADER",
    "ServiceTime",
    "format_service_header",
    "parse_service_header",
]

SERVICE_HEADER = "P2PLB-Service-Ms"
#: Seconds over which the mean is taken.  The antagonist benchmark's slow
#: periods last 5 s; 0.3 s to 3 s all track them in the simulator (p99 within
#: 5 %), and 1 s keeps the mean steady with exponential service times at a few
#: dozen requests a second.
DECAY = 1.0
#: Figures beyond this are refused when parsed: no index request takes an hour.
MAX_SERVICE_MS = 3_600_000.0
# What format_service_header writes, give or take the decimals: plain ASCII
# digits.  ``float`` alone would also take "nan", "1e400", "1_0" and digits of
# other scripts ("١٢"), none of which an indexer sends.
_SERVICE_MS = re.compile(r"[0-9]{1,7}(?:\.[0-9]{1,9})?")


class ServiceTime:
    """A mean of service times that forgets at rate ``1 / decay`` per second."""

    __slots__ = ("_at", "_mean", "decay")

    def __init__(self, decay: float = DECAY) -> None:
        if not decay > 0:
            raise ValueError(f"decay must be > 0 seconds, got {decay}")
        self.decay = decay
        self._mean: float | None = None
        self._at = 0.0

    def add(self, seconds: float, now: float) -> None:
        """One request held a slot for ``seconds``, finishing at ``now``."""
        seconds = max(0.0, seconds)
        if self._mean is None:
            self._mean, self._at = seconds, now
            return
        # A clock that went backwards (it should not: callers pass monotonic
        # time) gives the sample no weight rather than a negative one.
        elapsed = max(0.0, now - self._at)
        weight = -math.expm1(-elapsed / self.decay)
        self._mean += weight * (seconds - self._mean)
        self._at = max(self._at, now)

    @property
    def seconds(self) -> float | None:
        """The mean, or ``None`` before the first request."""
        return self._mean

    @property
    def ms(self) -> float | None:
        """The mean in milliseconds, rounded to a microsecond, or ``None``."""
        return None if self._mean is None else round(self._mean * 1000.0, 3)


def format_service_header(seconds: float) -> str:
    return f"{seconds * 1000.0:.3f}"


def parse_service_header(value: str | None) -> float | None:
    """``"12.5"`` (milliseconds) -> ``0.0125`` seconds; ``None`` if malformed.

    Malformed is anything but ASCII digits with an optional fraction, and any
    figure past ``MAX_SERVICE_MS``: never an exception.
    """
    if value is None or _SERVICE_MS.fullmatch(value) is None:
        return None
    ms = float(value)
    return ms / 1000.0 if ms <= MAX_SERVICE_MS else None
