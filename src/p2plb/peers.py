"""The peers of an indexer, and the ordered push stream to each of them.

Rules of the stream (the first of replication's three mechanisms):

* **Push, in order.**  Each local commit is appended to an outbox per peer; one
  sender task per peer sends everything waiting as one batch, and the next
  batch only after the previous one was acknowledged.  A batch says "these are
  all my operations in ``(base, upto]``", where ``base`` is what the peer
  acknowledged before; a peer that held everything up to ``base`` may then
  raise its *watermark* of this origin to ``upto``.
* **Heartbeats.**  When a node has nothing to push, it sends an empty push
  every heartbeat interval, so that peers know it is alive.  It carries the
  version of the node's last commit, which moves no watermark in an idle
  cluster, so it costs the peer no disk write.
* **Unordered until told.**  After a restart or an outbox overflow, what the
  peer holds is unknown (``acked`` is None): the push asks the peer to pull
  what came before the outbox (``need``), and ordered pushes resume from the
  watermark it answers once that reaches the start of the outbox.

``PeerStreams`` is a part of ``Replicator``, written apart for reading: it
works on the replicator's state, declared below, and owns none of its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp

from p2plb.storage import Op, Storage
from p2plb.wire import PROTOCOL, encode

if TYPE_CHECKING:
    from p2plb.replication import ReplicationSettings

__all__ = ["Peer", "PeerStreams", "Refused"]

# The stream's events are replication's: same names, same logger, so that
# ``p2plb.replication`` stays the one channel an operator follows for it.
logger = logging.getLogger("p2plb.replication")

# How many operations one push or one pulled bucket may carry at most; a
# longer outbox is sent over several batches, cut between versions.
_BATCH = 5000


@dataclass
class Peer:
    """Another indexer, as this one replicates with it."""

    id: str
    address: str
    healthy: bool = True
    # Every local operation up to ``acked`` is durable at the peer; None when
    # unknown (after a restart or an overflow) until the peer says so.
    acked: int | None = None
    outbox: list[Op] = field(default_factory=list)
    cleared_at: int = 0  # the outbox holds every local operation after this
    sent_upto: int = 0
    beat: bool = False  # a heartbeat is due: push even with an empty outbox
    heard: float = 0.0  # monotonic time of the last answer or push from it
    synced_after: float = -1.0  # monotonic time the last full pull from it began
    failures: int = 0
    marks: dict[str, int] | None = None  # its watermarks, from its last summary
    pulling: asyncio.Lock = field(default_factory=asyncio.Lock)
    beat_asked: int = 0  # the highest version a heartbeat was asked for
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class PeerStreams:
    """One ordered push stream per peer, and heartbeats when idle."""

    # The replicator's state, which these methods share with it.
    node_id: str
    address: str
    storage: Storage
    settings: ReplicationSettings
    peers: dict[str, Peer]
    _session: aiohttp.ClientSession | None
    _rng: random.Random
    _clock: Callable[[], float]
    _committed: int
    _changed: asyncio.Event
    _last_local: float
    _last_commit: float

    def _overflow(self, peer: Peer) -> None:
        logger.warning(
            "replication.outbox_overflow peer=%s ops=%d; it will catch up by "
            "anti-entropy",
            peer.id,
            len(peer.outbox),
        )
        peer.outbox.clear()
        peer.cleared_at = self._committed
        peer.acked = None

    async def _send_loop(self, peer: Peer) -> None:
        backoff = 0.05
        while True:
            await peer.wake.wait()
            peer.wake.clear()
            while peer.outbox or peer.beat:
                try:
                    await self._push(peer)
                    backoff = 0.05
                except (aiohttp.ClientError, TimeoutError, Refused) as exc:
                    peer.failures += 1
                    if peer.failures in (1, 10) or peer.failures % 100 == 0:
                        logger.warning(
                            "replication.push_failed peer=%s failures=%d error=%s",
                            peer.id,
                            peer.failures,
                            str(exc) or type(exc).__name__,
                        )
                    await asyncio.sleep(backoff * self._rng.uniform(0.5, 1.0))
                    backoff = min(backoff * 2, 2.0)

    async def _push(self, peer: Peer) -> None:
        assert self._session is not None
        peer.beat = False
        batch = _cut(peer.outbox, _BATCH)
        upto = batch[-1].version if len(batch) < len(peer.outbox) else self._committed
        base = peer.acked
        body = {
            "protocol": PROTOCOL,
            "origin": self.node_id,
            "address": self.address,
            "base": base,
            "upto": upto,
            "ops": [[o.index, o.item, int(o.present), o.version] for o in batch],
        }
        if base is None:
            # The stream is not ordered yet: ask the peer to pull from us what
            # came before the outbox, so that it can be.
            body["need"] = peer.cleared_at
        url = f"{peer.address}/internal/v1/push"
        async with self._session.post(url, data=encode(body)) as response:
            answer = await response.json(content_type=None)
            if response.status != 200 or not isinstance(answer, dict):
                raise Refused(f"push answered HTTP {response.status}")

        del peer.outbox[: len(batch)]
        peer.sent_upto = max(peer.sent_upto, upto)
        peer.heard = self._clock()
        if peer.failures:
            logger.info("replication.push_resumed peer=%s", peer.id)
        peer.failures = 0
        mark = answer.get("mark")
        if base is not None:
            peer.acked = upto
        elif isinstance(mark, int) and mark >= peer.cleared_at:
            # The peer caught up (by anti-entropy) past the point where the
            # outbox starts: ordered pushes can carry on from its watermark.
            peer.acked = mark
            logger.info("replication.stream_resumed peer=%s mark=%d", peer.id, mark)
        self._changed.set()

    async def _heartbeats(self) -> None:
        """Tell peers this node is alive when it has nothing to push.

        No clock tick goes with it.  Peers' watermarks of this node move with
        each of its commits anyway (a merge moves the clock past what it
        merged), and a reader that needs more asks for a tick (``beat``).  A
        tick must be on disk before it leaves (``Storage.tick``), and ticking
        every heartbeat cost each node an fsync five times a second while
        nothing changed.  Only after ``alive_every`` without a commit is a tick
        committed, so that the clock on disk tells a restarted node how long
        it was away (``AntiEntropy._discard_if_away_too_long``).
        """
        while True:
            await asyncio.sleep(self.settings.heartbeat)
            now = self._clock()
            if now - self._last_commit >= self.settings.alive_every:
                try:
                    await self.storage.tick()
                except Exception:
                    logger.exception("replication.tick_failed")
            # A local write in the interval was pushed: peers heard of it.
            if not self.peers or now - self._last_local < self.settings.heartbeat:
                continue
            for peer in self.peers.values():
                peer.beat = True
                peer.wake.set()


class Refused(Exception):
    """A peer answered, but not with success."""


def _cut(outbox: list[Op], limit: int) -> list[Op]:
    """The first ``limit`` operations, extended to the end of their version.

    A batch claims every operation up to its last version, so it must not
    split the operations that share a version (one request's items).
    """
    if len(outbox) <= limit:
        return list(outbox)
    end = limit
    last = outbox[end - 1].version
    while end < len(outbox) and outbox[end].version == last:
        end += 1
    return outbox[:end]
