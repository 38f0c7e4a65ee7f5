"""The balancer's state file: the shape of a registry snapshot, and its checks.

Rules of this module:

* A snapshot is JSON: ``version`` (``SNAPSHOT_VERSION``), ``strategy``, the two
  request totals and one row per indexer (``snapshot_row``).  It holds what a
  restarted balancer needs to route at once, and nothing about health: that is
  learnt again by probing.
* ``parse_snapshot`` checks every field before the registry changes anything,
  and refuses with a ``ValueError`` that names the field
  (``snapshot.indexers[2].capacity: ...``).  Unknown and missing keys are
  errors, so that a file from another version is never half understood.
* A row is held to the bounds of the API: what a registration may say
  (``RegisterBody.check``) and counts up to ``MAX_COUNT``; a bool is no
  integer.  A load restored past 64 bits once made status and metrics answer
  500, and every save wrote it back.
"""

from __future__ import annotations

from typing import Any

from p2plb.backends import STATES, Entry
from p2plb.errors import RequestError
from p2plb.strategies import STRATEGIES
from p2plb.wire import MAX_COUNT, RegisterBody

__all__ = ["SNAPSHOT_VERSION", "parse_snapshot", "snapshot_row"]

SNAPSHOT_VERSION = 1

_TOP_KEYS = {"version", "strategy", "total_requests", "routed_requests", "indexers"}
_REGISTERED = ("id", "address", "capacity", "zone", "instance")
_ROW_KEYS = {
    "id",
    "address",
    "capacity",
    "zone",
    "instance",
    "state",
    "reported_load",
    "requests",
    "routed",
    "errors",
    "served",
}


def snapshot_row(entry: Entry) -> dict[str, Any]:
    """One indexer as the state file holds it."""
    return {
        "id": entry.id,
        "address": entry.address,
        "capacity": entry.capacity,
        "zone": entry.zone,
        "instance": entry.instance,
        "state": entry.state,
        "reported_load": entry.reported_load,
        "requests": entry.requests,
        "routed": entry.routed,
        "errors": entry.errors,
        "served": entry.served_seen,
    }


def parse_snapshot(snapshot: Any) -> list[dict[str, Any]]:
    """Check every field of a snapshot; return its indexer rows, address
    normalised.  Anything unexpected is a ``ValueError`` naming the field."""
    _check_keys(snapshot, _TOP_KEYS, "snapshot")
    version = snapshot["version"]
    if version != SNAPSHOT_VERSION or isinstance(version, bool):
        raise ValueError(
            f"snapshot.version: expected {SNAPSHOT_VERSION}, got {version!r}"
        )
    if not isinstance(snapshot["strategy"], str) or (
        snapshot["strategy"] not in STRATEGIES
    ):
        raise ValueError(
            f"snapshot.strategy: unknown strategy {snapshot['strategy']!r}"
        )
    for name in ("total_requests", "routed_requests"):
        _expect_count(snapshot[name], f"snapshot.{name}", 0)
    if not isinstance(snapshot["indexers"], list):
        raise ValueError("snapshot.indexers: expected a list")

    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, row in enumerate(snapshot["indexers"]):
        where = f"snapshot.indexers[{index}]"
        _check_keys(row, _ROW_KEYS, where)
        registered = _registration(row, where)
        if registered.id in seen:
            raise ValueError(f"{where}.id: {registered.id!r} appears twice")
        seen.add(registered.id)
        for name in ("reported_load", "requests", "routed", "errors"):
            _expect_count(row[name], f"{where}.{name}", 0)
        if row["served"] is not None:
            _expect_count(row["served"], f"{where}.served", 0)
        if row["state"] not in STATES:
            raise ValueError(f"{where}.state: expected one of {', '.join(STATES)}")
        rows.append({**row, "address": registered.address})
    return rows


def _registration(row: dict[str, Any], where: str) -> RegisterBody:
    """What a row holds of a registration, checked as the API checks one."""
    # Only the types here: the bounds are the API's, checked by ``check``.
    if type(row["capacity"]) is not int:
        raise ValueError(
            f"{where}.capacity: expected an integer, got {row['capacity']!r}"
        )
    for name in ("zone", "instance"):
        if row[name] is not None and not isinstance(row[name], str):
            raise ValueError(f"{where}.{name}: expected a string or null")
    body = RegisterBody(**{key: row[key] for key in _REGISTERED})
    try:
        return body.check()
    except RequestError as exc:
        raise ValueError(f"{where}.{exc.message}") from None


def _check_keys(value: Any, keys: set[str], where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    missing = keys - value.keys()
    if missing:
        raise ValueError(f"{where}: missing {', '.join(sorted(missing))}")
    extra = value.keys() - keys
    if extra:
        raise ValueError(f"{where}: unexpected {', '.join(sorted(map(str, extra)))}")


def _expect_count(value: Any, where: str, minimum: int) -> None:
    if type(value) is not int or not minimum <= value <= MAX_COUNT:
        raise ValueError(
            f"{where}: expected an integer from {minimum} to {MAX_COUNT}, got {value!r}"
        )
