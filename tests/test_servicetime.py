"""The indexer's recent service time: its mean, and the header that carries it."""

from __future__ import annotations

import math

import pytest

from p2plb.servicetime import (
    ServiceTime,
    format_service_header,
    parse_service_header,
)


def test_nothing_is_known_before_the_first_request() -> None:
    mean = ServiceTime()
    assert (mean.seconds, mean.ms) == (None, None)
    mean.add(0.0125, now=3.0)
    assert (mean.seconds, mean.ms) == (0.0125, 12.5)


def test_a_sample_weighs_by_the_time_since_the_last_one() -> None:
    mean = ServiceTime(decay=1.0)
    mean.add(0.010, now=0.0)
    mean.add(0.050, now=1.0)
    assert mean.seconds == pytest.approx(0.010 + (1 - math.exp(-1)) * 0.040)

    # After a long quiet spell the next answer is nearly all that counts: an
    # indexer that was slow and is fast again is seen as fast at once.
    mean.add(0.002, now=60.0)
    assert mean.seconds == pytest.approx(0.002, abs=1e-12)


def test_the_mean_covers_time_not_a_number_of_requests() -> None:
    # A thousand requests finishing within a millisecond move the mean about
    # as far as one would a millisecond after the previous request.
    many, one = ServiceTime(), ServiceTime()
    many.add(0.010, now=0.0)
    one.add(0.010, now=0.0)
    for n in range(1, 1001):
        many.add(0.100, now=n * 1e-6)
    one.add(0.100, now=1e-3)
    assert many.seconds == pytest.approx(one.seconds, rel=1e-3)
    assert many.seconds is not None and many.seconds < 0.011


def test_a_clock_going_back_gives_no_weight() -> None:
    mean = ServiceTime()
    mean.add(0.010, now=5.0)
    mean.add(9.0, now=4.0)
    assert mean.seconds == 0.010
    mean.add(-1.0, now=6.0)  # never below zero, whatever the caller measured
    assert mean.seconds == pytest.approx(0.010 * math.exp(-1))


def test_decay_must_be_positive() -> None:
    for decay in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="decay must be > 0 seconds"):
            ServiceTime(decay=decay)


def test_header_round_trips_in_milliseconds() -> None:
    assert format_service_header(0.0125) == "12.500"
    assert parse_service_header("12.500") == pytest.approx(0.0125)
    assert parse_service_header("0") == 0.0


@pytest.mark.parametrize(
    "value",
    [None, "", "fast", "-1", "nan", "inf", "1e10", "1e400", "12ms", "1/2",
     "١٢", "1_0", " 12", "12 ", "+12", "12.", ".5", "0x10", "3600000.001"],
)  # fmt: skip
def test_a_malformed_header_is_ignored(value: str | None) -> None:
    assert parse_service_header(value) is None
