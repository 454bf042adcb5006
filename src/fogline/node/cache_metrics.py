"""Prometheus view of the node's edge caches, one label set per site, read at scrape time.

- `fogline_cache_requests_total{site,result}`: requests by how they were answered
  (`cache_proxy.RESULTS`: hit, miss, stale, revalidated, stale_if_error, pass, error,
  only_if_cached_miss).
- `fogline_cache_stale_served_total{site,reason}`: stale responses served, by why
  (`cache_proxy.STALE_REASONS`); `origin_unreachable` and `origin_timeout` are the node
  serving through a partition from the origin, as its `X-Cache: STALE-IF-ERROR` says.
- `fogline_cache_origin_errors_total{site}`: origin exchanges that failed (no answer, a
  timeout, or a 500/502/503/504).
- `fogline_cache_collapsed_total{site}`: requests that waited on another's exchange.
- `fogline_cache_bytes{site,tier}` and `fogline_cache_objects{site,tier}`: what the
  memory and disk tiers hold.

The scrape runs on the node's event loop, the stores' owner thread, so reading them
needs no lock. A site closed between scrapes simply disappears from the next one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:  # the cache (httpx among it) loads with the first site, not before
    from fogline.node.cache_proxy import CacheProxy
    from fogline.node.cache_store import CacheStore

Caches = Mapping[str, tuple["CacheProxy", "CacheStore"]]


class CacheCollector(Collector):
    """Every served site's cache counters and sizes; `caches` names them by site."""

    def __init__(self, caches: Callable[[], Caches]) -> None:
        self._caches = caches

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "fogline_cache_requests", "Edge cache requests by how they were answered",
            labels=["site", "result"])
        stale = CounterMetricFamily(
            "fogline_cache_stale_served", "Stale responses served by the edge cache, by "
            "reason (origin_unreachable/origin_timeout: serving through an origin outage)",
            labels=["site", "reason"])
        origin_errors = CounterMetricFamily(
            "fogline_cache_origin_errors", "Origin exchanges that failed (no answer, "
            "timeout, or 500/502/503/504)", labels=["site"])
        collapsed = CounterMetricFamily(
            "fogline_cache_collapsed", "Requests that shared another request's origin "
            "exchange", labels=["site"])
        size = GaugeMetricFamily("fogline_cache_bytes", "Bytes held by the edge cache",
                                 labels=["site", "tier"])
        objects = GaugeMetricFamily("fogline_cache_objects",
                                    "Stored responses held by the edge cache",
                                    labels=["site", "tier"])
        for site, (proxy, store) in sorted(self._caches().items()):
            for result, count in proxy.results().items():
                requests.add_metric([site, result], count)
            for reason, count in proxy.stale_served().items():
                stale.add_metric([site, reason], count)
            counts = proxy.stats()
            origin_errors.add_metric([site], counts["origin_errors"])
            collapsed.add_metric([site], counts["collapsed"])
            stats = store.stats()
            size.add_metric([site, "memory"], stats.memory_bytes)
            size.add_metric([site, "disk"], stats.disk_bytes)
            objects.add_metric([site, "memory"], stats.memory_entries)
            objects.add_metric([site, "disk"], stats.disk_entries)
        yield from (requests, stale, origin_errors, collapsed, size, objects)
