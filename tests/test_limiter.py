from __future__ import annotations

import asyncio

import pytest

from p2plb.errors import Overloaded
from p2plb.limiter import Limiter


async def hold(
    limiter: Limiter, release: asyncio.Event, log: list[str], name: str
) -> None:
    async with limiter.slot():
        log.append(name)
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_capacity_then_queue_then_refusal() -> None:
    limiter = Limiter(capacity=2, queue_limit=1, retry_after=3)
    release = asyncio.Event()
    log: list[str] = []
    tasks = [
        asyncio.create_task(hold(limiter, release, log, f"r{i}")) for i in range(3)
    ]
    await settle()

    assert (limiter.serving, limiter.waiting, limiter.load) == (2, 1, 3)
    with pytest.raises(Overloaded) as info:
        async with limiter.slot():
            pass
    assert info.value.retry_after == 3
    assert (
        str(info.value) == "indexer is at capacity (2 serving, 1 queued); retry later"
    )
    assert limiter.refused == 1

    release.set()
    await asyncio.gather(*tasks)
    assert log == ["r0", "r1", "r2"]
    assert (limiter.serving, limiter.waiting, limiter.load) == (0, 0, 0)


async def test_queue_is_fifo_and_slots_are_handed_over() -> None:
    limiter = Limiter(capacity=1, queue_limit=3)
    gates = [asyncio.Event() for _ in range(4)]
    log: list[str] = []
    tasks = [
        asyncio.create_task(hold(limiter, gates[i], log, f"r{i}")) for i in range(4)
    ]
    await settle()
    assert log == ["r0"]

    for i in range(4):
        gates[i].set()
        await settle()
        assert limiter.serving == (1 if i < 3 else 0)
    await asyncio.gather(*tasks)
    assert log == ["r0", "r1", "r2", "r3"]


async def test_cancelled_waiter_leaves_the_queue() -> None:
    limiter = Limiter(capacity=1, queue_limit=2)
    release = asyncio.Event()
    log: list[str] = []
    first = asyncio.create_task(hold(limiter, release, log, "first"))
    queued = asyncio.create_task(hold(limiter, release, log, "queued"))
    await settle()
    assert limiter.waiting == 1

    queued.cancel()
    await settle()
    assert (limiter.serving, limiter.waiting) == (1, 0)
    release.set()
    await first
    assert (limiter.serving, limiter.waiting, log) == (0, 0, ["first"])


async def test_waiter_cancelled_after_handover_passes_the_slot_on() -> None:
    limiter = Limiter(capacity=1, queue_limit=2)
    release = asyncio.Event()
    log: list[str] = []
    first = asyncio.create_task(hold(limiter, release, log, "first"))
    second = asyncio.create_task(hold(limiter, release, log, "second"))
    third = asyncio.create_task(hold(limiter, release, log, "third"))
    await settle()

    release.set()
    await asyncio.sleep(0)  # "first" ends and hands its slot to "second" ...
    assert first.done() and limiter.waiting == 1
    second.cancel()  # ... which is cancelled before it wakes up
    await asyncio.gather(second, third, return_exceptions=True)
    assert log == ["first", "third"]
    assert (limiter.serving, limiter.waiting) == (0, 0)


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        Limiter(0, 1)
    with pytest.raises(ValueError, match="queue_limit must not be negative"):
        Limiter(1, -1)
