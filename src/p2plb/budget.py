"""How much a client may retry, and how long it waits before it does.

Rules of this module:

* No I/O: time comes from the ``clock`` passed in, randomness from the
  ``random.Random`` passed in, so tests drive both by hand.
* Retries are paid from a token bucket (``RetryBudget``).  Every call deposits
  ``ratio`` tokens (0.2 by default) and every retry spends one, so over time
  retries stay within ``ratio`` of the calls.  A ``reserve`` of tokens (10 by
  default) is there from the start and refills with time at ``refill_per_s``
  even when calls are few, so a quiet client can still retry a lone failure.
  Deposits stop at ``cap`` so that a long healthy period cannot bank an
  unbounded burst of retries for the next outage.
* Backoff is exponential with full jitter, capped small: a retry goes to
  another indexer, so a long wait would only add latency.  ``Retry-After`` is
  honoured up to the same small cap.

Why a budget and not just a retry count.  With a fixed count, an outage
multiplies the load on what is left by up to ``1 + retries``, exactly when it
can least take it ("retry storms"; the Google SRE book, chapter 22, and
Finagle's ``RetryBudget`` describe the same bucket).  With the budget, a
healthy cluster still gets its retries for the odd failure, but a failing one
sees at most ``1 + ratio`` times the calls, plus the reserve.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from p2plb.errors import (
    LoopDetected,
    Overloaded,
    P2PLBError,
    RemoteError,
    ReplicaBehind,
    Timeout,
    Unreachable,
)

__all__ = [
    "RETRYABLE",
    "RetryBudget",
    "backoff",
    "gave_up",
    "reason",
    "retry_after_of",
]

#: What a retry on another indexer may cure: the rest is raised at once.
RETRYABLE = (Unreachable, Timeout, Overloaded, ReplicaBehind, LoopDetected)


class RetryBudget:
    """Tokens earned by calls and spent by retries."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        ratio: float = 0.2,
        reserve: float = 10.0,
        refill_per_s: float = 1.0,
        cap: float = 100.0,
    ) -> None:
        if ratio < 0 or reserve < 0 or refill_per_s < 0 or cap < reserve:
            raise ValueError(
                "retry budget: ratio, reserve and refill_per_s must be >= 0 "
                f"and cap >= reserve; got {ratio}, {reserve}, {refill_per_s}, {cap}"
            )
        self._clock = clock
        self.ratio = ratio
        self.reserve = reserve
        self.refill_per_s = refill_per_s
        self.cap = cap
        self._tokens = reserve
        self._checked = clock()

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def deposit(self) -> None:
        """A call starts: it earns ``ratio`` tokens, up to ``cap``."""
        self._refill()
        self._tokens = min(self.cap, self._tokens + self.ratio)

    def spend(self) -> bool:
        """Take one token for a retry; ``False`` (and nothing taken) if short."""
        self._refill()
        if self._tokens < 1.0 - 1e-9:  # five deposits of 0.2 make one token
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        return True

    def _refill(self) -> None:
        # Time refills only up to the reserve: the reserve is a floor for quiet
        # clients, not a second source of retries for busy ones.
        now = self._clock()
        elapsed = max(0.0, now - self._checked)
        self._checked = now
        if self._tokens < self.reserve:
            self._tokens = min(self.reserve, self._tokens + elapsed * self.refill_per_s)


def backoff(
    attempt: int,
    rng: random.Random,
    *,
    base: float = 0.01,
    cap: float = 0.25,
    retry_after: float | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry).

    Full jitter: uniform in ``[0, min(cap, base * 2**(attempt - 1))]``, so
    clients that failed together do not retry together.  A ``Retry-After``
    from the answer raises the wait to at least that, still at most ``cap``.
    """
    ceiling = min(cap, base * 2.0 ** max(0, attempt - 1))
    delay = rng.uniform(0.0, ceiling)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(cap, retry_after))
    return delay


def retry_after_of(error: P2PLBError) -> float | None:
    return error.retry_after if isinstance(error, RemoteError) else None


def reason(error: P2PLBError) -> str:
    if isinstance(error, Overloaded | ReplicaBehind | LoopDetected):
        return error.code
    if isinstance(error, Timeout):
        return "timed out"
    return str(error).rsplit(": ", 1)[-1]


def gave_up(last: P2PLBError, attempts: list[str]) -> P2PLBError:
    """``last`` again, its message saying what every attempt met."""
    if len(attempts) < 2:
        return last
    message = f"{last} (gave up after {'; '.join(attempts)})"
    if isinstance(last, RemoteError):
        return type(last)(message, retry_after=last.retry_after)
    return type(last)(message)
