"""The hub's SQL store: one SQLAlchemy Core schema for SQLite and PostgreSQL.

Every hub process shares this store; nothing the hub decides lives only in memory.
Writes that must be atomic (consuming a token and creating a node) run in one
transaction with a conditional UPDATE, so concurrent hubs cannot over-use a token.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from fogline.core.health import NodeHealth
from fogline.core.tokens import TokenRecord
from fogline.errors import ConfigError, NotFoundError
from fogline.protocol import AppStatus, BundleRefusal

metadata = sa.MetaData()

nodes = sa.Table(
    "fl_nodes", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("region", sa.String(64), nullable=False, default=""),
    sa.Column("zone", sa.String(64), nullable=False, default=""),
    sa.Column("tier", sa.String(16), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("capabilities", sa.JSON, nullable=False),
    sa.Column("version", sa.String(32), nullable=False, default=""),
    sa.Column("endpoint", sa.String(256), nullable=False, default=""),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_since_s", sa.Float, nullable=False),
    sa.Column("status_reason", sa.Text, nullable=False, default=""),
    sa.Column("last_seen_s", sa.Float),
    sa.Column("interval_s", sa.Float, nullable=False),
    sa.Column("failing_streak", sa.Integer, nullable=False, default=0),
    sa.Column("returns_s", sa.JSON, nullable=False),
    sa.Column("healthy_since_s", sa.Float),
    sa.Column("load", sa.JSON, nullable=False),
    sa.Column("failing_checks", sa.JSON, nullable=False),
    sa.Column("heartbeat_seq", sa.BigInteger, nullable=False, default=0),
    sa.Column("sync_clean_ms", sa.BigInteger, nullable=False, default=0, server_default="0"),
    sa.Column("enrolled_at_s", sa.Float, nullable=False),
    sa.Column("token_id", sa.String(32), nullable=False),
    sa.Column("key_fingerprint", sa.String(64), nullable=False),
    sa.Column("nats_public_key", sa.String(64), nullable=False),
    sa.Column("cert_expires_s", sa.Float, nullable=False),
    # The apps of the node's latest heartbeat (AppStatus as JSON objects).
    sa.Column("apps", sa.JSON, nullable=False, server_default=sa.text("'[]'")),
    # Deployed revisions the node refused (BundleRefusal as JSON objects), and the
    # generation of desired state it last acted on.
    sa.Column("refusals", sa.JSON, nullable=False, server_default=sa.text("'[]'")),
    sa.Column("desired_generation", sa.BigInteger, nullable=False, server_default="0"),
    # The last cache purge the node applied (fogline.core.purge).
    sa.Column("purge_seq", sa.BigInteger, nullable=False, server_default="0"),
)

tokens = sa.Table(
    "fl_tokens", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created_at_s", sa.Float, nullable=False),
    sa.Column("expires_at_s", sa.Float, nullable=False),
    sa.Column("uses_max", sa.Integer, nullable=False),
    sa.Column("uses", sa.Integer, nullable=False, default=0),
    sa.Column("region", sa.String(64), nullable=False, default=""),
    sa.Column("labels", sa.JSON, nullable=False),
)

revocations = sa.Table(
    "fl_revocations", metadata,
    sa.Column("nats_public_key", sa.String(64), primary_key=True),
    sa.Column("node_id", sa.String(64), nullable=False),
    sa.Column("revoked_at_s", sa.Float, nullable=False),
)

events = sa.Table(
    "fl_events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at_s", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(128), nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
)

# Deployments: publisher keys, app revisions (each a signed bundle), the deployment of
# each app (where and how: fogline.deploy_spec) and its current rollout.
publisher_keys = sa.Table(
    "fl_publisher_keys", metadata,
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("public_key", sa.String(64), nullable=False),
    sa.Column("name", sa.String(128), nullable=False, default=""),
    sa.Column("created_at_s", sa.Float, nullable=False),
    sa.Column("revoked_at_s", sa.Float),
)

revisions = sa.Table(
    "fl_revisions", metadata,
    sa.Column("app", sa.String(64), primary_key=True),
    sa.Column("revision", sa.Integer, primary_key=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("digest", sa.String(80), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("signature", sa.String(128), nullable=False),
    sa.Column("manifest", sa.JSON, nullable=False),
    sa.Column("created_at_s", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
)

deployments = sa.Table(
    "fl_deployments", metadata,
    sa.Column("app", sa.String(64), primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),  # the latest applied
    sa.Column("spec", sa.JSON, nullable=False),  # placement, rollout, pins
    sa.Column("updated_at_s", sa.Float, nullable=False),
    # The rollout (fogline.core.rollout.Rollout as JSON) and a counter bumped by every
    # write, so two hub processes never overwrite each other's step.
    sa.Column("rollout", sa.JSON, nullable=False),
    sa.Column("rollout_seq", sa.Integer, nullable=False, default=0),
    # Nodes the placement picked that cannot run the app: id -> reason.
    sa.Column("unsatisfied", sa.JSON, nullable=False),
)

stream_policies = sa.Table(
    "fl_stream_policies", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("policy", sa.JSON, nullable=False),  # StreamSetting fields but name
    sa.Column("updated_at_s", sa.Float, nullable=False),
)

# RTT from clients to nodes, as clients measured and reported it, by their location.
user_rtt = sa.Table(
    "fl_user_rtt", metadata,
    sa.Column("location", sa.String(64), primary_key=True),
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("rtt_ms", sa.Float, nullable=False),
    sa.Column("reports", sa.Integer, nullable=False),
    sa.Column("updated_at_s", sa.Float, nullable=False),
)

sites = sa.Table(
    "fl_sites", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("spec", sa.JSON, nullable=False),  # fogline.site_spec.SiteSpec as JSON
    sa.Column("updated_at_s", sa.Float, nullable=False),
)

# Cache purges, numbered by the database: one sequence for the fleet.
purges = sa.Table(
    "fl_purges", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("kind", sa.String(8), nullable=False),
    sa.Column("purge_values", sa.JSON, nullable=False),
    sa.Column("region", sa.String(64), nullable=False, default=""),
    sa.Column("site", sa.String(64), nullable=False, default=""),
    sa.Column("issued_at_s", sa.Float, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    # The nodes it was meant for when issued (the region's nodes, or all), by id.
    sa.Column("targets", sa.JSON, nullable=False),
)

# When each node applied each purge, as the node reported it.
purge_acks = sa.Table(
    "fl_purge_acks", metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("applied_at_s", sa.Float, nullable=False),
    sa.Column("removed", sa.Integer, nullable=False, default=0),
)

_HEALTH_COLUMNS = ("status", "status_since_s", "status_reason", "last_seen_s", "interval_s",
                   "failing_streak", "returns_s", "healthy_since_s")


def health_of(row: Mapping[str, Any]) -> NodeHealth:
    return NodeHealth(
        status=row["status"], status_since_s=row["status_since_s"],
        interval_s=row["interval_s"], last_seen_s=row["last_seen_s"],
        failing_streak=row["failing_streak"], returns_s=tuple(row["returns_s"]),
        healthy_since_s=row["healthy_since_s"], reason=row["status_reason"],
    )


def health_values(health: NodeHealth) -> dict[str, Any]:
    return {
        "status": health.status, "status_since_s": health.status_since_s,
        "status_reason": health.reason, "last_seen_s": health.last_seen_s,
        "interval_s": health.interval_s, "failing_streak": health.failing_streak,
        "returns_s": list(health.returns_s), "healthy_since_s": health.healthy_since_s,
    }


def apps_of(value: Any) -> tuple[AppStatus, ...]:
    """Stored apps (JSON) back as structs; the hub wrote them, so they are valid."""
    return msgspec.convert(value or [], tuple[AppStatus, ...])


@dataclass(frozen=True)
class HeartbeatUpdate:
    """What one heartbeat changes in a node's row."""

    node_id: str
    health: NodeHealth
    seq: int
    version: str
    endpoint: str
    load: dict[str, float]
    failing_checks: tuple[str, ...]
    sync_clean_ms: int = 0
    apps: tuple[AppStatus, ...] = ()
    refusals: tuple[BundleRefusal, ...] = ()
    desired_generation: int = 0
    purge_seq: int = 0


def upsert(conn: Connection, table: sa.Table, rows: list[dict[str, Any]],
           update: list[str]) -> None:
    """Insert rows; on a primary-key conflict update the `update` columns, or keep the
    existing row if none are given. One statement for SQLite and PostgreSQL."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        statement = postgresql.insert(table)
    elif conn.dialect.name == "sqlite":
        statement = sqlite.insert(table)
    else:
        raise ConfigError(f"the hub supports SQLite and PostgreSQL, not {conn.dialect.name}")
    keys = [c.name for c in table.primary_key.columns]
    if update:
        statement = statement.on_conflict_do_update(
            index_elements=keys, set_={c: statement.excluded[c] for c in update})
    else:
        statement = statement.on_conflict_do_nothing(index_elements=keys)
    conn.execute(statement, rows)


def add_missing_columns(engine: Engine) -> list[str]:
    """Add the columns this version defines that an older hub's database lacks.

    `create_all` creates missing tables only, so a column added to an existing table
    later is added here, with its server default; every such column must therefore be
    nullable or have a `server_default`. Safe when several hubs start at once: a column
    another hub just added is skipped. Returns the "table.column" names added.
    """
    added: list[str] = []
    for table in metadata.sorted_tables:
        present = {c["name"] for c in sa.inspect(engine).get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if column.primary_key or (not column.nullable and column.server_default is None):
                raise ConfigError(f"the database lacks {table.name}.{column.name}, which "
                                  "cannot be added in place; migrate it by hand")
            spec = sa.schema.CreateColumn(column).compile(dialect=engine.dialect)
            guard = "IF NOT EXISTS " if engine.dialect.name == "postgresql" else ""
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {guard}{spec}"))
            except sa.exc.OperationalError:
                # SQLite has no IF NOT EXISTS here: another hub may have won the race.
                if column.name not in {c["name"] for c in
                                       sa.inspect(engine).get_columns(table.name)}:
                    raise
                continue
            added.append(f"{table.name}.{column.name}")
    return added


def _engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    try:
        engine = sa.create_engine(url, pool_pre_ping=True)
    except (sa.exc.ArgumentError, ImportError) as exc:
        raise ConfigError(f"unsupported database URL {url!r}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()
    return engine


class HubStore:
    """Registry, tokens, revocations and the audit log, over one SQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)
        metadata.create_all(self.engine)
        add_missing_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # Tokens -------------------------------------------------------------------------

    def add_token(self, record: TokenRecord) -> None:
        with self._tx() as conn:
            conn.execute(tokens.insert().values(
                id=record.token_id, secret_sha256=record.secret_sha256,
                created_at_s=record.created_at_s, expires_at_s=record.expires_at_s,
                uses_max=record.uses_max, uses=record.uses, region=record.region,
                labels=dict(record.labels)))

    def get_token(self, token_id: str) -> TokenRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(tokens.select().where(tokens.c.id == token_id)).mappings().first()
        if row is None:
            return None
        return TokenRecord(
            token_id=row["id"], secret_sha256=row["secret_sha256"],
            created_at_s=row["created_at_s"], expires_at_s=row["expires_at_s"],
            uses_max=row["uses_max"], uses=row["uses"], region=row["region"],
            labels=tuple(sorted(row["labels"].items())))

    def list_tokens(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(tokens.select().order_by(tokens.c.created_at_s)).mappings()
            return [{k: v for k, v in row.items() if k != "secret_sha256"} for row in rows]

    # Nodes --------------------------------------------------------------------------

    def enroll(self, token_id: str, now_s: float, node: dict[str, Any]) -> bool:
        """Use one of the token's uses and create the node, atomically.

        Returns False (and changes nothing) if the token ran out or expired meanwhile.
        """
        with self._tx() as conn:
            used = conn.execute(
                tokens.update()
                .where(tokens.c.id == token_id, tokens.c.uses < tokens.c.uses_max,
                       tokens.c.expires_at_s > now_s)
                .values(uses=tokens.c.uses + 1))
            if used.rowcount != 1:
                return False
            taken = conn.execute(sa.select(nodes.c.id).where(nodes.c.name == node["name"]))
            if taken.first() is not None:
                raise ConfigError(f"node name {node['name']!r} is already enrolled; "
                                  "choose another --name or revoke the old node")
            conn.execute(nodes.insert().values(**node))
        return True

    def get_node(self, node_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(nodes.select().where(nodes.c.id == node_id)).mappings().first()
        if row is None:
            raise NotFoundError(f"no node {node_id!r}")
        return dict(row)

    def list_nodes(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(nodes.select().order_by(nodes.c.region, nodes.c.name))
            return [dict(row) for row in rows.mappings()]

    def sync_marks(self) -> list[tuple[str, str, int]]:
        """(node id, region, clean-upload mark) of every node that is not revoked."""
        query = sa.select(nodes.c.id, nodes.c.region, nodes.c.sync_clean_ms).where(
            nodes.c.status != "revoked")
        with self.engine.connect() as conn:
            return [(r.id, r.region, int(r.sync_clean_ms)) for r in conn.execute(query)]

    def count_by_status(self) -> dict[str, int]:
        query = sa.select(nodes.c.status, sa.func.count()).group_by(nodes.c.status)
        with self.engine.connect() as conn:
            return {status: int(count) for status, count in conn.execute(query)}

    def observed_by_node(
            self, node_ids: Iterable[str]) -> dict[str, tuple[NodeHealth, tuple[AppStatus, ...]]]:
        """Health and last reported apps of each given node, what a heartbeat batch is
        compared against."""
        ids = list(node_ids)
        result: dict[str, tuple[NodeHealth, tuple[AppStatus, ...]]] = {}
        columns = [nodes.c.id, nodes.c.apps, *(nodes.c[name] for name in _HEALTH_COLUMNS)]
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                rows = conn.execute(sa.select(*columns).where(nodes.c.id.in_(chunk)))
                for row in rows.mappings():
                    result[row["id"]] = (health_of(row), apps_of(row["apps"]))
        return result

    def list_apps(self) -> list[dict[str, Any]]:
        """One row per app per node across the fleet, ordered by node then app."""
        query = sa.select(nodes.c.id, nodes.c.name, nodes.c.status, nodes.c.apps).order_by(
            nodes.c.region, nodes.c.name)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{"node_id": row["id"], "node": row["name"], "node_status": row["status"],
                 "app": app.name, "version": app.version, "state": app.state,
                 "restarts": app.restarts, "reason": app.reason, "since_s": app.since_s}
                for row in rows for app in sorted(apps_of(row["apps"]), key=lambda a: a.name)]

    def silent_health(self, now_s: float, missed_heartbeats: int) -> dict[str, NodeHealth]:
        """Health of the live nodes that have been silent for `missed_heartbeats`
        intervals: the only candidates for going offline, found by the database
        rather than by loading every node."""
        columns = [nodes.c.id, *(nodes.c[name] for name in _HEALTH_COLUMNS)]
        reference = sa.func.coalesce(nodes.c.last_seen_s, nodes.c.status_since_s)
        query = sa.select(*columns).where(
            nodes.c.status.not_in(["offline", "revoked"]),
            reference + missed_heartbeats * nodes.c.interval_s < now_s)
        with self.engine.connect() as conn:
            return {row["id"]: health_of(row) for row in conn.execute(query).mappings()}

    def apply_heartbeats(self, updates: list[HeartbeatUpdate]) -> None:
        if not updates:
            return
        statement = (
            nodes.update().where(nodes.c.id == sa.bindparam("b_id"),
                                 nodes.c.status != "revoked")
            .values({**{name: sa.bindparam(f"b_{name}") for name in _HEALTH_COLUMNS},
                     "heartbeat_seq": sa.bindparam("b_seq"),
                     "version": sa.bindparam("b_version"),
                     "endpoint": sa.bindparam("b_endpoint"),
                     "load": sa.bindparam("b_load"),
                     "sync_clean_ms": sa.bindparam("b_sync_clean_ms"),
                     "apps": sa.bindparam("b_apps"),
                     "refusals": sa.bindparam("b_refusals"),
                     "desired_generation": sa.bindparam("b_desired_generation"),
                     # never backwards: an ack may have told us more already
                     "purge_seq": sa.case(
                         (nodes.c.purge_seq > sa.bindparam("b_purge_seq"), nodes.c.purge_seq),
                         else_=sa.bindparam("b_purge_seq")),
                     "failing_checks": sa.bindparam("b_failing_checks")}))
        params = [{
            "b_id": u.node_id, "b_seq": u.seq, "b_version": u.version,
            "b_endpoint": u.endpoint, "b_load": u.load,
            "b_failing_checks": list(u.failing_checks), "b_sync_clean_ms": u.sync_clean_ms,
            "b_apps": msgspec.to_builtins(u.apps),
            "b_refusals": msgspec.to_builtins(u.refusals),
            "b_desired_generation": u.desired_generation, "b_purge_seq": u.purge_seq,
            **{f"b_{k}": v for k, v in health_values(u.health).items()},
        } for u in updates]
        with self._tx() as conn:
            conn.execute(statement, params)

    def set_health(self, changes: Mapping[str, NodeHealth]) -> None:
        if not changes:
            return
        statement = (nodes.update()
                     .where(nodes.c.id == sa.bindparam("b_id"), nodes.c.status != "revoked")
                     .values({name: sa.bindparam(f"b_{name}") for name in _HEALTH_COLUMNS}))
        params = [{"b_id": node_id, **{f"b_{k}": v for k, v in health_values(h).items()}}
                  for node_id, h in changes.items()]
        with self._tx() as conn:
            conn.execute(statement, params)

    def update_credentials(self, node_id: str, cert_expires_s: float) -> None:
        with self._tx() as conn:
            conn.execute(nodes.update().where(nodes.c.id == node_id)
                         .values(cert_expires_s=cert_expires_s))

    def revoke(self, node_id: str, health: NodeHealth, now_s: float) -> None:
        with self._tx() as conn:
            row = conn.execute(sa.select(nodes.c.nats_public_key)
                               .where(nodes.c.id == node_id)).first()
            if row is None:
                raise NotFoundError(f"no node {node_id!r}")
            conn.execute(nodes.update().where(nodes.c.id == node_id)
                         .values(**health_values(health)))
            exists = conn.execute(sa.select(revocations.c.nats_public_key).where(
                revocations.c.nats_public_key == row.nats_public_key)).first()
            if exists is None:
                conn.execute(revocations.insert().values(
                    nats_public_key=row.nats_public_key, node_id=node_id, revoked_at_s=now_s))

    def revocations(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(revocations.c.nats_public_key,
                                          revocations.c.revoked_at_s))
            # A JWT issued at or before this instant is revoked; round up so a JWT issued
            # in the same second as the revocation is covered too.
            return {key: int(at) + 1 for key, at in rows}

    # Audit log ----------------------------------------------------------------------

    def add_event(self, at_s: float, actor: str, kind: str, subject: str,
                  detail: dict[str, Any]) -> None:
        self.add_events([{"at_s": at_s, "actor": actor, "kind": kind, "subject": subject,
                          "detail": detail}])

    def add_events(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        with self._tx() as conn:
            conn.execute(events.insert(), rows)

    def list_events(self, limit: int = 200) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(events.select().order_by(events.c.id.desc()).limit(limit))
            return [dict(row) for row in rows.mappings()]
