"""The node's own HTTP endpoints: `/healthz` and `/metrics`, served with the hub down."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fogline import __version__


@dataclass
class NodeState:
    """What the agent knows about itself, shared with its HTTP endpoints."""

    started_at_s: float
    node_id: str = ""
    name: str = ""
    region: str = ""
    endpoint: str = ""
    hub_connected: bool = False
    revoked: bool = False
    heartbeats_sent: int = 0
    last_heartbeat_s: float = 0.0
    renewals: int = 0
    hub_rtt_ms: float = 0.0

    @property
    def status(self) -> str:
        return "revoked" if self.revoked else "ok"


def create_node_app(state: NodeState) -> Starlette:
    registry = CollectorRegistry()
    Gauge("fogline_node_hub_connected", "1 while the NATS link to the hub is up",
          registry=registry).set_function(lambda: float(state.hub_connected))
    Gauge("fogline_node_heartbeats_sent", "Heartbeats sent since start",
          registry=registry).set_function(lambda: float(state.heartbeats_sent))
    Gauge("fogline_node_revoked", "1 once the hub has revoked this node",
          registry=registry).set_function(lambda: float(state.revoked))
    Gauge("fogline_node_credential_renewals", "Certificate and JWT renewals since start",
          registry=registry).set_function(lambda: float(state.renewals))

    async def healthz(_request: Request) -> JSONResponse:
        body = {
            "status": state.status, "node_id": state.node_id, "name": state.name,
            "region": state.region, "hub_connected": state.hub_connected,
            "heartbeats_sent": state.heartbeats_sent, "hub_rtt_ms": state.hub_rtt_ms,
            "last_heartbeat_s": state.last_heartbeat_s, "version": __version__,
        }
        return JSONResponse(body, status_code=200 if not state.revoked else 503)

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/healthz", healthz), Route("/metrics", metrics)])
