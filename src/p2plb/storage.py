"""The indexer's store: every index and item, in one SQLite database.

Rules of this module:

* Each (index, item) holds its latest operation: present (added) or absent (a
  tombstone), with its version (a hybrid logical clock value, see ``hlc``) and
  its origin (the id of the indexer that took the write). Removes always write
  a tombstone, even for an item never seen, so that an older add arriving later
  from another indexer cannot bring the item back.
* Merge rule, a last-writer-wins register per item: an operation replaces the
  stored one iff its ``(version, origin)`` is greater; equal is a no-op. Merging
  is therefore commutative, associative and idempotent, and replicas that saw
  the same operations hold the same entries, in whatever order they came.
* A local write takes ``version = clock.now()``. Merges make the clock observe
  every version they store, so a local write is above everything stored and
  always wins. The clock's last value is persisted in the same transaction as
  the entries, so after a restart it continues above every version the node
  ever issued or stored, even if the wall clock went back.
* Writes go through one thread with its own connection (``writer``). It takes
  every request waiting, applies each in a savepoint (a failing request undoes
  only itself), commits once for the whole group (one fsync) and only then
  answers. A write whose coroutine returned is durable (WAL,
  ``synchronous=FULL``) and survives ``kill -9``; a cancelled write may still
  be applied.  A group that changed nothing is not committed, so an idle
  node does not touch the disk (``commits`` counts those that were).
* Reads run on two threads with read-only connections of their own, in
  parallel with the writer thanks to WAL. The event loop never touches disk.
* Items sort by code point: SQLite's BINARY collation compares UTF-8 bytes,
  and UTF-8 byte order is code point order, which is how Python sorts ``str``.
* Every sqlite3 error becomes ``StorageError``, naming the operation and path.
* For replication, each entry also lands in a digest: per index and per one of
  ``BUCKETS`` buckets of items, the XOR of the entries' hashes and their count,
  kept up to date in the same transaction, so two replicas compare an index in
  one number and find the differing bucket in a few more.
* ``watermarks`` hold, per origin, a version up to which this replica holds every
  operation that origin took (its own origin: the last commit).  They only
  move forward, in the same transaction as the entries that justify them.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from p2plb import entries
from p2plb.entries import BUCKETS, Op, bucket_of
from p2plb.errors import StorageError
from p2plb.hlc import HybridLogicalClock, format_version
from p2plb.writer import Committed, Group, Writer

__all__ = ["BUCKETS", "Committed", "Op", "Page", "Storage", "WriteResult", "bucket_of"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# SQLite integers are signed 64-bit, so a version must stay below 2**63: any
# wall clock before the year 6400 does.
# How far ahead of our wall clock a version seen elsewhere may be and still move
# our clock: beyond it, it is a bogus or badly skewed version (see hlc.py).
MAX_DRIFT_MS = 60_000
MAX_STORED_VERSION = (1 << 63) - 1

_READERS = 2


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What an add or remove did: items that changed state, and its version."""

    changed: int
    version: int


@dataclass(frozen=True, slots=True)
class Page:
    """Present items of an index, sorted; ``next`` is the cursor when more remain."""

    items: list[str]
    next: str | None


class Storage:
    """The entries of every index, with a single writer and parallel readers."""

    def __init__(
        self,
        path: str | Path,
        node_id: str,
        *,
        wall_ms: Callable[[], int] = _wall_ms,
        on_commit: Callable[[Committed], None] | None = None,
    ) -> None:
        self._path = Path(path)
        self.on_commit = on_commit
        # Watermarks as of the last commit, read on the event loop only.
        self.watermarks: dict[str, int] = {}
        self._node_id = node_id
        self._clock = HybridLogicalClock(wall_ms)
        self._writer: Writer | None = None
        self._reader_conns: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._readers: ThreadPoolExecutor | None = None
        self._closing: asyncio.Task[None] | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def node_id(self) -> str:
        return self._node_id

    # -- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        """Create the directory and the schema, then start the threads."""
        if self._writer is not None or self._closing is not None:
            raise StorageError(f"storage at {self._path} was already opened")
        loop = asyncio.get_running_loop()
        conn = await asyncio.to_thread(self._open_sync)

        self._readers = ThreadPoolExecutor(_READERS, thread_name_prefix="p2plb-read")
        self._writer = Writer(conn, self._path, self._clock, loop, self._after_commit)
        self._writer.start()

    def _open_sync(self) -> sqlite3.Connection:
        """Open every connection and read the state back; the writer's is returned."""
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create the directory {self._path.parent} "
                f"for the database: {exc}"
            ) from exc

        opened: list[sqlite3.Connection] = []
        try:
            writer = self._connect(opened)
            entries.create_schema(writer)
            last = entries.stored_clock(writer)
            indices, items = entries.live_totals(writer)
            marks = entries.stored_watermarks(writer)
            for _ in range(_READERS):
                reader = self._connect(opened)
                reader.execute("PRAGMA query_only = ON")
                self._reader_conns.put(reader)
        except sqlite3.Error as exc:
            for conn in opened:
                conn.close()
            raise StorageError(
                f"cannot open the database {self._path} (is it an SQLite "
                f"database, and writable?): {exc}"
            ) from exc

        if last is not None:
            self._clock.observe(last)  # our own past: taken whatever the wall says
        self._clock.max_drift_ms = MAX_DRIFT_MS
        self.watermarks = marks | {self._node_id: self._clock.last}
        logger.info(
            "storage.opened path=%s indices=%d items=%d version=%s",
            self._path,
            indices,
            items,
            format_version(self._clock.last),
        )
        return writer

    def _connect(self, opened: list[sqlite3.Connection]) -> sqlite3.Connection:
        # isolation_level=None: transactions are only the ones begun here.
        # check_same_thread=False: each connection is used by one thread at a
        # time, but opened and closed by another.
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, timeout=30
        )
        opened.append(conn)
        conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    async def close(self) -> None:
        """Wait for queued writes, stop the threads, close every connection."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._writer is not None:
            await self._writer.stop()
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown, wait=True)
        while not self._reader_conns.empty():
            self._reader_conns.get_nowait().close()
        if self._writer is not None:
            logger.info("storage.closed path=%s", self._path)

    # -- writes -------------------------------------------------------------

    async def add(self, index: str, items: Sequence[str]) -> WriteResult:
        """Mark items present; ``changed`` counts those that were not."""
        return await self._local_write("add", index, items, present=True)

    async def remove(self, index: str, items: Sequence[str]) -> WriteResult:
        """Write tombstones; ``changed`` counts items that were present."""
        return await self._local_write("remove", index, items, present=False)

    async def _local_write(
        self, name: str, index: str, items: Sequence[str], *, present: bool
    ) -> WriteResult:
        unique = list(dict.fromkeys(items))

        def apply(conn: sqlite3.Connection, group: Group) -> WriteResult:
            # One version for the whole batch: it is one request.
            version = self._clock.now()
            ops = [Op(index, item, present, version, self._node_id) for item in unique]
            deltas = [entries.put(conn, op) for op in ops]
            group.local.extend(ops)
            group.indices.add(index)
            changed = sum(1 for delta in deltas if delta)
            entries.count_live(conn, {index: changed if present else -changed})
            logger.debug(
                "storage.%s index=%r items=%d changed=%d version=%s",
                name,
                index,
                len(unique),
                changed,
                format_version(version),
            )
            return WriteResult(changed, version)

        return await self._write(f"{name} on index {index!r}", apply)

    async def merge(
        self,
        ops: Sequence[Op],
        *,
        origin: str | None = None,
        base: int | None = None,
        upto: int | None = None,
    ) -> list[Op]:
        """Apply operations from other indexers; returns those that won.

        With ``origin``, ``base`` and ``upto`` (an ordered stream from that
        origin): if this replica already held every operation of ``origin`` up
        to ``base``, and ``ops`` are all of them in ``(base, upto]``, the
        watermark of ``origin`` moves to ``upto`` in the same transaction.
        """
        for op in ops:
            if not 0 <= op.version <= MAX_STORED_VERSION:
                raise StorageError(
                    f"merge into {self._path}: version {op.version} of "
                    f"{op.index!r}/{op.item!r} is out of range"
                )

        def apply(conn: sqlite3.Connection, group: Group) -> list[Op]:
            applied: list[Op] = []
            deltas: dict[str, int] = {}
            for op in ops:
                delta = entries.put(conn, op)
                if delta is not None:
                    applied.append(op)
                    deltas[op.index] = deltas.get(op.index, 0) + delta
                    group.indices.add(op.index)
            entries.count_live(conn, deltas)
            top = max((op.version for op in ops), default=0)
            if upto is not None:
                top = max(top, upto)
            if top and not self._clock.observe(min(top, MAX_STORED_VERSION)):
                logger.warning(
                    "clock.drift_refused path=%s version=%s; a peer's clock runs "
                    "more than %d s ahead of ours",
                    self._path,
                    format_version(top),
                    MAX_DRIFT_MS // 1000,
                )
            if origin is None or base is None or upto is None:
                pass  # not an ordered stream: the watermarks stay
            elif _mark(conn, group, origin) >= base:
                _raise_mark(conn, group, origin, upto)
            logger.debug(
                "storage.merge path=%s ops=%d applied=%d",
                self._path,
                len(ops),
                len(applied),
            )
            return applied

        return await self._write("merge", apply)

    async def advance(self, marks: dict[str, int]) -> None:
        """Raise watermarks to ``marks`` where they are higher (after a sync)."""

        def apply(conn: sqlite3.Connection, group: Group) -> None:
            for origin, version in marks.items():
                if origin != self._node_id:
                    _raise_mark(conn, group, origin, version)

        await self._write("advance watermarks", apply)

    async def drop_tombstones(
        self, older_than: int, safe: dict[str, int], *, most: int = 10_000
    ) -> int:
        """Forget tombstones every replica holds; returns how many went.

        A tombstone of ``origin`` goes once its version is below ``older_than``
        (the grace period) and at most ``safe[origin]``, the version up to which
        every registered indexer holds that origin's operations.  Before both,
        a replica that missed the removal could bring the item back.
        """

        def apply(conn: sqlite3.Connection, group: Group) -> int:
            dropped = 0
            for origin, mark in safe.items():
                rows = entries.tombstones(
                    conn, origin, min(older_than, mark), most - dropped
                )
                for idx, item, version, bucket in rows:
                    entries.forget(conn, idx, item, version, origin, bucket)
                    group.indices.add(idx)
                dropped += len(rows)
            return dropped

        return await self._write("drop tombstones", apply)

    async def wipe(self) -> None:
        """Discard every entry and watermark (not the clock), to resync anew."""

        def apply(conn: sqlite3.Connection, group: Group) -> None:
            # The wipe itself is news: "last committed" moves, even when
            # there was nothing to delete.
            entries.save_clock(conn, self._clock.now())
            group.indices.update(entries.clear(conn))
            group.marks = {}

        await self._write("wipe", apply)
        self.watermarks = {self._node_id: self.committed}

    async def tick(self, at_least: int = 0) -> int:
        """Commit a fresh clock value; every local write up to it is committed.

        Replication sends it to peers, so that their watermark of this node
        passes a version a reader waits for (``at_least``).  The value leaves
        this node, so it is saved (one fsync) before it does: after a crash
        the clock must resume above it, or a new write could take a version
        that peers already count as held.
        """

        def apply(conn: sqlite3.Connection, group: Group) -> int:
            if at_least:
                self._clock.observe(min(at_least, MAX_STORED_VERSION))  # bounded
            version = self._clock.now()
            entries.save_clock(conn, version)
            return version

        return await self._write("tick", apply)

    async def _write(
        self, name: str, apply: Callable[[sqlite3.Connection, Group], T]
    ) -> T:
        if self._writer is None or self._closing is not None:
            raise StorageError(f"{name} on {self._path}: the storage is not open")
        return await self._writer.write(name, apply)

    def _after_commit(self, committed: Committed, marks: dict[str, int]) -> None:
        self.watermarks.update(marks)
        self.watermarks[self._node_id] = committed.version
        if self.on_commit is not None:
            self.on_commit(committed)

    # -- reads --------------------------------------------------------------

    async def get(self, index: str, *, limit: int, after: str | None) -> Page | None:
        """Present items above ``after``, sorted; None if the index has none."""

        def read(conn: sqlite3.Connection) -> Page | None:
            found = entries.present_items(conn, index, after, limit + 1)

            # An empty page past the end is not an empty index: ask the counts.
            if not found and (after is None or not entries.is_live(conn, index)):
                return None

            items = found[:limit]
            more = len(found) > limit
            return Page(items, items[-1] if more else None)

        return await self._read(f"get on index {index!r}", read, snapshot=True)

    async def list_indices(self) -> list[str]:
        """Names of the indices that hold at least one present item, sorted."""
        return await self._read("list_indices", entries.live_indices)

    async def scan(
        self, index: str | None, after: tuple[str, str] | None, limit: int
    ) -> list[Op]:
        """Every entry, tombstones included, in (index, item) order after ``after``.

        ``index`` keeps to one index; ``after`` is the (index, item) of the last
        entry of the previous page.
        """
        return await self._read(
            "scan", lambda conn: entries.scan(conn, index, after, limit)
        )

    async def summary(self) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
        """Watermarks and per-index digests ``{index: (hash, entries)}``, together.

        Read in one snapshot, so a replica that comes to hold everything these
        digests describe also holds everything the watermarks promise.
        """

        def read(
            conn: sqlite3.Connection,
        ) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
            marks = entries.stored_watermarks(conn)
            clock = entries.stored_clock(conn)
            marks[self._node_id] = 0 if clock is None else clock
            return marks, entries.index_digests(conn)

        return await self._read("summary", read, snapshot=True)

    async def buckets(self, index: str) -> dict[int, tuple[int, int]]:
        """The digests of one index, per bucket: ``{bucket: (hash, entries)}``."""
        return await self._read(
            f"buckets of index {index!r}",
            lambda conn: entries.bucket_digests(conn, index),
        )

    async def scan_bucket(self, index: str, bucket: int) -> list[Op]:
        """Every entry of one bucket of one index, tombstones included."""
        return await self._read(
            f"scan of index {index!r}",
            lambda conn: entries.scan_bucket(conn, index, bucket),
        )

    async def check(self) -> None:
        """Read from the database; raises ``StorageError`` if it cannot."""
        if self._writer is None or self._closing is not None:
            raise StorageError(f"check of {self._path}: the storage is not open")
        if not self._writer.is_alive():
            raise StorageError(f"check of {self._path}: the writer thread has stopped")
        if self._writer.last_failure is not None:
            raise StorageError(f"check of {self._path}: {self._writer.last_failure}")

        await self._read("check", entries.stored_clock)

    def too_far_ahead(self, version: int) -> bool:
        """Whether ``version`` is beyond this node's clock plus the allowed drift."""
        return self._clock.too_far_ahead(version)

    @property
    def commits(self) -> int:
        """Groups committed to disk since ``open``: one fsync each."""
        return 0 if self._writer is None else self._writer.commits

    @property
    def committed(self) -> int:
        """The clock's last value as of the last commit (its physical part says
        when this replica last committed anything)."""
        return 0 if self._writer is None else self._writer.committed

    async def max_version(self) -> int:
        """The clock's last value as of the last commit.

        Not the clock itself: while a group is being applied the clock is
        already ahead of what readers can see, and a replica that answered a
        read asking for that version would serve stale data.
        """
        return self.committed

    async def _read(
        self,
        name: str,
        read: Callable[[sqlite3.Connection], T],
        *,
        snapshot: bool = False,
    ) -> T:
        if self._readers is None or self._closing is not None:
            raise StorageError(f"{name} on {self._path}: the storage is not open")

        def run() -> T:
            conn = self._reader_conns.get()
            try:
                if not snapshot:
                    return read(conn)
                # Several statements see one state of the database.
                conn.execute("BEGIN")
                try:
                    return read(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"{name} on {self._path} failed: {exc}") from exc
            finally:
                self._reader_conns.put(conn)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, run)


# Watermarks as a request sees them: its group's raises first, then the table.


def _mark(conn: sqlite3.Connection, group: Group, origin: str) -> int:
    if origin in group.marks:
        return group.marks[origin]
    return entries.stored_mark(conn, origin)


def _raise_mark(
    conn: sqlite3.Connection, group: Group, origin: str, version: int
) -> None:
    version = min(version, MAX_STORED_VERSION)
    if version <= _mark(conn, group, origin):
        return
    entries.save_mark(conn, origin, version)
    group.marks[origin] = version
