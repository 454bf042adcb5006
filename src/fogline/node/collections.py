"""Replicated collections on a node: local reads and writes, durable before they return.

Every write makes a CRDT op (`fogline.core.crdt`), merges it into the node's SQLite
replica and appends it to the pending-sync table in the same transaction, so an
acknowledged write survives kill -9 and reaches the hub eventually. Ops from the hub are
merged with the same rules. Reads never touch the network.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from fogline.clock import Clock
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
from fogline.core.hlc import Hlc, HybridLogicalClock
from fogline.core.sync import CollectionDef, check_definition
from fogline.errors import ConfigError, NotFoundError, ProtocolError
from fogline.node.sqlite_writer import FsyncPolicy, GroupCommitWriter

VALUE_BYTES_MAX = 256 * 1024
WATCH_QUEUE_MAX = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS defs (name TEXT PRIMARY KEY, type TEXT NOT NULL, scope TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS map (collection TEXT, key TEXT, op BLOB NOT NULL,
    deleted INTEGER NOT NULL, ts_wall_ms INTEGER NOT NULL, PRIMARY KEY (collection, key));
CREATE TABLE IF NOT EXISTS counter (collection TEXT, node TEXT, p INTEGER NOT NULL,
    n INTEGER NOT NULL, PRIMARY KEY (collection, node));
CREATE TABLE IF NOT EXISTS set_add (collection TEXT, tag BLOB, elem BLOB NOT NULL,
    PRIMARY KEY (collection, tag));
CREATE INDEX IF NOT EXISTS set_add_elem ON set_add (collection, elem);
CREATE TABLE IF NOT EXISTS set_removed (collection TEXT, tag BLOB, elem BLOB NOT NULL,
    ts_wall_ms INTEGER NOT NULL, PRIMARY KEY (collection, tag));
CREATE TABLE IF NOT EXISTS pending (seq INTEGER PRIMARY KEY AUTOINCREMENT,
    collection TEXT NOT NULL, op BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
"""

_encoder = msgspec.msgpack.Encoder()
_op_decoder = msgspec.msgpack.Decoder(Op)
_map_decoder = msgspec.msgpack.Decoder(MapOp)
_hlc_decoder = msgspec.msgpack.Decoder(Hlc)


def encode_value(value: Any) -> bytes:
    try:
        data = _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ConfigError(f"value cannot be stored: {exc}") from exc
    if len(data) > VALUE_BYTES_MAX:
        raise ProtocolError(f"value of {len(data)} bytes exceeds {VALUE_BYTES_MAX}")
    return data


def decode_value(data: bytes) -> Any:
    return msgspec.msgpack.decode(data)


# Reads on a connection: the node's own Collection and app workers' read-only view of
# state.db both use these, so the two can never disagree on what a value is.

def read_map_row(conn: sqlite3.Connection, name: str, key: str) -> MapOp | None:
    """The key's current op, tombstone included (its timestamp guards compare-and-put)."""
    row = conn.execute("SELECT op FROM map WHERE collection=? AND key=?",
                       (name, key)).fetchone()
    return _map_decoder.decode(row[0]) if row else None


def read_map_get(conn: sqlite3.Connection, name: str, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT op FROM map WHERE collection=? AND key=? AND deleted=0",
                       (name, key)).fetchone()
    if row is None:
        return default
    op = _map_decoder.decode(row[0])
    return decode_value(op.value) if op.value is not None else default


def read_map_items(conn: sqlite3.Connection, name: str, prefix: str = "") -> list[tuple[str, Any]]:
    rows = conn.execute(
        "SELECT key, op FROM map WHERE collection=? AND deleted=0 AND key >= ? "
        "AND key < ? ORDER BY key", (name, prefix, prefix + "\U0010ffff")).fetchall()
    return [(key, decode_value(_map_decoder.decode(op).value)) for key, op in rows]


def read_contains(conn: sqlite3.Connection, name: str, elem: bytes) -> bool:
    return conn.execute("SELECT 1 FROM set_add WHERE collection=? AND elem=? LIMIT 1",
                        (name, elem)).fetchone() is not None


def read_definition(conn: sqlite3.Connection, name: str) -> CollectionDef:
    row = conn.execute("SELECT name, type, scope FROM defs WHERE name=?", (name,)).fetchone()
    if row is None:
        raise NotFoundError(f"collection {name!r} is not defined on this node; create "
                            "it at the hub (fogline collection create)")
    return CollectionDef(*row)


def read_state(conn: sqlite3.Connection, definition: CollectionDef) -> CollectionState:
    name = definition.name
    state = CollectionState(definition.type)
    ops: list[Op] = [_map_decoder.decode(r[0]) for r in conn.execute(
        "SELECT op FROM map WHERE collection=?", (name,))]
    ops += [CounterOp(*r) for r in conn.execute(
        "SELECT node, p, n FROM counter WHERE collection=?", (name,))]
    ops += [SetAddOp(elem, _hlc_decoder.decode(tag)) for tag, elem in conn.execute(
        "SELECT tag, elem FROM set_add WHERE collection=?", (name,))]
    for op in ops:
        state.apply(op)
    return state


def decoded_value(definition: CollectionDef, state: CollectionState) -> Any:
    """A collection's whole value with map values and set elements decoded."""
    if definition.type == "set":
        return {decode_value(e) for e in state.value()}  # type: ignore[union-attr]
    if definition.type == "map":
        return {k: decode_value(v) for k, v in state.value().items()}  # type: ignore[union-attr]
    return state.value()


@dataclass(frozen=True)
class Change:
    """One merged op, as `watch()` reports it."""

    collection: str
    op: Op
    local: bool


# Row-level merge into SQLite (the same rules as CollectionState.apply) ----------------

def _merge(conn: sqlite3.Connection, collection: str, op: Op) -> tuple[bool, bool]:
    """Merge one op; (changed, conflict)."""
    if isinstance(op, MapOp):
        row = conn.execute("SELECT op FROM map WHERE collection=? AND key=?",
                           (collection, op.key)).fetchone()
        merged = merge_map(_map_decoder.decode(row[0]) if row else None, op)
        if merged.changed:
            conn.execute("INSERT OR REPLACE INTO map VALUES (?,?,?,?,?)",
                         (collection, op.key, _encoder.encode(op), op.value is None,
                          op.ts.wall_ms))
        return merged.changed, merged.conflict
    if isinstance(op, CounterOp):
        row = conn.execute("SELECT p, n FROM counter WHERE collection=? AND node=?",
                           (collection, op.node)).fetchone()
        before = (row[0], row[1]) if row else None
        after = merge_counter(before, op)
        if after != before:
            conn.execute("INSERT OR REPLACE INTO counter VALUES (?,?,?,?)",
                         (collection, op.node, *after))
        return after != before, False
    if isinstance(op, SetAddOp):
        tag = _encoder.encode(op.tag)
        if conn.execute("SELECT 1 FROM set_removed WHERE collection=? AND tag=?",
                        (collection, tag)).fetchone():
            return False, False
        cursor = conn.execute("INSERT OR IGNORE INTO set_add VALUES (?,?,?)",
                              (collection, tag, op.elem))
        return cursor.rowcount == 1, False
    changed = False
    for hlc in op.tags:
        tag = _encoder.encode(hlc)
        fresh = conn.execute("INSERT OR IGNORE INTO set_removed VALUES (?,?,?,?)",
                             (collection, tag, op.elem, hlc.wall_ms)).rowcount == 1
        removed = conn.execute("DELETE FROM set_add WHERE collection=? AND tag=?",
                               (collection, tag)).rowcount == 1
        changed = changed or fresh or removed
    return changed, False


class NodeCollections:
    """The node's replicas of every collection it holds, in `DIR/state.db`."""

    def __init__(self, path: Path, node_id: str, clock: Clock,
                 fsync: FsyncPolicy = "normal") -> None:
        self.node_id = node_id
        self.pending_changed = asyncio.Event()
        self.conflicts = 0
        loop = asyncio.get_running_loop()
        self.writer = GroupCommitWriter(
            path, fsync, on_commit=lambda: loop.call_soon_threadsafe(self.pending_changed.set))
        self.writer.read(lambda conn: conn.executescript(_SCHEMA))
        self.hlc = HybridLogicalClock(node_id, clock)
        last = self.writer.read(lambda c: c.execute(
            "SELECT v FROM meta WHERE k='hlc'").fetchone())
        if last:
            self.hlc.restore(_hlc_decoder.decode(last[0]))
        self._watchers: set[asyncio.Queue[Change]] = set()
        self._loop = loop

    def close(self) -> None:
        self.writer.close()

    # Definitions --------------------------------------------------------------------

    def definition(self, name: str) -> CollectionDef:
        return self.writer.read(lambda c: read_definition(c, name))

    def definitions(self) -> list[CollectionDef]:
        rows = self.writer.read(lambda c: c.execute("SELECT name, type, scope FROM defs "
                                                    "ORDER BY name").fetchall())
        return [CollectionDef(*row) for row in rows]

    async def define_local(self, defs: list[CollectionDef]) -> None:
        """Define the collections an app declares that this node does not know yet, so
        the app can write while the hub is unreachable (the hub is asked to create the
        same ones, see fogline.node.declare). All or nothing: raises ConfigError naming
        the collection if one is invalid or known here with another type or scope."""
        checked = [check_definition(d.name, d.type, d.scope) for d in defs]

        def run(conn: sqlite3.Connection) -> None:
            for d in checked:
                row = conn.execute("SELECT type, scope FROM defs WHERE name=?",
                                   (d.name,)).fetchone()
                if row is not None and tuple(row) != (d.type, d.scope):
                    raise ConfigError(f"collection {d.name!r} is defined on this node as "
                                      f"{row[0]}/{row[1]}, not {d.type}/{d.scope}; type "
                                      "and scope cannot change")
                conn.execute("INSERT OR IGNORE INTO defs VALUES (?,?,?)",
                             (d.name, d.type, d.scope))

        await self.writer.submit(run)  # an error rolls the whole call back

    # Writes -------------------------------------------------------------------------

    async def write(self, name: str, make: Callable[[sqlite3.Connection], Op | None]) -> Op | None:
        """Make an op from the current rows, merge it and queue it for sync, durably."""
        def run(conn: sqlite3.Connection) -> Op | None:
            op = make(conn)
            if op is None:
                return None
            _merge(conn, name, op)
            conn.execute("INSERT INTO pending (collection, op) VALUES (?,?)",
                         (name, _encoder.encode(op)))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('hlc', ?)",
                         (_encoder.encode(self.hlc.last),))
            return op

        op = await self.writer.submit(run)
        if op is not None:
            self._notify([Change(name, op, True)])
        return op

    async def merge_remote(self, ops: list[tuple[str, Op]],
                           defs: list[CollectionDef] | None = None) -> int:
        """Merge ops and definitions from the hub; returns how many changed state."""
        def run(conn: sqlite3.Connection) -> list[Change]:
            for d in defs or []:
                conn.execute("INSERT OR REPLACE INTO defs VALUES (?,?,?)",
                             (d.name, d.type, d.scope))
            changes = []
            for name, op in ops:
                # Runs on the writer thread, the only one that ticks the HLC.
                if isinstance(op, MapOp):
                    self.hlc.observe(op.ts)
                elif isinstance(op, SetAddOp):
                    self.hlc.observe(op.tag)
                changed, conflict = _merge(conn, name, op)
                self.conflicts += changed and conflict
                if changed:
                    changes.append(Change(name, op, False))
            return changes

        changes = await self.writer.submit(run)
        self._notify(changes)
        return len(changes)

    # Sync bookkeeping ---------------------------------------------------------------

    def pending_batch(self, ops_max: int) -> list[tuple[int, str, Op]]:
        rows = self.writer.read(lambda c: c.execute(
            "SELECT seq, collection, op FROM pending ORDER BY seq LIMIT ?",
            (ops_max,)).fetchall())
        return [(seq, name, _op_decoder.decode(op)) for seq, name, op in rows]

    async def acknowledge(self, seq_last: int) -> None:
        await self.writer.submit(lambda c: c.execute("DELETE FROM pending WHERE seq<=?",
                                                     (seq_last,)))

    async def clean_mark_ms(self) -> int | None:
        """The HLC (ms) if nothing is left to upload, else None; read on the writer
        thread, so no op can be half-made between the two reads."""
        def read(conn: sqlite3.Connection) -> int | None:
            pending = conn.execute("SELECT count(*) FROM pending").fetchone()[0]
            if pending:
                return None
            # Tick, so every later op is strictly newer than the mark even if the wall
            # clock steps back; saved like any write's timestamp.
            mark = self.hlc.now()
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('hlc', ?)",
                         (_encoder.encode(mark),))
            return mark.wall_ms

        return await self.writer.submit(read)

    async def collect_tombstones(self, scope: str, before_ms: int) -> int:
        """Drop tombstones older than the hub's horizon in every collection of `scope`."""
        def run(conn: sqlite3.Connection) -> int:
            names = [r[0] for r in conn.execute("SELECT name FROM defs WHERE scope=?",
                                                (scope,))]
            dropped = 0
            for name in names:
                dropped += conn.execute(
                    "DELETE FROM map WHERE collection=? AND deleted=1 AND ts_wall_ms<?",
                    (name, before_ms)).rowcount
                dropped += conn.execute(
                    "DELETE FROM set_removed WHERE collection=? AND ts_wall_ms<?",
                    (name, before_ms)).rowcount
            return dropped

        return await self.writer.submit(run)

    def tombstone_count(self) -> int:
        return int(self.writer.read(lambda c: c.execute(
            "SELECT (SELECT count(*) FROM map WHERE deleted=1) + "
            "(SELECT count(*) FROM set_removed)").fetchone()[0]))

    def pending_count(self) -> int:
        return int(self.writer.read(lambda c: c.execute(
            "SELECT count(*) FROM pending").fetchone()[0]))

    def meta(self, key: str) -> bytes | None:
        row = self.writer.read(lambda c: c.execute("SELECT v FROM meta WHERE k=?",
                                                   (key,)).fetchone())
        return row[0] if row else None

    async def set_meta(self, key: str, value: bytes) -> None:
        await self.writer.submit(lambda c: c.execute(
            "INSERT OR REPLACE INTO meta VALUES (?,?)", (key, value)))

    # Reads and watches --------------------------------------------------------------

    def state(self, name: str) -> CollectionState:
        definition = self.definition(name)
        return self.writer.read(lambda c: read_state(c, definition))

    def _notify(self, changes: list[Change]) -> None:
        for watcher in list(self._watchers):
            for change in changes:
                if watcher.full():
                    self._watchers.discard(watcher)  # too slow: drop it, never block writes
                    break
                watcher.put_nowait(change)

    async def watch(self) -> AsyncIterator[Change]:
        queue: asyncio.Queue[Change] = asyncio.Queue(WATCH_QUEUE_MAX)
        self._watchers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    def collection(self, name: str) -> Collection:
        return Collection(self, self.definition(name))


class Collection:
    """The local API of one collection (what apps get from `ctx.collection(name)`).

    The `*_encoded` writes take values already encoded with `encode_value`: app workers
    encode in their own process and the node applies the bytes as they are.
    """

    def __init__(self, store: NodeCollections, definition: CollectionDef) -> None:
        self.store = store
        self.definition = definition
        self.name = definition.name

    def _require(self, kind: str) -> None:
        if self.definition.type != kind:
            raise ConfigError(f"collection {self.name!r} is a {self.definition.type}, "
                              f"not a {kind}")

    # map
    async def put(self, key: str, value: Any) -> None:
        await self.put_encoded(key, encode_value(value))

    async def put_encoded(self, key: str, data: bytes) -> None:
        self._require("map")

        def make(conn: sqlite3.Connection) -> Op:
            current = read_map_row(conn, self.name, key)
            return MapOp(key, self.store.hlc.now(), data, current.ts if current else None)

        await self.store.write(self.name, make)

    async def compare_and_put(self, key: str, expected: Hlc | None, data: bytes) -> bool:
        """Write `data` only if the key's op is still the one stamped `expected` (None:
        never written); False, writing nothing, if another write came first."""
        self._require("map")
        matched: list[bool] = []

        def make(conn: sqlite3.Connection) -> Op | None:
            current = read_map_row(conn, self.name, key)
            ts = current.ts if current else None
            if ts != expected:
                return None
            matched.append(True)
            return MapOp(key, self.store.hlc.now(), data, ts)

        await self.store.write(self.name, make)
        return bool(matched)

    async def delete(self, key: str) -> None:
        self._require("map")

        def make(conn: sqlite3.Connection) -> Op | None:
            current = read_map_row(conn, self.name, key)
            if current is None or current.value is None:
                return None
            return MapOp(key, self.store.hlc.now(), None, current.ts)

        await self.store.write(self.name, make)

    async def update(self, key: str, fn: Callable[[Any], Any]) -> Any:
        """Read-modify-write one key atomically on this node."""
        self._require("map")
        result: list[Any] = []

        def make(conn: sqlite3.Connection) -> Op:
            current = read_map_row(conn, self.name, key)
            old = decode_value(current.value) if current and current.value else None
            result.append(fn(old))
            return MapOp(key, self.store.hlc.now(), encode_value(result[0]),
                         current.ts if current else None)

        await self.store.write(self.name, make)
        return result[0]

    def get(self, key: str, default: Any = None) -> Any:
        self._require("map")
        return self.store.writer.read(lambda c: read_map_get(c, self.name, key, default))

    def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        self._require("map")
        return self.store.writer.read(lambda c: read_map_items(c, self.name, prefix))

    # counter
    async def incr(self, amount: int = 1) -> None:
        self._require("counter")
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise ConfigError(f"counter amount must be an integer, got {amount!r}")
        node = self.store.node_id

        def make(conn: sqlite3.Connection) -> Op:
            row = conn.execute("SELECT p, n FROM counter WHERE collection=? AND node=?",
                               (self.name, node)).fetchone()
            p, n = row if row else (0, 0)
            return CounterOp(node, p + max(amount, 0), n + max(-amount, 0))

        await self.store.write(self.name, make)

    async def decr(self, amount: int = 1) -> None:
        await self.incr(-amount)

    def value(self) -> Any:
        return decoded_value(self.definition, self.store.state(self.name))

    # set
    async def add(self, elem: Any) -> None:
        await self.add_encoded(encode_value(elem))

    async def add_encoded(self, data: bytes) -> None:
        self._require("set")
        await self.store.write(self.name, lambda conn: SetAddOp(data, self.store.hlc.now()))

    async def remove(self, elem: Any) -> None:
        await self.remove_encoded(encode_value(elem))

    async def remove_encoded(self, data: bytes) -> None:
        self._require("set")

        def make(conn: sqlite3.Connection) -> Op | None:
            tags = tuple(sorted(_hlc_decoder.decode(r[0]) for r in conn.execute(
                "SELECT tag FROM set_add WHERE collection=? AND elem=?", (self.name, data))))
            return SetRemoveOp(data, tags) if tags else None

        await self.store.write(self.name, make)

    def contains(self, elem: Any) -> bool:
        self._require("set")
        data = encode_value(elem)
        return self.store.writer.read(lambda c: read_contains(c, self.name, data))
