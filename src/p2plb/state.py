"""The balancer's state file: saved atomically, soon after a change, never
loaded when damaged.

A save writes a temporary file beside the state file, fsyncs it, renames it over
the old one and fsyncs the directory, so a crash or a full disk at any moment
leaves either the old state or the new one, never half of one.

``Saver`` decides when: every ``--persist-interval`` (counters), within
``delay`` of a change an operator or an indexer would miss after a crash (a
strategy, a registration, a removal), and at shutdown.  Changes within
``delay`` of each other share one save, so a fleet registering at once costs
one save a second rather than one each.  Saves never overlap: they share the
temporary file.

A state file that cannot be read back whole (empty, truncated, NUL-filled,
valid JSON of the wrong shape) is renamed aside to
``<state-file>.corrupt-<timestamp>`` and reported; the balancer then starts
empty and serves, since indexers register again within one report interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

__all__ = [
    "FORMAT",
    "Saver",
    "StateFileError",
    "load_state",
    "save_state",
    "set_aside",
]

logger = logging.getLogger(__name__)

FORMAT = 1


class StateFileError(ValueError):
    """The state file exists but cannot be trusted."""


def save_state(path: str | Path, payload: dict[str, Any]) -> None:
    """Replace the state file with ``payload`` atomically (blocking: use a thread)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = msgspec.json.encode({"format": FORMAT, "saved_at": time.time(), **payload})
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")

    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise

    # The rename is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_state(path: str | Path) -> dict[str, Any] | None:
    """The saved payload, ``None`` when there is no file yet.

    Raises ``StateFileError`` when the file is there but damaged; the caller
    sets it aside with ``set_aside`` (after its own deeper checks fail too).
    """
    target = Path(path)
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read: {exc.strerror}") from exc

    if not data.strip(b"\x00 \t\r\n"):
        raise StateFileError(f"empty ({len(data)} bytes, no content)")
    try:
        document = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise StateFileError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise StateFileError("not valid JSON (nested too deeply)") from None
    if not isinstance(document, dict):
        raise StateFileError(f"expected a JSON object, got {type(document).__name__}")
    format = document.get("format")
    if type(format) is not int or format != FORMAT:  # true == 1 in Python
        raise StateFileError(f"unknown format {format!r}")
    return document


def set_aside(path: str | Path, reason: str) -> Path | None:
    """Rename a damaged state file out of the way; returns where it went."""
    target = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = target.with_name(f"{target.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = target.with_name(f"{target.name}.corrupt-{stamp}-{n}")
    try:
        os.replace(target, aside)
    except OSError as exc:
        logger.error(
            "state.set_aside_failed path=%s reason=%s error=%s",
            target,
            reason,
            exc.strerror,
        )
        return None
    logger.warning(
        "state.corrupt path=%s reason=%s moved_to=%s; starting empty",
        target,
        reason,
        aside,
    )
    return aside


class Saver:
    """Saves what ``payload`` returns to ``path``, at the times described above."""

    def __init__(
        self, path: str | Path, payload: Callable[[], dict[str, Any]], delay: float
    ) -> None:
        self.path = path
        self.payload = payload
        self.delay = delay
        self._lock = asyncio.Lock()
        self._changed = False
        self._pending: asyncio.Task[None] | None = None

    def soon(self) -> None:
        """Something worth keeping changed: save within ``delay``."""
        self._changed = True
        if self._pending is None or self._pending.done():
            self._pending = asyncio.get_running_loop().create_task(self._later())

    async def save(self) -> None:
        """Save now; a failed save is logged and leaves the previous file.

        Shielded: a caller cancelled mid-write leaves the write to finish
        under the lock, so the next save cannot write the same temporary
        file at the same time.
        """
        await asyncio.shield(self._save())

    async def close(self) -> None:
        """The last save, at shutdown, after any save still under way."""
        if self._pending is not None:
            self._pending.cancel()
            await asyncio.gather(self._pending, return_exceptions=True)
        await self.save()

    async def _later(self) -> None:
        # A change made while a save runs is in no snapshot yet: go round.
        while self._changed:
            await asyncio.sleep(self.delay)
            self._changed = False
            try:
                await self.save()
            except Exception:  # the periodic save still runs: keep serving
                logger.exception("state.save_failed path=%s", self.path)

    async def _save(self) -> None:
        async with self._lock:
            payload = self.payload()
            try:
                await asyncio.to_thread(save_state, self.path, payload)
            except OSError as exc:
                logger.error(
                    "state.save_failed path=%s error=%s; the previous state file "
                    "is intact",
                    self.path,
                    exc.strerror or exc,
                )
                return
        logger.debug("state.saved path=%s", self.path)
