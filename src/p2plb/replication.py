"""Replication of index data between indexers: push, watermarks, anti-entropy.

Every indexer holds every index.  The guarantees (design.md "Guarantees") rest
on three mechanisms, each covering what the previous one may miss:

1. **Push, in order** (``peers``).  Each local commit is streamed to every
   peer in order, with heartbeats when idle, so that a peer's *watermark* of
   this origin says which of its writes it holds.  A write is acknowledged
   to its caller once ``min(2, registered indexers) - 1`` peers hold it.

2. **Watermarks for read-your-writes.**  A read asking for version ``V`` is
   served once, for every origin that is alive, the watermark is ``>= V``: all
   that origin's writes up to ``V`` are here.  An origin that stops answering
   is left out only after an anti-entropy round with every live peer has
   finished since: its acknowledged writes live on at least one of them.

3. **Anti-entropy** (``antientropy``).  Every few seconds, and when a peer goes
   quiet, a node compares digests with a peer, pulls what differs and raises
   its watermarks to the peer's.

``Replicator`` is the facade the indexer uses: membership, the write path, the
read path and the internal API peers call.  The push streams (``PeerStreams``)
and anti-entropy (``AntiEntropy``) are parts of it, written in modules of their
own and sharing its state.

Known shortcoming: every indexer holds every index (full replication), which
suits the indices of a P2P indexer but not a data set larger than one node;
partitioning indices over replica sets (consistent hashing) would fix it.
Also, a newcomer is known to its peers once a balancer lists it or once it
pushes to them; until then a read elsewhere does not wait for its writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

import aiohttp
import msgspec

from p2plb.antientropy import AntiEntropy
from p2plb.errors import InsufficientReplicas, LoopDetected, RequestError
from p2plb.peers import Peer, PeerStreams, Refused
from p2plb.storage import Committed, Op, Storage
from p2plb.tokens import require
from p2plb.wire import PROTOCOL, encode

__all__ = ["Peer", "Replicator", "ReplicationSettings"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicationSettings:
    heartbeat: float = 0.2  # idle push interval: peers hear this node is alive
    anti_entropy: float = 3.0  # background digest comparison interval
    write_timeout: float = 2.0  # wait for copies before 503 insufficient_replicas
    read_wait: float = 1.0  # wait for watermarks before 503 replica_behind
    sync_timeout: float = 10.0  # serve anyway if no serving peer helped by then
    quiet_after: float = 1.0  # a peer silent this long is left out of reads
    outbox_limit: int = 200_000  # past this a peer must catch up by anti-entropy
    tombstone_grace: float = 86400.0  # keep tombstones at least this long
    alive_tick: float = 60.0  # idle: commit a clock tick this often at most

    @property
    def alive_every(self) -> float:
        """How long an idle node goes without a commit: well within the grace,
        against which a restarted node measures how long it was away."""
        return min(self.alive_tick, self.tombstone_grace / 4)


class Replicator(PeerStreams, AntiEntropy):
    """Replicates this indexer's storage with its peers; see the module rules."""

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
        self._told_self: set[str] = set()
        self._changed = asyncio.Event()  # a watermark or an ack moved
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._members_known = asyncio.Event()
        self._last_local = 0.0
        self._last_commit = 0.0
        self._last_up = 0
        self._quiet_syncs: set[str] = set()

    # -- lifecycle -----------------------------------------------------------

    async def start(self, *, expect_members: bool) -> None:
        """Start pushing and syncing; ``expect_members`` if a balancer will tell."""
        self._committed = self.storage.watermarks.get(self.node_id, 0)
        self._last_up = self.storage.committed
        self._last_commit = self._clock()
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
        """The registered indexers, as the balancers list them (self included
        or not): the union of their lists, see ``reporter``."""
        seen: set[str] = set()
        for member in members:
            member_id = member.get("id")
            address = member.get("address")
            if not isinstance(member_id, str) or not isinstance(address, str):
                continue
            if member_id == self.node_id:
                continue
            if address == self.address:
                # Another id registered at this node's own address: a stale
                # entry (this port's previous process, under another id).
                # Pushing to it would count this node's own copy twice.
                self._warn_self(member_id, address)
                continue
            seen.add(member_id)
            peer = self._peer(member_id, address)
            # Its "state" is not taken: the balancer's word on it may be older
            # than the peer (see ``AntiEntropy._catch_up``).
            peer.healthy = bool(member.get("healthy", True))
        for gone in set(self.peers) - seen - self._static_ids():
            self._drop(gone)
        self.registered = 1 + len(self.peers)
        self._members_known.set()

    def _warn_self(self, member_id: str, address: str) -> None:
        if member_id in self._told_self:
            return
        self._told_self.add(member_id)
        logger.warning(
            "replication.self_listed id=%s address=%s: registered at this "
            "indexer's own address, so not a peer; remove that stale entry",
            member_id,
            address,
        )

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
                    peer_id = str(body["id"])
                    if peer_id == self.node_id:
                        self._warn_self(peer_id, address)
                        continue
                    peer = self._peer(peer_id, address)
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
        self._last_commit = self._clock()
        self._changed.set()
        if not committed.local:
            return
        self._last_local = self._clock()
        for peer in self.peers.values():
            peer.outbox.extend(committed.local)
            if len(peer.outbox) > self.settings.outbox_limit:
                self._overflow(peer)
            peer.wake.set()

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
                # A live peer's watermark moves only with its commits; ask it
                # to commit a tick past the version (it may have nothing new).
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

    # -- what peers ask of this node (internal API) -----------------------------

    def authorize(self, header: str | None) -> None:
        require(header, {"cluster": self._token})

    async def receive_push(self, body: bytes) -> dict[str, Any]:
        try:
            push = msgspec.json.decode(body, type=_Push)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise RequestError(400, "invalid_json", f"body: {exc}") from None
        if push.origin == self.node_id:
            # Never a second copy: the sender reached itself through a stale
            # entry at its own address.
            raise LoopDetected(
                f"origin: {push.origin!r} is this indexer; a push to itself is "
                "no replica"
            )
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
            except (aiohttp.ClientError, TimeoutError, Refused, KeyError) as exc:
                logger.info("replication.sync_failed peer=%s error=%s", peer.id, exc)
            except Exception:  # a peer's odd answer must not go unseen
                logger.exception("replication.sync_crashed peer=%s", peer.id)
            finally:
                self._quiet_syncs.discard(key)

        self._spawn(run())

    async def summary(self) -> dict[str, Any]:
        """What this replica holds; ``state`` says whether a node catching up
        may take it as its source (only a serving one)."""
        marks, digests = await self.storage.summary()
        return {
            "protocol": PROTOCOL,
            "state": self.state,
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
