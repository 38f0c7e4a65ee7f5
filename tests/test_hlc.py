from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2plb.hlc import (
    LOGICAL_BITS,
    MAX_VERSION,
    HybridLogicalClock,
    format_version,
    parse_version,
)


class FakeWall:
    """A wall clock the test sets by hand."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def physical(version: int) -> int:
    return version >> LOGICAL_BITS


def logical(version: int) -> int:
    return version & ((1 << LOGICAL_BITS) - 1)


def test_now_follows_the_wall_clock() -> None:
    wall = FakeWall(1_000)
    clock = HybridLogicalClock(wall)

    first = clock.now()
    wall.ms = 1_005
    second = clock.now()

    assert (physical(first), logical(first)) == (1_000, 0)
    assert (physical(second), logical(second)) == (1_005, 0)
    assert clock.last == second


def test_now_counts_while_the_wall_clock_stands_still() -> None:
    clock = HybridLogicalClock(FakeWall(1_000))

    versions = [clock.now() for _ in range(3)]

    assert [(physical(v), logical(v)) for v in versions] == [
        (1_000, 0),
        (1_000, 1),
        (1_000, 2),
    ]


def test_now_never_goes_back_when_the_wall_clock_does() -> None:
    wall = FakeWall(5_000)
    clock = HybridLogicalClock(wall)
    before = clock.now()

    wall.ms = 1_000
    after = [clock.now() for _ in range(3)]

    assert after == [before + 1, before + 2, before + 3]


def test_now_jumps_with_the_wall_clock_and_resets_the_counter() -> None:
    wall = FakeWall(1_000)
    clock = HybridLogicalClock(wall)
    clock.now()
    clock.now()

    wall.ms = 9_000_000
    version = clock.now()

    assert (physical(version), logical(version)) == (9_000_000, 0)


def test_a_full_counter_carries_into_the_next_millisecond() -> None:
    clock = HybridLogicalClock(FakeWall(1_000))

    versions = [clock.now() for _ in range((1 << LOGICAL_BITS) + 10)]

    assert all(a < b for a, b in zip(versions, versions[1:], strict=False))
    assert (physical(versions[-1]), logical(versions[-1])) == (1_001, 9)


@given(st.lists(st.integers(min_value=-10, max_value=1 << 40), min_size=1))
def test_now_is_strictly_increasing_for_any_wall_clock(walls: list[int]) -> None:
    readings = iter(walls)
    clock = HybridLogicalClock(lambda: next(readings))

    versions = [clock.now() for _ in walls]

    assert versions == sorted(set(versions))
    assert physical(versions[-1]) >= max(walls)


def test_observe_puts_the_next_version_above_a_remote_one() -> None:
    clock = HybridLogicalClock(FakeWall(1_000))
    remote = (50_000 << LOGICAL_BITS) | 7

    clock.observe(remote)

    assert clock.last == remote
    assert clock.now() == remote + 1


def test_observe_of_an_older_version_changes_nothing() -> None:
    clock = HybridLogicalClock(FakeWall(1_000))
    mine = clock.now()

    clock.observe(3)

    assert clock.last == mine
    assert clock.now() == mine + 1


def test_a_clock_restarted_from_last_continues_above_it() -> None:
    last = (8_000 << LOGICAL_BITS) | 4

    clock = HybridLogicalClock(FakeWall(1_000), last=last)

    assert clock.now() == last + 1


def test_now_refuses_to_overflow() -> None:
    clock = HybridLogicalClock(FakeWall(0), last=MAX_VERSION)

    with pytest.raises(OverflowError, match="clock overflow"):
        clock.now()


@pytest.mark.parametrize("bad", [-1, MAX_VERSION + 1])
def test_out_of_range_versions_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="version must be between 0 and"):
        HybridLogicalClock(FakeWall(0)).observe(bad)
    with pytest.raises(ValueError, match="last must be between 0 and"):
        HybridLogicalClock(FakeWall(0), last=bad)
    with pytest.raises(ValueError, match="version must be between 0 and"):
        format_version(bad)


@pytest.mark.parametrize(
    ("version", "text"),
    [
        (0, "0000000000000000"),
        (1, "0000000000000001"),
        ((1_700_000_000_000 << 16) | 3, "018bcfe568000003"),
        (MAX_VERSION, "ffffffffffffffff"),
    ],
)
def test_format_and_parse(version: int, text: str) -> None:
    assert format_version(version) == text
    assert parse_version(text) == version


@given(st.integers(0, MAX_VERSION), st.integers(0, MAX_VERSION))
def test_string_order_is_numeric_order(a: int, b: int) -> None:
    text_a, text_b = format_version(a), format_version(b)

    assert len(text_a) == 16
    assert parse_version(text_a) == a
    assert (text_a < text_b) == (a < b)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "version must be 16 hex digits, got 0 characters: ''"),
        ("abc", "version must be 16 hex digits, got 3 characters: 'abc'"),
        ("0" * 17, "version must be 16 hex digits, got 17 characters"),
        ("0x00000000000001", "only the lower-case hex digits 0-9 and a-f"),
        ("00000000000000FF", "only the lower-case hex digits 0-9 and a-f"),
        ("000000000000000g", "only the lower-case hex digits 0-9 and a-f"),
        ("+000000000000001", "only the lower-case hex digits 0-9 and a-f"),
        (" 000000000000001", "only the lower-case hex digits 0-9 and a-f"),
        ("0000_00000000001", "only the lower-case hex digits 0-9 and a-f"),
        ("000000000000000\u0661", "only the lower-case hex digits 0-9 and a-f"),
    ],
)
def test_parse_refuses_malformed_versions(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_version(text)

    assert message in str(info.value)


def test_parse_refuses_what_is_not_a_string() -> None:
    with pytest.raises(ValueError, match="version must be a string, got int"):
        parse_version(12)  # type: ignore[arg-type]


def test_a_version_far_ahead_of_the_wall_clock_is_refused() -> None:
    wall = [1_000_000]
    clock = HybridLogicalClock(lambda: wall[0], max_drift_ms=60_000)
    near = (wall[0] + 59_000) << 16
    far = (wall[0] + 61_000) << 16

    assert clock.observe(near) is True
    assert clock.observe(far) is False
    assert clock.last == near
    assert clock.now() == near + 1
    wall[0] += 2_000  # time passes: the same version is now within the bound
    assert clock.observe(far) is True
