"""The hub API's routing table: `GET /v1/routes[?app=NAME | ?site=NAME]` (admin token).

The JSON shape is stable (clients, the gateway and DNS or load-balancer exporters read
it): `{"generated_at", "heartbeat_interval_s", "routes": [{"node_id", "region", "tier",
"endpoint", "health", "serving", "load": {"cpu_percent", "http_inflight", "http_rps"},
"hub_rtt_ms", "apps": [{"name", "revision", "state"}], "sites": [{"name", "hosts",
"path_prefixes"}], "last_seen_s", "interval_s", "user_rtt_ms": {location: ms}}]}`; see
docs/routing.md. `POST /v1/routes/rtt` takes clients' measurements for `user_rtt_ms`.
"""

# No `from __future__ import annotations`: FastAPI resolves annotations at definition.
import re
from typing import Any, Protocol

import msgspec
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from pydantic import BaseModel, Field

from fogline.clock import Clock
from fogline.core.routing import USER_RTT_NODES_MAX, check_rtt_report
from fogline.errors import ConfigError, NotFoundError
from fogline.hub.deployments import HubDeployments
from fogline.hub.routes import RouteTables
from fogline.hub.store import HubStore

# App names as manifests allow them, site names as fogline.site_spec does.
_APP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_SITE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class RttReport(BaseModel):
    location: str = Field(max_length=64)
    rtt_ms: dict[str, Any] = Field(max_length=USER_RTT_NODES_MAX)


class RouteOperations(Protocol):
    heartbeat_interval_s: float
    deployments: HubDeployments


def add_route_routes(app: FastAPI, store: HubStore, hub: RouteOperations, clock: Clock,
                     admin: Any) -> None:
    tables: list[RouteTables] = []

    def route_tables() -> RouteTables:
        # Built at the first request: the hub's deployments exist by then.
        if not tables:
            tables.append(RouteTables(store, hub.deployments.store, hub.heartbeat_interval_s))
        return tables[0]

    @app.get("/v1/routes")
    def routes(_: admin, app: str | None = None, site: str | None = None) -> Response:
        """Every node as a routing target; `app` or `site` keeps the nodes that run that
        app or front that site."""
        if app is not None and site is not None:
            raise HTTPException(422, "ask for one of app or site, not both")
        if app is not None and not _APP.match(app):
            raise HTTPException(422, f"invalid app name {app!r}")
        if site is not None and not _SITE.match(site):
            raise HTTPException(422, f"invalid site name {site!r}")
        tables = route_tables()
        if site is not None and site not in tables.site_names():
            raise NotFoundError(f"no site {site!r}")
        table = tables.table(clock.now(), clock.monotonic(), app=app, site=site)
        return Response(msgspec.json.encode(table), media_type="application/json")

    @app.post("/v1/routes/rtt", status_code=202)
    def report_rtt(body: RttReport, _: admin) -> dict[str, Any]:
        """A client's measured RTT to nodes, from its location (a region, a network):
        the table shows each node's running average per location as `user_rtt_ms`."""
        try:
            location, rtt_ms = check_rtt_report(body.location, body.rtt_ms)
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from exc
        recorded = route_tables().record_rtt(location, rtt_ms, clock.now())
        return {"location": location, "recorded": recorded,
                "ignored": len(rtt_ms) - recorded}
