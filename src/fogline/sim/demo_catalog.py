"""The demo's cache story: a catalog origin beside the hub, cached by every regional node.

The origin serves items (`/catalog/items/<n>`: a price per category, fresh for 5
minutes, tagged `category-<c>`) and stock levels (`/catalog/stock/<n>`: fresh for 5 s,
usable stale if the origin fails). Each region's nodes reach it over their region's
WAN link, so a miss costs the region's RTT, and each region has its own `kind: Site`
(`catalog-<region>`, placed by region) because the origin URL a node uses is that link.
Shoppers in every region browse through `fogline.client` (demo_shoppers), each region
reaching every node through its own links: its own region's node is near, the others
are as far as both regions are from the hub.

On the timeline: the eu-west partition (demo.py) also cuts that region from the origin,
so its node answers stock from the cache, stale (`X-Cache: STALE-IF-ERROR`); at
`purge_at_s` shoe prices change at the origin and a fleet-wide purge of
`category-shoes` goes out through the hub; at `kill_at_s` one node is killed with
SIGKILL and its region's shoppers are served elsewhere; `restart_after_s` later it
starts again (same data, same port) and its shoppers come back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fogline.sim.demo_shoppers import WATCHED_CATEGORY, shoppers_process
from fogline.sim.demo_users import read_stats
from fogline.sim.wan import LinkConfig, WanEmulator, WanLink
from fogline.transport.http_server import serve_http

ITEMS = 200
CATEGORIES = ("shoes", "hats", "bags", "coats")
SITE_READY_TIMEOUT_S = 30.0
PURGE_WAIT_S = 10.0


@dataclass(frozen=True)
class CacheSettings:
    shoppers_per_s: float = 20.0  # per region
    stock_share: float = 0.1
    purge_at_s: float = 50.0
    kill_at_s: float = 60.0
    kill_node: str = ""  # default: the first node of the last region
    restart_after_s: float = 6.0
    local_rtt_ms: float = 4.0  # a shopper to a node of its own region


@dataclass
class CacheNode:
    name: str
    region: str
    rtt_ms: float  # to the hub, and to the origin beside it
    endpoint: str


class CatalogOrigin:
    """The origin: prices change per category when `bump` says so."""

    def __init__(self) -> None:
        self.versions = dict.fromkeys(CATEGORIES, 1)
        self.requests = 0

    def category(self, item: int) -> str:
        return CATEGORIES[item % len(CATEGORIES)]

    async def page(self, request: Request) -> JSONResponse:
        self.requests += 1
        kind, raw = request.path_params["kind"], request.path_params["item"]
        if kind not in ("items", "stock") or not raw.isdigit():
            return JSONResponse({"error": "no such page"}, status_code=404,
                                headers={"Cache-Control": "max-age=60"})
        item = int(raw)
        category = self.category(item)
        if kind == "stock":
            return JSONResponse(
                {"item": item, "in_stock": (item * 7 + int(time.time() / 5)) % 40},
                headers={"Cache-Control": "max-age=5, stale-if-error=600",
                         "Cache-Tag": "catalog,stock"})
        version = self.versions[category]
        return JSONResponse(
            {"item": item, "category": category, "version": version,
             "price": round((10 + item % 37) * (1 + 0.1 * (version - 1)), 2)},
            headers={"Cache-Control": "max-age=300, stale-if-error=600",
                     "Cache-Tag": f"catalog,category-{category},item-{item}"})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/catalog/{kind}/{item}", self.page)])


@dataclass
class CacheStory:
    settings: CacheSettings
    note: Callable[..., None]
    kill: Callable[[str], Awaitable[None]]
    restart: Callable[[str], Awaitable[None]]
    origin: CatalogOrigin = field(default_factory=CatalogOrigin)
    nodes: list[CacheNode] = field(default_factory=list)
    origin_links: dict[str, WanLink] = field(default_factory=dict)
    shoppers: dict[str, Any] = field(default_factory=dict)
    stats_path: Path | None = None
    purge: dict[str, Any] = field(default_factory=dict)
    killed: dict[str, Any] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # node id -> name, from the demo
    _config: dict[str, Any] = field(default_factory=dict)

    @property
    def kill_target(self) -> CacheNode:
        name = self.settings.kill_node or next(
            n.name for n in self.nodes if n.region == self.nodes[-1].region)
        return next(n for n in self.nodes if n.name == name)

    def region_links(self, region: str) -> list[WanLink]:
        """What a partition of `region` cuts here: its link to the origin."""
        return [self.origin_links[region]] if region in self.origin_links else []

    # Setup --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self, wan: WanEmulator, api: httpx.AsyncClient, hub_url: str,
                      admin_token: str, nodes: list[CacheNode], data: Path,
                      ) -> AsyncIterator[None]:
        """Origin, sites and shoppers, while the context is open."""
        self.nodes = nodes
        async with serve_http(self.origin.app(), "127.0.0.1", 0) as port:
            await self._sites(wan, api, port)
            await self._wait_served()
            self.stats_path = data / "shoppers" / "stats.json"
            self._config = {
                "stats_path": str(self.stats_path), "hub": hub_url, "token": admin_token,
                "items": ITEMS, "stock_share": self.settings.stock_share,
                "regions": {region: {"rate_per_s": self.settings.shoppers_per_s,
                                     "resolve": self._links_from(wan, region)}
                            for region in dict.fromkeys(n.region for n in nodes)}}
            self.note("catalog", sites=[f"catalog-{r}" for r in self._config["regions"]],
                      items=ITEMS)
            try:
                async with shoppers_process(self._config, data / "shoppers.log"):
                    yield
            finally:
                self.shoppers = read_stats(self.stats_path) or self.shoppers

    async def _sites(self, wan: WanEmulator, api: httpx.AsyncClient, port: int) -> None:
        for node in self.nodes:
            if node.region in self.origin_links:
                continue
            link = wan.add_link(f"origin/{node.region}", ("127.0.0.1", port),
                                LinkConfig(latency_ms=node.rtt_ms / 2))
            self.origin_links[node.region] = link
            response = await api.post("/v1/sites", json={
                "name": f"catalog-{node.region}", "reason": "demo catalog",
                "spec": {"origin": f"http://127.0.0.1:{link.port}",
                         "path_prefixes": ["/catalog"],
                         "cache": {"memory_mb": 16, "disk_mb": 64, "stale_if_error": "10m"},
                         "placement": {"selector": {"regions": [node.region]}}}})
            response.raise_for_status()

    async def _wait_served(self) -> None:
        deadline = time.monotonic() + SITE_READY_TIMEOUT_S
        async with httpx.AsyncClient(timeout=5) as client:
            for node in self.nodes:
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(f"{node.endpoint}/catalog/items/1")
                                ).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{node.name} did not serve the catalog")
                    await asyncio.sleep(0.2)

    def _links_from(self, wan: WanEmulator, region: str) -> dict[str, str]:
        """Links from `region`'s shoppers to every node: the resolve map of their client."""
        rtt_here = next(n.rtt_ms for n in self.nodes if n.region == region)
        resolve = {}
        for node in self.nodes:
            host, _, port = node.endpoint.removeprefix("http://").rpartition(":")
            rtt = self.settings.local_rtt_ms if node.region == region else \
                rtt_here + node.rtt_ms
            link = wan.add_link(f"shop/{region}/{node.name}", (host, int(port)),
                                LinkConfig(latency_ms=rtt / 2))
            resolve[node.endpoint] = f"http://127.0.0.1:{link.port}"
        return resolve

    # Timeline -----------------------------------------------------------------------

    async def step(self, api: httpx.AsyncClient, now_s: float) -> None:
        settings = self.settings
        if not self.purge and now_s >= settings.purge_at_s:
            await self._purge(api)
        if self.purge and "done" not in self.purge:
            await self._purge_status(api)
        if not self.killed and now_s >= settings.kill_at_s:
            target = self.kill_target
            self.killed = {"node": target.name, "region": target.region,
                           "killed_at_s": time.time()}
            await self.kill(target.name)
            self.note("node killed", node=target.name, signal="SIGKILL")
        if self.killed and "restarted_at_s" not in self.killed and \
                now_s >= settings.kill_at_s + settings.restart_after_s:
            self.killed["restarted_at_s"] = time.time()
            await self.restart(self.killed["node"])
            self.note("node restarted", node=self.killed["node"])
        if self.stats_path is not None:
            self.shoppers = read_stats(self.stats_path) or self.shoppers

    async def _purge(self, api: httpx.AsyncClient) -> None:
        self.origin.versions[WATCHED_CATEGORY] += 1
        issued_s = time.time()
        response = await api.post("/v1/purges", json={
            "kind": "tag", "values": [f"category-{WATCHED_CATEGORY}"],
            "reason": "demo: new shoe prices"})
        response.raise_for_status()
        body = response.json()
        self.purge = {"seq": body["seq"], "tag": f"category-{WATCHED_CATEGORY}",
                      "issued_at_s": issued_s, "targets": body["targets"],
                      "new_version": self.origin.versions[WATCHED_CATEGORY]}
        self.note("purge", tag=self.purge["tag"], seq=body["seq"], targets=body["targets"])

    async def _purge_status(self, api: httpx.AsyncClient) -> None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            status = (await api.get(f"/v1/purges/{self.purge['seq']}")).json()
            self.purge.update(applied=status["applied"], pending=status["pending"],
                              latency_ms=status["latency_ms"],
                              nodes={n["node"]: n["applied_at_s"] for n in status["nodes"]})
            if status["pending"] == 0 or \
                    time.time() - self.purge["issued_at_s"] > PURGE_WAIT_S:
                self.purge["done"] = True
                self.note("purge applied", seq=self.purge["seq"], applied=status["applied"],
                          targets=status["targets"], latency_ms=status["latency_ms"])

    # Figures ------------------------------------------------------------------------

    def regions(self) -> dict[str, dict[str, Any]]:
        return dict(self.shoppers.get("regions", {}))

    def hit_ratio(self) -> float | None:
        hits = total = 0
        for stats in self.regions().values():
            counts = stats.get("x_cache", {})
            total += sum(counts.values())
            hits += sum(counts.get(k, 0) for k in ("HIT", "STALE", "STALE-IF-ERROR"))
        return round(hits / total, 4) if total else None

    def stale_after_purge(self) -> list[dict[str, Any]]:
        """Old shoe prices a node served after it had applied the purge (must be none)."""
        applied = self.purge.get("nodes", {})
        old = str(self.purge.get("new_version", 0) - 1)
        found = []
        for region, stats in self.regions().items():
            for node_id, versions in stats.get("versions", {}).items():
                name = self._name_of(node_id)
                at_s = applied.get(name)
                span = versions.get(old)
                if at_s is not None and span is not None and span[1] > at_s:
                    found.append({"region": region, "node": name, "last_old_s": span[1],
                                  "applied_at_s": at_s})
        return found

    def kill_figures(self) -> dict[str, Any]:
        """For the killed node's region: the first answer from elsewhere after the kill,
        the failed requests, and when the shoppers were back on it."""
        if not self.killed:
            return {}
        stats = self.regions().get(self.killed["region"], {})
        killed_at = self.killed["killed_at_s"]
        elsewhere = back = None
        for at_s, node_id in stats.get("switches", []):
            name = self._name_of(node_id)
            if at_s > killed_at and name != self.killed["node"] and elsewhere is None:
                elsewhere = {"node": name, "after_s": round(at_s - killed_at, 3)}
            if elsewhere is not None and at_s > killed_at and name == self.killed["node"]:
                back = round(at_s - killed_at, 3)
        window = range(int(killed_at) - 1, int(killed_at + self.settings.restart_after_s) + 15)
        by_second = stats.get("by_second", {})
        return {**self.killed, "served_elsewhere": elsewhere, "back_on_it_after_s": back,
                "failed_requests": sum(by_second.get(str(s), [0, 0])[1] for s in window),
                "ok_requests": sum(by_second.get(str(s), [0, 0])[0] for s in window)}

    def _name_of(self, node_id: str) -> str:
        return self.names.get(node_id, node_id)

    def summary(self) -> dict[str, Any]:
        regions = {}
        for region, stats in self.regions().items():
            regions[region] = {k: stats.get(k) for k in (
                "ok", "failed", "errors", "x_cache", "hit_p50_ms", "hit_p99_ms",
                "origin_p50_ms", "origin_p99_ms", "failovers")}
            regions[region]["served_by"] = {self._name_of(k): v for k, v in
                                            stats.get("served_by", {}).items()}
        purge = {k: v for k, v in self.purge.items() if k != "done"}
        if purge:
            purge["stale_after_purge"] = self.stale_after_purge()
        return {"hit_ratio": self.hit_ratio(), "origin_requests": self.origin.requests,
                "regions": regions, "purge": purge, "kill": self.kill_figures()}
