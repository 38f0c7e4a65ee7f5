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
* Writes go through one thread with its own connection. It takes every request
  waiting, applies each in a savepoint (a failing request undoes only itself),
  commits once for the whole group (one fsync) and only then answers. A write
  whose coroutine returned is durable (WAL, ``synchronous=FULL``) and survives
  ``kill -9``; a cancelled write may still be applied.
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
import contextlib
import hashlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from p2plb.errors import StorageError
from p2plb.hlc import HybridLogicalClock, format_version

__all__ = ["BUCKETS", "Committed", "Op", "Page", "Storage", "WriteResult", "bucket_of"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# SQLite integers are signed 64-bit, so a version must stay below 2**63: any
# wall clock before the year 6400 does.
MAX_STORED_VERSION = (1 << 63) - 1

_SCHEMA_VERSION = 1
_READERS = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx TEXT NOT NULL CHECK (length(idx) > 0),
    item TEXT NOT NULL CHECK (length(item) > 0),
    present INTEGER NOT NULL CHECK (present IN (0, 1)),
    version INTEGER NOT NULL,
    origin TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    PRIMARY KEY (idx, item)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_bucket ON entries (idx, bucket);
CREATE TABLE IF NOT EXISTS live (
    idx TEXT PRIMARY KEY,
    items INTEGER NOT NULL CHECK (items >= 0)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS digests (
    idx TEXT NOT NULL,
    bucket INTEGER NOT NULL,
    hash INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    PRIMARY KEY (idx, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    origin TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
"""

# Items of an index are spread over this many buckets for digests; the row with
# bucket = INDEX_TOTAL holds the XOR of all of them.
BUCKETS = 64
INDEX_TOTAL = -1


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


@dataclass(frozen=True, slots=True)
class Op:
    """One operation on one item, as stored and as replicated."""

    index: str
    item: str
    present: bool
    version: int
    origin: str


@dataclass(frozen=True, slots=True)
class Committed:
    """What one group commit made durable, as the commit hook is told.

    ``local`` are the operations this node originated, in version order;
    ``version`` is the clock's last value at the commit: every local operation
    up to it is in ``local`` of this or an earlier commit.
    """

    local: list[Op]
    version: int
    indices: set[str]  # every index whose entries changed


class _Request(Generic[T]):
    """A write waiting for the writer thread, and where to send its outcome."""

    def __init__(
        self,
        name: str,
        apply: Callable[[sqlite3.Connection], T],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.apply = apply
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()

    def settle(self, result: Any, error: BaseException | None) -> None:
        """Hand the outcome to the request's event loop, from any thread."""
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self.loop.call_soon_threadsafe(self._settle, result, error)

    def _settle(self, result: Any, error: BaseException | None) -> None:
        if self.future.done():  # the caller was cancelled and left
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


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
        self._loop: asyncio.AbstractEventLoop | None = None
        # Watermarks as of the last commit, read on the event loop only.
        self.watermarks: dict[str, int] = {}
        # Filled by the writer thread during a group, handed over at commit.
        self._group_local: list[Op] = []
        self._group_marks: dict[str, int] = {}
        self._group_indices: set[str] = set()
        self._node_id = node_id
        self._clock = HybridLogicalClock(wall_ms)
        # The clock's last value as of the last commit: what readers may rely on.
        self._committed = 0
        self._queue: queue.SimpleQueue[_Request[Any] | None] = queue.SimpleQueue()
        self._writer_conn: sqlite3.Connection | None = None
        self._writer: threading.Thread | None = None
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
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open_sync)

        self._readers = ThreadPoolExecutor(_READERS, thread_name_prefix="p2plb-read")
        self._writer = threading.Thread(
            target=self._run_writer, name="p2plb-write", daemon=True
        )
        self._writer.start()

    def _open_sync(self) -> None:
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
            self._create_schema(writer)
            last = writer.execute(
                "SELECT value FROM meta WHERE key = 'clock'"
            ).fetchone()
            indices, items = writer.execute(
                "SELECT count(*), coalesce(sum(items), 0) FROM live"
            ).fetchone()
            marks = dict(writer.execute("SELECT origin, version FROM watermarks"))
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

        self._writer_conn = writer
        if last is not None:
            self._clock.observe(last[0])
        self._committed = self._clock.last
        self.watermarks = marks | {self._node_id: self._committed}
        logger.info(
            "storage.opened path=%s indices=%d items=%d version=%s",
            self._path,
            indices,
            items,
            format_version(self._committed),
        )

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

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > _SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {found} is newer than this p2plb ({_SCHEMA_VERSION})"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Wait for queued writes, stop the threads, close every connection."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
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

        def apply(conn: sqlite3.Connection) -> WriteResult:
            # One version for the whole batch: it is one request.
            version = self._clock.now()
            ops = [Op(index, item, present, version, self._node_id) for item in unique]
            deltas = [_put(conn, op) for op in ops]
            self._group_local.extend(ops)
            self._group_indices.add(index)
            changed = sum(1 for delta in deltas if delta)
            _count(conn, {index: changed if present else -changed})
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

        def apply(conn: sqlite3.Connection) -> list[Op]:
            applied: list[Op] = []
            deltas: dict[str, int] = {}
            for op in ops:
                delta = _put(conn, op)
                if delta is not None:
                    applied.append(op)
                    deltas[op.index] = deltas.get(op.index, 0) + delta
                    self._group_indices.add(op.index)
            _count(conn, deltas)
            top = max((op.version for op in ops), default=0)
            if upto is not None:
                top = max(top, upto)
            if top:
                self._clock.observe(min(top, MAX_STORED_VERSION))
            if origin is None or base is None or upto is None:
                pass  # not an ordered stream: the watermarks stay
            elif self._mark(conn, origin) >= base:
                self._raise_mark(conn, origin, upto)
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

        def apply(conn: sqlite3.Connection) -> None:
            for origin, version in marks.items():
                if origin != self._node_id:
                    self._raise_mark(conn, origin, version)

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

        def apply(conn: sqlite3.Connection) -> int:
            dropped = 0
            for origin, mark in safe.items():
                rows = conn.execute(
                    "SELECT idx, item, version, bucket FROM entries "
                    "WHERE present = 0 AND origin = ? AND version <= ? LIMIT ?",
                    (origin, min(older_than, mark), most - dropped),
                ).fetchall()
                for idx, item, version, bucket in rows:
                    _forget(conn, idx, item, version, origin, bucket)
                    self._group_indices.add(idx)
                dropped += len(rows)
            return dropped

        return await self._write("drop tombstones", apply)

    async def wipe(self) -> None:
        """Discard every entry and watermark (not the clock), to resync anew."""

        def apply(conn: sqlite3.Connection) -> None:
            self._clock.now()  # the wipe itself is news: "last committed" moves
            indices = [row[0] for row in conn.execute("SELECT DISTINCT idx FROM live")]
            self._group_indices.update(indices)
            for table in ("entries", "live", "digests", "watermarks"):
                conn.execute(f"DELETE FROM {table}")  # names fixed above, no input
            self._group_marks = {}

        await self._write("wipe", apply)
        self.watermarks = {self._node_id: self._committed}

    async def tick(self) -> int:
        """Commit a fresh clock value; every local write up to it is committed.

        Replication sends it to peers as a heartbeat, so their watermark of
        this node moves on even when it takes no writes.
        """

        def apply(conn: sqlite3.Connection) -> int:
            return self._clock.now()

        return await self._write("tick", apply)

    def _mark(self, conn: sqlite3.Connection, origin: str) -> int:
        if origin in self._group_marks:
            return self._group_marks[origin]
        row = conn.execute(
            "SELECT version FROM watermarks WHERE origin = ?", (origin,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _raise_mark(self, conn: sqlite3.Connection, origin: str, version: int) -> None:
        version = min(version, MAX_STORED_VERSION)
        if version <= self._mark(conn, origin):
            return
        conn.execute(
            "INSERT INTO watermarks (origin, version) VALUES (?, ?) "
            "ON CONFLICT (origin) DO UPDATE SET version = excluded.version",
            (origin, version),
        )
        self._group_marks[origin] = version

    async def _write(self, name: str, apply: Callable[[sqlite3.Connection], T]) -> T:
        if self._writer is None or self._closing is not None:
            raise StorageError(f"{name} on {self._path}: the storage is not open")
        request = _Request(name, apply, asyncio.get_running_loop())
        self._queue.put(request)
        return await request.future

    def _run_writer(self) -> None:
        """The writer thread: take waiting requests, commit them as one group."""
        stop = False
        while not stop:
            group: list[_Request[Any]] = []
            item = self._queue.get()
            while item is not None:
                group.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                stop = True
            if group:
                self._commit_group(group)

        assert self._writer_conn is not None
        self._writer_conn.close()

    def _commit_group(self, group: list[_Request[Any]]) -> None:
        conn = self._writer_conn
        assert conn is not None
        outcomes: list[tuple[_Request[Any], object, BaseException | None]] = []
        self._group_local = []
        self._group_marks = {}
        self._group_indices = set()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for request in group:
                outcomes.append((request, *self._apply_one(conn, request)))

            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('clock', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (self._clock.last,),
            )
            conn.execute("COMMIT")
        except Exception as exc:
            logger.error(
                "storage.commit_failed path=%s requests=%d error=%s",
                self._path,
                len(group),
                exc,
            )
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for request in group:
                message = f"{request.name} on {self._path}: commit failed: {exc}"
                request.settle(None, _chained(message, exc))
            return

        self._committed = self._clock.last
        logger.debug(
            "storage.committed path=%s requests=%d version=%s",
            self._path,
            len(group),
            format_version(self._committed),
        )
        # Before any answer: the loop runs callbacks in order, so whoever hears
        # of a commit (replication) hears of it before the writer is answered.
        if self._loop is not None:
            committed = Committed(
                self._group_local, self._committed, self._group_indices
            )
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(
                    self._after_commit, committed, self._group_marks
                )
        for request, result, error in outcomes:
            request.settle(result, error)

    def _after_commit(self, committed: Committed, marks: dict[str, int]) -> None:
        self.watermarks.update(marks)
        self.watermarks[self._node_id] = committed.version
        if self.on_commit is not None:
            self.on_commit(committed)

    def _apply_one(
        self, conn: sqlite3.Connection, request: _Request[Any]
    ) -> tuple[object, BaseException | None]:
        conn.execute("SAVEPOINT request")
        local_before = len(self._group_local)
        marks_before = dict(self._group_marks)
        try:
            result = request.apply(conn)
        except Exception as exc:
            del self._group_local[local_before:]
            self._group_marks = marks_before
            conn.execute("ROLLBACK TO request")
            conn.execute("RELEASE request")
            logger.warning(
                "storage.request_failed path=%s request=%s error=%s",
                self._path,
                request.name,
                exc,
            )
            if isinstance(exc, sqlite3.Error | OverflowError):
                message = f"{request.name} on {self._path} failed: {exc}"
                return None, _chained(message, exc)
            return None, exc
        conn.execute("RELEASE request")
        return result, None

    # -- reads --------------------------------------------------------------

    async def get(self, index: str, *, limit: int, after: str | None) -> Page | None:
        """Present items above ``after``, sorted; None if the index has none."""

        def read(conn: sqlite3.Connection) -> Page | None:
            if after is None:
                rows = conn.execute(
                    "SELECT item FROM entries WHERE idx = ? AND present = 1 "
                    "ORDER BY item LIMIT ?",
                    (index, limit + 1),
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT item FROM entries WHERE idx = ? AND present = 1 "
                    "AND item > ? ORDER BY item LIMIT ?",
                    (index, after, limit + 1),
                ).fetchall()

            # An empty page past the end is not an empty index: ask the counts.
            if not rows and (after is None or not _is_live(conn, index)):
                return None

            items = [row[0] for row in rows[:limit]]
            more = len(rows) > limit
            return Page(items, items[-1] if more else None)

        return await self._read(f"get on index {index!r}", read, snapshot=True)

    async def list_indices(self) -> list[str]:
        """Names of the indices that hold at least one present item, sorted."""

        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT idx FROM live ORDER BY idx").fetchall()
            return [row[0] for row in rows]

        return await self._read("list_indices", read)

    async def scan(
        self, index: str | None, after: tuple[str, str] | None, limit: int
    ) -> list[Op]:
        """Every entry, tombstones included, in (index, item) order after ``after``.

        ``index`` keeps to one index; ``after`` is the (index, item) of the last
        entry of the previous page.
        """
        where: list[str] = []
        args: list[object] = []
        if index is not None:
            where.append("idx = ?")
            args.append(index)
        if after is not None:
            where.append("(idx, item) > (?, ?)")
            args.extend(after)
        sql = "SELECT idx, item, present, version, origin FROM entries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY idx, item LIMIT ?"
        args.append(limit)

        def read(conn: sqlite3.Connection) -> list[Op]:
            rows = conn.execute(sql, args).fetchall()
            return [
                Op(idx, item, bool(p), v, origin) for idx, item, p, v, origin in rows
            ]

        return await self._read("scan", read)

    async def summary(self) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
        """Watermarks and per-index digests ``{index: (hash, entries)}``, together.

        Read in one snapshot, so a replica that comes to hold everything these
        digests describe also holds everything the watermarks promise.
        """

        def read(conn: sqlite3.Connection) -> Any:
            marks = dict(conn.execute("SELECT origin, version FROM watermarks"))
            clock = conn.execute("SELECT value FROM meta WHERE key = 'clock'")
            marks[self._node_id] = next((int(r[0]) for r in clock), 0)
            digests = {
                idx: (h, n)
                for idx, h, n in conn.execute(
                    "SELECT idx, hash, entries FROM digests WHERE bucket = ?",
                    (INDEX_TOTAL,),
                )
            }
            return marks, digests

        result: tuple[dict[str, int], dict[str, tuple[int, int]]] = await self._read(
            "summary", read, snapshot=True
        )
        return result

    async def buckets(self, index: str) -> dict[int, tuple[int, int]]:
        """The digests of one index, per bucket: ``{bucket: (hash, entries)}``."""

        def read(conn: sqlite3.Connection) -> dict[int, tuple[int, int]]:
            rows = conn.execute(
                "SELECT bucket, hash, entries FROM digests "
                "WHERE idx = ? AND bucket >= 0",
                (index,),
            )
            return {b: (h, n) for b, h, n in rows}

        return await self._read(f"buckets of index {index!r}", read)

    async def scan_bucket(self, index: str, bucket: int) -> list[Op]:
        """Every entry of one bucket of one index, tombstones included."""

        def read(conn: sqlite3.Connection) -> list[Op]:
            rows = conn.execute(
                "SELECT item, present, version, origin FROM entries "
                "WHERE idx = ? AND bucket = ?",
                (index, bucket),
            )
            return [Op(index, item, bool(p), v, o) for item, p, v, o in rows]

        return await self._read(f"scan of index {index!r}", read)

    async def check(self) -> None:
        """Read from the database; raises ``StorageError`` if it cannot."""
        if self._writer is None or self._closing is not None:
            raise StorageError(f"check of {self._path}: the storage is not open")
        if not self._writer.is_alive():
            raise StorageError(f"check of {self._path}: the writer thread has stopped")

        def read(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT value FROM meta WHERE key = 'clock'").fetchall()

        await self._read("check", read)

    @property
    def committed(self) -> int:
        """The clock's last value as of the last commit (its physical part says
        when this replica last committed anything)."""
        return self._committed

    async def max_version(self) -> int:
        """The clock's last value as of the last commit.

        Not the clock itself: while a group is being applied the clock is
        already ahead of what readers can see, and a replica that answered a
        read asking for that version would serve stale data.
        """
        return self._committed

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


def _chained(message: str, cause: BaseException) -> StorageError:
    """A StorageError caused by ``cause``, as ``raise ... from`` would make it.

    The writer thread cannot raise into the caller's coroutine; it hands the
    error to a future instead, so the chaining is done by hand.
    """
    error = StorageError(message)
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error


def bucket_of(item: str) -> int:
    """The digest bucket of an item: stable across processes and machines."""
    digest = hashlib.blake2b(item.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def _entry_hash(idx: str, item: str, present: int, version: int, origin: str) -> int:
    text = f"{idx}\0{item}\0{present}\0{version}\0{origin}".encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _put(conn: sqlite3.Connection, op: Op) -> int | None:
    """Store ``op`` if it wins by the merge rule, keeping the digests in step.

    Returns None when the stored operation won, else how the number of present
    items changed (-1, 0 or +1), for the caller to add to the live counts.
    """
    row = conn.execute(
        "SELECT present, version, origin FROM entries WHERE idx = ? AND item = ?",
        (op.index, op.item),
    ).fetchone()
    if row is not None and (op.version, op.origin) <= (row[1], row[2]):
        return None

    bucket = bucket_of(op.item)
    conn.execute(
        "INSERT INTO entries (idx, item, present, version, origin, bucket) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (idx, item) DO UPDATE SET "
        "present = excluded.present, version = excluded.version, "
        "origin = excluded.origin",
        (op.index, op.item, int(op.present), op.version, op.origin, bucket),
    )

    # XOR the old entry out of the digests and the new one in.
    change = _entry_hash(op.index, op.item, int(op.present), op.version, op.origin)
    added = 1
    if row is not None:
        change ^= _entry_hash(op.index, op.item, row[0], row[1], row[2])
        added = 0
    for key in (bucket, INDEX_TOTAL):
        found = conn.execute(
            "SELECT hash FROM digests WHERE idx = ? AND bucket = ?", (op.index, key)
        ).fetchone()
        if found is None:
            conn.execute(
                "INSERT INTO digests (idx, bucket, hash, entries) VALUES (?, ?, ?, 1)",
                (op.index, key, change),
            )
        else:
            conn.execute(
                "UPDATE digests SET hash = ?, entries = entries + ? "
                "WHERE idx = ? AND bucket = ?",
                (found[0] ^ change, added, op.index, key),
            )

    was_present = row is not None and bool(row[0])
    return int(op.present) - int(was_present)


def _forget(
    conn: sqlite3.Connection,
    idx: str,
    item: str,
    version: int,
    origin: str,
    bucket: int,
) -> None:
    """Delete a tombstone, XOR-ing it out of the digests."""
    conn.execute("DELETE FROM entries WHERE idx = ? AND item = ?", (idx, item))
    gone = _entry_hash(idx, item, 0, version, origin)
    for key in (bucket, INDEX_TOTAL):
        found = conn.execute(
            "SELECT hash FROM digests WHERE idx = ? AND bucket = ?", (idx, key)
        ).fetchone()
        if found is None:
            continue
        conn.execute(
            "UPDATE digests SET hash = ?, entries = entries - 1 "
            "WHERE idx = ? AND bucket = ?",
            (found[0] ^ gone, idx, key),
        )
        conn.execute(
            "DELETE FROM digests WHERE idx = ? AND bucket = ? AND entries <= 0",
            (idx, key),
        )


def _count(conn: sqlite3.Connection, deltas: dict[str, int]) -> None:
    """Add to the live counts, dropping indices left with no present item."""
    for index, delta in deltas.items():
        if not delta:
            continue
        conn.execute(
            "INSERT INTO live (idx, items) VALUES (?, 0) ON CONFLICT (idx) DO NOTHING",
            (index,),
        )
        conn.execute("UPDATE live SET items = items + ? WHERE idx = ?", (delta, index))
        conn.execute("DELETE FROM live WHERE idx = ? AND items = 0", (index,))


def _is_live(conn: sqlite3.Connection, index: str) -> bool:
    row = conn.execute("SELECT 1 FROM live WHERE idx = ?", (index,)).fetchone()
    return row is not None
