"""Whether one indexer is fit to take requests: a state machine with no I/O.

An indexer is healthy when none of these holds (checked in this order, and the
first that holds gives the reason):

1. **Restored, not yet probed.**  An entry a balancer restored from its state
   file is unhealthy ("restored; awaiting probe") until one probe succeeds;
   once ``probe_fall`` probes failed, the reason says how they failed.
2. **Ejected.**  ``passive_fall`` proxied requests in a row failed (the caller
   decides what is a failure: refused, reset, timed out, a 5xx other than
   ``503 overloaded``), so it is left out for ``eject_for`` seconds.  Nothing
   cuts an ejection short, not even a report: an indexer can report on time
   and still fail every request.  When it ends the indexer is back *on
   probation*: one more failed request ejects it again for twice as long (up
   to ``eject_max``), and ``probation_ok`` successful requests in a row end the
   probation and forget the earlier ejections.
3. **Failing probes.**  ``probe_fall`` failed active probes in a row; it takes
   ``probe_rise`` successful probes in a row to count again.
4. **Silent.**  No report for more than ``unhealthy_after`` seconds (counted
   from registration until the first report).  A successful probe does not
   help: an indexer that stopped reporting may have stopped its replication
   too.

Time is whatever monotonic clock the caller reads and passes in as ``now``;
this module never looks at the wall clock.  Every method that can change the
verdict returns a ``HealthChange`` when it did (``healthy`` flipped), else
``None``.  One exception: a passive ejection the caller forbids (too many
indexers are out already, see ``max_ejected_fraction``) is announced with a
``HealthChange`` that keeps ``healthy=True``, so that it gets logged.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Health", "HealthChange", "HealthPolicy"]


@dataclass(frozen=True)
class HealthChange:
    """What a caller logs: ``indexer.healthy`` or ``indexer.unhealthy``.

    ``removed`` is set when the registry forgot the indexer for having been
    unhealthy too long (``indexer.forgotten``).
    """

    id: str
    healthy: bool
    reason: str
    removed: bool = False
    refused: bool = False  # an ejection refused by the max-ejected rule


@dataclass(frozen=True)
class HealthPolicy:
    """The thresholds of the rules above."""

    unhealthy_after: float = 60.0
    probe_rise: int = 2
    probe_fall: int = 2
    passive_fall: int = 3
    eject_for: float = 10.0
    eject_max: float = 300.0
    probation_ok: int = 5
    max_ejected_fraction: float = 0.5

    def __post_init__(self) -> None:
        for name in ("unhealthy_after", "eject_for", "eject_max"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("probe_rise", "probe_fall", "passive_fall", "probation_ok"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.max_ejected_fraction <= 1.0:
            raise ValueError(
                "max_ejected_fraction must be between 0 and 1, "
                f"got {self.max_ejected_fraction}"
            )

    def ejection_time(self, ejections: int) -> float:
        """How long the ``ejections``-th ejection in a row lasts."""
        return min(self.eject_for * 2.0 ** (ejections - 1), self.eject_max)


class Health:
    """The health of one indexer, driven by reports, probes and requests."""

    def __init__(
        self,
        id: str,
        policy: HealthPolicy,
        now: float,
        *,
        restored: bool = False,
    ) -> None:
        self.id = id
        self.policy = policy
        self.healthy = not restored
        self.reason = "restored; awaiting probe" if restored else "registered"
        self.since = now  # when ``healthy`` last flipped (or the start)

        self.last_report: float | None = None
        self._heard_at = now  # last report, or registration before the first
        self._awaiting_probe = restored

        self._probe_down = False
        self._probe_ok_run = 0
        self._probe_fail_run = 0
        self._probe_reason = ""

        self._request_fail_run = 0
        self._request_ok_run = 0
        self._ejections = 0
        self._ejected_reason = ""
        self.ejected_until: float | None = None
        self.on_probation = False

    @property
    def ejected(self) -> bool:
        """True from a passive ejection until ``evaluate`` sees it expire."""
        return self.ejected_until is not None

    def describe(self, now: float) -> str:
        """The reason, with a live report age while healthy: "report 2.1 s ago"."""
        if not self.healthy or self.last_report is None:
            return self.reason
        text = f"report {max(0.0, now - self.last_report):.1f} s ago"
        return f"{text}; on probation" if self.on_probation else text

    # events ----------------------------------------------------------------------

    def on_report(self, now: float) -> HealthChange | None:
        self.last_report = now
        self._heard_at = now
        return self._settle(now, "report received")

    def on_contact(self, now: float) -> HealthChange | None:
        """The indexer registered again: alive, though it reported nothing."""
        self._heard_at = now
        return self._settle(now, "registered again")

    def on_probe(self, ok: bool, detail: str, now: float) -> HealthChange | None:
        if ok:
            self._probe_fail_run = 0
            self._probe_ok_run += 1
            if self._awaiting_probe:
                self._awaiting_probe = False
                self._probe_down = False
            elif self._probe_ok_run >= self.policy.probe_rise:
                self._probe_down = False
            return self._settle(now, "probe ok")

        self._probe_ok_run = 0
        self._probe_fail_run += 1
        if self._probe_fail_run >= self.policy.probe_fall:
            self._probe_down = True
            failed = _count(self._probe_fail_run, "failed probe")
            self._probe_reason = f"{failed}: {detail}"
        return self._settle(now, "")

    def on_request(
        self, ok: bool, detail: str, now: float, *, may_eject: bool = True
    ) -> HealthChange | None:
        """A proxied request ended; ``may_eject=False`` forbids an ejection.

        Requests that end while the indexer is ejected were sent before it was,
        and say nothing new: they are ignored.
        """
        ended = self._end_ejection(now)
        if self.ejected:
            return None

        if ok:
            self._request_fail_run = 0
            self._request_ok_run += 1
            if self.on_probation and self._request_ok_run >= self.policy.probation_ok:
                self.on_probation = False
                self._ejections = 0
            return self._settle(now, ended)

        self._request_ok_run = 0
        self._request_fail_run += 1
        failures = self._request_fail_run
        if not self.on_probation and failures < self.policy.passive_fall:
            return self._settle(now, ended)

        self._request_fail_run = 0
        if may_eject:
            return self._eject(failures, detail, now)

        # Refused: say so, together with the end of an ejection that this very
        # call noticed, so that neither goes unlogged.
        flipped = self._settle(now, ended)
        share = f"{self.policy.max_ejected_fraction:.0%}"
        text = (
            f"not ejected after {_count(failures, 'failed request')}: {detail}; "
            f"at most {share} of the indexers may be ejected at once"
        )
        if flipped is not None:
            text = f"{flipped.reason}; {text}"
        return HealthChange(self.id, self.healthy, text, refused=True)

    def evaluate(self, now: float) -> HealthChange | None:
        """Apply the passage of time: silence and the end of an ejection."""
        return self._settle(now, "")

    # the verdict -----------------------------------------------------------------

    def _eject(self, failures: int, detail: str, now: float) -> HealthChange | None:
        again = self.on_probation
        self._ejections += 1
        duration = self.policy.ejection_time(self._ejections)
        self.ejected_until = now + duration
        self.on_probation = False
        if again:
            self._ejected_reason = (
                f"ejected again for {duration:.1f} s after a failed request "
                f"on probation: {detail}"
            )
        else:
            failed = _count(failures, "failed request")
            self._ejected_reason = f"ejected after {failed}: {detail}"
        return self._settle(now, "")

    def _end_ejection(self, now: float) -> str:
        """End an ejection whose time is up; return the reason to give, or ""."""
        if self.ejected_until is None or now < self.ejected_until:
            return ""
        self.ejected_until = None
        self.on_probation = True
        self._request_fail_run = 0
        self._request_ok_run = 0
        lasted = self.policy.ejection_time(self._ejections)
        return f"ejection over after {lasted:.1f} s; on probation"

    def _settle(self, now: float, healthy_reason: str) -> HealthChange | None:
        """Recompute the verdict; report it if ``healthy`` flipped.

        ``healthy_reason`` names the event that may have made the indexer
        healthy again; the end of an ejection names itself.
        """
        healthy_reason = self._end_ejection(now) or healthy_reason
        problem = self._problem(now)
        if problem is not None:
            self.reason = problem
        elif not self.healthy:
            self.reason = healthy_reason or "healthy again"
        if (problem is None) == self.healthy:
            return None

        self.healthy = problem is None
        self.since = now
        return HealthChange(self.id, self.healthy, self.reason)

    def _problem(self, now: float) -> str | None:
        if self._awaiting_probe:
            if self._probe_down:  # say why, not only that it is waiting
                return f"restored; {self._probe_reason}"
            return "restored; awaiting probe"
        if self.ejected:
            return self._ejected_reason
        if self._probe_down:
            return self._probe_reason
        silence = now - self._heard_at
        if silence > self.policy.unhealthy_after:
            return f"no report for {silence:.1f} s"
        return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
