"""When the balancer's state is saved: soon after a change, never two at once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from p2plb.state import Saver


class Disk:
    """Stands in for ``save_state``: records each payload, and can hold a
    write until released, as a slow disk would."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.writing = 0
        self.most_at_once = 0
        self.hold = threading.Event()
        self.hold.set()
        self._begun = 0
        self._changed = threading.Condition()

    def __call__(self, path: Path, payload: Any) -> None:
        with self._changed:
            self._begun += 1
            self.writing += 1
            self.most_at_once = max(self.most_at_once, self.writing)
            self._changed.notify_all()
        self.hold.wait(5)
        with self._changed:
            self.written.append(payload)
            self.writing -= 1

    async def begun(self, writes: int) -> None:
        """Wait until ``writes`` writes have begun."""

        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: self._begun >= writes, 5)

        assert await asyncio.to_thread(wait)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    fake = Disk()
    monkeypatch.setattr("p2plb.state.save_state", fake)
    return fake


async def test_changes_close_together_share_one_save(
    tmp_path: Path, disk: Disk
) -> None:
    state = {"strategy": "least_load"}
    saver = Saver(tmp_path / "state.json", lambda: dict(state), delay=0.05)
    for strategy in ("p2c", "random", "round_robin"):
        state["strategy"] = strategy
        saver.soon()

    await disk.begun(1)
    await saver.close()
    # One save for the three changes, and the last one at shutdown.
    assert disk.written == [{"strategy": "round_robin"}] * 2


async def test_a_change_during_a_save_gets_a_save_of_its_own(
    tmp_path: Path, disk: Disk
) -> None:
    state = {"strategy": "least_load"}
    saver = Saver(tmp_path / "state.json", lambda: dict(state), delay=0.01)
    disk.hold.clear()
    state["strategy"] = "p2c"
    saver.soon()
    await disk.begun(1)

    state["strategy"] = "random"  # the snapshot being written misses this
    saver.soon()
    periodic = asyncio.create_task(saver.save())
    disk.hold.set()
    await periodic
    await disk.begun(3)
    await saver.close()

    assert disk.written == [
        {"strategy": "p2c"},
        {"strategy": "random"},
        {"strategy": "random"},
        {"strategy": "random"},
    ]
    assert disk.most_at_once == 1


async def test_shutdown_waits_for_a_save_under_way(tmp_path: Path, disk: Disk) -> None:
    saver = Saver(tmp_path / "state.json", lambda: {"n": len(disk.written)}, 0.01)
    disk.hold.clear()
    periodic = asyncio.create_task(saver.save())
    await disk.begun(1)

    periodic.cancel()  # as the balancer cancels its loops at shutdown
    closing = asyncio.create_task(saver.close())
    await asyncio.sleep(0.05)
    assert disk.writing == 1 and not closing.done()
    disk.hold.set()
    await closing

    assert disk.written == [{"n": 0}, {"n": 1}]
    assert disk.most_at_once == 1
