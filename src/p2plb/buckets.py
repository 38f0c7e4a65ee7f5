"""Sets of ids the strategies draw from, each answering in constant time.

``Bag`` gives a uniform random member; ``LowestIndex`` a member whose key is
within one bucket of the lowest, chosen at random among those.  They know
nothing of indexers or load: a strategy decides what the key is.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

__all__ = ["Bag", "LowestIndex"]


class Bag:
    """Members in an array plus each one's position in it.

    Removal moves the last member into the hole, so add, remove and a uniform
    random member are all O(1); the order of the array means nothing.
    """

    __slots__ = ("_items", "_where")

    def __init__(self) -> None:
        self._items: list[str] = []
        self._where: dict[str, int] = {}

    def add(self, id: str) -> None:
        if id not in self._where:
            self._where[id] = len(self._items)
            self._items.append(id)

    def remove(self, id: str) -> None:
        index = self._where.pop(id, None)
        if index is None:
            return
        last = self._items.pop()
        if index < len(self._items):
            self._items[index] = last
            self._where[last] = index

    def choice(self, rng: random.Random) -> str:
        return self._items[rng.randrange(len(self._items))]

    def __getitem__(self, index: int) -> str:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, id: object) -> bool:
        return id in self._where


class LowestIndex:
    """Ids with a key each; ``lowest`` is one of those in the lowest bucket.

    ``bucket_of`` maps a key to a bucket, 0 to ``buckets - 1``, or to -1 for
    keys past the last one.  Each bucket is a ``Bag``, and an integer bit mask
    records which buckets are non-empty, so the lowest one is its lowest set
    bit: a constant amount of work however many ids there are, and a uniform
    random member of that bucket breaks the tie.  Keys past the last bucket
    are rare; they wait in a heap ordered by exact key (lazy deletion: a stale
    heap row is skipped when it reaches the top, and the heap is rebuilt when
    stale rows outnumber live ones).  An id taken from the heap is pushed back
    with a fresh random tie-breaker, so exact ties there rotate too.
    """

    def __init__(
        self, rng: random.Random, bucket_of: Callable[[float], int], buckets: int
    ) -> None:
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self._rng = rng
        self._bucket_of = bucket_of
        self._buckets = buckets
        self._key: dict[str, float] = {}
        self._bucket: dict[str, int] = {}  # -1: in the overflow heap
        self._bags: dict[int, Bag] = {}
        self._mask = 0
        self._heap: list[tuple[float, float, int, str]] = []
        self._heap_gen: dict[str, int] = {}
        self._gen = 0

    def place(self, id: str, key: float) -> None:
        """Add ``id`` with ``key``, or move it there."""
        if self._key.get(id) == key:
            return
        index = self._bucket_of(key)
        if not -1 <= index < self._buckets:
            raise ValueError(f"bucket of {key} must be -1 to {self._buckets - 1}")
        self.remove(id)

        self._key[id] = key
        self._bucket[id] = index
        if index >= 0:
            bag = self._bags.get(index)
            if bag is None:
                bag = self._bags[index] = Bag()
                self._mask |= 1 << index
            bag.add(id)
        else:
            self._push(id, key)

    def remove(self, id: str) -> None:
        """Take ``id`` out; nothing happens if it is not here."""
        index = self._bucket.pop(id, None)
        if index is None:
            return
        del self._key[id]
        if index >= 0:
            bag = self._bags[index]
            bag.remove(id)
            if not bag:
                del self._bags[index]
                self._mask &= ~(1 << index)
        else:
            del self._heap_gen[id]
            if len(self._heap) > 2 * len(self._heap_gen) + 32:
                self._compact()

    def lowest(self) -> str | None:
        """A member of the lowest bucket at random; ``None`` when empty."""
        if self._mask:
            lowest = (self._mask & -self._mask).bit_length() - 1
            return self._bags[lowest].choice(self._rng)

        while self._heap:
            key, _, gen, id = self._heap[0]
            if self._heap_gen.get(id) != gen:
                heapq.heappop(self._heap)
                continue
            heapq.heappop(self._heap)
            self._push(id, key)
            return id
        return None

    def key(self, id: str) -> float | None:
        return self._key.get(id)

    def _push(self, id: str, key: float) -> None:
        self._gen += 1
        self._heap_gen[id] = self._gen
        heapq.heappush(self._heap, (key, self._rng.random(), self._gen, id))

    def _compact(self) -> None:
        self._heap = [row for row in self._heap if self._heap_gen.get(row[3]) == row[2]]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._key)

    def __contains__(self, id: object) -> bool:
        return id in self._key
