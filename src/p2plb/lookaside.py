"""Lookaside answers counted as load, until the balancer learns better.

Rules of this module:

* Each ``GET /v1/route`` answer adds one to the effective load of the indexer
  it names (design.md, "Load"), so that callers spread out instead of all
  landing on the idlest indexer.
* An answer counts until a load figure of that indexer (a report, or the
  ``P2PLB-Load`` of a probe's or a proxied answer) is observed at least one
  service time after it: the indexer's own, else ``default_service``.  By then
  the request the answer sent has arrived, and if it still runs the figure
  holds it.  This refines design.md's "about one recent service time": a
  fixed time forgot answers the balancer had learnt nothing about yet, and
  callers asking one after another 20 ms apart all went to an idle newcomer,
  each answer forgotten before the next.
* An answer older than ``max_age`` stops counting anyway, so that an indexer
  whose load is never observed does not gather answers for ever; so does the
  oldest of more than ``most`` (memory stays bounded, about 200 bytes each,
  when loads go unobserved for long under many picks).
* Each answer leaves once, from the front of its entry's queue (an
  observation) or of the queue here (the limits): O(1) amortised per answer,
  and no scan of the indexers.  No I/O; time is passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from p2plb.backends import Entry

__all__ = ["Lookaside"]


class Lookaside:
    """Every lookaside answer still counted; ``changed`` hears of each entry
    whose count the limits lowered (an observation's caller knows already)."""

    def __init__(
        self,
        changed: Callable[[Entry], None],
        *,
        default_service: float,
        max_age: float,
        most: int,
    ) -> None:
        self.changed = changed
        self.default_service = default_service
        self.max_age = max_age
        self.most = most
        # Oldest first: (when, number, entry).  An entry's own queue holds
        # (number, when) of the answers still counted there.
        self._answers: deque[tuple[float, int, Entry]] = deque()
        self._given = 0

    def given(self, entry: Entry, now: float) -> None:
        """An answer pointing at ``entry`` was given at ``now``."""
        self._given += 1
        entry.lookaside.append((self._given, now))
        self._answers.append((now, self._given, entry))
        if len(self._answers) > self.most:
            self._drop_oldest()

    def observed(self, entry: Entry, now: float) -> None:
        """A fresh load figure of ``entry``: it holds the requests of the
        answers given at least one service time before ``now``."""
        wait = self.default_service if entry.service is None else entry.service
        answers = entry.lookaside
        while answers and answers[0][1] + wait <= now:
            answers.popleft()

    def expire(self, now: float) -> None:
        """Stop counting the answers older than ``max_age``."""
        oldest = now - self.max_age
        while self._answers and self._answers[0][0] <= oldest:
            self._drop_oldest()

    def clear(self) -> None:
        self._answers.clear()

    def _drop_oldest(self) -> None:
        # Both queues are in the order answers were given, and an observation
        # only ever takes the oldest of an entry's: an answer still counted
        # there is the first of its entry's when it comes first here.
        _, number, entry = self._answers.popleft()
        if entry.lookaside and entry.lookaside[0][0] == number:
            entry.lookaside.popleft()
            self.changed(entry)
