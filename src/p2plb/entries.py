"""How one entry is stored: the schema, the merge rule, the digests, the queries.

Functions here take a connection from ``storage`` (the writer's, inside its
transaction, or a reader's) and know nothing of threads or the event loop.
The rules:

* Each (index, item) holds its latest operation: present (added) or absent (a
  tombstone), its version (a hybrid logical clock value) and its origin.
* An operation replaces the stored one iff its ``(version, origin)`` is
  greater; equal is a no-op.  Merging is commutative, associative and
  idempotent, so replicas that saw the same operations hold the same entries.
* Each entry also lands in a digest: per index and per one of ``BUCKETS``
  buckets of items, the XOR of the entries' hashes and their count, so two
  replicas compare an index in one number and find the differing buckets in a
  few more.  XOR makes adding and removing an entry the same cheap step.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass

__all__ = [
    "BUCKETS",
    "INDEX_TOTAL",
    "SCHEMA",
    "SCHEMA_VERSION",
    "Op",
    "bucket_of",
    "bucket_digests",
    "clear",
    "count_live",
    "create_schema",
    "forget",
    "index_digests",
    "is_live",
    "live_indices",
    "live_totals",
    "present_items",
    "put",
    "save_clock",
    "save_mark",
    "scan",
    "scan_bucket",
    "stored_clock",
    "stored_mark",
    "stored_watermarks",
    "tombstones",
]


@dataclass(frozen=True, slots=True)
class Op:
    """One operation on one item, as stored and as replicated."""

    index: str
    item: str
    present: bool
    version: int
    origin: str


SCHEMA_VERSION = 1
SCHEMA = """
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


def create_schema(conn: sqlite3.Connection) -> None:
    """Create what is missing of the schema, in one transaction."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {found} is newer than this p2plb ({SCHEMA_VERSION})"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def bucket_of(item: str) -> int:
    """The digest bucket of an item: stable across processes and machines."""
    digest = hashlib.blake2b(item.encode("utf-8"), digest_size=4).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def _entry_hash(idx: str, item: str, present: int, version: int, origin: str) -> int:
    text = f"{idx}\0{item}\0{present}\0{version}\0{origin}".encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def put(conn: sqlite3.Connection, op: Op) -> int | None:
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


def forget(
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


def count_live(conn: sqlite3.Connection, deltas: dict[str, int]) -> None:
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


def is_live(conn: sqlite3.Connection, index: str) -> bool:
    row = conn.execute("SELECT 1 FROM live WHERE idx = ?", (index,)).fetchone()
    return row is not None


def save_clock(conn: sqlite3.Connection, value: int) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('clock', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (value,),
    )


def stored_clock(conn: sqlite3.Connection) -> int | None:
    """The clock's last value as of the last commit; None in a new database."""
    rows = conn.execute("SELECT value FROM meta WHERE key = 'clock'").fetchall()
    return int(rows[0][0]) if rows else None


def stored_watermarks(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT origin, version FROM watermarks"))


def stored_mark(conn: sqlite3.Connection, origin: str) -> int:
    row = conn.execute(
        "SELECT version FROM watermarks WHERE origin = ?", (origin,)
    ).fetchone()
    return 0 if row is None else int(row[0])


def save_mark(conn: sqlite3.Connection, origin: str, version: int) -> None:
    conn.execute(
        "INSERT INTO watermarks (origin, version) VALUES (?, ?) "
        "ON CONFLICT (origin) DO UPDATE SET version = excluded.version",
        (origin, version),
    )


def clear(conn: sqlite3.Connection) -> list[str]:
    """Delete every entry, count, digest and watermark (not the clock); return
    the indices that had present items."""
    indices = [row[0] for row in conn.execute("SELECT DISTINCT idx FROM live")]
    for table in ("entries", "live", "digests", "watermarks"):
        conn.execute(f"DELETE FROM {table}")  # names fixed above, no input
    return indices


def tombstones(
    conn: sqlite3.Connection, origin: str, upto: int, most: int
) -> list[tuple[str, str, int, int]]:
    """Up to ``most`` tombstones of ``origin`` at or below ``upto``, as
    ``(index, item, version, bucket)``, the arguments ``forget`` needs."""
    rows: list[tuple[str, str, int, int]] = conn.execute(
        "SELECT idx, item, version, bucket FROM entries "
        "WHERE present = 0 AND origin = ? AND version <= ? LIMIT ?",
        (origin, upto, most),
    ).fetchall()
    return rows


# -- reads -------------------------------------------------------------------


def present_items(
    conn: sqlite3.Connection, index: str, after: str | None, limit: int
) -> list[str]:
    """Up to ``limit`` present items of ``index`` above ``after``, sorted."""
    if after is None:
        rows = conn.execute(
            "SELECT item FROM entries WHERE idx = ? AND present = 1 "
            "ORDER BY item LIMIT ?",
            (index, limit),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT item FROM entries WHERE idx = ? AND present = 1 "
            "AND item > ? ORDER BY item LIMIT ?",
            (index, after, limit),
        ).fetchall()
    return [row[0] for row in rows]


def live_totals(conn: sqlite3.Connection) -> tuple[int, int]:
    """How many indices hold present items, and how many items in all."""
    indices, items = conn.execute(
        "SELECT count(*), coalesce(sum(items), 0) FROM live"
    ).fetchone()
    return int(indices), int(items)


def live_indices(conn: sqlite3.Connection) -> list[str]:
    """Indices holding at least one present item, sorted."""
    rows = conn.execute("SELECT idx FROM live ORDER BY idx").fetchall()
    return [row[0] for row in rows]


def scan(
    conn: sqlite3.Connection,
    index: str | None,
    after: tuple[str, str] | None,
    limit: int,
) -> list[Op]:
    """Entries, tombstones included, in (index, item) order after ``after``."""
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

    rows = conn.execute(sql, args).fetchall()
    return [Op(idx, item, bool(p), v, origin) for idx, item, p, v, origin in rows]


def index_digests(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Every index's digest: ``{index: (hash, entries)}``."""
    rows = conn.execute(
        "SELECT idx, hash, entries FROM digests WHERE bucket = ?", (INDEX_TOTAL,)
    )
    return {idx: (h, n) for idx, h, n in rows}


def bucket_digests(conn: sqlite3.Connection, index: str) -> dict[int, tuple[int, int]]:
    """One index's digests per bucket: ``{bucket: (hash, entries)}``."""
    rows = conn.execute(
        "SELECT bucket, hash, entries FROM digests WHERE idx = ? AND bucket >= 0",
        (index,),
    )
    return {b: (h, n) for b, h, n in rows}


def scan_bucket(conn: sqlite3.Connection, index: str, bucket: int) -> list[Op]:
    """Every entry of one bucket of one index, tombstones included."""
    rows = conn.execute(
        "SELECT item, present, version, origin FROM entries "
        "WHERE idx = ? AND bucket = ?",
        (index, bucket),
    )
    return [Op(index, item, bool(p), v, o) for item, p, v, o in rows]
