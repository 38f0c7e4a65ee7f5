"""Encoded answers of index reads, kept until the index changes.

A read of an index costs a trip to a reader thread and an SQLite query (about
three quarters of a request's time, measured); most reads in a read-heavy
P2P workload repeat the same pages between writes.  The cache keeps the bytes
of each answer together with the index's generation, a counter the storage
commit hook moves for every index a group commit touched.  A hit is answered on
the event loop without touching disk.

Correctness rests on one ordering: the generation is read *before* the storage
read starts, so a page read while a write lands is stored under the older
generation and is never served after the write's commit bumped it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

__all__ = ["ReadCache"]


class ReadCache:
    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[int, int, bytes]] = OrderedDict()
        self._generations: dict[str, int] = {}
        self._all = 0  # moves with any index: for the list of indices

    def generation(self, index: str | None) -> int:
        """The generation to read under: call before reading storage."""
        if index is None:
            return self._all
        return self._generations.get(index, 0)

    def changed(self, indices: Iterable[str]) -> None:
        """A commit touched these indices: their cached answers are stale."""
        for index in indices:
            self._generations[index] = self._generations.get(index, 0) + 1
            self._all += 1

    def get(self, key: Hashable, index: str | None) -> tuple[int, bytes] | None:
        """``(status, body)`` if cached under the current generation."""
        found = self._entries.get(key)
        if found is None or found[0] != self.generation(index):
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return found[1], found[2]

    def put(self, key: Hashable, generation: int, status: int, body: bytes) -> None:
        if len(body) > self.max_bytes // 8:
            return  # one huge page would push out everything else
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= len(old[2])
        self._entries[key] = (generation, status, body)
        self.size += len(body)
        while self.size > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.size -= len(dropped)
