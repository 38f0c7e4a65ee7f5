"""A hybrid logical clock: versions that follow real time and never go back.

Rules of this module:

* A version is one integer, ``(physical_ms << 16) | logical``: 48 bits of
  milliseconds since the Unix epoch, then a 16-bit counter. Comparing two
  versions as integers compares their physical parts first, then their counters.
* On the wire a version is ``format_version``: 16 lower-case hex digits, fixed
  width, so comparing the strings gives the same order as comparing the ints.
* ``HybridLogicalClock.now()`` returns a version strictly greater than every
  version it returned or observed before, whatever the wall clock does.
* No I/O: the wall clock is a function passed in, so tests drive it by hand and
  storage decides where the last value is persisted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeGuard

__all__ = [
    "LOGICAL_BITS",
    "MAX_VERSION",
    "HybridLogicalClock",
    "format_version",
    "is_version",
    "parse_version",
]

LOGICAL_BITS = 16
PHYSICAL_BITS = 48
MAX_VERSION = (1 << (PHYSICAL_BITS + LOGICAL_BITS)) - 1
VERSION_CHARS = (PHYSICAL_BITS + LOGICAL_BITS) // 4

_HEX_DIGITS = frozenset("0123456789abcdef")


def format_version(version: int) -> str:
    """The version as 16 lower-case hex digits."""
    if not 0 <= version <= MAX_VERSION:
        raise ValueError(f"version must be between 0 and {MAX_VERSION}, got {version}")
    return f"{version:0{VERSION_CHARS}x}"


def parse_version(text: object) -> int:
    """The reverse of ``format_version``; raises ``ValueError`` on anything else.

    Only the canonical form is accepted (no sign, spaces, ``0x`` or capitals), so
    a version that parses also sorts correctly as a string.
    """
    if not isinstance(text, str):
        raise ValueError(f"version must be a string, got {type(text).__name__}")
    if len(text) != VERSION_CHARS:
        raise ValueError(
            f"version must be {VERSION_CHARS} hex digits, "
            f"got {len(text)} characters: {text!r}"
        )
    if not _HEX_DIGITS.issuperset(text):
        raise ValueError(
            f"version must hold only the lower-case hex digits 0-9 and a-f, "
            f"got {text!r}"
        )
    return int(text, 16)


def is_version(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a version as ``format_version`` writes it."""
    try:
        parse_version(value)
    except ValueError:
        return False
    return True


class HybridLogicalClock:
    """Issues versions close to the wall clock, strictly increasing.

    This is the hybrid logical clock of Kulkarni, Demirbas et al., "Logical
    Physical Clocks" (OPODIS 2014). Pure wall-clock timestamps fail when a
    clock steps back (NTP) or when a remote node runs ahead: a later write would
    get a smaller version and lose. A Lamport counter alone orders writes but
    says nothing about when they happened. The hybrid keeps the physical part at
    the largest millisecond seen anywhere and counts within it, so versions
    stay within clock skew of real time and still never repeat or go back.

    Packing both parts in one integer makes the paper's update rule a single
    ``max``: the next version is the larger of "now, counter 0" and "last + 1".
    When the counter is full, ``last + 1`` carries into the physical part, which
    is the bump of one millisecond the paper prescribes.
    """

    def __init__(
        self,
        wall_ms: Callable[[], int],
        last: int = 0,
        *,
        max_drift_ms: int | None = None,
    ) -> None:
        if not 0 <= last <= MAX_VERSION:
            raise ValueError(f"last must be between 0 and {MAX_VERSION}, got {last}")
        self._wall_ms = wall_ms
        self._last = last
        self.max_drift_ms = max_drift_ms

    @property
    def last(self) -> int:
        """The greatest version returned by ``now`` or passed to ``observe``."""
        return self._last

    def now(self) -> int:
        """A new version, greater than every version returned or observed."""
        physical = max(self._wall_ms(), 0)
        version = max(physical << LOGICAL_BITS, self._last + 1)
        if version > MAX_VERSION:
            raise OverflowError(
                f"clock overflow: the wall clock ({physical} ms) or an observed "
                f"version is beyond the {PHYSICAL_BITS}-bit range"
            )
        self._last = version
        return version

    def observe(self, version: int) -> bool:
        """Take in a version seen elsewhere, so the next ``now`` is above it.

        With ``max_drift_ms``, a version further ahead of the wall clock than
        that is refused (returns False): the paper's bound on drift, without
        which one bogus far-future version would drag every later version with
        it, up to the end of the range.
        """
        if not 0 <= version <= MAX_VERSION:
            raise ValueError(
                f"version must be between 0 and {MAX_VERSION}, got {version}"
            )
        if self.too_far_ahead(version):
            return False
        self._last = max(self._last, version)
        return True

    def too_far_ahead(self, version: int) -> bool:
        """Whether ``version`` lies beyond the wall clock plus the allowed drift."""
        if self.max_drift_ms is None:
            return False
        return (version >> LOGICAL_BITS) > self._wall_ms() + self.max_drift_ms
