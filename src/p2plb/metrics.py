"""Prometheus metrics of a balancer, all named ``p2plb_...``.

Per-indexer figures (load, health, request counters) are read from the registry
when Prometheus scrapes, by a custom collector, so the request path pays nothing
for them; so are the proxy's own counts.  Only what happens per request and has
no home elsewhere (proxy latency, route decisions per strategy, health
transitions) is counted live.

Each balancer owns its own ``CollectorRegistry``, so several can run in one
process (tests) without sharing counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from p2plb.proxy import Proxy
from p2plb.registry import Registry

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Index requests take from well under a millisecond to seconds under overload.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _RegistryCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        entries = self.registry.entries()
        healthy = GaugeMetricFamily(
            "p2plb_indexers_healthy", "Indexers that are healthy now."
        )
        healthy.add_metric([], sum(1 for e in entries if e.health.healthy))
        total = GaugeMetricFamily("p2plb_indexers_total", "Indexers registered now.")
        total.add_metric([], len(entries))

        labels = ["indexer"]
        ratio = GaugeMetricFamily(
            "p2plb_indexer_load_ratio",
            "Estimated load of an indexer relative to its capacity.",
            labels=labels,
        )
        up = GaugeMetricFamily(
            "p2plb_indexer_healthy", "1 if the indexer is healthy.", labels=labels
        )
        served = CounterMetricFamily(
            "p2plb_indexer_requests",
            "Requests the indexer reported serving, by any path.",
            labels=labels,
        )
        routed = CounterMetricFamily(
            "p2plb_indexer_routed",
            "Requests this balancer proxied or routed to the indexer.",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "p2plb_indexer_errors",
            "Proxied requests to the indexer that failed.",
            labels=labels,
        )
        service = GaugeMetricFamily(
            "p2plb_indexer_service_seconds",
            "Recent mean time the indexer took to serve one request (queue excluded).",
            labels=labels,
        )
        for entry in entries:
            key = [entry.id]
            ratio.add_metric(key, self.registry.effective_load(entry) / entry.capacity)
            up.add_metric(key, 1.0 if entry.health.healthy else 0.0)
            served.add_metric(key, entry.requests)
            routed.add_metric(key, entry.routed)
            errors.add_metric(key, entry.errors)
            if entry.service is not None:
                service.add_metric(key, entry.service)
        yield from (healthy, total, ratio, up, served, routed, errors, service)


class _ProxyCollector(Collector):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily(
            "p2plb_proxy_retries_refused",
            "Proxied requests not retried on another indexer for want of retry budget.",
        )
        refused.add_metric([], self.proxy.budget_refusals)
        yield refused


class Metrics:
    def __init__(self, registry: Registry, proxy: Proxy | None = None) -> None:
        self.collectors = CollectorRegistry(auto_describe=True)
        self.collectors.register(_RegistryCollector(registry))
        if proxy is not None:
            self.collectors.register(_ProxyCollector(proxy))
        self.route_decisions = Counter(
            "p2plb_route_decisions",
            "Indexers chosen, by strategy and path (proxy or lookaside).",
            ["strategy", "path"],
            registry=self.collectors,
        )
        self.proxy_latency = Histogram(
            "p2plb_proxy_latency_seconds",
            "Time an indexer took to answer a proxied request.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.collectors,
        )
        self.health_transitions = Counter(
            "p2plb_health_transitions",
            "Changes of an indexer's health, by the state it entered.",
            ["to"],
            registry=self.collectors,
        )

    def render(self) -> bytes:
        return generate_latest(self.collectors)
