"""The indexer server: the v1 index API over the local SQLite replica.

Rules of this module:

* Index requests pass through the ``Limiter`` (capacity, short queue, then
  ``503 overloaded``); ``/healthz`` and ``/v1/load`` never do, so a busy indexer
  still answers its balancer.
* Every response, errors included, carries ``P2PLB-Load: <load>/<capacity>`` so
  whoever called learns the load at no cost (design.md "Load"), and, once it
  has served a request, ``P2PLB-Service-Ms``: its recent service time, which
  ``least_latency`` weighs (``p2plb.servicetime``).
* Input is validated completely before storage is touched: a rejected request
  changes nothing.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import time
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from p2plb.cache import ReadCache
from p2plb.config import IndexerConfig
from p2plb.errors import ConfigError, ReplicaBehind, RequestError, StorageError
from p2plb.hlc import format_version, parse_version
from p2plb.limiter import Limiter
from p2plb.openapi import openapi_handler
from p2plb.replication import ReplicationSettings, Replicator
from p2plb.reporter import Reporter
from p2plb.servicetime import SERVICE_HEADER, ServiceTime, format_service_header
from p2plb.storage import BUCKETS, MAX_DRIFT_MS, Committed, Storage
from p2plb.tls import client_context, server_context
from p2plb.web import (
    DEFAULT_PAGE,
    INDEX,
    MAX_PAGE,
    Handler,
    check_index,
    check_item_query,
    check_page,
    check_query,
    error_middleware,
    error_response,
    json_response,
    read_body,
)
from p2plb.wire import (
    PROTOCOL,
    ItemsBody,
    check_name,
    check_whole_number,
    decode_body,
)
from p2plb.workload import ServiceModel

__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "Indexer", "LOAD_HEADER"]

logger = logging.getLogger(__name__)

LOAD_HEADER = "P2PLB-Load"
MIN_VERSION_HEADER = "P2PLB-Min-Version"
# A push between indexers may carry a large batch; it is not a public request.
_REPLICATION_BODY = 256 * 1024 * 1024

STORAGE_KEY = web.AppKey("storage", Storage)


class Indexer:
    """One indexer: storage, replication, admission control, HTTP handlers."""

    def __init__(
        self, config: IndexerConfig, storage: Storage, replicator: Replicator
    ) -> None:
        self.config = config
        self.storage = storage
        self.replicator = replicator
        self.limiter = Limiter(config.capacity, config.queue_limit)
        self.cache = ReadCache()
        self.served = 0
        self.service = ServiceTime()
        self.service_model: ServiceModel | None = None
        if config.service_time is not None:
            factor, period = config.antagonist or (1.0, 0.0)
            self.service_model = ServiceModel(config.service_time, factor, period)
        self.url = config.advertise_url or ""

    @property
    def state(self) -> str:
        return self.replicator.state

    def on_commit(self, committed: Committed) -> None:
        """Storage hook: drop stale cached reads, then replicate."""
        self.cache.changed(committed.indices)
        self.replicator.on_commit(committed)

    @property
    def load(self) -> int:
        return self.limiter.load

    def load_report(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "id": self.config.id,
            "load": self.limiter.load,
            "capacity": self.config.capacity,
            "serving": self.limiter.serving,
            "queued": self.limiter.waiting,
            "state": self.state,
            "served": self.served,
            "service_ms": self.service.ms,
        }

    def make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._stamped],
            client_max_size=self.config.max_body_size,
        )
        app[STORAGE_KEY] = self.storage
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/openapi.json", openapi_handler("indexer"))
        app.router.add_get("/v1/load", self.get_load)
        app.router.add_get("/v1/indices", self._reader(self.list_indices))
        app.router.add_get(INDEX, self._reader(self.get_index))
        app.router.add_post(INDEX + "/items", self._limited(self.add_items))
        app.router.add_post(INDEX + "/items/remove", self._limited(self.remove_items))
        app.router.add_delete(INDEX + "/items", self._limited(self.delete_item))
        # Between indexers: never behind the capacity limit.
        app.router.add_post("/internal/v1/push", self.push)
        app.router.add_post("/internal/v1/beat", self.beat)
        app.router.add_get("/internal/v1/summary", self.summary)
        app.router.add_get("/internal/v1/buckets", self.buckets)
        app.router.add_get("/internal/v1/bucket", self.bucket)
        return app

    @web.middleware
    async def _stamped(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """Every answer, error answers included, with the load headers.

        Stamped here rather than in an ``on_response_prepare`` signal: the
        same answers for less work per request (the read path is measured
        against a bare aiohttp app, bench/indexer_read.py).
        """
        try:
            response = await error_middleware(request, handler)
        except web.HTTPException as exc:  # answered by aiohttp: stamped too
            self._stamp(exc.headers)
            raise
        self._stamp(response.headers)
        return response

    def _stamp(self, headers: MutableMapping[str, str]) -> None:
        headers[LOAD_HEADER] = f"{self.limiter.load}/{self.config.capacity}"
        service = self.service.seconds
        if service is not None:
            headers[SERVICE_HEADER] = format_service_header(service)

    def _limited(self, handler: Any, *, read: bool = False) -> Any:
        """``handler`` behind the capacity limit; for a read, after waiting
        to catch up to ``P2PLB-Min-Version`` (outside the limit: waiting
        inside would hold a slot that a request ready to be served could use).

        One wrapper for both, not a read wrapper around a limit wrapper: every
        index request goes through it, so a coroutine less counts.
        """
        model = self.service_model

        async def limited(request: web.Request) -> web.StreamResponse:
            if read:
                raw = request.headers.get(MIN_VERSION_HEADER)
                if raw is not None:
                    await self._catch_up_to(raw)
            if request.body_exists:
                # Received before a slot is taken: a slow sender must not hold
                # one.  The handler's own read_body then returns it at once.
                await read_body(
                    request, self.config.max_body_size, self.config.body_timeout
                )
            async with self.limiter.slot():
                began = time.monotonic()
                if model is not None:
                    await model.serve()  # benchmarks only: see workload.py
                try:
                    response: web.StreamResponse = await handler(request)
                finally:
                    # Every request that held a slot was served, whatever it
                    # was answered: a rejected name or a 503
                    # insufficient_replicas is work done too.
                    self.served += 1
                # Only whole answers feed the service time: a quick rejection
                # says nothing of how long real work takes here.
                now = time.monotonic()
                self.service.add(now - began, now)
            return response

        return limited

    def _reader(self, handler: Any) -> Any:
        return self._limited(handler, read=True)

    async def _catch_up_to(self, raw: str) -> None:
        """Wait until this indexer holds version ``raw``, else 503 replica_behind."""
        try:
            version = parse_version(raw.strip())
        except ValueError as exc:
            raise RequestError(
                400, "invalid_field", f"{MIN_VERSION_HEADER}: {exc}"
            ) from None
        if self.storage.too_far_ahead(version):
            raise RequestError(
                400,
                "invalid_field",
                f"{MIN_VERSION_HEADER}: {raw.strip()} lies more than "
                f"{MAX_DRIFT_MS // 1000} s ahead of this indexer's clock; no "
                "write can have been given it",
            )
        if not await self.replicator.caught_up(version):
            raise ReplicaBehind(
                f"indexer {self.config.id} has not caught up to version "
                f"{raw.strip()} yet; try another indexer",
                retry_after=1,
            )

    # -- health and load: never behind the limiter ---------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        check_query(request)
        try:
            await self.storage.check()
        except StorageError as exc:
            logger.error(
                "indexer.storage_unhealthy id=%s error=%s", self.config.id, exc
            )
            return error_response(503, "storage_unavailable", str(exc))
        return json_response(
            {"status": "ok", "id": self.config.id, "state": self.state}
        )

    async def get_load(self, request: web.Request) -> web.Response:
        check_query(request)
        return json_response(self.load_report())

    # -- the index API ---------------------------------------------------------------

    async def add_items(self, request: web.Request) -> web.Response:
        name = check_index(request)
        body = decode_body(
            await read_body(
                request, self.config.max_body_size, self.config.body_timeout
            ),
            ItemsBody,
        )
        items = body.values()

        result = await self.storage.add(name, items)
        await self.replicator.replicate(result.version)

        logger.debug(
            "index.added name=%s items=%d new=%d", name, len(items), result.changed
        )
        return json_response(
            {"added": result.changed, "version": format_version(result.version)}
        )

    async def remove_items(self, request: web.Request) -> web.Response:
        name = check_index(request)
        body = decode_body(
            await read_body(
                request, self.config.max_body_size, self.config.body_timeout
            ),
            ItemsBody,
        )
        return await self._remove(name, body.values())

    async def delete_item(self, request: web.Request) -> web.Response:
        name, item = check_item_query(request)
        return await self._remove(name, [item])

    async def _remove(self, name: str, items: list[str]) -> web.Response:
        result = await self.storage.remove(name, items)
        await self.replicator.replicate(result.version)
        logger.debug(
            "index.removed name=%s items=%d gone=%d", name, len(items), result.changed
        )
        return json_response(
            {"removed": result.changed, "version": format_version(result.version)}
        )

    async def get_index(self, request: web.Request) -> web.Response:
        # The raw path is the key: a hit was validated when it was first read.
        key = request.raw_path
        name = request.match_info["name"]
        cached = self.cache.get(key, name)
        if cached is not None:
            return _cached_response(*cached)

        name, limit, after = check_page(request)
        generation = self.cache.generation(name)  # before the read: see cache.py
        page = await self.storage.get(name, limit=limit, after=after)

        if page is None:
            error = RequestError(
                404, "index_not_found", f"name: index {name!r} has no items"
            )
            answer = error_response(error.status, error.code, error.message)
        else:
            payload = {"name": name, "items": page.items, "next": page.next}
            answer = json_response(payload)
        assert isinstance(answer.body, bytes)
        self.cache.put(key, generation, answer.status, answer.body)
        return answer

    async def list_indices(self, request: web.Request) -> web.Response:
        check_query(request)
        cached = self.cache.get(_LIST_KEY, None)
        if cached is not None:
            return _cached_response(*cached)
        generation = self.cache.generation(None)

        answer = json_response({"indices": await self.storage.list_indices()})

        assert isinstance(answer.body, bytes)
        self.cache.put(_LIST_KEY, generation, answer.status, answer.body)
        return answer

    # -- replication between indexers ------------------------------------------------

    async def push(self, request: web.Request) -> web.Response:
        self.replicator.authorize(request.headers.get("Authorization"))
        body = await read_body(request, _REPLICATION_BODY, self.config.body_timeout)
        return json_response(await self.replicator.receive_push(body))

    async def beat(self, request: web.Request) -> web.Response:
        self.replicator.authorize(request.headers.get("Authorization"))
        body = await read_body(
            request, self.config.max_body_size, self.config.body_timeout
        )
        return json_response(await self.replicator.beat(body))

    async def summary(self, request: web.Request) -> web.Response:
        self.replicator.authorize(request.headers.get("Authorization"))
        return json_response(await self.replicator.summary())

    async def buckets(self, request: web.Request) -> web.Response:
        self.replicator.authorize(request.headers.get("Authorization"))
        index = check_name(request.query.get("index", ""), field="index")
        return json_response(await self.replicator.buckets(index))

    async def bucket(self, request: web.Request) -> web.Response:
        self.replicator.authorize(request.headers.get("Authorization"))
        index = check_name(request.query.get("index", ""), field="index")
        bucket = check_whole_number(
            request.query.get("bucket", ""), "bucket", 0, BUCKETS - 1
        )
        return json_response(await self.replicator.bucket(index, bucket))


_LIST_KEY = "list of indices"  # never a raw path: those start with "/"


def _cached_response(status: int, body: bytes) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json")


def advertise_url(config: IndexerConfig, bound_url: str, wildcard: bool) -> str:
    """The address others use: ``--advertise-url``, else the bound host and port."""
    if config.advertise_url:
        return config.advertise_url
    if wildcard:
        raise ConfigError(
            "--advertise-url: required when --host is a wildcard address "
            f"({config.host}), since peers cannot connect to it"
        )
    return bound_url


def _lock_data_dir(data_dir: str) -> IO[str]:
    """Hold an exclusive lock on the data directory for the life of the process.

    Two indexers on one database would fight over SQLite's write lock and time
    out; refusing the second at start says what is wrong instead.
    """
    path = Path(data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / "LOCK", "a+")  # noqa: SIM115 - held until shutdown
    except OSError as exc:
        raise ConfigError(f"--data-dir: cannot use {data_dir}: {exc.strerror}") from exc
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"--data-dir: {data_dir} is in use by another running indexer"
        ) from None
    return handle


async def run_indexer(config: IndexerConfig) -> None:
    """Open storage, serve until a signal, then drain and close (design.md)."""
    from p2plb.lifecycle import bind, is_wildcard, run_server

    listener = bind(
        config.host, config.port, server_context(config.tls_cert, config.tls_key)
    )
    peers_tls = client_context(config.ca_file)
    url = advertise_url(config, listener.url, is_wildcard(config.host))
    lock = _lock_data_dir(config.data_dir)
    storage = Storage(f"{config.data_dir}/index.sqlite3", config.id)
    replicator = Replicator(
        config.id,
        storage,
        settings=ReplicationSettings(
            anti_entropy=config.anti_entropy_interval,
            write_timeout=config.write_timeout,
            read_wait=config.read_wait,
            sync_timeout=config.sync_timeout,
            tombstone_grace=config.tombstone_grace,
        ),
        token=config.cluster_token,
        static_peers=config.peer,
        ssl=peers_tls,
    )
    try:
        await storage.open()
    except BaseException:
        listener.sock.close()
        lock.close()
        raise
    indexer = Indexer(config, storage, replicator)
    storage.on_commit = indexer.on_commit
    indexer.url = url
    replicator.address = url
    reporter = Reporter(
        indexer_id=config.id,
        address=url,
        capacity=config.capacity,
        instance=uuid.uuid4().hex,
        balancers=config.balancer,
        interval=config.report_interval,
        load_report=indexer.load_report,
        on_peers=replicator.set_members,
        membership_interval=config.membership_interval,
        token=config.cluster_token,
        ssl=peers_tls,
    )
    replicator.on_state = reporter.kick

    async def started() -> None:
        logger.info(
            "indexer.started id=%s url=%s listen=%s capacity=%d data_dir=%s",
            config.id,
            url,
            listener.url,
            config.capacity,
            config.data_dir,
        )
        await replicator.start(expect_members=bool(config.balancer))
        await reporter.start()

    async def draining() -> None:
        # Leave the balancers first, then keep serving while routed clients
        # refresh their tables and stop sending here.
        if not config.balancer:
            return
        await reporter.unregister()
        logger.info("indexer.draining id=%s for_s=%.1f", config.id, config.drain_period)
        await asyncio.sleep(config.drain_period)

    async def closed() -> None:
        await reporter.stop()
        await replicator.stop()
        await storage.close()
        lock.close()
        logger.info("indexer.stopped id=%s served=%d", config.id, indexer.served)

    await run_server(
        indexer.make_app(),
        listener,
        shutdown_timeout=config.shutdown_timeout,
        idle_timeout=config.idle_timeout,
        on_started=started,
        before_stop=draining,
        after_stop=closed,
    )
