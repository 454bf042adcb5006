"""The checkers of the deterministic simulator, kept apart from the model they judge.

`Books` is told every acknowledged write and emit and keeps its own ledger; it never
trusts the model's bookkeeping. Safety is checked after every step (nothing
acknowledged is lost from a committed replica, timestamps only move forward, the hub
applies each stream record once and in seq order); liveness once everything has
healed and gone quiet (every replica equals the hub's, the hub equals what the ledger
says the writes add up to, every emitted record arrived exactly once).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import TYPE_CHECKING, Protocol

from fogline.core.crdt import CollectionState, CounterOp, MapOp, Op, SetAddOp, SetRemoveOp
from fogline.core.hlc import Hlc

if TYPE_CHECKING:
    from fogline.sim.deterministic import Simulation
    from fogline.sim.network import NamedOp, SimHub

FAILURES_MAX = 10
SHOWN_CHARS_MAX = 300


class Observer(Protocol):
    """What the model reports to the checkers, which keep their own books."""

    def acknowledged(self, node: str, replica: str, collection: str, op: Op) -> None:
        """A local write reached the node's committed state and was acknowledged."""

    def counted(self, replica: str, collection: str, amount: int) -> None:
        """The amount a counter write meant to add (the ledger's own sum)."""

    def emitted(self, node: str, stream: str, seq: int) -> None:
        """A record was committed to the node's stream outbox and acknowledged."""

    def delta_acked(self, node: str, ops: list[NamedOp]) -> None:
        """The hub acknowledged these ops; the node drops them from its outbox."""


def reflects(state: CollectionState, op: Op) -> bool:
    """Whether a replica holds the effect of `op` (or something that supersedes it)."""
    if isinstance(op, MapOp):
        entry = state.entries.get(op.key)
        return entry is not None and entry.ts >= op.ts
    if isinstance(op, CounterOp):
        p, n = state.counts.get(op.node, (0, 0))
        return p >= op.p and n >= op.n
    if isinstance(op, SetAddOp):
        return op.tag in state.adds.get(op.elem, ()) or op.tag in state.removed
    return state.removed.issuperset(op.tags)


def canonical(state: CollectionState) -> tuple[object, ...]:
    """The replicated part of a replica. `conflicts` is a local observation count, and
    an element whose tags were all removed may or may not keep an empty entry depending
    on the order ops arrived in, so neither is compared."""
    adds = {elem: tags for elem, tags in state.adds.items() if tags}
    return state.entries, state.counts, adds, state.removed


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS_MAX else text[:SHOWN_CHARS_MAX] + "..."


class Books:
    """The ledger of acknowledged work and the safety checks that run after each step."""

    def __init__(self) -> None:
        self.sim: Simulation | None = None
        self.acked: dict[str, list[NamedOp]] = {}
        self.by_replica: dict[tuple[str, str], list[Op]] = {}
        self.counter_sums: dict[tuple[str, str], int] = {}
        self.emits: dict[tuple[str, str], int] = {}
        self.hlc_last: dict[str, Hlc] = {}
        self.failures: list[str] = []
        self._records_seen = 0
        self._stream_next: dict[tuple[str, str], int] = {}

    # Observer --------------------------------------------------------------------------

    def acknowledged(self, node: str, replica: str, collection: str, op: Op) -> None:
        self.acked.setdefault(node, []).append((collection, op))
        self.by_replica.setdefault((collection, replica), []).append(op)
        ts = op.ts if isinstance(op, MapOp) else op.tag if isinstance(op, SetAddOp) else None
        if ts is None:
            return
        last = self.hlc_last.get(node)
        if ts.node != node or (last is not None and ts <= last):
            self.failures.append(f"{node} issued timestamp {ts} after {last}: HLC went back")
        self.hlc_last[node] = ts

    def counted(self, replica: str, collection: str, amount: int) -> None:
        key = (collection, replica)
        self.counter_sums[key] = self.counter_sums.get(key, 0) + amount

    def emitted(self, node: str, stream: str, seq: int) -> None:
        self.emits[(node, stream)] = seq

    def delta_acked(self, node: str, ops: list[NamedOp]) -> None:
        """The hub acked: each op must now be merged at the hub or queued to be."""
        assert self.sim is not None
        hub = self.sim.hub
        for name, op in ops:
            key = (name, self.sim.replica_of(self.sim.nodes[node], name))
            state = hub.replicas.get(key)
            if state is not None and reflects(state, op):
                continue
            if not any((name, op) in item.batch.ops for item in hub.queue):
                self.failures.append(f"hub acked {name} op {op} from {node} but holds it "
                                     "neither merged nor queued")

    # Safety ----------------------------------------------------------------------------

    def after_step(self) -> list[str]:
        assert self.sim is not None
        for node_id in dict.fromkeys(self.sim.touched):
            replicas = self.sim.nodes[node_id].disk.replicas
            for name, op in self.acked.get(node_id, ()):
                if not reflects(replicas[name], op):
                    self.failures.append(f"{node_id} lost acknowledged write {op} of {name} "
                                         f"from its committed state")
                    break
        self._check_stream_order()
        return self.failures[:FAILURES_MAX]

    def _check_stream_order(self) -> None:
        assert self.sim is not None
        records = self.sim.hub.applied_records
        for node, stream, seq in records[self._records_seen:]:
            key = (node, stream)
            expected = self._stream_next.get(key, 1)
            if seq != expected:
                what = "twice" if seq < expected else "out of seq order"
                self.failures.append(f"hub applied record {seq} of {node}/{stream} {what} "
                                     f"(expected {expected})")
            self._stream_next[key] = max(expected, seq + 1)
        self._records_seen = len(records)


# Liveness ------------------------------------------------------------------------------

def expected_value(state: CollectionState, ops: list[Op], counted: int) -> object:
    """What the acknowledged writes add up to, computed from the ledger alone."""
    if state.kind == "counter":
        return counted
    if state.kind == "map":
        latest: dict[str, MapOp] = {}
        for op in ops:
            assert isinstance(op, MapOp)
            if op.key not in latest or op.ts > latest[op.key].ts:
                latest[op.key] = op
        return {k: op.value for k, op in sorted(latest.items()) if op.value is not None}
    removed = {tag for op in ops if isinstance(op, SetRemoveOp) for tag in op.tags}
    return {op.elem for op in ops if isinstance(op, SetAddOp) and op.tag not in removed}


def check_liveness(sim: Simulation, books: Books) -> list[str]:
    """After healing: converged replicas, the ledger's values, streams exactly once."""
    if not sim.quiescent():
        return [f"not quiescent after {sim.stats['liveness_steps']} liveness steps: "
                f"{_pending(sim)}"]
    failures = _check_replicas(sim, books)
    failures += _check_streams(sim, books)
    return failures[:FAILURES_MAX]


def _pending(sim: Simulation) -> str:
    parts = [f"hub queue {len(sim.hub.queue)}, log end {sim.hub.log_end}"]
    for node in sim.nodes.values():
        pending = sum(len(records) for records in node.disk.pending.values())
        parts.append(f"{node.node_id}: up={node.up} outbox={len(node.disk.outbox)} "
                     f"records={pending} cursor={node.disk.fanout_position}")
    return "; ".join(parts)


def _check_replicas(sim: Simulation, books: Books) -> list[str]:
    failures: list[str] = []
    hub = sim.hub
    for node in sim.nodes.values():
        for name, state in node.disk.replicas.items():
            key = sim.replica_of(node, name)
            hub_state = hub.replicas.get((name, key)) or CollectionState(state.kind)
            if state.value() != hub_state.value() or canonical(state) != canonical(hub_state):
                failures.append(f"{node.node_id} replica {key} of {name} differs from the "
                                f"hub's: {_short(canonical(state))} != "
                                f"{_short(canonical(hub_state))}")
    for (name, key), hub_state in hub.replicas.items():
        expected = expected_value(hub_state, books.by_replica.get((name, key), []),
                                  books.counter_sums.get((name, key), 0))
        if hub_state.value() != expected:
            failures.append(f"hub replica {key} of {name} is {_short(hub_state.value())}, "
                            f"the acknowledged writes make {_short(expected)}")
    for name, key in books.by_replica:
        if (name, key) not in hub.replicas:
            failures.append(f"hub never received replica {key} of {name}")
    return failures


def _check_streams(sim: Simulation, books: Books) -> list[str]:
    failures: list[str] = []
    applied = Counter(sim.hub.applied_records)
    for (node, stream), last_seq in books.emits.items():
        for seq in range(1, last_seq + 1):
            times = applied.pop((node, stream, seq), 0)
            if times != 1:
                failures.append(f"record {seq} of {node}/{stream} is at the hub {times} times")
    failures.extend(f"hub holds record {seq} of {node}/{stream} that was never emitted"
                    for node, stream, seq in applied)
    return failures


def fingerprint(hub: SimHub) -> str:
    """The hub's final state, independent of set and hash order: equal for a replay."""
    parts: list[str] = []
    for (name, key), state in sorted(hub.replicas.items(), key=lambda item: item[0]):
        adds = sorted((elem, sorted(map(repr, tags))) for elem, tags in state.adds.items())
        parts.append(f"{name}/{key}:{sorted(map(repr, state.entries.values()))}"
                     f"{sorted(state.counts.items())}{adds}{sorted(map(repr, state.removed))}")
    parts.append(repr(hub.applied_records))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
