"""The storage's writer: one thread, one connection, writes committed in groups.

Rules of this module:

* Every write of ``Storage`` is a request: a function of the connection and of
  the current ``Group``, queued here and run on the one thread that owns the
  writing connection.  The event loop never waits on disk.
* The thread takes every request waiting and applies each in a savepoint, so a
  failing request undoes only itself: its rows, the local operations and the
  watermark changes it noted.  The indices it touched stay noted, which at
  worst names an index that did not change.
* Then one COMMIT for the whole group (one fsync), with the clock's last value
  saved in the same transaction.  If the COMMIT fails, every request of the
  group fails and ``on_commit`` hears nothing of it.
* A group that changed no row is not committed at all: it is rolled back, which
  touches no disk, and ``on_commit`` hears nothing of it either.  Idle
  replication (a heartbeat merged that moves no watermark, an anti-entropy
  round that finds nothing new) is such a group, and used to cost an fsync
  each, several times a second.  The clock may have observed a version in it;
  that needs no saving, since nothing holds that version here.  A request
  whose version leaves this node without a row (a clock tick) saves the clock
  itself, which is a changed row.
* Only after a successful COMMIT, ``on_commit`` gets the group on the event
  loop, and then the requests are answered.  Both go through
  ``call_soon_threadsafe``, in that order, and the loop runs callbacks in
  order: whoever hears of a commit (replication) hears of it before any writer
  is answered.
* A request's sqlite3 or overflow error becomes ``StorageError``, naming the
  request and the path; any other exception reaches the caller unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from p2plb.entries import Op, save_clock
from p2plb.errors import StorageError
from p2plb.hlc import HybridLogicalClock, format_version

__all__ = ["Committed", "Group", "Writer"]

# The writer's events are the storage's: same names, same logger, so that
# ``p2plb.storage`` stays the one channel an operator follows for the database.
logger = logging.getLogger("p2plb.storage")

T = TypeVar("T")


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


class Group:
    """What the requests of one group did besides their rows, for ``on_commit``."""

    def __init__(self) -> None:
        self.local: list[Op] = []  # operations this node originated
        self.marks: dict[str, int] = {}  # watermarks raised, by origin
        self.indices: set[str] = set()  # indices whose entries changed


class _Request(Generic[T]):
    """A write waiting for the writer thread, and where to send its outcome."""

    def __init__(
        self,
        name: str,
        apply: Callable[[sqlite3.Connection, Group], T],
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


class Writer:
    """The thread that owns the writing connection and commits requests in groups.

    ``committed`` is the clock's last value as of the last commit; the thread
    moves it, the event loop reads it.  ``on_commit`` runs on ``loop`` with
    each commit and the watermarks it raised.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        clock: HybridLogicalClock,
        loop: asyncio.AbstractEventLoop,
        on_commit: Callable[[Committed, dict[str, int]], None],
    ) -> None:
        self.conn = conn
        self.committed = clock.last
        self.commits = 0  # groups committed to disk, one fsync each
        # Set while the last group commit failed: /healthz reports it, so a node
        # that cannot write leaves rotation instead of failing every request.
        self.last_failure: str | None = None
        self._path = path
        self._clock = clock
        self._loop = loop
        self._on_commit = on_commit
        self._queue: queue.SimpleQueue[_Request[Any] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run, name="p2plb-write", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    async def write(
        self, name: str, apply: Callable[[sqlite3.Connection, Group], T]
    ) -> T:
        """Queue ``apply`` and wait until its group is committed (or failed)."""
        request = _Request(name, apply, asyncio.get_running_loop())
        self._queue.put(request)
        return await request.future

    async def stop(self) -> None:
        """Let the thread finish the requests queued, then close the connection."""
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
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

        self.conn.close()

    def _commit_group(self, requests: list[_Request[Any]]) -> None:
        conn = self.conn
        outcomes: list[tuple[_Request[Any], object, BaseException | None]] = []
        group = Group()
        try:
            conn.execute("BEGIN IMMEDIATE")
            changes = conn.total_changes
            for request in requests:
                outcomes.append((request, *self._apply_one(conn, group, request)))

            durable = conn.total_changes != changes
            if durable:
                save_clock(conn, self._clock.last)
                conn.execute("COMMIT")
            else:
                conn.execute("ROLLBACK")  # nothing to keep: no write, no fsync
        except Exception as exc:
            logger.error(
                "storage.commit_failed path=%s requests=%d error=%s",
                self._path,
                len(requests),
                exc,
            )
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            for request in requests:
                message = f"{request.name} on {self._path}: commit failed: {exc}"
                request.settle(None, _chained(message, exc))
            self.last_failure = f"commit failed: {exc}"
            return

        self.last_failure = None
        if durable:
            self.commits += 1
            self.committed = self._clock.last
            logger.debug(
                "storage.committed path=%s requests=%d version=%s",
                self._path,
                len(requests),
                format_version(self.committed),
            )
            # The hook first, then the answers (see the rules above).
            committed = Committed(group.local, self.committed, group.indices)
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._on_commit, committed, group.marks)
        for request, result, error in outcomes:
            request.settle(result, error)

    def _apply_one(
        self, conn: sqlite3.Connection, group: Group, request: _Request[Any]
    ) -> tuple[object, BaseException | None]:
        conn.execute("SAVEPOINT request")
        local_before = len(group.local)
        marks_before = dict(group.marks)
        try:
            result = request.apply(conn, group)
        except Exception as exc:
            del group.local[local_before:]
            group.marks = marks_before
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


def _chained(message: str, cause: BaseException) -> StorageError:
    """A StorageError caused by ``cause``, as ``raise ... from`` would make it.

    The writer thread cannot raise into the caller's coroutine; it hands the
    error to a future instead, so the chaining is done by hand.
    """
    error = StorageError(message)
    error.__cause__ = cause
    error.__suppress_context__ = True
    return error
