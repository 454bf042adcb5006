"""The far side of every node's link in the deterministic simulator: network and hub.

`SimNetwork` delays every message by a seeded latency plus jitter, so two messages on
one link can arrive in either order; faults drop, duplicate and partition. `SimHub`
models what the real hub gets from JetStream: publishes stored then acknowledged, a
merge worker that may die between its commit and its fan-out (and is redelivered), a
fan-out log with bounded retention read through each node's durable cursor, and stream
ingest that is exactly-once in effect. Nothing here reads real time: callers pass the
simulated time in ms.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from fogline.core.crdt import (
    CollectionState,
    CollectionType,
    CounterOp,
    Op,
    Scope,
    SetAddOp,
    SetRemoveOp,
)
from fogline.core.hlc import Hlc
from fogline.core.outbox import IngestStep, ingest_step
from fogline.core.sync import replica_key

ApplyFn = Callable[[CollectionState, Op], bool]
MERGES_PER_STEP_MAX = 16

# An op of one collection, as it travels (the collection name goes with it).
NamedOp = tuple[str, Op]


# Messages. They mirror the real subjects: node -> hub state batches (JetStream
# FL_STATE, retried until the publish ack), upstream stream batches, and the node's
# durable fan-out cursor reading the hub's fan-out log (FL_FANOUT).

@dataclass(frozen=True, slots=True)
class StateBatch:
    node: str
    seq_first: int
    seq_last: int
    ops: tuple[NamedOp, ...]


@dataclass(frozen=True, slots=True)
class StateAck:
    seq_first: int
    seq_last: int


@dataclass(frozen=True, slots=True)
class StreamBatch:
    node: str
    stream: str
    first_seq: int
    records: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class StreamAck:
    stream: str
    last_seq: int


@dataclass(frozen=True, slots=True)
class Fetch:
    """Read the fan-out log from `position` (the node's committed cursor)."""

    node: str
    position: int


@dataclass(frozen=True, slots=True)
class FanoutBatch:
    start: int
    end: int
    ops: tuple[NamedOp, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The hub's replicas for one node; holds every fan-out entry below `position`."""

    position: int
    ops: tuple[NamedOp, ...]


Message = StateBatch | StateAck | StreamBatch | StreamAck | Fetch | FanoutBatch | Snapshot


@dataclass(frozen=True)
class Faults:
    """Fault rates for one phase; the liveness phase switches them all off."""

    drop_p: float = 0.0
    duplicate_p: float = 0.0
    latency_ms: int = 5
    jitter_ms: int = 20


@dataclass(order=True)
class Envelope:
    deliver_at_ms: int
    order: int
    # The node at the far end of the link and the direction of travel.
    node: str = field(compare=False)
    to_hub: bool = field(compare=False)
    message: Message = field(compare=False)


@dataclass
class NetworkStats:
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0
    delivered: int = 0


class SimNetwork:
    """Messages in flight between nodes and the hub, in delivery-time order."""

    def __init__(self, rng: random.Random, faults: Faults, in_flight_max: int = 20_000) -> None:
        self.rng = rng
        self.faults = faults
        self.in_flight_max = in_flight_max
        self.partitioned: set[str] = set()
        self.stats = NetworkStats()
        self._heap: list[Envelope] = []
        self._order = 0

    def send(self, now_ms: int, node: str, to_hub: bool, message: Message) -> None:
        """Queue a message; a partitioned link or a drop loses it silently, like UDP."""
        self.stats.sent += 1
        if node in self.partitioned or self.rng.random() < self.faults.drop_p:
            self.stats.dropped += 1
            return
        copies = 1
        if self.rng.random() < self.faults.duplicate_p:
            copies = 2
            self.stats.duplicated += 1
        for _ in range(copies):
            if len(self._heap) >= self.in_flight_max:
                # A full network drops, as a full socket buffer would.
                self.stats.dropped += 1
                return
            delay_ms = self.faults.latency_ms + self.rng.randint(0, self.faults.jitter_ms)
            self._order += 1
            heapq.heappush(self._heap, Envelope(now_ms + delay_ms, self._order, node, to_hub,
                                                message))

    def deliver_due(self, now_ms: int) -> list[Envelope]:
        """Messages whose time has come; a link cut while they flew loses them."""
        due: list[Envelope] = []
        while self._heap and self._heap[0].deliver_at_ms <= now_ms:
            envelope = heapq.heappop(self._heap)
            if envelope.node in self.partitioned:
                self.stats.dropped += 1
                continue
            self.stats.delivered += 1
            due.append(envelope)
        return due

    def idle(self) -> bool:
        return not self._heap


# The hub ------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubRules:
    """How the hub behaves; tests flip the flags to prove the checkers catch it."""

    regions: dict[str, str]  # node id -> region
    collections: dict[str, tuple[CollectionType, Scope]]
    fanout_batch_max: int
    backlog_max: int  # fan-out log entries kept; a cursor behind them has expired
    merge_crash_p: float
    apply: ApplyFn = CollectionState.apply
    dedupes_streams: bool = True
    replays_redelivered: bool = True


@dataclass
class QueuedBatch:
    batch: StateBatch
    redelivered: bool = False


@dataclass
class HubStats:
    snapshots: int = 0
    merge_crashes: int = 0
    fanout_entries: int = 0


class SimHub:
    """The hub's durable state (it does not crash here; its merge worker does)."""

    def __init__(self, rules: HubRules, net: SimNetwork, rng: random.Random) -> None:
        self.rules = rules
        self.net = net
        self.rng = rng
        self.stats = HubStats()
        self.replicas: dict[tuple[str, str], CollectionState] = {}
        # The element of every removed set tag, as the hub's SQL store keeps it:
        # `CollectionState.removed` alone cannot be served as ops.
        self.removed_elems: dict[tuple[str, str], dict[Hlc, bytes]] = {}
        self.queue: list[QueuedBatch] = []
        self.log: list[tuple[str, str, Op]] = []
        self.log_start = 0
        self.stream_cursor: dict[tuple[str, str], int] = {}
        self.applied_records: list[tuple[str, str, int]] = []

    @property
    def log_end(self) -> int:
        return self.log_start + len(self.log)

    def replica_of(self, node: str, collection: str) -> str:
        scope = self.rules.collections[collection][1]
        return replica_key(scope, self.rules.regions[node], node)

    def receive(self, now_ms: int, node: str, message: Message) -> None:
        if isinstance(message, StateBatch):
            # Stored in FL_STATE, then acknowledged: the merge worker takes it from here.
            self.queue.append(QueuedBatch(message))
            self.net.send(now_ms, node, False, StateAck(message.seq_first, message.seq_last))
        elif isinstance(message, StreamBatch):
            self._ingest(now_ms, message)
        elif isinstance(message, Fetch):
            self._serve_fetch(now_ms, node, message.position)

    def _ingest(self, now_ms: int, batch: StreamBatch) -> None:
        """Exactly-once in effect: the production rule `fogline.core.outbox.ingest_step`."""
        key = (batch.node, batch.stream)
        last_seq = self.stream_cursor.get(key, 0)
        step = ingest_step(last_seq, batch.first_seq, len(batch.records), 0)
        if not self.rules.dedupes_streams:
            step = IngestStep("apply", max(last_seq, batch.first_seq + len(batch.records) - 1))
        if step.action == "apply":
            self.applied_records.extend((batch.node, batch.stream, batch.first_seq + offset)
                                        for offset in range(step.skip, len(batch.records)))
            self.stream_cursor[key] = step.last_seq
        self.net.send(now_ms, batch.node, False, StreamAck(batch.stream, step.last_seq))

    def _serve_fetch(self, now_ms: int, node: str, position: int) -> None:
        region = self.rules.regions[node]
        keys = {"global", replica_key("region", region, node), replica_key("node", region, node)}
        if position < self.log_start:
            # The cursor expired: the node bootstraps from a snapshot plus the tail.
            self.stats.snapshots += 1
            self.net.send(now_ms, node, False, Snapshot(self.log_end, self._snapshot_ops(keys)))
            return
        if position >= self.log_end:
            return
        end = min(self.log_end, position + self.rules.fanout_batch_max)
        entries = self.log[position - self.log_start:end - self.log_start]
        ops = tuple((name, op) for key, name, op in entries if key in keys)
        self.net.send(now_ms, node, False, FanoutBatch(position, end, ops))

    def _snapshot_ops(self, keys: set[str]) -> tuple[NamedOp, ...]:
        """The replicas as ops, the way the hub's SQL store serves them."""
        ops: list[NamedOp] = []
        for (name, key), state in self.replicas.items():
            if key not in keys:
                continue
            ops.extend((name, entry) for entry in state.entries.values())
            ops.extend((name, CounterOp(node, p, n)) for node, (p, n) in state.counts.items())
            for elem, tags in state.adds.items():
                ops.extend((name, SetAddOp(elem, tag)) for tag in sorted(tags))
            elems = self.removed_elems.get((name, key), {})
            ops.extend((name, SetRemoveOp(elems[tag], (tag,))) for tag in sorted(state.removed))
        return tuple(ops)

    def merge(self, faults_on: bool) -> None:
        """The merge worker: merge queued batches, log changes for fan-out, then ack."""
        for _ in range(MERGES_PER_STEP_MAX):
            if not self.queue:
                return
            item = self.queue[0]
            merged = self._merge_batch(item)
            if faults_on and self.rng.random() < self.rules.merge_crash_p:
                # Died after the SQL commit, before fan-out and ack: JetStream redelivers.
                item.redelivered = True
                self.stats.merge_crashes += 1
                return
            self.log.extend(merged)
            self.stats.fanout_entries += len(merged)
            self.queue.pop(0)
            overflow = len(self.log) - self.rules.backlog_max
            if overflow > 0:
                del self.log[:overflow]
                self.log_start += overflow

    def _merge_batch(self, item: QueuedBatch) -> list[tuple[str, str, Op]]:
        """Merge one batch; the entries to fan out: what changed, or all of a redelivered
        batch (its first attempt may have committed without fanning out)."""
        merged: list[tuple[str, str, Op]] = []
        replay = item.redelivered and self.rules.replays_redelivered
        for name, op in item.batch.ops:
            key = self.replica_of(item.batch.node, name)
            state = self.replicas.get((name, key))
            if state is None:
                state = self.replicas[(name, key)] = CollectionState(
                    self.rules.collections[name][0])
            if isinstance(op, SetRemoveOp):
                elems = self.removed_elems.setdefault((name, key), {})
                for tag in op.tags:
                    elems.setdefault(tag, op.elem)
            if self.rules.apply(state, op) or replay:
                merged.append((key, name, op))
        return merged
