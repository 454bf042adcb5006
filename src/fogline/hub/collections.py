"""The hub's replicas of every collection, in SQL, merged in batches.

Each op is merged with the same row rules the nodes use (`fogline.core.crdt`): the
current rows for a whole batch are read with one query per table, merged in Python and
written back with one multi-row upsert, so a batch costs a few round trips whatever
its size. Works on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fogline.core.crdt import (
    CollectionState,
    CounterOp,
    MapOp,
    Op,
    SetAddOp,
    SetRemoveOp,
    merge_counter,
    merge_map,
)
from fogline.core.hlc import Hlc
from fogline.core.sync import CollectionDef
from fogline.errors import ConfigError, NotFoundError
from fogline.hub.store import metadata, upsert

definitions = sa.Table(
    "fl_coll_defs", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("created_at_s", sa.Float, nullable=False),
)
map_rows = sa.Table(
    "fl_coll_map", metadata,
    sa.Column("replica", sa.String(80), primary_key=True),
    sa.Column("collection", sa.String(64), primary_key=True),
    sa.Column("key", sa.String(512), primary_key=True),
    sa.Column("op", sa.LargeBinary, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("ts_wall_ms", sa.BigInteger, nullable=False),
)
# Merges look rows up by key across replicas: without this, every lookup scans the table.
sa.Index("fl_coll_map_key", map_rows.c.key)

counter_rows = sa.Table(
    "fl_coll_counter", metadata,
    sa.Column("replica", sa.String(80), primary_key=True),
    sa.Column("collection", sa.String(64), primary_key=True),
    sa.Column("node", sa.String(64), primary_key=True),
    sa.Column("p", sa.BigInteger, nullable=False),
    sa.Column("n", sa.BigInteger, nullable=False),
)
set_adds = sa.Table(
    "fl_coll_set_add", metadata,
    sa.Column("replica", sa.String(80), primary_key=True),
    sa.Column("collection", sa.String(64), primary_key=True),
    sa.Column("tag", sa.LargeBinary, primary_key=True),
    sa.Column("elem", sa.LargeBinary, nullable=False),
)
set_removed = sa.Table(
    "fl_coll_set_removed", metadata,
    sa.Column("replica", sa.String(80), primary_key=True),
    sa.Column("collection", sa.String(64), primary_key=True),
    sa.Column("tag", sa.LargeBinary, primary_key=True),
    sa.Column("elem", sa.LargeBinary, nullable=False),
    sa.Column("ts_wall_ms", sa.BigInteger, nullable=False),
)

_tag_encoder = msgspec.msgpack.Encoder()
_tag_decoder = msgspec.msgpack.Decoder(Hlc)
_map_decoder = msgspec.msgpack.Decoder(MapOp)

Located = tuple[str, str, Op]  # (replica, collection, op)


def _tag(hlc: Hlc) -> bytes:
    return _tag_encoder.encode(hlc)


@dataclass
class MergeOutcome:
    changed: list[Located] = field(default_factory=list)
    conflicts: list[tuple[str, str, MapOp]] = field(default_factory=list)




class CollectionStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # Definitions --------------------------------------------------------------------

    def define(self, definition: CollectionDef, now_s: float) -> str:
        """Create a collection; 'unchanged' if it exists alike. Type and scope are
        immutable: a different one is refused and nothing changes."""
        with self.engine.begin() as conn:
            row = conn.execute(definitions.select().where(
                definitions.c.name == definition.name)).mappings().first()
            if row is not None:
                if (row["type"], row["scope"]) != (definition.type, definition.scope):
                    raise ConfigError(
                        f"collection {definition.name!r} exists as {row['type']}/"
                        f"{row['scope']}; type and scope cannot change")
                return "unchanged"
            conn.execute(definitions.insert().values(
                name=definition.name, type=definition.type, scope=definition.scope,
                created_at_s=now_s))
        return "created"

    def definitions(self) -> dict[str, CollectionDef]:
        with self.engine.connect() as conn:
            rows = conn.execute(definitions.select().order_by(definitions.c.name))
            return {r.name: CollectionDef(r.name, r.type, r.scope) for r in rows}

    # Merging ------------------------------------------------------------------------

    def merge(self, located: list[Located]) -> MergeOutcome:
        """Merge a batch of ops into the hub's replicas in one transaction."""
        outcome = MergeOutcome()
        by_kind: dict[type, list[Located]] = defaultdict(list)
        for item in located:
            by_kind[type(item[2])].append(item)
        with self.engine.begin() as conn:
            self._merge_maps(conn, by_kind[MapOp], outcome)
            self._merge_counters(conn, by_kind[CounterOp], outcome)
            self._merge_set_adds(conn, by_kind[SetAddOp], outcome)
            self._merge_set_removes(conn, by_kind[SetRemoveOp], outcome)
        return outcome

    def _merge_maps(self, conn: Connection, items: list[Located],
                    outcome: MergeOutcome) -> None:
        if not items:
            return
        # Plain DB-API calls: SQLAlchemy's per-row parameter processing cost more
        # than the SQL itself.
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        wanted = {(r, c, op.key) for r, c, op in items}  # type: ignore[union-attr]
        keys = list({key for _, _, key in wanted})
        current: dict[tuple[str, str, str], MapOp] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            rows = conn.exec_driver_sql(
                f"SELECT replica, collection, key, op FROM {map_rows.name} "
                f"WHERE key IN ({', '.join([mark] * len(chunk))})", tuple(chunk)).fetchall()
            for replica, collection, key, data in rows:
                if (replica, collection, key) in wanted:
                    current[(replica, collection, key)] = _map_decoder.decode(data)
        writes: dict[tuple[str, str, str], MapOp] = {}
        for replica, collection, op in items:
            assert isinstance(op, MapOp)
            slot = (replica, collection, op.key)
            merged = merge_map(current.get(slot), op)
            if merged.conflict and merged.changed:  # counted once, when displaced
                outcome.conflicts.append((replica, collection, current[slot]))
            if merged.changed:
                current[slot] = merged.winner
                writes[slot] = merged.winner
                outcome.changed.append((replica, collection, op))
        rows_out = [{"replica": r, "collection": c, "key": k, "op": _tag_encoder.encode(op),
                     "deleted": op.value is None, "ts_wall_ms": op.ts.wall_ms}
                    for (r, c, k), op in writes.items()]
        if conn.dialect.name != "sqlite":  # psycopg: SQLAlchemy batches many rows per INSERT
            upsert(conn, map_rows, rows_out, ["op", "deleted", "ts_wall_ms"])
        elif rows_out:
            conn.exec_driver_sql(
                f"INSERT INTO {map_rows.name} (replica, collection, key, op, deleted, "
                "ts_wall_ms) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (replica, collection, key) "
                "DO UPDATE SET op = excluded.op, deleted = excluded.deleted, "
                "ts_wall_ms = excluded.ts_wall_ms", [tuple(row.values()) for row in rows_out])

    def _merge_counters(self, conn: Connection, items: list[Located],
                        outcome: MergeOutcome) -> None:
        if not items:
            return
        nodes = {op.node for _, _, op in items}  # type: ignore[union-attr]
        current: dict[tuple[str, str, str], tuple[int, int]] = {}
        rows = conn.execute(counter_rows.select().where(counter_rows.c.node.in_(nodes)))
        for row in rows:
            current[(row.replica, row.collection, row.node)] = (row.p, row.n)
        writes: dict[tuple[str, str, str], tuple[int, int]] = {}
        for replica, collection, op in items:
            assert isinstance(op, CounterOp)
            slot = (replica, collection, op.node)
            before = current.get(slot)
            after = merge_counter(before, op)
            if after != before:
                current[slot] = writes[slot] = after
                outcome.changed.append((replica, collection, op))
        upsert(conn, counter_rows, [
            {"replica": r, "collection": c, "node": node, "p": p, "n": n}
            for (r, c, node), (p, n) in writes.items()], ["p", "n"])

    def _removed_tags(self, conn: Connection, tags: set[bytes]) -> set[tuple[str, str, bytes]]:
        found: set[tuple[str, str, bytes]] = set()
        tag_list = list(tags)
        for start in range(0, len(tag_list), 500):
            rows = conn.execute(sa.select(set_removed.c.replica, set_removed.c.collection,
                                          set_removed.c.tag)
                                .where(set_removed.c.tag.in_(tag_list[start:start + 500])))
            found.update((r.replica, r.collection, r.tag) for r in rows)
        return found

    def _merge_set_adds(self, conn: Connection, items: list[Located],
                        outcome: MergeOutcome) -> None:
        if not items:
            return
        tags = {_tag(op.tag) for _, _, op in items}  # type: ignore[union-attr]
        removed = self._removed_tags(conn, tags)
        existing: set[tuple[str, str, bytes]] = set()
        tag_list = list(tags)
        for start in range(0, len(tag_list), 500):
            rows = conn.execute(sa.select(set_adds.c.replica, set_adds.c.collection,
                                          set_adds.c.tag)
                                .where(set_adds.c.tag.in_(tag_list[start:start + 500])))
            existing.update((r.replica, r.collection, r.tag) for r in rows)
        rows_out = []
        for replica, collection, op in items:
            assert isinstance(op, SetAddOp)
            slot = (replica, collection, _tag(op.tag))
            if slot in removed or slot in existing:
                continue
            existing.add(slot)
            rows_out.append({"replica": replica, "collection": collection, "tag": slot[2],
                             "elem": op.elem})
            outcome.changed.append((replica, collection, op))
        upsert(conn, set_adds, rows_out, [])

    def _merge_set_removes(self, conn: Connection, items: list[Located],
                           outcome: MergeOutcome) -> None:
        if not items:
            return
        tags = {_tag(t) for _, _, op in items for t in op.tags}  # type: ignore[union-attr]
        removed = self._removed_tags(conn, tags)
        rows_out = []
        for replica, collection, op in items:
            assert isinstance(op, SetRemoveOp)
            fresh = [(_tag(t), t.wall_ms) for t in op.tags
                     if (replica, collection, _tag(t)) not in removed]
            if not fresh:
                continue
            for tag, wall_ms in fresh:
                removed.add((replica, collection, tag))
                rows_out.append({"replica": replica, "collection": collection, "tag": tag,
                                 "elem": op.elem, "ts_wall_ms": wall_ms})
            conn.execute(set_adds.delete().where(
                set_adds.c.replica == replica, set_adds.c.collection == collection,
                set_adds.c.tag.in_([tag for tag, _ in fresh])))
            outcome.changed.append((replica, collection, op))
        upsert(conn, set_removed, rows_out, [])

    # Tombstones ---------------------------------------------------------------------

    def replicas_with_tombstones(self) -> list[str]:
        with self.engine.connect() as conn:
            found = set(conn.execute(sa.select(map_rows.c.replica).distinct()
                                     .where(map_rows.c.deleted.is_(True))).scalars())
            found |= set(conn.execute(sa.select(set_removed.c.replica).distinct()).scalars())
        return sorted(found)

    def collect_tombstones(self, replica: str, before_ms: int) -> int:
        """Drop the replica's tombstones older than the horizon (core/tombstones.py)."""
        with self.engine.begin() as conn:
            dropped = conn.execute(map_rows.delete().where(
                map_rows.c.replica == replica, map_rows.c.deleted.is_(True),
                map_rows.c.ts_wall_ms < before_ms)).rowcount
            dropped += conn.execute(set_removed.delete().where(
                set_removed.c.replica == replica,
                set_removed.c.ts_wall_ms < before_ms)).rowcount
        return int(dropped)

    def tombstone_count(self, replica: str) -> int:
        with self.engine.connect() as conn:
            maps = conn.execute(sa.select(sa.func.count()).select_from(map_rows).where(
                map_rows.c.replica == replica, map_rows.c.deleted.is_(True))).scalar_one()
            tags = conn.execute(sa.select(sa.func.count()).select_from(set_removed).where(
                set_removed.c.replica == replica)).scalar_one()
        return int(maps) + int(tags)

    # Reading ------------------------------------------------------------------------

    def replica_ops(self, replicas: list[str]) -> list[tuple[str, str, Op]]:
        """Every op that rebuilds the given replicas (for snapshots)."""
        out: list[tuple[str, str, Op]] = []
        with self.engine.connect() as conn:
            for row in conn.execute(sa.select(map_rows.c.replica, map_rows.c.collection,
                                              map_rows.c.op)
                                    .where(map_rows.c.replica.in_(replicas))):
                out.append((row.replica, row.collection, _map_decoder.decode(row.op)))
            for row in conn.execute(counter_rows.select().where(
                    counter_rows.c.replica.in_(replicas))):
                out.append((row.replica, row.collection, CounterOp(row.node, row.p, row.n)))
            for row in conn.execute(set_adds.select().where(set_adds.c.replica.in_(replicas))):
                out.append((row.replica, row.collection,
                            SetAddOp(row.elem, _tag_decoder.decode(row.tag))))
            for row in conn.execute(set_removed.select().where(
                    set_removed.c.replica.in_(replicas))):
                out.append((row.replica, row.collection,
                            SetRemoveOp(row.elem, (_tag_decoder.decode(row.tag),))))
        return out

    def replicas_of(self, name: str) -> list[str]:
        with self.engine.connect() as conn:
            found: set[str] = set()
            for table in (map_rows, counter_rows, set_adds, set_removed):
                found.update(conn.execute(sa.select(table.c.replica).distinct()
                                          .where(table.c.collection == name)).scalars())
        return sorted(found)

    def state(self, name: str, replica: str) -> CollectionState:
        definition = self.definitions().get(name)
        if definition is None:
            raise NotFoundError(f"no collection {name!r}")
        state = CollectionState(definition.type)
        for _, collection, op in self.replica_ops([replica]):
            if collection == name:
                state.apply(op)
        return state
