"""The hub API's deployment endpoints: publisher keys, apply, rollouts.

`POST /v1/apply` takes a packed, signed bundle with the App manifest it was packed from;
the hub checks digest and signature against the registered publisher keys before it
stores anything. Every endpoint takes the admin token; the optional `reason` of a
command lands in the audit log with the actor.
"""

# No `from __future__ import annotations`: FastAPI resolves annotations at definition.
import base64
import binascii
from typing import Any, Literal, Protocol

from fastapi import FastAPI
from pydantic import BaseModel, Field

from fogline.bundle import BUNDLE_BYTES_MAX, key_id_of, parse_public_key
from fogline.errors import ConfigError
from fogline.hub.deployments import HubDeployments


class DeployOperations(Protocol):
    deployments: HubDeployments

    def apply_bundle(self, manifest: dict[str, Any], bundle: bytes, digest: str,
                     key_id: str, signature: str, actor: str, reason: str) -> dict[str, Any]:
        ...


class KeyRegister(BaseModel):
    key_id: str = Field(max_length=32)
    public_key: str = Field(max_length=64)
    name: str = Field("", max_length=128)


class Reason(BaseModel):
    reason: str = Field("", max_length=500)


class StreamSet(BaseModel):
    name: str = Field(max_length=64)
    policy: dict[str, Any] = {}
    reason: str = Field("", max_length=500)


class SiteSet(BaseModel):
    name: str = Field(max_length=64)
    spec: dict[str, Any]
    reason: str = Field("", max_length=500)


class ApplyRequest(BaseModel):
    manifest: dict[str, Any]
    bundle: str = Field(max_length=(BUNDLE_BYTES_MAX * 4) // 3 + 8)  # base64
    digest: str = Field(max_length=80)
    key_id: str = Field("", max_length=32)
    signature: str = Field("", max_length=128)
    reason: str = Field("", max_length=500)


def add_deploy_routes(app: FastAPI, hub: DeployOperations, admin: Any) -> None:
    @app.post("/v1/keys", status_code=201)
    def register_key(body: KeyRegister, actor: admin) -> dict[str, Any]:
        raw = parse_public_key(body.public_key)
        if key_id_of(raw) != body.key_id:
            raise ConfigError(f"key id {body.key_id!r} does not belong to that public key "
                              f"(it is {key_id_of(raw)})")
        deployments = hub.deployments
        added = deployments.store.add_key(body.key_id, body.public_key, body.name,
                                          deployments.clock.now())
        if added:
            deployments.record_event(actor, "key.registered", body.key_id, "", name=body.name)
            deployments.poke()
        return {"key_id": body.key_id, "result": "created" if added else "unchanged"}

    @app.get("/v1/keys")
    def list_keys(_: admin) -> list[dict[str, Any]]:
        return hub.deployments.store.list_keys()

    @app.post("/v1/keys/{key_id}/revoke")
    def revoke_key(key_id: str, body: Reason, actor: admin) -> dict[str, Any]:
        deployments = hub.deployments
        deployments.store.revoke_key(key_id, deployments.clock.now())
        deployments.record_event(actor, "key.revoked", key_id, body.reason)
        deployments.poke()
        return {"key_id": key_id, "result": "revoked"}

    @app.post("/v1/apply")
    def apply(body: ApplyRequest, actor: admin) -> dict[str, Any]:
        try:
            bundle = base64.b64decode(body.bundle, validate=True)
        except binascii.Error as exc:
            raise ConfigError(f"bundle: not base64: {exc}") from exc
        return hub.apply_bundle(body.manifest, bundle, body.digest, body.key_id,
                                body.signature, actor, body.reason)

    @app.post("/v1/stream-policies")
    def set_stream(body: StreamSet, actor: admin) -> dict[str, Any]:
        result = hub.deployments.set_stream(body.name, body.policy, actor, body.reason)
        return {"name": body.name, "result": result}

    @app.get("/v1/stream-policies")
    def list_stream_policies(_: admin) -> dict[str, Any]:
        return hub.deployments.store.streams()

    @app.delete("/v1/stream-policies/{name}")
    def delete_stream(name: str, actor: admin, reason: str = "") -> dict[str, Any]:
        hub.deployments.delete_stream(name, actor, reason)
        return {"name": name, "result": "deleted"}

    @app.post("/v1/sites")
    def set_site(body: SiteSet, actor: admin) -> dict[str, Any]:
        result = hub.deployments.set_site(body.name, body.spec, actor, body.reason)
        return {"name": body.name, "result": result}

    @app.get("/v1/sites")
    def list_sites(_: admin) -> dict[str, Any]:
        return hub.deployments.store.sites()

    @app.delete("/v1/sites/{name}")
    def delete_site(name: str, actor: admin, reason: str = "") -> dict[str, Any]:
        hub.deployments.delete_site(name, actor, reason)
        return {"name": name, "result": "deleted"}

    @app.get("/v1/deployments")
    def list_deployments(_: admin) -> list[dict[str, Any]]:
        return hub.deployments.describe()

    @app.get("/v1/deployments/{name}")
    def get_deployment(name: str, _: admin) -> dict[str, Any]:
        return hub.deployments.describe(name)[0]

    @app.delete("/v1/deployments/{name}")
    def delete_deployment(name: str, actor: admin, reason: str = "") -> dict[str, Any]:
        hub.deployments.delete(name, actor, reason)
        return {"app": name, "result": "deleted"}

    @app.post("/v1/deployments/{name}/rollout/{verb}")
    def rollout_command(name: str, verb: Literal["pause", "resume", "promote", "undo"],
                        body: Reason, actor: admin) -> dict[str, Any]:
        return hub.deployments.command(name, verb, actor, body.reason)
