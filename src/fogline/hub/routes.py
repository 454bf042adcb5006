"""The hub's routing table: every node as a routing target, for clients, gateways, DNS
and load balancers (`GET /v1/routes`, `fogline get routes`).

`route_table` is pure: node rows as the store keeps them (health, endpoint, the load
and apps of the latest heartbeat), the sites placed on each node, and the time. A node
serves when its health is ready or degraded, its last heartbeat is fresh (see
`fogline.core.routing.is_fresh`) and it has an endpoint; in a table asked for one app,
only when that app runs there too. `RouteTables` is the IO glue: it reads the store,
and keeps a computed table for a moment so many clients refreshing at once cost the
database one read.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from fogline.core.routing import (
    SERVING_HEALTH,
    USER_RTT_FRESH_S,
    Route,
    RouteApp,
    RouteLoad,
    RouteSite,
    RouteTable,
    is_fresh,
    merge_rtt,
)
from fogline.hub.deploy_store import DeployStore
from fogline.hub.deployments import sites_by_node
from fogline.hub.store import HubStore, apps_of, nodes, upsert, user_rtt
from fogline.protocol import SiteSetting

# A table is reused for this long: well under any heartbeat interval.
TABLE_REUSE_S = 0.2


def _number(load: Mapping[str, Any], key: str) -> float:
    value = load.get(key)
    return float(value) if isinstance(value, int | float) else 0.0


def route_of(row: Mapping[str, Any], sites: tuple[SiteSetting, ...], now_s: float,
             app: str | None = None, user_rtt_ms: Mapping[str, float] | None = None) -> Route:
    load = row.get("load") or {}
    apps = tuple(RouteApp(a.name, a.revision, a.state) for a in apps_of(row.get("apps")))
    serving = (row["status"] in SERVING_HEALTH and bool(row["endpoint"])
               and is_fresh(row["last_seen_s"], row["interval_s"], now_s))
    if app is not None:
        serving = serving and any(a.name == app and a.state == "running" for a in apps)
    hub_rtt = load.get("hub_rtt_ms")
    return Route(
        node_id=row["id"], region=row["region"], tier=row["tier"], endpoint=row["endpoint"],
        health=row["status"], serving=serving,
        load=RouteLoad(cpu_percent=_number(load, "cpu_percent"),
                       http_inflight=int(_number(load, "http_inflight")),
                       http_rps=_number(load, "http_rps")),
        # 0 means the node has not measured it yet.
        hub_rtt_ms=float(hub_rtt) if isinstance(hub_rtt, int | float) and hub_rtt > 0
        else None,
        apps=apps,
        sites=tuple(RouteSite(s.name, s.hosts, s.path_prefixes) for s in sites),
        last_seen_s=row["last_seen_s"], interval_s=row["interval_s"],
        user_rtt_ms=dict(user_rtt_ms or {}))


def route_table(nodes: list[Mapping[str, Any]],
                sites: Mapping[str, tuple[SiteSetting, ...]], now_s: float,
                heartbeat_interval_s: float, app: str | None = None,
                site: str | None = None,
                user_rtt_ms: Mapping[str, Mapping[str, float]] | None = None) -> RouteTable:
    """The table for every node, or only those with `app` (any state) or `site`
    placed on them. Revoked nodes are left out: they are no longer in the fleet."""
    routes = []
    for row in nodes:
        if row["status"] == "revoked":
            continue
        node_sites = sites.get(row["id"], ())
        if site is not None and not any(s.name == site for s in node_sites):
            continue
        route = route_of(row, node_sites, now_s, app, (user_rtt_ms or {}).get(row["id"]))
        if app is not None and not any(a.name == app for a in route.apps):
            continue
        routes.append(route)
    return RouteTable(generated_at=now_s, heartbeat_interval_s=heartbeat_interval_s,
                      routes=tuple(routes))


class RouteTables:
    """Routing tables from the store, each computation reused for TABLE_REUSE_S."""

    def __init__(self, store: HubStore, deploy_store: DeployStore,
                 heartbeat_interval_s: float) -> None:
        self.store = store
        self.deploy_store = deploy_store
        self.heartbeat_interval_s = heartbeat_interval_s
        self._lock = threading.Lock()  # API handlers run in a thread pool
        self._cached: tuple[float, list[dict[str, Any]],
                            dict[str, tuple[SiteSetting, ...]],
                            dict[str, dict[str, float]]] | None = None

    def table(self, now_s: float, monotonic_s: float, app: str | None = None,
              site: str | None = None) -> RouteTable:
        with self._lock:
            cached = self._cached
            if cached is None or monotonic_s - cached[0] > TABLE_REUSE_S:
                cached = (monotonic_s, self.store.list_nodes(), self._sites(),
                          self._user_rtt(now_s))
                self._cached = cached
        _, rows, sites, rtts = cached
        return route_table(rows, sites, now_s, self.heartbeat_interval_s, app, site, rtts)

    def _user_rtt(self, now_s: float) -> dict[str, dict[str, float]]:
        """node id -> location -> ms, of reports fresher than USER_RTT_FRESH_S."""
        query = sa.select(user_rtt.c.node_id, user_rtt.c.location, user_rtt.c.rtt_ms).where(
            user_rtt.c.updated_at_s >= now_s - USER_RTT_FRESH_S)
        found: dict[str, dict[str, float]] = {}
        with self.store.engine.connect() as conn:
            for node_id, location, rtt_ms in conn.execute(query):
                found.setdefault(node_id, {})[location] = round(rtt_ms, 3)
        return found

    def record_rtt(self, location: str, rtt_ms: Mapping[str, float], now_s: float) -> int:
        """Fold a client's report into the running averages; how many nodes it named
        that the fleet has (others are ignored)."""
        with self.store.engine.begin() as conn:
            known = set(conn.execute(sa.select(nodes.c.id).where(
                nodes.c.id.in_(list(rtt_ms)), nodes.c.status != "revoked")).scalars())
            before = {node_id: (ms, reports) for node_id, ms, reports in conn.execute(
                sa.select(user_rtt.c.node_id, user_rtt.c.rtt_ms, user_rtt.c.reports).where(
                    user_rtt.c.location == location, user_rtt.c.node_id.in_(known)))}
            rows = [{"location": location, "node_id": node_id,
                     "rtt_ms": merge_rtt(before.get(node_id, (None, 0))[0], ms),
                     "reports": before.get(node_id, (None, 0))[1] + 1, "updated_at_s": now_s}
                    for node_id, ms in rtt_ms.items() if node_id in known]
            upsert(conn, user_rtt, rows, ["rtt_ms", "reports", "updated_at_s"])
        return len(rows)

    def site_names(self) -> set[str]:
        return set(self.deploy_store.sites())

    def _sites(self) -> dict[str, tuple[SiteSetting, ...]]:
        rows = self.deploy_store.sites()
        if not rows:
            return {}
        return sites_by_node(rows, [facts for facts, _, _ in self.deploy_store.fleet()])
