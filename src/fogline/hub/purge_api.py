"""The hub API's purge endpoints: issue a fleet-wide cache purge, see who applied it."""

# No `from __future__ import annotations`: FastAPI resolves annotations at definition.
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from fogline.errors import ConfigError
from fogline.hub.purges import HubPurges
from fogline.protocol import PURGE_VALUES_MAX


class PurgeOperations(Protocol):
    purges: HubPurges


class PurgeRequest(BaseModel):
    kind: str = Field(max_length=8)
    values: list[str] = Field(max_length=PURGE_VALUES_MAX)
    region: str = Field("", max_length=64)
    site: str = Field("", max_length=64)
    reason: str = Field("", max_length=500)


def add_purge_routes(app: FastAPI, hub: PurgeOperations, admin: Any) -> None:
    @app.post("/v1/purges", status_code=202)
    async def purge(body: PurgeRequest, actor: admin) -> dict[str, Any]:
        try:
            issued, targets = await hub.purges.issue(body.kind, body.values, body.region,
                                                     body.site, actor, body.reason)
        except ConfigError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"seq": issued.seq, "kind": issued.kind, "values": list(issued.values),
                "region": issued.region, "site": issued.site,
                "issued_at_s": issued.issued_at_s, "targets": targets}

    @app.get("/v1/purges")
    def list_purges(_: admin, limit: int = 20) -> list[dict[str, Any]]:
        return hub.purges.store.summaries(min(max(limit, 1), 1000))

    @app.get("/v1/purges/{seq}")
    def purge_status(seq: int, _: admin) -> dict[str, Any]:
        return hub.purges.store.status(seq)
