"""Which process of an indexer id a message speaks for, and who was replaced.

Rules of this module:

* One entry per indexer id.  A registration from a different process (a new
  address, or a new ``instance``) replaces the entry at once; the replaced
  (address, instance) is remembered for ``forget_after``, and its reports get
  ``409 superseded`` so that it stops.
* A 409 stops a live indexer for good, so only what shows a replacement gives
  one: a replacement this balancer process saw, or a message from another
  address than the entry's.  A different instance at the entry's address is
  the same indexer restarted in place (two processes cannot listen at one
  address): a report from it adopts its instance, and its own DELETE removes
  the entry.  A message that leaves out its address is taken to come from the
  entry's.
* A restored entry is trusted to route (once probed) and to prove a DELETE by
  its instance, and for nothing else: the state file may be older than what
  the indexer did since (a balancer killed before its next save misses a
  restart in place, or a move).  Until its indexer speaks to this process it
  refuses no one: a message from its address adopts the instance it carries,
  and one from elsewhere gets ``404`` so that the indexer registers again,
  which replaces the entry.  Replacements are remembered in memory only, so a
  restart also forgets who was replaced; the registration rule (the newest
  registration wins) then decides.
* No I/O; the registry passes in the entry and the time.
"""

from __future__ import annotations

from collections import deque

from p2plb.backends import Entry
from p2plb.errors import RequestError

__all__ = ["Replacements", "not_found", "same_process"]


class Replacements:
    """Processes replaced by a newer one of their id, for a while, and the
    judgement of who a message comes from.

    At most ``KEPT`` are remembered per id, each until ``expire`` finds it
    older than ``forget_after``.
    """

    KEPT = 4

    def __init__(self) -> None:
        self._by_id: dict[str, deque[tuple[str, str | None, float]]] = {}

    def add(self, old: Entry, now: float) -> None:
        """Remember the process of ``old``, just replaced at ``now``."""
        replaced = self._by_id.setdefault(old.id, deque(maxlen=self.KEPT))
        replaced.append((old.address, old.instance, now))

    def discard(self, id: str, address: str, instance: str | None) -> None:
        """Forget (address, instance) of ``id``: it registered again."""
        replaced = self._by_id.get(id)
        if replaced is None:
            return
        kept = [row for row in replaced if (row[0], row[1]) != (address, instance)]
        replaced.clear()
        replaced.extend(kept)

    def matches(self, id: str, address: str | None, instance: str | None) -> bool:
        """Whether a sender of ``id`` is a replaced process; what it leaves out
        matches anything, and a sender that gives neither matches nothing."""
        if address is None and instance is None:
            return False
        for old_address, old_instance, _ in self._by_id.get(id, ()):
            address_matches = address is None or address == old_address
            instance_matches = instance is None or instance == old_instance
            if address_matches and instance_matches:
                return True
        return False

    def expire(self, now: float, forget_after: float) -> None:
        """Forget processes replaced ``forget_after`` seconds ago or more."""
        for id, replaced in list(self._by_id.items()):
            while replaced and now - replaced[0][2] >= forget_after:
                replaced.popleft()
            if not replaced:
                del self._by_id[id]

    def sender(
        self, entry: Entry | None, id: str, address: str | None, instance: str | None
    ) -> Entry:
        """The entry (of ``id``, if any) a message from (address, instance)
        may act on.

        ``409 superseded`` for a sender that was replaced, ``404`` for an id
        not registered, or registered elsewhere only as far as the state file
        says (the sender registers again, and its registration wins).
        """
        replaced = self.matches(id, address, instance)
        if entry is not None and same_process(entry, address, instance):
            return entry
        if entry is None and not replaced:
            raise not_found(id)
        if replaced:
            raise _superseded(id, entry, address, instance)
        assert entry is not None
        if address is None or address == entry.address:
            return entry  # restarted in place
        if entry.restored:
            raise RequestError(
                404,
                "indexer_not_found",
                f"id: indexer {id!r} is known here at {entry.address} only from "
                "the state file; register again",
            )
        raise _superseded(id, entry, address, instance)

    def adopt(self, entry: Entry, instance: str, now: float) -> None:
        """``instance`` is ``entry``'s indexer restarted in place."""
        if entry.instance is not None:
            self.add(entry, now)
            entry.served_seen = None  # the new process counts from zero
        self.discard(entry.id, entry.address, instance)
        entry.instance = instance


def same_process(entry: Entry, address: str | None, instance: str | None) -> bool:
    """Whether a message from (address, instance) comes from ``entry``'s process.

    Whatever the message leaves out is taken to match.
    """
    if address is not None and address != entry.address:
        return False
    return instance is None or entry.instance is None or instance == entry.instance


def not_found(id: str) -> RequestError:
    return RequestError(
        404, "indexer_not_found", f"id: no indexer {id!r} is registered"
    )


def _superseded(
    id: str, current: Entry | None, address: str | None, instance: str | None
) -> RequestError:
    sender = address or f"instance {instance}"
    where = f" at {current.address}" if current is not None else ""
    return RequestError(
        409,
        "superseded",
        f"id: indexer {id!r} ({sender}) was replaced by a newer registration"
        f"{where}; this process must stop reporting",
    )
