"""The health state machine of one indexer, with time passed in by hand."""

from __future__ import annotations

from dataclasses import astuple

import pytest

from p2plb.health import Health, HealthChange, HealthPolicy

# Monotonic clocks start anywhere; a large start catches any use of wall time
# or any assumption that time starts at zero.
T0 = 5_000_000.0
POLICY = HealthPolicy()


def fresh(policy: HealthPolicy = POLICY, **kwargs: bool) -> Health:
    return Health("i1", policy, T0, **kwargs)


def down(reason: str) -> HealthChange:
    return HealthChange("i1", False, reason)


def up(reason: str) -> HealthChange:
    return HealthChange("i1", True, reason)


def test_policy_defaults_and_validation() -> None:
    assert astuple(POLICY) == (60.0, 2, 2, 3, 10.0, 300.0, 5, 0.5)
    assert [POLICY.ejection_time(n) for n in (1, 2, 3, 6, 9)] == [
        10.0,
        20.0,
        40.0,
        300.0,
        300.0,
    ]
    with pytest.raises(ValueError, match="probe_rise"):
        HealthPolicy(probe_rise=0)
    with pytest.raises(ValueError, match="unhealthy_after"):
        HealthPolicy(unhealthy_after=0)
    with pytest.raises(ValueError, match="max_ejected_fraction"):
        HealthPolicy(max_ejected_fraction=1.5)


def test_a_registration_starts_healthy() -> None:
    health = fresh()
    assert (health.healthy, health.reason, health.since) == (True, "registered", T0)
    assert health.describe(T0 + 3) == "registered"
    assert health.evaluate(T0 + 60) is None


def test_silence_makes_unhealthy_and_a_report_heals() -> None:
    health = fresh()
    assert health.on_report(T0 + 10) is None
    assert health.describe(T0 + 12.06) == "report 2.1 s ago"

    assert health.evaluate(T0 + 70) is None  # exactly unhealthy_after: still fine
    assert health.evaluate(T0 + 71) == down("no report for 61.0 s")
    assert health.evaluate(T0 + 75) is None
    assert health.reason == "no report for 65.0 s"  # kept current, no new event
    assert health.since == T0 + 71

    assert health.on_report(T0 + 80) == up("report received")
    assert health.describe(T0 + 80) == "report 0.0 s ago"


def test_silence_counts_from_registration_until_the_first_report() -> None:
    health = fresh()
    assert health.evaluate(T0 + 60.5) == down("no report for 60.5 s")


def test_probes_fall_and_rise() -> None:
    health = fresh()
    health.on_report(T0 + 1)
    assert health.on_probe(False, "connection refused", T0 + 2) is None
    assert health.on_probe(False, "connection refused", T0 + 3) == down(
        "2 failed probes: connection refused"
    )
    assert health.on_probe(False, "timed out", T0 + 4) is None
    assert health.reason == "3 failed probes: timed out"

    assert health.on_probe(True, "", T0 + 5) is None  # one is not enough
    assert health.reason == "3 failed probes: timed out"
    assert health.on_probe(False, "timed out", T0 + 6) is None  # run broken
    assert health.on_probe(True, "", T0 + 7) is None
    assert health.on_probe(True, "", T0 + 8) == up("probe ok")


def test_a_single_failed_probe_changes_nothing() -> None:
    health = fresh()
    for second in range(10):
        health.on_probe(second % 2 == 0, "refused", T0 + second)
    assert (health.healthy, health.reason) == (True, "registered")


def test_good_probes_do_not_excuse_silence() -> None:
    health = fresh()
    assert health.evaluate(T0 + 61) == down("no report for 61.0 s")
    for second in range(62, 70):
        assert health.on_probe(True, "", T0 + second) is None
    assert not health.healthy
    assert health.on_report(T0 + 70) == up("report received")


def test_restored_waits_for_one_good_probe() -> None:
    health = fresh(restored=True)
    assert (health.healthy, health.reason) == (False, "restored; awaiting probe")
    assert health.on_report(T0 + 1) is None
    assert health.on_probe(False, "refused", T0 + 2) is None
    assert health.reason == "restored; awaiting probe"
    assert health.on_probe(True, "", T0 + 3) == up("probe ok")  # rise is 2


def test_a_restored_indexer_that_never_answers_says_why() -> None:
    health = fresh(restored=True)
    health.on_probe(False, "connection refused", T0 + 1)
    assert health.on_probe(False, "connection refused", T0 + 2) is None  # still down
    assert health.describe(T0 + 2) == "restored; 2 failed probes: connection refused"
    health.on_probe(False, "probe timed out", T0 + 3)
    assert health.reason == "restored; 3 failed probes: probe timed out"
    assert health.on_probe(True, "", T0 + 4) == up("probe ok")


def test_passive_ejection_then_probation_then_doubling() -> None:
    health = fresh()
    health.on_report(T0)
    assert health.on_request(False, "HTTP 500", T0 + 1) is None
    assert health.on_request(True, "", T0 + 1) is None  # the run is broken
    assert health.on_request(False, "HTTP 500", T0 + 2) is None
    assert health.on_request(False, "timed out", T0 + 2) is None
    assert health.on_request(False, "HTTP 500", T0 + 3) == down(
        "ejected after 3 failed requests: HTTP 500"
    )
    assert (health.ejected, health.ejected_until) == (True, T0 + 13)

    # Reports do not cut it short; requests that were in flight change nothing.
    assert health.on_report(T0 + 5) is None
    assert health.on_request(False, "HTTP 500", T0 + 6) is None
    assert health.on_request(True, "", T0 + 6) is None
    assert health.evaluate(T0 + 12.9) is None

    assert health.evaluate(T0 + 13) == up("ejection over after 10.0 s; on probation")
    assert health.on_probation
    health.on_report(T0 + 13)
    assert health.describe(T0 + 14) == "report 1.0 s ago; on probation"

    assert health.on_request(False, "connection refused", T0 + 14) == down(
        "ejected again for 20.0 s after a failed request on probation: "
        "connection refused"
    )
    assert health.ejected_until == T0 + 34
    assert health.evaluate(T0 + 34) == up("ejection over after 20.0 s; on probation")
    assert health.on_request(False, "HTTP 502", T0 + 35) == down(
        "ejected again for 40.0 s after a failed request on probation: HTTP 502"
    )


def test_probation_ends_after_enough_successes() -> None:
    health = fresh()
    for _ in range(3):
        health.on_request(False, "HTTP 500", T0)
    health.evaluate(T0 + 10)
    for _ in range(5):
        assert health.on_request(True, "", T0 + 11) is None
    assert not health.on_probation

    # The earlier ejection is forgotten: three failures again, ten seconds again.
    assert health.on_request(False, "HTTP 500", T0 + 12) is None
    assert health.on_request(False, "HTTP 500", T0 + 12) is None
    assert health.on_request(False, "HTTP 500", T0 + 12) == down(
        "ejected after 3 failed requests: HTTP 500"
    )
    assert health.ejected_until == T0 + 22


def test_an_expired_ejection_noticed_by_a_request_is_reported() -> None:
    health = fresh()
    for _ in range(3):
        health.on_request(False, "HTTP 500", T0)
    assert health.on_request(True, "", T0 + 10.5) == up(
        "ejection over after 10.0 s; on probation"
    )


def test_a_forbidden_ejection_is_announced_but_keeps_the_indexer() -> None:
    health = fresh()
    health.on_request(False, "HTTP 500", T0)
    health.on_request(False, "HTTP 500", T0)
    refused = health.on_request(False, "HTTP 500", T0, may_eject=False)
    assert refused == HealthChange(
        "i1",
        True,
        "not ejected after 3 failed requests: HTTP 500; "
        "at most 50% of the indexers may be ejected at once",
        refused=True,
    )
    assert (health.healthy, health.ejected, health.reason) == (
        True,
        False,
        "registered",
    )

    # The count starts over: two more failures are not enough to ask again.
    assert health.on_request(False, "HTTP 500", T0) is None
    assert health.on_request(False, "HTTP 500", T0) is None
    assert health.on_request(False, "HTTP 500", T0) == down(
        "ejected after 3 failed requests: HTTP 500"
    )


def test_reasons_come_in_a_fixed_order() -> None:
    health = fresh()
    health.on_probe(False, "refused", T0 + 1)
    health.on_probe(False, "refused", T0 + 2)
    assert health.reason == "2 failed probes: refused"
    for _ in range(3):
        health.on_request(False, "HTTP 500", T0 + 3)
    assert health.reason == "ejected after 3 failed requests: HTTP 500"

    assert health.evaluate(T0 + 13) is None  # ejection over, probes still failing
    assert health.reason == "2 failed probes: refused"
    health.on_probe(True, "", T0 + 61)
    assert health.on_probe(True, "", T0 + 62) is None  # and now silent
    assert health.reason == "no report for 62.0 s"
    assert health.on_report(T0 + 63) == up("report received")


def test_a_refusal_noticed_with_the_end_of_an_ejection_reports_both() -> None:
    health = fresh()
    for _ in range(3):
        health.on_request(False, "HTTP 500", T0)
    refused = health.on_request(False, "HTTP 502", T0 + 11, may_eject=False)
    assert refused == HealthChange(
        "i1",
        True,
        "ejection over after 10.0 s; on probation; "
        "not ejected after 1 failed request: HTTP 502; "
        "at most 50% of the indexers may be ejected at once",
        refused=True,
    )
    assert (health.healthy, health.on_probation) == (True, True)
