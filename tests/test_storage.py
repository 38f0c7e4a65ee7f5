from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import tempfile
import textwrap
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2plb.errors import StorageError
from p2plb.hlc import LOGICAL_BITS
from p2plb.storage import Op, Page, Storage, WriteResult

NOW_MS = 1_700_000_000_000

store_settings = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = Storage(tmp_path / "data" / "index.sqlite3", "node-a")
    await storage.open()
    yield storage
    await storage.close()


async def every_item(store: Storage, index: str, limit: int = 1000) -> list[str] | None:
    """All present items of an index, following the ``next`` cursors."""
    page = await store.get(index, limit=limit, after=None)
    if page is None:
        return None
    items = list(page.items)
    while page.next is not None:
        assert len(page.items) == limit
        page = await store.get(index, limit=limit, after=page.next)
        assert page is not None
        items += page.items
    return items


async def every_entry(store: Storage, limit: int = 3) -> list[Op]:
    """The whole store, tombstones included, through ``scan`` pages."""
    entries: list[Op] = []
    after: tuple[str, str] | None = None
    while True:
        page = await store.scan(None, after, limit)
        entries += page
        if len(page) < limit:
            return entries
        after = (page[-1].index, page[-1].item)


# -- add, remove, get ------------------------------------------------------------


async def test_add_counts_items_newly_present(store: Storage) -> None:
    first = await store.add("songs", ["b", "a"])
    second = await store.add("songs", ["b", "c"])

    assert first.changed == 2
    assert second.changed == 1
    assert second.version > first.version
    assert await every_item(store, "songs") == ["a", "b", "c"]


async def test_add_and_remove_are_idempotent(store: Storage) -> None:
    await store.add("songs", ["a"])

    again = await store.add("songs", ["a"])
    removed = await store.remove("songs", ["a"])
    removed_again = await store.remove("songs", ["a"])

    assert (again.changed, removed.changed, removed_again.changed) == (0, 1, 0)
    assert again.version < removed.version < removed_again.version
    assert await store.get("songs", limit=10, after=None) is None


async def test_a_batch_counts_duplicates_once_and_takes_one_version(
    store: Storage,
) -> None:
    added = await store.add("songs", ["x", "y", "x", "x"])
    removed = await store.remove("songs", ["y", "y", "z"])

    assert added.changed == 2
    assert removed.changed == 1
    assert await store.scan(None, None, 10) == [
        Op("songs", "x", True, added.version, "node-a"),
        Op("songs", "y", False, removed.version, "node-a"),
        Op("songs", "z", False, removed.version, "node-a"),
    ]


async def test_remove_of_an_unseen_item_writes_a_tombstone(store: Storage) -> None:
    result = await store.remove("songs", ["ghost"])

    assert result == WriteResult(changed=0, version=result.version)
    assert await store.scan("songs", None, 10) == [
        Op("songs", "ghost", False, result.version, "node-a")
    ]
    assert await store.list_indices() == []
    assert await store.get("songs", limit=10, after=None) is None


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 5])
async def test_get_pages_through_every_item(store: Storage, limit: int) -> None:
    await store.add("songs", ["d", "b", "a", "c"])

    pages: list[Page] = []
    after = None
    while True:
        page = await store.get("songs", limit=limit, after=after)
        assert page is not None
        pages.append(page)
        if page.next is None:
            break
        after = page.next

    assert [item for page in pages for item in page.items] == ["a", "b", "c", "d"]
    # A page that ends exactly at the last item says so: no empty page follows.
    assert len(pages) == -(-4 // limit)
    assert all(page.next == page.items[-1] for page in pages[:-1])


async def test_get_after_the_end_or_between_items(store: Storage) -> None:
    await store.add("songs", ["a", "c", "e"])
    await store.remove("songs", ["d"])

    assert await store.get("songs", limit=10, after="e") == Page([], None)
    assert await store.get("songs", limit=10, after="zzz") == Page([], None)
    assert await store.get("songs", limit=10, after="b") == Page(["c", "e"], None)
    assert await store.get("songs", limit=1, after="d") == Page(["e"], None)
    assert await store.get("songs", limit=1, after="") == Page(["a"], "a")


async def test_get_is_none_for_unknown_and_emptied_indices(store: Storage) -> None:
    await store.add("songs", ["a", "b"])
    await store.add("films", ["x"])
    await store.remove("songs", ["a", "b"])

    assert await store.get("nothing", limit=10, after=None) is None
    assert await store.get("songs", limit=10, after=None) is None
    assert await store.get("songs", limit=10, after="a") is None
    assert await store.list_indices() == ["films"]


async def test_list_indices_is_sorted_and_only_lists_live_ones(store: Storage) -> None:
    await store.add("zeta", ["1"])
    await store.add("alpha", ["1", "2"])
    await store.add("Mid", ["1"])
    await store.remove("gone", ["1"])
    await store.remove("alpha", ["1"])

    assert await store.list_indices() == ["Mid", "alpha", "zeta"]


UNICODE_ITEMS = [
    "🎵",
    "👩‍👩‍👧",  # a ZWJ sequence
    "音楽",
    "e\u0301",  # e + combining acute: not the same item as é
    "é",
    "שלום",
    "مرحبا",
    "a\u200fb",  # a right-to-left mark inside
    "x" * 4096,
]


async def test_unicode_round_trips_exactly(store: Storage) -> None:
    await store.add("múśica 🎶", UNICODE_ITEMS)

    assert await store.list_indices() == ["múśica 🎶"]
    assert await every_item(store, "múśica 🎶", limit=2) == sorted(UNICODE_ITEMS)


@store_settings
@given(
    st.lists(
        st.text(
            st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
            min_size=1,
            max_size=6,
        ),
        min_size=1,
        max_size=30,
    )
)
def test_sqlite_sorts_items_as_python_sorts_str(items: list[str]) -> None:
    async def stored_order(path: Path) -> list[str] | None:
        store = Storage(path, "node-a")
        await store.open()
        try:
            await store.add("i", items)
            return await every_item(store, "i", limit=3)
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as directory:
        stored = asyncio.run(stored_order(Path(directory) / "db.sqlite3"))

    assert stored == sorted(set(items))


# -- reopening ---------------------------------------------------------------------


async def test_reopen_keeps_everything_and_the_clock_continues(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    first = Storage(path, "node-a", wall_ms=lambda: NOW_MS)
    await first.open()
    await first.add("songs", UNICODE_ITEMS)
    removed = await first.remove("songs", ["🎵"])
    await first.merge([Op("films", "x", True, (NOW_MS + 5_000) << LOGICAL_BITS, "b")])
    before = await every_entry(first)
    last = await first.max_version()
    await first.close()

    # The wall clock went back a day while the node was down.
    second = Storage(path, "node-a", wall_ms=lambda: NOW_MS - 86_400_000)
    await second.open()
    try:
        assert await every_entry(second) == before
        assert await second.max_version() == last
        assert await second.list_indices() == ["films", "songs"]
        later = await second.add("songs", ["new"])
    finally:
        await second.close()

    assert last > removed.version
    assert later.version > last


async def test_closed_storage_refuses_work(tmp_path: Path) -> None:
    store = Storage(tmp_path / "index.sqlite3", "node-a")
    await store.open()
    with pytest.raises(StorageError, match="already opened"):
        await store.open()
    await store.close()
    await store.close()

    with pytest.raises(StorageError, match="the storage is not open"):
        await store.add("songs", ["a"])
    with pytest.raises(StorageError, match="the storage is not open"):
        await store.get("songs", limit=1, after=None)
    with pytest.raises(StorageError, match="the storage is not open"):
        await store.check()


async def test_close_waits_for_queued_writes(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    store = Storage(path, "node-a")
    await store.open()

    writes = [asyncio.create_task(store.add("songs", [str(n)])) for n in range(50)]
    await asyncio.sleep(0)  # let every task put its request in the queue
    await store.close()

    assert [result.changed for result in await asyncio.gather(*writes)] == [1] * 50
    reopened = Storage(path, "node-a")
    await reopened.open()
    try:
        page = await reopened.get("songs", limit=100, after=None)
    finally:
        await reopened.close()
    assert page is not None
    assert len(page.items) == 50


async def test_check_reads_the_database(store: Storage) -> None:
    await store.check()


# -- errors --------------------------------------------------------------------


async def test_a_directory_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    store = Storage(tmp_path / "file" / "index.sqlite3", "node-a")

    with pytest.raises(StorageError, match="cannot create the directory") as info:
        await store.open()

    assert str(tmp_path / "file") in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


async def test_a_path_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open the database") as info:
        await Storage(tmp_path, "node-a").open()

    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.Error)


async def test_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    path.write_bytes(b"this is not an SQLite database, not even close" * 100)

    with pytest.raises(StorageError, match="cannot open the database") as info:
        await Storage(path, "node-a").open()

    assert str(path) in str(info.value)
    assert "file is not a database" in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


async def test_merge_refuses_versions_sqlite_cannot_hold(store: Storage) -> None:
    with pytest.raises(StorageError, match="out of range"):
        await store.merge([Op("songs", "a", True, 1 << 63, "node-b")])

    assert await store.scan(None, None, 10) == []


# -- merge ---------------------------------------------------------------------

ORIGINS = ["node-a", "node-b", "node-c"]

ops_strategy = st.lists(
    st.builds(
        Op,
        index=st.sampled_from(["i", "j"]),
        item=st.sampled_from(["x", "y", "z"]),
        present=st.booleans(),
        version=st.integers(0, 3),
        origin=st.sampled_from(ORIGINS),
    ),
    max_size=30,
    # One (version, origin) names one write: no node issues a version twice.
    unique_by=lambda op: (op.index, op.item, op.version, op.origin),
)


def expected_state(ops: list[Op]) -> list[Op]:
    """The merge rule as a plain function: the greatest (version, origin) wins."""
    winners: dict[tuple[str, str], Op] = {}
    for op in ops:
        key = (op.index, op.item)
        held = winners.get(key)
        if held is None or (op.version, op.origin) > (held.version, held.origin):
            winners[key] = op
    return [winners[key] for key in sorted(winners)]


@st.composite
def deliveries(draw: st.DrawFn, ops: list[Op]) -> list[list[Op]]:
    """The same ops, shuffled, some repeated, cut into batches of any size."""
    repeats = draw(st.lists(st.sampled_from(ops), max_size=10)) if ops else []
    shuffled = draw(st.permutations(ops + repeats))
    cuts = sorted(draw(st.sets(st.integers(0, len(shuffled)), max_size=5)))
    bounds = [0, *cuts, len(shuffled)]
    return [shuffled[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@store_settings
@given(st.data(), ops_strategy)
def test_merge_order_does_not_matter(data: st.DataObject, ops: list[Op]) -> None:
    first = data.draw(deliveries(ops), label="first delivery")
    second = data.draw(deliveries(ops), label="second delivery")

    async def merged(path: Path, batches: list[list[Op]], together: bool) -> list[Op]:
        store = Storage(path, "node-z")
        await store.open()
        try:
            applied: list[Op] = []
            if together:  # concurrent requests, interleaved in commit groups
                for ops_applied in await asyncio.gather(*map(store.merge, batches)):
                    applied += ops_applied
            else:
                for batch in batches:
                    applied += await store.merge(batch)
            # Everything was seen: merging it all again changes nothing.
            assert await store.merge(ops) == []

            state = await every_entry(store)
            live = sorted({op.index for op in state if op.present})
            assert await store.list_indices() == live
            for index in ["i", "j"]:
                present = [op.item for op in state if op.index == index and op.present]
                assert await every_item(store, index, limit=2) == (present or None)
            assert set(state) <= set(applied)
            return state
        finally:
            await store.close()

    with tempfile.TemporaryDirectory() as directory:
        one = asyncio.run(merged(Path(directory) / "one.sqlite3", first, False))
        two = asyncio.run(merged(Path(directory) / "two.sqlite3", second, True))

    assert one == two == expected_state(ops)


@pytest.mark.parametrize("order", ["add first", "remove first"])
async def test_concurrent_add_and_remove_with_equal_versions(
    store: Storage, order: str
) -> None:
    add = Op("songs", "x", True, 7, "node-b")
    remove = Op("songs", "x", False, 7, "node-c")
    ops = [add, remove] if order == "add first" else [remove, add]

    for op in ops:
        await store.merge([op])

    # Equal versions: the greater origin decides, on every replica alike.
    assert await store.scan(None, None, 10) == [remove]
    assert await store.get("songs", limit=10, after=None) is None


@pytest.mark.parametrize("order", ["in order", "reversed"])
async def test_a_remove_beats_an_earlier_add(
    tmp_path: Path, store: Storage, order: str
) -> None:
    wall = iter([NOW_MS, NOW_MS + 1_000])
    source = Storage(tmp_path / "source.sqlite3", "node-b", wall_ms=lambda: next(wall))
    await source.open()
    await source.add("songs", ["x", "y"])
    await source.remove("songs", ["x"])
    ops = await source.scan(None, None, 10)
    await source.close()
    # Another node added x after the first add but before the remove.
    ops.append(Op("songs", "x", True, (NOW_MS + 500) << LOGICAL_BITS, "node-c"))
    if order == "reversed":
        ops.reverse()

    for op in ops:
        await store.merge([op])

    assert await every_item(store, "songs") == ["y"]
    assert (await store.scan("songs", None, 1))[0].present is False


async def test_a_local_write_beats_everything_merged(store: Storage) -> None:
    ahead = (NOW_MS + 30_000) << LOGICAL_BITS  # a peer whose clock runs 30 s ahead
    applied = await store.merge(
        [Op("songs", "x", False, ahead, "node-b"), Op("songs", "y", True, 3, "node-b")]
    )

    added = await store.add("songs", ["x"])
    removed = await store.remove("songs", ["y"])

    assert len(applied) == 2
    assert (added.changed, removed.changed) == (1, 1)
    assert ahead < added.version < removed.version
    assert await store.max_version() == removed.version
    assert await every_item(store, "songs") == ["x"]


async def test_a_version_beyond_the_drift_bound_does_not_drag_the_clock(
    store: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    bogus = (NOW_MS * 2) << LOGICAL_BITS  # far beyond any real clock skew
    caplog.set_level(logging.WARNING, logger="p2plb.storage")

    applied = await store.merge([Op("songs", "x", False, bogus, "node-b")])
    added = await store.add("songs", ["y"])

    assert len(applied) == 1  # stored: merging stays order-free
    assert added.version < bogus  # but our clock did not jump with it
    assert store.too_far_ahead(bogus) and not store.too_far_ahead(added.version)
    assert "clock.drift_refused" in caplog.text


async def test_merge_returns_only_the_ops_that_won(store: Storage) -> None:
    old = Op("songs", "x", True, 5, "node-b")
    new = Op("songs", "x", False, 9, "node-c")

    assert await store.merge([new]) == [new]
    assert await store.merge([old, new]) == []
    assert await store.merge([]) == []
    assert await store.max_version() >= 9


# -- the writer ------------------------------------------------------------------


async def test_concurrent_writes_are_all_applied_with_distinct_versions(
    store: Storage,
) -> None:
    results = await asyncio.gather(
        *(store.add("songs", [f"item-{n:03d}"]) for n in range(200)),
        *(store.remove("gone", [f"item-{n:03d}"]) for n in range(50)),
    )

    assert len({result.version for result in results}) == 250
    assert sum(result.changed for result in results) == 200
    assert await every_item(store, "songs", limit=64) == [
        f"item-{n:03d}" for n in range(200)
    ]
    assert await store.max_version() == max(result.version for result in results)


async def test_a_group_that_changes_nothing_touches_no_disk(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    store = Storage(path, "node-a", wall_ms=lambda: NOW_MS)
    await store.open()
    try:
        stale = Op("songs", "x", True, 5, "node-b")
        await store.merge([stale], origin="node-b", base=0, upto=9)
        assert (store.commits, store.watermarks["node-b"]) == (1, 9)
        before = await store.max_version()

        # What idle replication asks: a heartbeat that moves no watermark, an
        # operation held already, watermarks no higher than ours.
        assert await store.merge([], origin="node-b", base=9, upto=9) == []
        assert await store.merge([stale]) == []
        await store.advance({"node-b": 7})
        assert store.commits == 1
        assert await store.max_version() == before

        # A tick leaves this node: it is on disk before it is returned.
        ticked = await store.tick()
        assert store.commits == 2
    finally:
        await store.close()

    again = Storage(path, "node-a", wall_ms=lambda: NOW_MS)
    await again.open()
    try:
        assert (await again.add("songs", ["y"])).version > ticked
    finally:
        await again.close()


class GatedWall:
    """A wall clock that can hold the writer thread inside one request.

    While the writer waits here, the test queues more requests, so they are
    certain to be committed together as the next group.
    """

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> int:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(timeout=30)
        return NOW_MS


async def hold_the_writer(store: Storage, gate: GatedWall) -> asyncio.Task[WriteResult]:
    gate.armed = True
    held = asyncio.create_task(store.add("held", ["h"]))
    await asyncio.to_thread(gate.entered.wait, 30)
    return held


async def test_a_failing_request_does_not_undo_its_group(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="p2plb.storage")
    gate = GatedWall()
    path = tmp_path / "index.sqlite3"
    store = Storage(path, "node-a", wall_ms=gate)
    await store.open()
    try:
        held = await hold_the_writer(store, gate)

        before = asyncio.create_task(store.add("songs", ["a"]))
        # An empty index name breaks a CHECK constraint of the schema.
        failing = asyncio.create_task(store.add("", ["b"]))
        after = asyncio.create_task(store.remove("songs", ["c"]))
        await asyncio.sleep(0)  # let the three tasks queue their requests
        gate.release.set()
        await held

        assert (await before).changed == 1
        assert (await after).changed == 0
        with pytest.raises(StorageError, match="CHECK constraint failed") as info:
            await failing
        assert str(path) in str(info.value)
        assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
        assert [(op.index, op.item) for op in await store.scan(None, None, 10)] == [
            ("held", "h"),
            ("songs", "a"),
            ("songs", "c"),
        ]
    finally:
        await store.close()

    committed = [r.getMessage() for r in caplog.records if "storage.committed" in r.msg]
    assert [message.split()[2] for message in committed] == ["requests=1", "requests=3"]
    assert any("storage.request_failed" in r.msg for r in caplog.records)


async def test_a_cancelled_write_leaves_the_writer_working(tmp_path: Path) -> None:
    gate = GatedWall()
    store = Storage(tmp_path / "index.sqlite3", "node-a", wall_ms=gate)
    await store.open()
    try:
        held = await hold_the_writer(store, gate)
        held.cancel()
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await held

        result = await store.add("songs", ["after"])

        # The cancelled write was already under way: it still took effect.
        assert result.changed == 1
        assert await store.list_indices() == ["held", "songs"]
    finally:
        await store.close()


KILLED_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from p2plb.storage import Storage

    async def main():
        store = Storage(sys.argv[1], "node-a")
        await store.open()
        for n in range(1_000_000):
            await store.add("songs", [f"item-{n:07d}"])
            print(n, flush=True)

    asyncio.run(main())
    """
)


async def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_WRITER,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    acknowledged: list[int] = []
    async with asyncio.timeout(60):
        while len(acknowledged) < 100:
            line = await process.stdout.readline()
            if not line:
                error = await process.stderr.read()
                pytest.fail(f"the writer exited early: {error.decode()}")
            acknowledged.append(int(line))

        process.kill()  # SIGKILL: no atexit, no close, no flush
        rest, _ = await process.communicate()
    # Lines already printed when the kill came were acknowledged too.
    acknowledged += [
        int(line) for line in rest.splitlines(keepends=True) if line[-1:] == b"\n"
    ]
    assert process.returncode == -9

    store = Storage(path, "node-a")
    await store.open()
    try:
        stored = set(await every_item(store, "songs", limit=500) or [])
    finally:
        await store.close()
    assert {f"item-{n:07d}" for n in acknowledged} <= stored
    assert len(stored) >= len(acknowledged)


async def test_check_fails_when_the_database_is_damaged(store: Storage) -> None:
    await store.add("songs", [f"item-{n}" for n in range(500)])
    await store.check()

    for damaged in [store.path, Path(f"{store.path}-wal")]:
        damaged.write_bytes(b"\xff" * damaged.stat().st_size)

    with pytest.raises(StorageError, match="check on .* failed") as info:
        await store.check()
    assert str(store.path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


async def test_a_database_from_a_newer_p2plb(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()

    with pytest.raises(StorageError, match="schema version 99 is newer"):
        await Storage(path, "node-a").open()


class FailingCommit:
    """The writer's connection, with one COMMIT failing as a full disk would."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.failures = 1

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "COMMIT" and self.failures:
            self.failures -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


async def test_a_failed_commit_fails_its_group_and_nothing_else(
    store: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await store.add("songs", ["a"])
    assert store._writer is not None
    monkeypatch.setattr(store._writer, "conn", FailingCommit(store._writer.conn))

    with pytest.raises(StorageError, match="commit failed: database or disk is full"):
        await store.add("songs", ["b"])
    after = await store.add("songs", ["c"])

    assert await every_item(store, "songs") == ["a", "c"]
    assert await store.max_version() == after.version > before.version
