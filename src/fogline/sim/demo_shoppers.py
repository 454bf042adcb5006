"""The demo's shoppers: per region, users browsing the catalog through `fogline.client`.

They run in a process of their own (`python -m fogline.sim.demo_shoppers CONFIG`), like
the factory's users (demo_users), so the latency they measure is not the demo loop's.
Each region's shoppers hold one `Client`: it reads the hub's routing table, probes the
nodes that front a catalog site through the region's own WAN links (the `resolve` map:
a node's endpoint -> the link from this region to it), and sends each request to the
best node, failing over when one dies. Requests go out on a fixed schedule (open loop).

Per region the stats say: outcomes by second, X-Cache counts, latency of hits and of
the rest (origin trips), which node served and when the choice changed, and, for the
purged category, which price version each node served when, so the demo can check that
no node served a purged price after it applied the purge. The stats go to a JSON file,
replaced atomically every half second and once more at exit.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fogline.client import Client
from fogline.core.routing import Route
from fogline.errors import ConfigError, FoglineError
from fogline.sim.demo_users import sorted_percentile
from fogline.sim.procs import python_module, run_reporting

REQUEST_TIMEOUT_S = 3.0
WRITE_INTERVAL_S = 0.5
LATENCIES_MAX = 200_000
SITE_PREFIX = "catalog-"
WATCHED_CATEGORY = "shoes"  # the category whose prices the demo changes and purges


def item_path(rng: random.Random, items: int, stock_share: float) -> str:
    """A popular-first pick: item k with probability ~ 1/k (Zipf-like)."""
    index = min(items, int(items ** rng.random()))
    if rng.random() < stock_share:
        return f"/catalog/stock/{index}"
    return f"/catalog/items/{index}"


def serves_catalog(route: Route) -> bool:
    return any(site.name.startswith(SITE_PREFIX) for site in route.sites)


@dataclass
class RegionStats:
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    by_second: dict[int, list[int]] = field(default_factory=dict)
    x_cache: dict[str, int] = field(default_factory=dict)
    hit_ms: list[float] = field(default_factory=list)
    origin_ms: list[float] = field(default_factory=list)
    served_by: dict[str, int] = field(default_factory=dict)
    # (wall time the answer came, node) each time the serving node changed.
    switches: list[tuple[float, str]] = field(default_factory=list)
    # node -> price version of the watched category -> [first, last] wall time served
    versions: dict[str, dict[int, list[float]]] = field(default_factory=dict)

    def record(self, at_s: float, latency_ms: float, node: str, x_cache: str,
               version: int | None) -> None:
        self.ok += 1
        self.by_second.setdefault(int(at_s), [0, 0])[0] += 1
        self.x_cache[x_cache] = self.x_cache.get(x_cache, 0) + 1
        bucket = self.hit_ms if x_cache in ("HIT", "STALE", "STALE-IF-ERROR") else \
            self.origin_ms
        if len(bucket) < LATENCIES_MAX:
            bisect.insort(bucket, latency_ms)
        self.served_by[node] = self.served_by.get(node, 0) + 1
        if not self.switches or self.switches[-1][1] != node:
            self.switches.append((at_s + latency_ms / 1000, node))
        if version is not None:
            seen = self.versions.setdefault(node, {}).setdefault(version, [at_s, at_s])
            seen[1] = at_s

    def fail(self, at_s: float, error: str) -> None:
        self.failed += 1
        self.by_second.setdefault(int(at_s), [0, 0])[1] += 1
        self.errors[error] = self.errors.get(error, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        def pct(values: list[float], q: float) -> float | None:
            value = sorted_percentile(values, q)
            return None if value is None else round(value, 3)

        return {
            "ok": self.ok, "failed": self.failed, "errors": self.errors,
            "x_cache": self.x_cache, "served_by": self.served_by,
            "hit_p50_ms": pct(self.hit_ms, 50), "hit_p99_ms": pct(self.hit_ms, 99),
            "origin_p50_ms": pct(self.origin_ms, 50), "origin_p99_ms": pct(self.origin_ms, 99),
            "switches": self.switches,
            "versions": {node: {str(v): span for v, span in seen.items()}
                         for node, seen in self.versions.items()},
            "by_second": {str(s): counts for s, counts in self.by_second.items()},
        }


class Shoppers:
    """One region's shoppers: a client and an open-loop schedule of requests."""

    def __init__(self, region: str, spec: dict[str, Any], hub: str, token: str,
                 items: int, stock_share: float) -> None:
        self.region = region
        self.rate_per_s = float(spec["rate_per_s"])
        self.items, self.stock_share = items, stock_share
        self.rng = random.Random(region)
        self.stats = RegionStats()
        self.client = Client(hub=hub, token=token, where=serves_catalog, report_as=region,
                             resolve=dict(spec["resolve"]), probe_interval_s=0.5,
                             timeout_s=REQUEST_TIMEOUT_S, connect_timeout_s=1.0)

    async def one(self, path: str) -> None:
        started = time.perf_counter()
        at_s = time.time()
        try:
            response = await self.client.get(path)
        except FoglineError as exc:
            self.stats.fail(at_s, type(exc).__name__)
            return
        latency_ms = (time.perf_counter() - started) * 1000
        if response.status_code != 200:
            self.stats.fail(at_s, f"http {response.status_code}")
            return
        version = None
        if path.startswith("/catalog/items/"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                body = response.json()
                if body["category"] == WATCHED_CATEGORY:
                    version = int(body["version"])
        self.stats.record(at_s, latency_ms, str(response.extensions.get("fogline_node_id")),
                          response.headers.get("x-cache", ""), version)

    async def run(self, stop: asyncio.Event) -> None:
        tasks: set[asyncio.Task[None]] = set()
        async with self.client:
            try:
                interval_s = 1.0 / self.rate_per_s
                next_s = time.monotonic()
                while not stop.is_set():
                    task = asyncio.create_task(self.one(item_path(self.rng, self.items,
                                                                  self.stock_share)))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    next_s += interval_s
                    await asyncio.sleep(max(0.0, next_s - time.monotonic()))
            finally:  # nothing may use the client once it closes
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)


def write_stats(target: Path, shoppers: list[Shoppers]) -> None:
    body = {"written_at_s": time.time(),
            "regions": {s.region: {**s.stats.to_dict(), "node": s.client.current,
                                   "failovers": s.client.stats.failovers}
                        for s in shoppers}}
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(body))
    os.replace(temporary, target)


async def serve_shoppers(config: dict[str, Any]) -> None:
    target = Path(config["stats_path"])
    target.parent.mkdir(parents=True, exist_ok=True)
    shoppers = [Shoppers(region, spec, config["hub"], config["token"], config["items"],
                         config["stock_share"]) for region, spec in config["regions"].items()]
    await run_reporting([s.run for s in shoppers], lambda: write_stats(target, shoppers),
                        WRITE_INTERVAL_S)


def shoppers_process(config: dict[str, Any], log_path: Path
                     ) -> contextlib.AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """The shoppers' process, running until the context exits."""
    return python_module("fogline.sim.demo_shoppers", config, log_path)


def main() -> None:
    from fogline.runtime import run_service

    if len(sys.argv) != 2:
        raise ConfigError("usage: python -m fogline.sim.demo_shoppers CONFIG_JSON")
    config = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    gc.freeze()  # the measuring instrument: as demo_users
    gc.set_threshold(50_000, 20, 100)
    run_service(lambda: serve_shoppers(config))


if __name__ == "__main__":
    main()
