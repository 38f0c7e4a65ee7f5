"""Anti-entropy: pulling from a peer whatever differs, to repair what push missed.

Rules (the third of replication's three mechanisms):

* **Compare, then pull.**  Every few seconds, and when a peer goes quiet, a
  node compares per-index digests with a peer (then per-bucket digests of the
  indices that differ) and pulls the buckets that differ.  Merging is
  idempotent and order-free (``storage``), so pulling too much is harmless.
* **Watermarks follow.**  After pulling everything a peer's summary described,
  the node holds all that the peer's watermarks promised, and raises its own
  to them.
* **Catch up before serving.**  A starting node stays "syncing" until one full
  pull from a serving peer (or a timeout); one that was away longer than the
  tombstone grace starts afresh, since its old entries could bring removed
  items back.  Whether a peer is serving is its own word, in its summary: the
  balancer's entry may be older than the peer (a balancer restored from its
  state file lists the indexers of a whole-cluster restart as serving, while
  each is still catching up itself).  A syncing peer may miss writes, so it
  is no source; if no serving peer answers within the sync timeout, the node
  serves anyway, so that a whole cluster restarted at once does not wait on
  itself forever.
* **Tombstones go last.**  A tombstone older than the grace is dropped only
  once every registered peer's watermarks show it holds it.

This follows the classic design of anti-entropy with version vectors
(Demers et al., "Epidemic algorithms for replicated database maintenance",
1987; Petersen et al., "Flexible update propagation for weakly consistent
replication" (Bayou), 1997), with hybrid logical clocks for versions.

``AntiEntropy`` is a part of ``Replicator``, written apart for reading: it
works on the replicator's state, declared below, and owns none of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from p2plb.peers import Peer, Refused
from p2plb.storage import Op, Storage

if TYPE_CHECKING:
    from p2plb.replication import ReplicationSettings

__all__ = ["AntiEntropy"]

# Anti-entropy's events are replication's: same names, same logger, so that
# ``p2plb.replication`` stays the one channel an operator follows for it.
logger = logging.getLogger("p2plb.replication")


class AntiEntropy:
    """Pulls from peers: on start (catch-up), periodically, and when asked."""

    # The replicator's state, which these methods share with it.
    node_id: str
    storage: Storage
    settings: ReplicationSettings
    peers: dict[str, Peer]
    state: str
    on_state: Callable[[], None] | None
    _session: aiohttp.ClientSession | None
    _rng: random.Random
    _clock: Callable[[], float]
    _changed: asyncio.Event
    _members_known: asyncio.Event
    _last_up: int  # the clock on disk at start: when this replica was last up

    def _live(self, peer: Peer) -> bool:
        quiet = self._clock() - peer.heard > self.settings.quiet_after
        return peer.healthy and not quiet

    async def sync_with(self, peer: Peer) -> int:
        """Pull from ``peer`` what differs; returns the operations that won.

        One pull per peer at a time: pulls started together (catch-up, a
        push asking for one, the periodic round) would fetch the same buckets.
        """
        async with peer.pulling:
            started = self._clock()
            summary = await self._get(peer, "/internal/v1/summary", {})
            return await self._pull(peer, summary, started)

    async def _catch_up_with(self, peer: Peer, deadline: float) -> int | None:
        """Pull from ``peer`` if it says it is serving; None if it does not.

        Its summary must come before ``deadline``; the pull that follows may
        take longer, since a serving peer did answer.
        """
        async with peer.pulling:
            started = self._clock()
            summary = await asyncio.wait_for(
                self._get(peer, "/internal/v1/summary", {}),
                max(deadline - started, 0.0),
            )
            if not isinstance(summary, dict) or summary.get("state") != "serving":
                return None  # catching up itself, or too old to say
            await self._discard_if_away_too_long()
            return await self._pull(peer, summary, started)

    async def _pull(self, peer: Peer, summary: Any, started: float) -> int:
        """Pull what differs from what ``summary`` of ``peer`` describes."""
        theirs: dict[str, list[int]] = summary["indices"]
        _, mine = await self.storage.summary()

        applied = 0
        for index, digest in theirs.items():
            if tuple(digest) == mine.get(index):
                continue
            answer = await self._get(peer, "/internal/v1/buckets", {"index": index})
            their_buckets: dict[str, list[int]] = answer["buckets"]
            my_buckets = await self.storage.buckets(index)
            for bucket, bucket_digest in their_buckets.items():
                if tuple(bucket_digest) == my_buckets.get(int(bucket)):
                    continue
                params = {"index": index, "bucket": bucket}
                ops = await self._get(peer, "/internal/v1/bucket", params)
                pulled = [
                    Op(index, item, bool(present), version, origin)
                    for item, present, version, origin in ops["ops"]
                ]
                applied += len(await self.storage.merge(pulled))

        marks = {str(k): int(v) for k, v in summary["marks"].items()}
        await self.storage.advance(marks)
        peer.marks = marks
        peer.synced_after = max(peer.synced_after, started)
        peer.heard = max(peer.heard, started)
        self._changed.set()
        if applied:
            logger.info("replication.synced peer=%s applied=%d", peer.id, applied)
        return applied

    async def _get(self, peer: Peer, path: str, params: dict[str, str]) -> Any:
        assert self._session is not None
        async with self._session.get(peer.address + path, params=params) as response:
            if response.status != 200:
                raise Refused(f"{path} answered HTTP {response.status}")
            try:
                answer = await response.json(content_type=None)
            except (ValueError, RecursionError):
                raise Refused(f"{path} answered what is not JSON") from None
        if not isinstance(answer, dict):
            raise Refused(f"{path} answered {type(answer).__name__}, not an object")
        return answer

    async def _anti_entropy(self) -> None:
        while True:
            await asyncio.sleep(
                self.settings.anti_entropy * self._rng.uniform(0.8, 1.2)
            )
            live = [p for p in self.peers.values() if self._live(p)]
            if not live:
                continue
            peer = self._rng.choice(live)
            try:
                await self.sync_with(peer)
            except (aiohttp.ClientError, TimeoutError, Refused, KeyError) as exc:
                logger.info("replication.sync_failed peer=%s error=%s", peer.id, exc)
            except Exception:  # the loop must outlive any peer's answer
                logger.exception("replication.sync_crashed peer=%s", peer.id)

    async def _catch_up(self) -> None:
        """Stay "syncing" until a full pull from a serving peer, or the timeout."""
        deadline = self._clock() + self.settings.sync_timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._members_known.wait(), self.settings.sync_timeout
            )
        while self._clock() < deadline:
            if not self.peers:
                break  # alone: nothing to catch up with
            for peer in list(self.peers.values()):
                try:
                    applied = await self._catch_up_with(peer, deadline)
                except (aiohttp.ClientError, TimeoutError, Refused, KeyError):
                    continue
                if applied is not None:
                    self._serve(f"caught up with {peer.id} ({applied} operations)")
                    return
            await asyncio.sleep(0.2)
        if self.peers:
            logger.warning(
                "replication.sync_timeout after_s=%.1f; no serving peer answered, "
                "serving without catching up",
                self.settings.sync_timeout,
            )
        self._serve("no peer to catch up with" if not self.peers else "sync timeout")

    async def _discard_if_away_too_long(self) -> None:
        """Away longer than the grace, peers may have dropped tombstones this
        replica never saw; its old entries could bring removed items back, so it
        starts afresh from a serving peer instead."""
        # The clock as the store was opened, not as it is now: this process
        # commits too (merged pushes, ticks) and moves it on.
        last_ms = self._last_up >> 16
        away = time.time() - last_ms / 1000
        if last_ms == 0 or away <= self.settings.tombstone_grace:
            return
        logger.warning(
            "replication.discarding away_s=%.0f grace_s=%.0f; resyncing from scratch",
            away,
            self.settings.tombstone_grace,
        )
        await self.storage.wipe()
        self._last_up = self.storage.committed  # once is enough

    async def _collect_tombstones(self) -> None:
        """Drop tombstones older than the grace that every registered peer holds."""
        every = min(600.0, max(0.5, self.settings.tombstone_grace / 4))
        while True:
            await asyncio.sleep(every)
            if self.state != "serving":
                continue
            peers = list(self.peers.values())
            if any(p.marks is None for p in peers):
                continue  # someone's holdings are unknown: keep everything
            safe = dict(self.storage.watermarks)
            for peer in peers:
                assert peer.marks is not None
                safe = {o: min(v, peer.marks.get(o, 0)) for o, v in safe.items()}
            cutoff_ms = int((time.time() - self.settings.tombstone_grace) * 1000)
            try:
                dropped = await self.storage.drop_tombstones(cutoff_ms << 16, safe)
            except Exception:
                logger.exception("replication.tombstones_failed")
                continue
            if dropped:
                logger.info("replication.tombstones_dropped count=%d", dropped)

    def _serve(self, reason: str) -> None:
        self.state = "serving"
        self._changed.set()
        if self.on_state is not None:
            self.on_state()
        logger.info("replication.serving id=%s reason=%s", self.node_id, reason)
