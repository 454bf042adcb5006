"""Conflict-free replicated data types for collections: the merge rules, sans IO.

Three types, each merged row by row so the node's SQLite store, the hub's SQL store and
the in-memory simulator all make the very same decisions:

- `map`: a last-writer-wins register per key, ordered by hybrid logical clock (ties
  broken by node id inside the `Hlc`). A delete writes a tombstone.
- `counter`: a PN-counter; each node's increments and decrements are kept as two
  monotonically growing totals, merged by maximum.
- `set`: an add-wins observed-remove set; each add carries a unique tag (its `Hlc`),
  a remove deletes only the tags it observed, so a concurrent add survives.

Ops are state deltas: applying one twice, or in any order, gives the same result
(merge is commutative, associative and idempotent; tests/unit/test_crdt.py proves it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import msgspec

from fogline.core.hlc import Hlc, HybridLogicalClock

CollectionType = Literal["map", "counter", "set"]
COLLECTION_TYPES: tuple[str, ...] = ("map", "counter", "set")
Scope = Literal["node", "region", "global"]
SCOPES: tuple[str, ...] = ("node", "region", "global")


class MapOp(msgspec.Struct, frozen=True, tag="map", array_like=True):
    key: str
    ts: Hlc
    # msgpack-encoded value; None is a tombstone (the key was deleted).
    value: bytes | None
    # The timestamp of the entry the writer saw when it wrote; tells a lost concurrent
    # write (a conflict) from an ordinary overwrite.
    prev: Hlc | None = None


class CounterOp(msgspec.Struct, frozen=True, tag="cnt", array_like=True):
    node: str
    p: int
    n: int


class SetAddOp(msgspec.Struct, frozen=True, tag="sadd", array_like=True):
    elem: bytes
    tag: Hlc


class SetRemoveOp(msgspec.Struct, frozen=True, tag="srem", array_like=True):
    elem: bytes
    tags: tuple[Hlc, ...]


Op = MapOp | CounterOp | SetAddOp | SetRemoveOp


@dataclass(frozen=True)
class MapMerge:
    winner: MapOp
    changed: bool
    # A write that had not seen the other one lost (a concurrent write was discarded).
    conflict: bool


def merge_map(current: MapOp | None, incoming: MapOp) -> MapMerge:
    if current is None:
        return MapMerge(incoming, True, False)
    if incoming.ts == current.ts:
        return MapMerge(current, False, False)
    if incoming.ts > current.ts:
        return MapMerge(incoming, True, incoming.prev != current.ts)
    return MapMerge(current, False, current.prev != incoming.ts)


def merge_counter(current: tuple[int, int] | None, incoming: CounterOp) -> tuple[int, int]:
    if current is None:
        return incoming.p, incoming.n
    return max(current[0], incoming.p), max(current[1], incoming.n)


@dataclass
class CollectionState:
    """One replica of one collection, in memory (simulator, tests, hub snapshots)."""

    kind: CollectionType
    entries: dict[str, MapOp] = field(default_factory=dict)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    adds: dict[bytes, set[Hlc]] = field(default_factory=dict)
    removed: set[Hlc] = field(default_factory=set)
    conflicts: int = 0

    def apply(self, op: Op) -> bool:
        """Merge one op; True if the state changed."""
        if isinstance(op, MapOp):
            merged = merge_map(self.entries.get(op.key), op)
            # Count a conflict once: when the winner displaces the loser. A redelivered
            # losing write changes nothing and must not count again.
            self.conflicts += merged.changed and merged.conflict
            if merged.changed:
                self.entries[op.key] = merged.winner
            return merged.changed
        if isinstance(op, CounterOp):
            before = self.counts.get(op.node)
            after = merge_counter(before, op)
            self.counts[op.node] = after
            return after != before
        if isinstance(op, SetAddOp):
            tags = self.adds.setdefault(op.elem, set())
            if op.tag in self.removed or op.tag in tags:
                return False
            tags.add(op.tag)
            return True
        fresh = set(op.tags) - self.removed
        self.removed |= fresh
        tags = self.adds.get(op.elem, set())
        changed = bool(tags & fresh)
        tags -= fresh
        return changed or bool(fresh)

    # Reads --------------------------------------------------------------------------

    def value(self) -> object:
        """The user-visible value: dict, int or set (of encoded elements)."""
        if self.kind == "map":
            return {k: e.value for k, e in sorted(self.entries.items()) if e.value is not None}
        if self.kind == "counter":
            return sum(p for p, _ in self.counts.values()) - sum(
                n for _, n in self.counts.values())
        return {elem for elem, tags in self.adds.items() if tags}

    # Local writes: each returns the op to apply locally and replicate ------------------

    def put(self, hlc: HybridLogicalClock, key: str, value: bytes | None) -> MapOp:
        current = self.entries.get(key)
        return MapOp(key, hlc.now(), value, current.ts if current else None)

    def increment(self, node: str, amount: int) -> CounterOp:
        p, n = self.counts.get(node, (0, 0))
        return CounterOp(node, p + max(amount, 0), n + max(-amount, 0))

    def add(self, hlc: HybridLogicalClock, elem: bytes) -> SetAddOp:
        return SetAddOp(elem, hlc.now())

    def remove(self, elem: bytes) -> SetRemoveOp:
        return SetRemoveOp(elem, tuple(sorted(self.adds.get(elem, set()))))
