"""The balancer server: registry API, routing, statistics, proxy, persistence.

Rules of this module:

* Decisions belong to ``Registry`` (and the health and strategy classes under
  it); this module only connects them to HTTP, timers and the state file.
* Three background loops run beside the server: ``tick`` (report staleness,
  ejection expiry, forgetting), ``probe`` (active ``/healthz`` checks) and
  ``persist`` (the state file, which a change of strategy or membership also
  saves within ``SAVE_DELAY``).  Each survives its own errors: a failed probe
  round or save is logged and retried on the next interval.
* Every change of an indexer's health is logged as ``indexer.healthy`` or
  ``indexer.unhealthy`` with its reason, and counted in the metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from p2plb.config import BalancerConfig
from p2plb.dashboard import HEADERS as DASHBOARD_HEADERS
from p2plb.dashboard import QUERY as DASHBOARD_QUERY
from p2plb.dashboard import refresh_seconds, render
from p2plb.errors import ConfigError, RequestError, describe_failure
from p2plb.health import HealthChange, HealthPolicy
from p2plb.metrics import CONTENT_TYPE, Metrics
from p2plb.openapi import openapi_handler
from p2plb.proxy import Proxy
from p2plb.registry import Entry, Registry
from p2plb.state import Saver, StateFileError, load_state, save_state, set_aside
from p2plb.tls import client_context, server_context
from p2plb.tokens import require
from p2plb.web import (
    INDEX,
    check_index,
    check_item_query,
    check_page,
    check_query,
    error_middleware,
    json_response,
    read_body,
)
from p2plb.wire import (
    MAX_COUNT,
    LoadBody,
    RegisterBody,
    StrategyBody,
    check_address,
    check_indexer_id,
    check_name,
    check_whole_number,
    decode_body,
)

__all__ = ["Balancer", "run_balancer"]

logger = logging.getLogger(__name__)

_ROUTE_QUERY = frozenset({"index", "op"})
_LIST_QUERY = frozenset({"members_since"})
_OPS = ("read", "write")
#: Sent by an indexer that removes itself: which process of its id it is,
#: and where it listens (a restart in place keeps the address).
INSTANCE_HEADER = "P2PLB-Instance"
ADDRESS_HEADER = "P2PLB-Address"
#: How soon a change of strategy or membership is saved (counters wait for
#: --persist-interval): a crash seconds later must not undo it.
SAVE_DELAY = 0.5


class Balancer:
    def __init__(self, config: BalancerConfig, *, rng: random.Random | None = None):
        self.config = config
        self.started = time.monotonic()
        self.registry = Registry(
            clock=time.monotonic,
            rng=rng or random.Random(),
            policy=HealthPolicy(
                unhealthy_after=config.unhealthy_after,
                probe_rise=config.probe_rise,
                probe_fall=config.probe_fall,
                eject_for=config.eject_for,
            ),
            strategy=config.strategy,
            forget_after=config.forget_after,
            # A probe answer carries the indexer's load: a lookaside answer is
            # normally settled by the next one.  One not settled in three
            # probes, or once the indexer is unhealthy for silence, is let go.
            lookaside_max_age=min(3 * config.probe_interval, config.unhealthy_after),
        )
        self.proxy = Proxy(
            self.registry,
            timeout=config.proxy_timeout,
            retries=config.proxy_retries,
            keepalive=config.proxy_keepalive,
            max_body_size=config.max_body_size,
            body_timeout=config.body_timeout,
            observe=self._observe_proxy,
            ssl=client_context(config.ca_file),
        )
        self.metrics = Metrics(self.registry, self.proxy)
        self.saver = Saver(
            config.state_file,
            lambda: {"registry": self.registry.snapshot()},
            delay=SAVE_DELAY,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._probe_session: aiohttp.ClientSession | None = None

    # -- lifecycle ---------------------------------------------------------------

    def restore(self) -> None:
        """Load the state file; a damaged one is set aside and we start empty."""
        path = self.config.state_file
        try:
            document = load_state(path)
            if document is None:
                logger.info("state.none path=%s; starting empty", path)
                return
            self.registry.restore(document.get("registry"))
        except (StateFileError, ValueError) as exc:
            set_aside(path, str(exc))
            return
        logger.info(
            "state.restored path=%s indexers=%d strategy=%s",
            path,
            len(self.registry),
            self.registry.strategy,
        )
        if self.registry.strategy == self.config.strategy:
            return
        # design.md: a restart restores the strategy, including one changed at
        # run time; a --strategy given at start then loses, which its operator
        # should hear about.
        log = logger.warning if self.config.strategy_given else logger.info
        log(
            "balancer.strategy_restored strategy=%s given=%s; the state file's "
            "strategy wins, change it with PUT /v1/strategy (p2plb strategy %s)",
            self.registry.strategy,
            self.config.strategy,
            self.config.strategy,
        )

    async def start(self) -> None:
        await self.proxy.start()
        self._probe_session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.config.probe_timeout),
            connector=aiohttp.TCPConnector(
                limit=256, keepalive_timeout=30, ssl=client_context(self.config.ca_file)
            ),
        )
        # Probe restored indexers at once, so routing resumes without waiting
        # for their next report.
        await self._probe_all()
        self._tasks = [
            asyncio.create_task(self._every(self._tick_interval(), self._tick, "tick")),
            asyncio.create_task(
                self._every(self.config.probe_interval, self._probe_all, "probe")
            ),
            asyncio.create_task(
                self._every(self.config.persist_interval, self.saver.save, "persist")
            ),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.proxy.close()
        if self._probe_session is not None:
            await self._probe_session.close()
        await self.saver.close()

    def _tick_interval(self) -> float:
        return max(0.05, min(1.0, self.config.unhealthy_after / 4))

    async def _every(
        self, interval: float, step: Callable[[], Awaitable[None]], name: str
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except Exception:
                logger.exception("balancer.loop_failed loop=%s", name)

    async def _tick(self) -> None:
        self._log_changes(self.registry.tick())

    def _log_changes(self, changes: list[HealthChange]) -> None:
        changes = changes + self.registry.drain_changes()
        for change in changes:
            if change.removed:
                self.saver.soon()
            if change.removed or change.refused:
                event = "forgotten" if change.removed else "ejection_refused"
                logger.warning(
                    "indexer.%s id=%s reason=%s", event, change.id, change.reason
                )
                continue
            if change.healthy:
                logger.info("indexer.healthy id=%s reason=%s", change.id, change.reason)
            else:
                logger.warning(
                    "indexer.unhealthy id=%s reason=%s", change.id, change.reason
                )
            self.metrics.health_transitions.labels(
                "healthy" if change.healthy else "unhealthy"
            ).inc()

    async def _probe_all(self) -> None:
        entries = self.registry.entries()
        if not entries:
            return
        limit = asyncio.Semaphore(128)

        async def probe(entry: Entry) -> None:
            async with limit:
                ok, detail = await self._probe(entry)
            if self.registry.get(entry.id) is entry:
                self.registry.probe_result(entry.id, ok, detail)

        await asyncio.gather(*(probe(e) for e in entries))
        self._log_changes([])

    async def _probe(self, entry: Entry) -> tuple[bool, str]:
        assert self._probe_session is not None
        try:
            async with self._probe_session.get(f"{entry.address}/healthz") as response:
                await response.read()
                if response.status == 200:
                    self.proxy.note_load(entry.id, response.headers)
                    return True, "probe ok"
                return False, f"probe answered HTTP {response.status}"
        except TimeoutError:
            return False, "probe timed out"
        except aiohttp.ClientError as exc:
            return False, f"probe failed: {_short(exc)}"

    def _observe_proxy(self, indexer_id: str, seconds: float, ok: bool) -> None:
        self.metrics.proxy_latency.labels("ok" if ok else "error").observe(seconds)
        self.metrics.route_decisions.labels(self.registry.strategy, "proxy").inc()

    # -- the HTTP API --------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(
            middlewares=[error_middleware], client_max_size=self.config.max_body_size
        )
        add = app.router
        add.add_get("/", self.home)
        add.add_get("/dashboard", self.dashboard)
        add.add_get("/healthz", self.healthz)
        add.add_get("/openapi.json", openapi_handler("balancer"))
        add.add_get("/metrics", self.get_metrics)
        add.add_post("/v1/indexers", self.register)
        add.add_get("/v1/indexers", self.list_indexers)
        add.add_delete("/v1/indexers/{id}", self.unregister)
        add.add_put("/v1/indexers/{id}/load", self.report)
        add.add_get("/v1/route", self.route)
        add.add_get("/v1/routing-table", self.routing_table)
        add.add_get("/v1/status", self.status)
        add.add_get("/v1/strategy", self.get_strategy)
        add.add_put("/v1/strategy", self.put_strategy)
        # The index API, proxied, each route checked as the indexer checks it.
        add.add_get("/v1/indices", self._forward("read", check_query))
        add.add_get(INDEX, self._forward("read", check_page))
        add.add_post(INDEX + "/items", self._forward("write", check_index))
        add.add_post(INDEX + "/items/remove", self._forward("write", check_index))
        add.add_delete(INDEX + "/items", self._forward("write", check_item_query))
        return app

    def _forward(
        self, op: str, check: Callable[[web.Request], object]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def forward(request: web.Request) -> web.Response:
            # A bad name or query is the caller's mistake whether or not an
            # indexer is up to say so: 400 here, never 503 no_healthy_indexer.
            check(request)
            try:
                return await self.proxy.forward(request, op=op)
            finally:
                # A passive ejection is logged when it happens, not at the
                # next tick.
                self._log_changes([])

        return forward

    async def healthz(self, request: web.Request) -> web.Response:
        check_query(request)
        return json_response({"status": "ok"})

    async def get_metrics(self, request: web.Request) -> web.Response:
        # No check_query: Prometheus lets a scrape config add parameters
        # (params:), and a scrape refused for them would look like an outage.
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def _cluster(self, request: web.Request) -> str:
        """Registering and reporting: the cluster token (or the admin's, when
        one is set: an unset admin token opens the admin's own actions, never
        the cluster's)."""
        tokens = {"cluster": self.config.cluster_token}
        if self.config.admin_token:
            tokens["admin"] = self.config.admin_token
        return require(request.headers.get("Authorization"), tokens)

    def _admin(self, request: web.Request) -> str:
        return require(
            request.headers.get("Authorization"), {"admin": self.config.admin_token}
        )

    async def register(self, request: web.Request) -> web.Response:
        self._cluster(request)
        raw = await read_body(
            request, self.config.max_body_size, self.config.body_timeout
        )
        body = decode_body(raw, RegisterBody).check()

        entry, created = self.registry.register(
            body.id, body.address, body.capacity, zone=body.zone, instance=body.instance
        )

        self.saver.soon()
        logger.info(
            "indexer.registered id=%s address=%s capacity=%d new=%s",
            entry.id,
            entry.address,
            entry.capacity,
            created,
        )
        answer = self._entry_json(entry) | {
            "peers": self._peers(entry.id),
            "peers_version": self.registry.members_version,
        }
        return json_response(answer, status=201 if created else 200)

    async def unregister(self, request: web.Request) -> web.Response:
        # The token before the id, here and in report: a caller without one
        # learns nothing, not even which ids are well formed.
        # Either role may remove, so an unset admin token leaves it open to
        # operators (on loopback, as the config insists).
        role = require(
            request.headers.get("Authorization"),
            {"cluster": self.config.cluster_token, "admin": self.config.admin_token},
        )
        indexer_id = check_indexer_id(request.match_info["id"])
        instance = request.headers.get(INSTANCE_HEADER) or None
        address = request.headers.get(ADDRESS_HEADER) or None
        if address is not None:
            address = check_address(address, field=ADDRESS_HEADER)

        try:
            # With the cluster token an indexer may remove itself only: it
            # proves which one it is by the instance it registered with.
            entry = self.registry.unregister(
                indexer_id,
                instance,
                address=address,
                prove=role == "cluster" and bool(self.config.cluster_token),
            )
        except RequestError as exc:
            if exc.code == "superseded":
                logger.info(
                    "indexer.unregister_refused id=%s instance=%s reason=superseded",
                    indexer_id,
                    instance,
                )
            raise

        self.saver.soon()
        logger.info("indexer.unregistered id=%s address=%s", entry.id, entry.address)
        return web.Response(status=204)

    async def report(self, request: web.Request) -> web.Response:
        self._cluster(request)
        indexer_id = check_indexer_id(request.match_info["id"])
        raw = await read_body(
            request, self.config.max_body_size, self.config.body_timeout
        )
        body = decode_body(raw, LoadBody).check()

        known = self.registry.get(indexer_id)
        before = None if known is None else known.instance
        entry = self.registry.report(
            indexer_id,
            body.load,
            body.state,
            served=body.served,
            address=body.address,
            instance=body.instance,
            service=None if body.service_ms is None else body.service_ms / 1000.0,
        )
        if before is not None and entry.instance != before:
            self.saver.soon()
            logger.info(
                "indexer.instance_changed id=%s address=%s; restarted in place",
                entry.id,
                entry.address,
            )

        # The member list costs O(indexers) to build and send: only when it
        # changed since the version the indexer says it holds.
        version = self.registry.members_version
        if body.peers_version == version:
            return json_response({"peers": None, "peers_version": version})
        peers = self._peers(indexer_id)
        return json_response({"peers": peers, "peers_version": version})

    async def list_indexers(self, request: web.Request) -> web.Response:
        """Every indexer; with ``?members_since=V``, nothing if V is current.

        Indexers poll this for replication; answering ``null`` while the
        member list is unchanged keeps the poll cheap at thousands of them.
        """
        check_query(request, _LIST_QUERY)
        version = self.registry.members_version
        since = request.query.get("members_since")
        if since is not None and version == check_whole_number(
            since, "members_since", 0, MAX_COUNT
        ):
            return json_response({"indexers": None, "members_version": version})
        entries = [self._entry_json(e) for e in self.registry.entries()]
        return json_response({"indexers": entries, "members_version": version})

    async def route(self, request: web.Request) -> web.Response:
        check_query(request, _ROUTE_QUERY)
        op = request.query.get("op", "read")
        if op not in _OPS:
            raise RequestError(
                400, "invalid_field", f'op: must be "read" or "write", got {op!r}'
            )
        if "index" in request.query:
            check_name(request.query["index"], field="index")

        entry = self.registry.route(op)

        self.metrics.route_decisions.labels(self.registry.strategy, "lookaside").inc()
        return json_response({"id": entry.id, "address": entry.address})

    async def routing_table(self, request: web.Request) -> web.Response:
        check_query(request)
        return json_response(self.registry.routing_table())

    async def status(self, request: web.Request) -> web.Response:
        check_query(request)
        return json_response(self.status_json())

    async def dashboard(self, request: web.Request) -> web.Response:
        """``GET /v1/status`` as a page for people; public, as the status is."""
        check_query(request, DASHBOARD_QUERY)
        refresh = refresh_seconds(request.query.get("refresh"))
        page = render(self.status_json(), refresh=refresh)
        return web.Response(
            text=page,
            content_type="text/html",
            charset="utf-8",
            headers=DASHBOARD_HEADERS,
        )

    async def home(self, request: web.Request) -> web.Response:
        """``/`` is where a browser lands: the dashboard, with the refresh asked."""
        check_query(request, DASHBOARD_QUERY)
        location = "/dashboard"
        if "refresh" in request.query:
            # Rebuilt from the number, so nothing the caller sent is reflected.
            location += f"?refresh={refresh_seconds(request.query['refresh'])}"
        raise web.HTTPFound(location)

    def status_json(self) -> dict[str, Any]:
        status = self.registry.status()
        indexers = status.pop("indexers")
        status["uptime_seconds"] = round(time.monotonic() - self.started, 1)
        status["strategy"] = status.pop("strategy")
        status["indexers"] = indexers
        return status

    async def get_strategy(self, request: web.Request) -> web.Response:
        check_query(request)
        return json_response({"strategy": self.registry.strategy})

    async def put_strategy(self, request: web.Request) -> web.Response:
        self._admin(request)
        check_query(request)
        raw = await read_body(
            request, self.config.max_body_size, self.config.body_timeout
        )
        body = decode_body(raw, StrategyBody)

        previous = self.registry.strategy
        self.registry.set_strategy(body.strategy)
        self.saver.soon()

        logger.info("balancer.strategy_changed from=%s to=%s", previous, body.strategy)
        return json_response({"strategy": self.registry.strategy})

    def _entry_json(self, entry: Entry) -> dict[str, Any]:
        # Never the instance: it is what proves an indexer's own DELETE with
        # the cluster token, so only its process may know it.
        return {
            "id": entry.id,
            "address": entry.address,
            "capacity": entry.capacity,
            "zone": entry.zone,
            "state": entry.state,
            "healthy": entry.health.healthy,
            "health_reason": entry.health.describe(time.monotonic()),
            "load": entry.load,
        }

    def _peers(self, indexer_id: str) -> list[dict[str, Any]]:
        return [
            {
                "id": e.id,
                "address": e.address,
                "state": e.state,
                "healthy": e.health.healthy,
            }
            for e in self.registry.entries()
            if e.id != indexer_id
        ]


def _short(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientError):
        # As the client says it: an untrusted CA, a refused connection...
        return describe_failure(exc)
    return str(exc) or type(exc).__name__


async def run_balancer(config: BalancerConfig) -> None:
    """Restore, serve until a signal, then save the state (design.md)."""
    from p2plb.lifecycle import bind, run_server

    listener = bind(
        config.host, config.port, server_context(config.tls_cert, config.tls_key)
    )
    balancer = Balancer(config)
    balancer.restore()
    try:  # a state file that cannot be written is a setup error: say so now
        save_state(config.state_file, {"registry": balancer.registry.snapshot()})
    except OSError as exc:
        listener.sock.close()
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"--state-file: cannot write {config.state_file}: {reason}"
        ) from exc

    async def started() -> None:
        await balancer.start()
        logger.info(
            "balancer.started url=%s strategy=%s state_file=%s indexers=%d instance=%s",
            listener.url,
            balancer.registry.strategy,
            config.state_file,
            len(balancer.registry),
            balancer.proxy.via,
        )

    async def stopped() -> None:
        await balancer.stop()
        logger.info("balancer.stopped state_file=%s", config.state_file)

    await run_server(
        balancer.make_app(),
        listener,
        shutdown_timeout=config.shutdown_timeout,
        idle_timeout=config.idle_timeout,
        on_started=started,
        after_stop=stopped,
    )
