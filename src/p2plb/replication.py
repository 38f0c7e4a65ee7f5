"""Replication of index data between indexers: push, watermarks, anti-entropy.

Every indexer holds every index.  The guarantees (design.md "Guarantees") rest
on three mechanisms, each covering what the previous one may miss:

1. **Push, in order.**  Each local commit is appended to an outbox per peer; one
   sender task per peer sends everything waiting as one batch, and the next
   batch only after the previous one was acknowledged.  A batch says "these are
   all my operations in ``(base, upto]``", where ``base`` is what the peer
   acknowledged before; a peer that held everything up to ``base`` may then
   raise its *watermark* of this origin to ``upto``.  A write is acknowledged
   to its caller once ``min(2, registered indexers) - 1`` peers hold it.
   When a node is idle, a clock tick is pushed instead (a heartbeat), so
   watermarks keep moving.

2. **Watermarks for read-your-writes.**  A read asking for version ``V`` is
   served once, for every origin that is alive, the watermark is ``>= V``: all
   that origin's writes up to ``V`` are here.  An origin that stops answering
   is left out only after an anti-entropy round with every live peer has
   finished since: its acknowledged writes live on at least one of them.

3. **Anti-entropy.**  Every few seconds, and when a peer goes quiet, a node
   compares per-index digests with a peer (then per-bucket digests of the
   indices that differ) and pulls the buckets that differ.  Merging is
   idempotent and order-free (``storage``), so pulling too much is harmless.
   After pulling everything a peer's summary described, the node holds all
   that the peer's watermarks promised, and raises its own to them.

Known shortcoming: every indexer holds every index (full replication), which
suits the indices of a P2P indexer but not a data set larger than one node;
partitioning indices over replica sets (consistent hashing) would fix it.
Also, a newcomer is known to its peers once a balancer lists it or once it
pushes to them; until then a read elsewhere does not wait for its writes.

This follows the classic design of anti-entropy with version vectors
(Demers et al., "Epidemic algorithms for replicated database maintenance",
1987; Petersen et al., "Flexible update propagation for weakly consistent
replication" (Bayou), 1997), with hybrid logical clocks for versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any

import aiohttp
import msgspec

from p2plb.errors import InsufficientReplicas, RequestError
from p2plb.storage import Committed, Op, Storage
from p2plb.tokens import require
from p2plb.wire import PROTOCOL, encode

__all__ = ["Peer", "Replicator", "ReplicationSettings"]

logger = logging.getLogger(__name__)

# How many operations one push or one pulled bucket may carry at most; a
# longer outbox is sent over several batches, cut between versions.
_BATCH = 5000


@dataclass(frozen=True)
class ReplicationSettings:
    heartbeat: float = 0.2  # idle push interval: bounds how long a read waits
    anti_entropy: float = 3.0  # background digest comparison interval
    write_timeout: float = 2.0  # wait for copies before 503 insufficient_replicas
    read_wait: float = 1.0  # wait for watermarks before 503 replica_behind
    sync_timeout: float = 10.0  # serve anyway if no serving peer helped by then
    quiet_after: float = 1.0  # a peer silent this long is left out of reads
    outbox_limit: int = 200_000  # past this a peer must catch up by anti-entropy
    tombstone_grace: float = 86400.0  # keep tombstones at least this long


@dataclass
class Peer:
    """Another indexer, as this one replicates with it."""

    id: str
    address: str
    healthy: bool = True
    state: str = "serving"
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


class Replicator:
    def __init__(
        self,
        node_id: str,
        storage: Storage,
        *,
        settings: ReplicationSettings,
        token: str | None = None,
        static_peers: tuple[str, ...] = (),
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        ssl: SSLContext | None = None,
    ) -> None:
        self.node_id = node_id
        self._ssl = ssl
        self.address = ""  # where peers reach this node; set once bound
        self.storage = storage
        self.settings = settings
        self.peers: dict[str, Peer] = {}
        self.registered = 1  # this node and the peers the balancer knows
        self.state = "syncing"
        self.on_state: Callable[[], None] | None = None
        self._token = token
        self._static = static_peers
        self._rng = rng or random.Random()
        self._clock = clock
        self._committed = 0
        self._changed = asyncio.Event()  # a watermark or an ack moved
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._members_known = asyncio.Event()
        self._last_local = 0.0
        self._quiet_syncs: set[str] = set()

    # -- lifecycle -----------------------------------------------------------

    async def start(self, *, expect_members: bool) -> None:
        """Start pushing and syncing; ``expect_members`` if a balancer will tell."""
        self._committed = self.storage.watermarks.get(self.node_id, 0)
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=5, connect=1),
            connector=aiohttp.TCPConnector(
                limit=0, keepalive_timeout=30, ssl=self._ssl or True
            ),
        )
        if not expect_members and not self._static:
            self._members_known.set()
        self._tasks = [
            asyncio.create_task(self._catch_up()),
            asyncio.create_task(self._heartbeats()),
            asyncio.create_task(self._anti_entropy()),
            asyncio.create_task(self._collect_tombstones()),
        ]
        if self._static:
            self._tasks.append(asyncio.create_task(self._resolve_static()))

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._background]
        tasks += [p.task for p in self.peers.values() if p.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- membership ----------------------------------------------------------

    def set_members(self, members: list[dict[str, Any]]) -> None:
        """The registered indexers, as a balancer lists them (self included or not).

        Known shortcoming: the list is the view of whichever balancer answered
        last; when balancers disagree (one forgot an indexer), the stream to
        that indexer is dropped and restarts through anti-entropy.  Merging
        the views of every balancer would fix it.
        """
        seen: set[str] = set()
        for member in members:
            member_id = member.get("id")
            address = member.get("address")
            if not isinstance(member_id, str) or not isinstance(address, str):
                continue
            if member_id == self.node_id:
                continue
            seen.add(member_id)
            peer = self._peer(member_id, address)
            peer.healthy = bool(member.get("healthy", True))
            peer.state = str(member.get("state", "serving"))
        for gone in set(self.peers) - seen - self._static_ids():
            self._drop(gone)
        self.registered = 1 + len(self.peers)
        self._members_known.set()

    def _static_ids(self) -> set[str]:
        return {p.id for p in self.peers.values() if p.address in self._static}

    def _peer(self, peer_id: str, address: str) -> Peer:
        peer = self.peers.get(peer_id)
        if peer is not None and peer.address != address:
            self._drop(peer_id)  # restarted elsewhere: start the stream afresh
            peer = None
        if peer is None:
            peer = Peer(peer_id, address, cleared_at=self._committed)
            peer.heard = self._clock()
            peer.task = asyncio.create_task(self._send_loop(peer))
            self.peers[peer_id] = peer
            logger.info("replication.peer_added id=%s address=%s", peer_id, address)
        return peer

    def _drop(self, peer_id: str) -> None:
        peer = self.peers.pop(peer_id, None)
        if peer is not None and peer.task is not None:
            peer.task.cancel()
            logger.info("replication.peer_removed id=%s", peer_id)
        self._changed.set()

    async def _resolve_static(self) -> None:
        """Learn the ids of --peer addresses, and keep them listed."""
        assert self._session is not None
        while True:
            for address in self._static:
                try:
                    async with self._session.get(f"{address}/v1/load") as response:
                        body = await response.json(content_type=None)
                    peer = self._peer(str(body["id"]), address)
                    peer.healthy = True
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                    continue
            self.registered = 1 + len(self.peers)
            self._members_known.set()
            await asyncio.sleep(1.0)

    # -- the write path -------------------------------------------------------

    def on_commit(self, committed: Committed) -> None:
        """Storage hook, on the event loop, before the writers are answered.

        Only local operations wake the senders: a commit of merged operations
        moves the clock too, but pushing that would echo every write back to
        every peer (measured: 6 pushes per write with 3 indexers instead of 2).
        """
        self._committed = committed.version
        self._changed.set()
        if not committed.local:
            return
        self._last_local = self._clock()
        for peer in self.peers.values():
            peer.outbox.extend(committed.local)
            if len(peer.outbox) > self.settings.outbox_limit:
                self._overflow(peer)
            peer.wake.set()

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

    async def replicate(self, version: int) -> None:
        """Wait until enough peers hold ``version``; else 503 insufficient_replicas.

        Known shortcoming: ``registered`` counts a dead indexer until the
        balancer forgets it (``--forget-after``, 1 h), so a two-indexer
        cluster with one dead takes no writes until then; counting only
        healthy indexers would fix it, at the cost of design.md's wording.
        """
        needed = min(2, self.registered) - 1
        if needed <= 0:
            return
        deadline = self._clock() + self.settings.write_timeout
        while self._copies(version) < needed:
            left = deadline - self._clock()
            if left <= 0:
                raise InsufficientReplicas(
                    f"the write is durable on {1 + self._copies(version)} of the "
                    f"{needed + 1} indexers required; it may still apply later"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def _copies(self, version: int) -> int:
        return sum(
            1 for p in self.peers.values() if p.acked is not None and p.acked >= version
        )

    async def _send_loop(self, peer: Peer) -> None:
        backoff = 0.05
        while True:
            await peer.wake.wait()
            peer.wake.clear()
            while peer.outbox or peer.beat:
                try:
                    await self._push(peer)
                    backoff = 0.05
                except (aiohttp.ClientError, TimeoutError, _Refused) as exc:
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
                raise _Refused(f"push answered HTTP {response.status}")

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
        """Tick the clock when idle, so peers' watermarks of this node move on."""
        while True:
            await asyncio.sleep(self.settings.heartbeat)
            if not self.peers:
                continue  # nobody to tell
            # A local write in the interval carried a fresh clock already.
            if self._clock() - self._last_local < self.settings.heartbeat:
                continue
            try:
                await self.storage.tick()
            except Exception:
                logger.exception("replication.tick_failed")
                continue
            for peer in self.peers.values():
                peer.beat = True
                peer.wake.set()

    # -- the read path --------------------------------------------------------

    async def caught_up(self, version: int) -> bool:
        """Whether every write up to ``version`` is here, waiting a little."""
        deadline = self._clock() + self.settings.read_wait
        while not self._holds(version):
            left = deadline - self._clock()
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.1))
        return True

    def _holds(self, version: int) -> bool:
        if self.state != "serving":
            return False
        marks = self.storage.watermarks
        now = self._clock()
        for peer in self.peers.values():
            if marks.get(peer.id, 0) >= version:
                continue
            quiet = now - peer.heard > self.settings.quiet_after or not peer.healthy
            if not quiet:
                # An idle peer's watermark moves with its heartbeats; ask it for
                # one now rather than wait up to a heartbeat interval.
                self._ask_beat(peer, version)
                return False
            # A quiet peer's acknowledged writes are also on a live peer: they
            # are here once a pull from every live peer began after it went quiet.
            if not self._synced_since(peer.heard):
                self._sync_soon(peer.id)
                return False
        return True

    def _ask_beat(self, peer: Peer, version: int) -> None:
        if peer.beat_asked >= version:
            return
        peer.beat_asked = version

        async def ask() -> None:
            assert self._session is not None
            body = encode({"protocol": PROTOCOL, "at_least": version})
            url = f"{peer.address}/internal/v1/beat"
            try:
                async with self._session.post(url, data=body) as response:
                    await response.read()
            except (aiohttp.ClientError, TimeoutError):
                peer.beat_asked = 0  # ask again on the next read that needs it

        self._spawn(ask())

    async def beat(self, body: bytes) -> dict[str, Any]:
        """A peer waits for our watermark to reach a version: push a tick now."""
        try:
            asked = msgspec.json.decode(body, type=_Beat)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise RequestError(400, "invalid_json", f"body: {exc}") from None
        await self.storage.tick(at_least=asked.at_least)
        for peer in self.peers.values():
            peer.beat = True
            peer.wake.set()
        return {"protocol": PROTOCOL}

    def _synced_since(self, moment: float) -> bool:
        live = [p for p in self.peers.values() if self._live(p)]
        return all(p.synced_after >= moment for p in live)

    def _live(self, peer: Peer) -> bool:
        quiet = self._clock() - peer.heard > self.settings.quiet_after
        return peer.healthy and not quiet

    def _sync_soon(self, quiet_id: str) -> None:
        if quiet_id in self._quiet_syncs:
            return
        self._quiet_syncs.add(quiet_id)

        async def run() -> None:
            try:
                for peer in [p for p in self.peers.values() if self._live(p)]:
                    with contextlib.suppress(Exception):
                        await self.sync_with(peer)
            finally:
                self._quiet_syncs.discard(quiet_id)
                self._changed.set()

        self._spawn(run())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- anti-entropy ----------------------------------------------------------

    async def sync_with(self, peer: Peer) -> int:
        """Pull from ``peer`` what differs; returns the operations that won.

        One pull per peer at a time: pulls started together (catch-up, a
        push asking for one, the periodic round) would fetch the same buckets.
        """
        async with peer.pulling:
            return await self._pull(peer)

    async def _pull(self, peer: Peer) -> int:
        assert self._session is not None
        started = self._clock()
        summary = await self._get(peer, "/internal/v1/summary", {})
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
                raise _Refused(f"{path} answered HTTP {response.status}")
            return await response.json(content_type=None)

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
            except (aiohttp.ClientError, TimeoutError, _Refused, KeyError) as exc:
                logger.info("replication.sync_failed peer=%s error=%s", peer.id, exc)

    async def _catch_up(self) -> None:
        """Stay "syncing" until a full pull from a serving peer, or the timeout."""
        deadline = self._clock() + self.settings.sync_timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._members_known.wait(), self.settings.sync_timeout
            )
        while self._clock() < deadline:
            serving = [p for p in self.peers.values() if p.state == "serving"]
            if not self.peers:
                break  # alone: nothing to catch up with
            for peer in serving:
                try:
                    await self._discard_if_away_too_long()
                    applied = await self.sync_with(peer)
                except (aiohttp.ClientError, TimeoutError, _Refused, KeyError):
                    continue
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
        last_ms = self.storage.committed >> 16
        away = time.time() - last_ms / 1000
        if last_ms == 0 or away <= self.settings.tombstone_grace:
            return
        logger.warning(
            "replication.discarding away_s=%.0f grace_s=%.0f; resyncing from scratch",
            away,
            self.settings.tombstone_grace,
        )
        await self.storage.wipe()

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

    # -- what peers ask of this node (internal API) -----------------------------

    def authorize(self, header: str | None) -> None:
        require(header, {"cluster": self._token})

    async def receive_push(self, body: bytes) -> dict[str, Any]:
        try:
            push = msgspec.json.decode(body, type=_Push)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise RequestError(400, "invalid_json", f"body: {exc}") from None
        ops = [
            Op(index, item, bool(present), version, push.origin)
            for index, item, present, version in push.ops
        ]
        await self.storage.merge(
            ops, origin=push.origin, base=push.base, upto=push.upto
        )

        peer = self.peers.get(push.origin)
        if peer is None and push.address and push.origin != self.node_id:
            # A peer the balancer has not told us of yet: its writes count for
            # read-your-writes from now on, not after the next membership poll.
            peer = self._peer(push.origin, push.address)
            self.registered = max(self.registered, 1 + len(self.peers))
        if peer is not None:
            peer.heard = self._clock()
        self._changed.set()
        mark = self.storage.watermarks.get(push.origin, 0)
        if peer is not None and push.need is not None and mark < push.need:
            self._pull_soon(peer)
        return {"protocol": PROTOCOL, "mark": mark}

    def _pull_soon(self, peer: Peer) -> None:
        key = f"pull:{peer.id}"
        if key in self._quiet_syncs or peer.pulling.locked():
            return
        self._quiet_syncs.add(key)

        async def run() -> None:
            try:
                await self.sync_with(peer)
            except (aiohttp.ClientError, TimeoutError, _Refused, KeyError) as exc:
                logger.info("replication.sync_failed peer=%s error=%s", peer.id, exc)
            finally:
                self._quiet_syncs.discard(key)

        self._spawn(run())

    async def summary(self) -> dict[str, Any]:
        marks, digests = await self.storage.summary()
        return {
            "protocol": PROTOCOL,
            "marks": marks,
            "indices": {k: list(v) for k, v in digests.items()},
        }

    async def buckets(self, index: str) -> dict[str, Any]:
        found = await self.storage.buckets(index)
        return {
            "protocol": PROTOCOL,
            "buckets": {str(b): list(d) for b, d in found.items()},
        }

    async def bucket(self, index: str, bucket: int) -> dict[str, Any]:
        ops = await self.storage.scan_bucket(index, bucket)
        rows = [[o.item, int(o.present), o.version, o.origin] for o in ops]
        return {"protocol": PROTOCOL, "ops": rows}


class _Push(msgspec.Struct):
    origin: str
    upto: int
    ops: list[tuple[str, str, int, int]]
    base: int | None = None
    need: int | None = None
    address: str | None = None
    protocol: int = PROTOCOL


class _Beat(msgspec.Struct):
    at_least: int
    protocol: int = PROTOCOL


class _Refused(Exception):
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
