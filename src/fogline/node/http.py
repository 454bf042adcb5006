"""The node's own HTTP endpoints, served with the hub down.

`/healthz` and `/metrics` are open. `/local/...` reads and writes the node's collections
and requires the node's local token (`DIR/local.token`, mode 0600), because it changes
replicated state.
"""

from __future__ import annotations

import dataclasses
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fogline import __version__
from fogline.errors import ConfigError, FoglineError, NotFoundError, ProtocolError
from fogline.fsutil import write_private
from fogline.node.collections import NodeCollections
from fogline.node.outbox import Outbox

if TYPE_CHECKING:
    from fogline.node.apps.manager import NodeApps
    from fogline.node.deployments import NodeDeployments


def load_local_token(data_dir: Path) -> str:
    path = data_dir / "local.token"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = "fln_" + secrets.token_urlsafe(24)
    write_private(path, token + "\n")
    return token


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
    mqtt_url: str = ""
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def status(self) -> str:
        return "revoked" if self.revoked else "ok"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


async def _apply(collections: NodeCollections, name: str, body: dict[str, Any]) -> None:
    collection = collections.collection(name)
    action = body.get("op")
    if action == "put":
        await collection.put(str(body["key"]), body.get("value"))
    elif action == "delete":
        await collection.delete(str(body["key"]))
    elif action in ("incr", "decr"):
        amount = body.get("amount", 1)
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise ConfigError("amount must be an integer")
        await (collection.incr if action == "incr" else collection.decr)(amount)
    elif action == "add":
        await collection.add(body["value"])
    elif action == "remove":
        await collection.remove(body["value"])
    else:
        raise ConfigError("op must be one of put, delete, incr, decr, add, remove")


def _refused(request: Request, local_token: str) -> JSONResponse | None:
    """401 unless the request carries the node's local token."""
    header = request.headers.get("authorization", "")
    if hmac.compare_digest(header, f"Bearer {local_token}"):
        return None
    return _error(401, "local token required")


def local_routes(get_collections: Callable[[], NodeCollections | None],
                 local_token: str) -> list[Route]:
    async def collections_endpoint(request: Request) -> JSONResponse:
        collections = get_collections()
        if refused := _refused(request, local_token):
            return refused
        if collections is None:
            return _error(503, "node is still starting")
        name = request.path_params.get("name")
        try:
            if name is None:
                return JSONResponse([{"name": d.name, "type": d.type, "scope": d.scope}
                                     for d in collections.definitions()])
            if request.method == "POST":
                try:
                    body = await request.json()
                except ValueError:
                    return _error(422, "body must be JSON")
                if not isinstance(body, dict):
                    return _error(422, "body must be a JSON object")
                try:
                    await _apply(collections, name, body)
                except KeyError as exc:
                    return _error(422, f"missing field {exc}")
            value = collections.collection(name).value()
            if isinstance(value, set):
                value = sorted(value, key=repr)
            return JSONResponse({"name": name, "value": value,
                                 "pending_sync": collections.pending_count()})
        except NotFoundError as exc:
            return _error(404, str(exc))
        except (ConfigError, ProtocolError) as exc:
            return _error(422, str(exc))
        except FoglineError as exc:
            return _error(503, str(exc))

    return [Route("/local/collections", collections_endpoint),
            Route("/local/collections/{name}", collections_endpoint,
                  methods=["GET", "POST"])]


def stream_routes(get_outbox: Callable[[], Outbox | None], local_token: str) -> list[Route]:
    """`POST /local/streams/{stream}` emits `{"record": ...}`; `GET /local/streams`
    shows every stream's backlog, `GET /local/stream-policies` the policy each one
    follows and where it comes from (the hub's Stream manifests, the node, default)."""

    async def streams_endpoint(request: Request) -> JSONResponse:
        outbox = get_outbox()
        if refused := _refused(request, local_token):
            return refused
        if outbox is None:
            return _error(503, "node is still starting")
        name = request.path_params.get("stream")
        if name is None:
            return JSONResponse({stream: msgspec.to_builtins(stats)
                                 for stream, stats in outbox.stats().items()})
        try:
            body = await request.json()
        except ValueError:
            return _error(422, "body must be JSON")
        if not isinstance(body, dict) or "record" not in body:
            return _error(422, 'body must be {"record": ...}')
        try:
            seq = await outbox.emit(name, body["record"])
        except (ConfigError, ProtocolError) as exc:
            return _error(422, str(exc))
        except FoglineError as exc:
            return _error(503, str(exc))
        return JSONResponse({"stream": name, "seq": seq})

    async def policies_endpoint(request: Request) -> JSONResponse:
        outbox = get_outbox()
        if refused := _refused(request, local_token):
            return refused
        if outbox is None:
            return _error(503, "node is still starting")
        names = sorted(set(outbox.policies) | set(outbox.fleet_policies) | set(outbox.stats()))
        return JSONResponse({name: {
            **dataclasses.asdict(outbox.policy(name)),
            "source": "fleet" if name in outbox.fleet_policies else
                      "node" if name in outbox.policies else "default"} for name in names})

    return [Route("/local/streams", streams_endpoint),
            Route("/local/streams/{stream}", streams_endpoint, methods=["POST"]),
            Route("/local/stream-policies", policies_endpoint)]


def app_routes(get_apps: Callable[[], NodeApps | None], local_token: str) -> list[Route]:
    """`GET /local/apps` lists the apps' status and counters; `POST
    /local/apps/{name}/reload` re-reads an app's manifest and replaces its workers."""

    async def apps_endpoint(request: Request) -> JSONResponse:
        if refused := _refused(request, local_token):
            return refused
        apps = get_apps()
        if apps is None:
            return JSONResponse([])
        name = request.path_params.get("name")
        if name is None:
            return JSONResponse([{**msgspec.to_builtins(s.status()),
                                  "stats": msgspec.structs.asdict(s.stats())}
                                 for s in apps.supervisors.values()])
        try:
            status = await apps.reload(name)
        except ConfigError as exc:
            return _error(422, str(exc))
        return JSONResponse(msgspec.to_builtins(status))

    return [Route("/local/apps", apps_endpoint),
            Route("/local/apps/{name}/reload", apps_endpoint, methods=["POST"])]


def deployment_routes(get_deployments: Callable[[], NodeDeployments | None],
                      local_token: str) -> list[Route]:
    """`GET /local/deployments`: the desired state's generation and apps, the revisions
    running, and the revisions refused (with why)."""

    async def deployments_endpoint(request: Request) -> JSONResponse:
        if refused := _refused(request, local_token):
            return refused
        deployments = get_deployments()
        if deployments is None:
            return _error(503, "node is still starting")
        desired = deployments.desired
        return JSONResponse({
            "generation": desired.generation,
            "applied_generation": deployments.applied_generation,
            "desired": msgspec.to_builtins(desired.apps),
            "running": deployments.running(),
            "refusals": msgspec.to_builtins(deployments.refusals()),
        })

    return [Route("/local/deployments", deployments_endpoint)]


def create_node_app(state: NodeState,
                    get_collections: Callable[[], NodeCollections | None] = lambda: None,
                    local_token: str = "",
                    get_outbox: Callable[[], Outbox | None] = lambda: None,
                    get_apps: Callable[[], NodeApps | None] = lambda: None,
                    get_deployments: Callable[[], NodeDeployments | None] = lambda: None,
                    ) -> Starlette:
    registry = state.registry
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
        apps = get_apps()
        if apps is not None:
            body["apps"] = [msgspec.to_builtins(status) for status in apps.statuses()]
            body["mqtt_url"] = state.mqtt_url
        return JSONResponse(body, status_code=200 if not state.revoked else 503)

    async def metrics(_request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/healthz", healthz), Route("/metrics", metrics)]
    if local_token:
        routes += local_routes(get_collections, local_token)
        routes += stream_routes(get_outbox, local_token)
        routes += app_routes(get_apps, local_token)
        routes += deployment_routes(get_deployments, local_token)
    return Starlette(routes=routes)
