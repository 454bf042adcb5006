"""The hub's HTTP API (FastAPI): fleet registry, tokens, enrollment, revocation.

Authentication: every endpoint takes the admin token (`Authorization: Bearer ...`)
except `/healthz`, `/v1/ca` (the public CA certificate), `/v1/enroll` (authenticated by
a bootstrap token) and `/v1/nodes/{id}/renew` (authenticated by a CSR signed with the
node's registered key). Errors are JSON: `{"detail": "..."}` with a 4xx status.
"""

# No `from __future__ import annotations`: FastAPI resolves the local `Admin` alias
# in endpoint signatures at definition time.
import hmac
import re
from typing import Annotated, Any, Protocol

import msgspec
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel, Field, field_validator

from fogline import __version__
from fogline.bundle import BundleRejected
from fogline.core.crdt import CollectionState
from fogline.core.sync import CollectionDef, check_definition
from fogline.core.tokens import TokenRecord, new_token
from fogline.errors import AuthError, ConfigError, FoglineError, NotFoundError, ProtocolError
from fogline.hub.collections import CollectionStore
from fogline.hub.deploy_api import add_deploy_routes
from fogline.hub.enrollment import Credentials, Enrollment
from fogline.hub.ingest import list_streams, read_records
from fogline.hub.purge_api import add_purge_routes
from fogline.hub.routes_api import add_route_routes
from fogline.hub.store import HubStore
from fogline.protocol import APP_STATES, TIERS

_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
_REGION = re.compile(r"^[a-z0-9][a-z0-9\-]{0,62}$|^$")


def _check_labels(labels: dict[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise ValueError(f"invalid label key {key!r}")
        if len(value) > 63:
            raise ValueError(f"label {key!r} value longer than 63 characters")
    return labels


class TokenCreate(BaseModel):
    ttl_s: float = Field(3600.0, gt=0, le=365 * 86400)
    uses: int = Field(1, ge=1, le=100_000)
    region: str = Field("", pattern=_REGION.pattern)
    labels: dict[str, str] = {}

    _labels = field_validator("labels")(_check_labels)


class TokenCreated(BaseModel):
    token: str
    token_id: str
    expires_at_s: float
    uses: int
    ca_sha256: str


class EnrollRequest(BaseModel):
    token: str = Field(max_length=200)
    csr_pem: str = Field(max_length=16 * 1024)
    nats_public_key: str = Field(max_length=64)
    name: str = Field(pattern=_NAME.pattern)
    region: str = Field("", pattern=_REGION.pattern)
    zone: str = Field("", max_length=64)
    tier: str = "near"
    labels: dict[str, str] = {}
    capabilities: dict[str, Any] = {}
    endpoint: str = Field("", max_length=256)

    _labels = field_validator("labels")(_check_labels)

    @field_validator("tier")
    @classmethod
    def _tier(cls, tier: str) -> str:
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}")
        return tier


class RenewRequest(BaseModel):
    csr_pem: str = Field(max_length=16 * 1024)


class CredentialsOut(BaseModel):
    node_id: str
    certificate_pem: str
    ca_pem: str
    nats_jwt: str
    nats_urls: list[str]
    expires_at_s: float
    heartbeat_interval_s: float
    region: str = ""
    labels: dict[str, str] = {}


class RevokeRequest(BaseModel):
    reason: str = Field("revoked by admin", max_length=500)


class CollectionCreate(BaseModel):
    name: str = Field(max_length=63)
    type: str
    scope: str


class HubOperations(Protocol):
    """What the API needs from the running hub beyond the store."""

    nats_urls: list[str]
    heartbeat_interval_s: float
    ca_pem: str
    ca_fingerprint: str
    collections: CollectionStore

    def revoke(self, node_id: str, reason: str, actor: str) -> dict[str, Any]: ...

    def define_collection(self, definition: CollectionDef) -> str: ...


def collection_view(state: CollectionState) -> Any:
    """A replica's value as JSON: maps as objects, counters as numbers, sets as lists."""
    value = state.value()
    if state.kind == "map":
        return {k: msgspec.msgpack.decode(v) for k, v in value.items()}  # type: ignore[union-attr]
    if state.kind == "set":
        return sorted((msgspec.msgpack.decode(e) for e in value), key=repr)  # type: ignore[union-attr]
    return value


_STATUS_FOR: list[tuple[type[FoglineError], int]] = [
    (AuthError, 401), (NotFoundError, 404), (ProtocolError, 400), (ConfigError, 409),
]


def _error_response(exc: FoglineError) -> JSONResponse:
    if isinstance(exc, BundleRejected):
        return JSONResponse({"detail": f"bundle refused ({exc.reason}): {exc}",
                             "code": exc.reason}, status_code=422)
    for kind, status in _STATUS_FOR:
        if isinstance(exc, kind):
            return JSONResponse({"detail": str(exc)}, status_code=status)
    return JSONResponse({"detail": str(exc)}, status_code=500)


def create_api(store: HubStore, enrollment: Enrollment, hub: HubOperations,
               admin_token: str, registry: CollectorRegistry) -> FastAPI:
    # The schema and docs are served below behind the admin token like everything else.
    app = FastAPI(title="fogline hub", version=__version__, openapi_url=None, docs_url=None,
                  redoc_url=None)

    @app.exception_handler(FoglineError)
    async def _fogline_error(_request: Request, exc: FoglineError) -> JSONResponse:
        return _error_response(exc)

    def admin(authorization: Annotated[str | None, Header()] = None,
              x_fogline_actor: Annotated[str | None, Header()] = None) -> str:
        expected = f"Bearer {admin_token}"
        if authorization is None or not hmac.compare_digest(authorization, expected):
            raise HTTPException(401, "admin token required",
                                headers={"WWW-Authenticate": "Bearer"})
        # Who holds the token, as the CLI says (user@host): for the audit log.
        who = (x_fogline_actor or "").strip()[:100]
        return f"admin ({who})" if who else "admin"

    Admin = Annotated[str, Depends(admin)]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/metrics")
    def metrics(_: Admin) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(_: Admin) -> JSONResponse:
        return JSONResponse(get_openapi(title=app.title, version=app.version,
                                        routes=app.routes))

    @app.get("/v1/ca")
    def ca() -> dict[str, str]:
        return {"ca_pem": hub.ca_pem, "sha256": hub.ca_fingerprint}

    @app.post("/v1/tokens", status_code=201)
    def create_token(body: TokenCreate, actor: Admin) -> TokenCreated:
        text, token_id, secret_hash = new_token()
        now_s = enrollment.clock.now()
        store.add_token(TokenRecord(
            token_id=token_id, secret_sha256=secret_hash, created_at_s=now_s,
            expires_at_s=now_s + body.ttl_s, uses_max=body.uses, uses=0,
            region=body.region, labels=tuple(sorted(body.labels.items()))))
        store.add_event(now_s, actor, "token.created", token_id,
                        {"uses": body.uses, "ttl_s": body.ttl_s, "region": body.region})
        return TokenCreated(token=text, token_id=token_id, expires_at_s=now_s + body.ttl_s,
                            uses=body.uses, ca_sha256=hub.ca_fingerprint)

    @app.get("/v1/tokens")
    def list_tokens(_: Admin) -> list[dict[str, Any]]:
        return store.list_tokens()

    def _out(creds: Credentials) -> CredentialsOut:
        return CredentialsOut(
            node_id=creds.node_id, certificate_pem=creds.certificate_pem,
            ca_pem=creds.ca_pem, nats_jwt=creds.nats_jwt, nats_urls=hub.nats_urls,
            expires_at_s=creds.expires_at_s, heartbeat_interval_s=hub.heartbeat_interval_s,
            region=creds.region, labels=creds.labels)

    @app.post("/v1/enroll", status_code=201)
    def enroll(body: EnrollRequest) -> CredentialsOut:
        return _out(enrollment.enroll(body.model_dump()))

    @app.post("/v1/nodes/{node_id}/renew")
    def renew(node_id: str, body: RenewRequest) -> CredentialsOut:
        return _out(enrollment.renew(node_id, body.csr_pem))

    @app.get("/v1/nodes")
    def list_nodes(_: Admin) -> list[dict[str, Any]]:
        return [_public_node(row) for row in store.list_nodes()]

    @app.get("/v1/nodes/{node_id}")
    def get_node(node_id: str, _: Admin) -> dict[str, Any]:
        return _public_node(store.get_node(node_id))

    @app.get("/v1/apps")
    def list_apps(_: Admin, state: str | None = None) -> list[dict[str, Any]]:
        """Every app on every node, as of each node's latest heartbeat."""
        if state is not None and state not in APP_STATES:
            raise HTTPException(422, f"state must be one of {', '.join(APP_STATES)}")
        return [row for row in store.list_apps() if state is None or row["state"] == state]

    @app.post("/v1/nodes/{node_id}/revoke")
    def revoke(node_id: str, body: RevokeRequest, actor: Admin) -> dict[str, Any]:
        return hub.revoke(node_id, body.reason, actor)

    @app.post("/v1/collections")
    def create_collection(body: CollectionCreate, actor: Admin) -> JSONResponse:
        try:
            definition = check_definition(body.name, body.type, body.scope)
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from exc
        result = hub.define_collection(definition)
        if result == "created":
            store.add_event(enrollment.clock.now(), actor, "collection.created", body.name,
                            {"type": body.type, "scope": body.scope})
        return JSONResponse({"name": body.name, "type": body.type, "scope": body.scope,
                             "result": result}, status_code=201 if result == "created" else 200)

    @app.get("/v1/collections")
    def list_collections(_: Admin) -> list[dict[str, Any]]:
        return [{"name": d.name, "type": d.type, "scope": d.scope,
                 "replicas": hub.collections.replicas_of(d.name)}
                for d in hub.collections.definitions().values()]

    @app.get("/v1/collections/{name}")
    def get_collection(name: str, _: Admin, replica: str | None = None) -> dict[str, Any]:
        definition = hub.collections.definitions().get(name)
        if definition is None:
            raise NotFoundError(f"no collection {name!r}")
        replicas = [replica] if replica else hub.collections.replicas_of(name)
        return {"name": name, "type": definition.type, "scope": definition.scope,
                "replicas": {r: collection_view(hub.collections.state(name, r))
                             for r in replicas},
                "tombstones": {r: hub.collections.tombstone_count(r) for r in replicas}}

    @app.get("/v1/streams")
    def streams(_: Admin, node_id: str | None = None) -> Any:
        return list_streams(store.engine, node_id)

    @app.get("/v1/nodes/{node_id}/streams/{stream}/records")
    def stream_records(node_id: str, stream: str, _: Admin, after_seq: int = 0,
                       limit: int = 100) -> Any:
        return read_records(store.engine, node_id, stream, after_seq,
                            min(max(limit, 1), 10_000))

    add_deploy_routes(app, hub, Admin)  # type: ignore[arg-type]
    add_route_routes(app, store, hub, enrollment.clock, Admin)  # type: ignore[arg-type]
    add_purge_routes(app, hub, Admin)  # type: ignore[arg-type]

    @app.get("/v1/events")
    def list_events(_: Admin, limit: int = 200) -> list[dict[str, Any]]:
        return store.list_events(min(max(limit, 1), 10_000))

    return app


def _public_node(row: dict[str, Any]) -> dict[str, Any]:
    """A node row as the API shows it; `apps` is a list of AppStatus objects."""
    hidden = {"key_fingerprint", "token_id", "failing_streak", "returns_s", "healthy_since_s"}
    return {k: v for k, v in row.items() if k not in hidden}
