"""SQL for deployments: publisher keys, revisions, deployments with their rollouts.

Rollouts are stored as JSON next to a sequence number: a write names the sequence it
read and fails if another hub process wrote meanwhile (optimistic concurrency), so a
step is never decided twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fogline.core.placement import NodeFacts
from fogline.core.rollout import Rollout
from fogline.errors import ConfigError, NotFoundError
from fogline.hub.store import (
    apps_of,
    deployments,
    nodes,
    publisher_keys,
    revisions,
    sites,
    stream_policies,
)
from fogline.protocol import AppStatus, BundleRefusal


def rollout_to_json(rollout: Rollout) -> dict[str, Any]:
    return msgspec.to_builtins(rollout)  # type: ignore[no-any-return]


def rollout_from_json(value: dict[str, Any]) -> Rollout:
    return msgspec.convert(value, Rollout)


class DeployStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # Publisher keys -----------------------------------------------------------------

    def add_key(self, key_id: str, public_key: str, name: str, now_s: float) -> bool:
        """Register a key; False if it is already registered (with the same key)."""
        with self._tx() as conn:
            row = conn.execute(publisher_keys.select().where(
                publisher_keys.c.key_id == key_id)).mappings().first()
            if row is not None:
                if row["public_key"] != public_key:
                    raise ConfigError(f"key id {key_id} is registered with another key")
                if row["revoked_at_s"] is not None:
                    raise ConfigError(f"key {key_id} was revoked; create a new key")
                return False
            conn.execute(publisher_keys.insert().values(
                key_id=key_id, public_key=public_key, name=name, created_at_s=now_s))
        return True

    def revoke_key(self, key_id: str, now_s: float) -> None:
        with self._tx() as conn:
            done = conn.execute(publisher_keys.update().where(
                publisher_keys.c.key_id == key_id, publisher_keys.c.revoked_at_s.is_(None))
                .values(revoked_at_s=now_s))
            if done.rowcount != 1:
                raise NotFoundError(f"no active publisher key {key_id!r}")

    def list_keys(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(publisher_keys.select().order_by(publisher_keys.c.created_at_s))
            return [dict(row) for row in rows.mappings()]

    def trusted_keys(self) -> dict[str, str]:
        """key id -> public key of every key not revoked."""
        return {k["key_id"]: k["public_key"] for k in self.list_keys()
                if k["revoked_at_s"] is None}

    # Revisions ----------------------------------------------------------------------

    def revisions_of(self, app: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(revisions.select().where(revisions.c.app == app)
                                .order_by(revisions.c.revision))
            return [dict(row) for row in rows.mappings()]

    def all_revisions(self) -> dict[tuple[str, int], dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(revisions.select()).mappings()
            return {(row["app"], row["revision"]): dict(row) for row in rows}

    # Deployments --------------------------------------------------------------------

    def get(self, app: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(deployments.select().where(deployments.c.app == app)
                               ).mappings().first()
        return dict(row) if row is not None else None

    def require(self, app: str) -> dict[str, Any]:
        row = self.get(app)
        if row is None:
            raise NotFoundError(f"no deployment {app!r}")
        return row

    def all(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(deployments.select().order_by(deployments.c.app))
            return [dict(row) for row in rows.mappings()]

    def apply(self, app: str, revision: dict[str, Any] | None, spec: dict[str, Any],
              rollout: Rollout | None, now_s: float, seq: int | None) -> None:
        """Add `revision` (if any) and set the deployment's spec (and rollout, if a new
        revision starts one) in one transaction; `seq` is the rollout_seq read (None:
        the deployment must not exist yet)."""
        with self._tx() as conn:
            if revision is not None:
                conn.execute(revisions.insert().values(**revision))
            values: dict[str, Any] = {"spec": spec, "updated_at_s": now_s}
            if revision is not None:
                values["revision"] = revision["revision"]
            if rollout is not None:
                values["rollout"] = rollout_to_json(rollout)
            if seq is None:
                conn.execute(deployments.insert().values(
                    app=app, rollout_seq=0, unsatisfied={}, **values))
                return
            values["rollout_seq"] = seq + 1
            done = conn.execute(deployments.update().where(
                deployments.c.app == app, deployments.c.rollout_seq == seq).values(**values))
            if done.rowcount != 1:
                raise ConfigError(f"deployment {app!r} changed meanwhile; apply again")

    def save_rollout(self, app: str, rollout: Rollout, seq: int,
                     unsatisfied: dict[str, str] | None = None) -> bool:
        """Write the rollout if nobody did since `seq` was read; False if someone did."""
        values: dict[str, Any] = {"rollout": rollout_to_json(rollout), "rollout_seq": seq + 1}
        if unsatisfied is not None:
            values["unsatisfied"] = unsatisfied
        with self._tx() as conn:
            done = conn.execute(deployments.update().where(
                deployments.c.app == app, deployments.c.rollout_seq == seq).values(**values))
            return done.rowcount == 1

    def delete(self, app: str) -> None:
        with self._tx() as conn:
            done = conn.execute(deployments.delete().where(deployments.c.app == app))
            if done.rowcount != 1:
                raise NotFoundError(f"no deployment {app!r}")

    # Fleet-wide stream policies --------------------------------------------------------

    def set_stream(self, name: str, policy: dict[str, Any], now_s: float) -> str:
        """created, configured or unchanged."""
        with self._tx() as conn:
            row = conn.execute(sa.select(stream_policies.c.policy).where(
                stream_policies.c.name == name)).first()
            if row is not None and row.policy == policy:
                return "unchanged"
            if row is None:
                conn.execute(stream_policies.insert().values(name=name, policy=policy,
                                                              updated_at_s=now_s))
                return "created"
            conn.execute(stream_policies.update().where(stream_policies.c.name == name)
                         .values(policy=policy, updated_at_s=now_s))
            return "configured"

    def delete_stream(self, name: str) -> None:
        with self._tx() as conn:
            done = conn.execute(stream_policies.delete().where(stream_policies.c.name == name))
            if done.rowcount != 1:
                raise NotFoundError(f"no stream policy {name!r}")

    def streams(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(stream_policies.c.name, stream_policies.c.policy)
                                .order_by(stream_policies.c.name))
            return {row.name: dict(row.policy) for row in rows}

    # Sites (`kind: Site`) ---------------------------------------------------------------

    def set_site(self, name: str, spec: dict[str, Any], now_s: float) -> str:
        """created, configured or unchanged."""
        with self._tx() as conn:
            row = conn.execute(sa.select(sites.c.spec).where(sites.c.name == name)).first()
            if row is not None and row.spec == spec:
                return "unchanged"
            if row is None:
                conn.execute(sites.insert().values(name=name, spec=spec, updated_at_s=now_s))
                return "created"
            conn.execute(sites.update().where(sites.c.name == name)
                         .values(spec=spec, updated_at_s=now_s))
            return "configured"

    def delete_site(self, name: str) -> None:
        with self._tx() as conn:
            done = conn.execute(sites.delete().where(sites.c.name == name))
            if done.rowcount != 1:
                raise NotFoundError(f"no site {name!r}")

    def sites(self) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(sites.c.name, sites.c.spec).order_by(sites.c.name))
            return {row.name: dict(row.spec) for row in rows}

    # Nodes as rollouts see them -----------------------------------------------------

    def fleet(self) -> list[tuple[NodeFacts, tuple[AppStatus, ...], tuple[BundleRefusal, ...]]]:
        query = sa.select(nodes.c.id, nodes.c.region, nodes.c.tier, nodes.c.labels,
                          nodes.c.capabilities, nodes.c.status, nodes.c.apps,
                          nodes.c.refusals)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        fleet = []
        for row in rows:
            caps = row["capabilities"] or {}
            facts = NodeFacts(
                id=row["id"], region=row["region"], tier=row["tier"],
                labels=dict(row["labels"] or {}), cores=int(caps.get("cores", 1)),
                memory_bytes=int(caps.get("memory_bytes", 0)), arch=str(caps.get("arch", "")),
                gpu=bool(caps.get("gpu", False)),
                accelerators=tuple(caps.get("accelerators", ())), status=row["status"])
            refusals = msgspec.convert(row["refusals"] or [], tuple[BundleRefusal, ...])
            fleet.append((facts, apps_of(row["apps"]), refusals))
        return fleet
