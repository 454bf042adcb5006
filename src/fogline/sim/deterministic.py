"""The deterministic simulator: the sans-IO collection and stream core under a seeded storm.

One seed draws the topology (2-5 nodes in 1-2 regions, one hub, collections of every
type and scope, streams), the faults (drop, duplicate, reorder, partition, node
crash-restart, wall clocks stepping back, a hub merge worker dying between commit and
fan-out) and the workload. `random.Random(seed)` is the only randomness and time is
simulated, so a failing seed replays exactly. A safety phase runs the storm with the
checkers of `fogline.sim.invariants` after every step; a liveness phase heals
everything and runs until quiescent, then checks convergence. The model mirrors the
real transport (JetStream): node -> hub publishes are retried until acknowledged, the
hub merges with the same `CollectionState.apply` the node runs, logs changed ops for
fan-out, and each node reads that log through a durable cursor that falls back to a
snapshot once the hub has trimmed past it.

The node model and the scheduler stay in one module (a little over 400 lines) because
they are read together: every node action is a step of the scheduler.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from fogline.clock import ManualClock
from fogline.core.crdt import (
    CollectionState,
    CollectionType,
    MapOp,
    Op,
    Scope,
    SetAddOp,
)
from fogline.core.hlc import MAX_DRIFT_MS, ZERO, Hlc, HybridLogicalClock
from fogline.sim.invariants import Books, Observer, check_liveness, fingerprint
from fogline.sim.network import (
    ApplyFn,
    Envelope,
    FanoutBatch,
    Faults,
    Fetch,
    HubRules,
    NamedOp,
    SimHub,
    SimNetwork,
    Snapshot,
    StateAck,
    StateBatch,
    StreamAck,
    StreamBatch,
)

KEYS = ("k0", "k1", "k2")
ELEMS = (b"e0", b"e1", b"e2")
AMOUNTS = (-3, -1, 1, 2, 5)
# Bounds on one seed (limits on everything): a run that needs more is a failure.
LIVENESS_STEPS_MAX = 4000
SEND_BATCHES_PER_TICK_MAX = 4


def replay_command(seed: int) -> str:
    return f"fogline sim check --seeds 1 --start {seed}"


@dataclass(frozen=True)
class SimOptions:
    """Knobs that break the model on purpose, so tests can prove the checkers bite."""

    apply: ApplyFn = CollectionState.apply
    hub_dedupes_streams: bool = True
    hub_replays_redelivered: bool = True
    restore_hlc: bool = True


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    kind: CollectionType
    scope: Scope


@dataclass(frozen=True)
class Topology:
    regions: dict[str, str]  # node id -> region
    collections: tuple[CollectionSpec, ...]
    streams: tuple[str, ...]
    max_drift_ms: int
    backlog_max: int  # fan-out log entries the hub keeps; older cursors expire
    batch_max: int
    tick_ms: int
    safety_steps: int
    write_p: float
    fault_p: float
    merge_crash_p: float
    faults: Faults


def draw_topology(rng: random.Random) -> Topology:
    node_count = rng.randint(2, 5)
    region_count = rng.randint(1, 2)
    regions = {f"n{i}": f"r{rng.randrange(region_count)}" for i in range(node_count)}
    kinds: tuple[CollectionType, ...] = ("map", "counter", "set")
    scopes: tuple[Scope, ...] = ("node", "region", "global")
    collections = tuple(CollectionSpec(f"c{i}", rng.choice(kinds), rng.choice(scopes))
                        for i in range(rng.randint(1, 4)))
    streams = tuple(f"s{i}" for i in range(rng.randint(1, 2)))
    faults = Faults(drop_p=rng.choice((0.0, 0.05, 0.2)), duplicate_p=rng.choice((0.0, 0.1)),
                    latency_ms=rng.randint(1, 10), jitter_ms=rng.choice((0, 10, 40)))
    return Topology(
        regions=regions, collections=collections, streams=streams,
        max_drift_ms=rng.choice((300, 2000, MAX_DRIFT_MS)),
        backlog_max=rng.choice((6, 24, 10_000)), batch_max=rng.choice((2, 8)),
        tick_ms=rng.randint(20, 60), safety_steps=rng.randint(120, 240),
        write_p=rng.uniform(0.2, 0.35), fault_p=rng.choice((0.0, 0.03, 0.08)),
        merge_crash_p=rng.choice((0.0, 0.1)), faults=faults)


class SkewedClock:
    """A node's wall clock: the simulated time plus an offset that may step back."""

    def __init__(self, base: ManualClock, offset_s: float) -> None:
        self.base = base
        self.offset_s = offset_s

    def now(self) -> float:
        return self.base.now() + self.offset_s

    def monotonic(self) -> float:
        return self.base.monotonic()

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError("simulated time moves only by the scheduler")


@dataclass
class NodeDisk:
    """What survives a crash: the committed replicas, outboxes and fan-out cursor."""

    replicas: dict[str, CollectionState]
    outbox: list[tuple[int, str, Op]] = field(default_factory=list)
    next_seq: int = 1
    pending: dict[str, list[tuple[int, bytes]]] = field(default_factory=dict)
    stream_next: dict[str, int] = field(default_factory=dict)
    fanout_position: int = 0
    hlc_high: Hlc = ZERO


@dataclass
class SimNode:
    node_id: str
    region: str
    disk: NodeDisk
    clock: SkewedClock
    hlc: HybridLogicalClock | None  # memory only: None while down
    next_tick_ms: int = 0

    @property
    def up(self) -> bool:
        return self.hlc is not None


@dataclass
class SimResult:
    seed: int
    failures: list[str]
    stats: dict[str, int | str]

    @property
    def ok(self) -> bool:
        return not self.failures


class Simulation:
    """The model: nodes, hub and network, advanced one seeded step at a time."""

    def __init__(self, seed: int, options: SimOptions, observer: Observer) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.options = options
        self.observer = observer
        self.topology = draw_topology(self.rng)
        self.clock = ManualClock()
        self.now_ms = 0
        self.net = SimNetwork(self.rng, self.topology.faults)
        self.hub = SimHub(HubRules(
            regions=self.topology.regions,
            collections={c.name: (c.kind, c.scope) for c in self.topology.collections},
            fanout_batch_max=self.topology.batch_max * 4,
            backlog_max=self.topology.backlog_max, merge_crash_p=self.topology.merge_crash_p,
            apply=options.apply, dedupes_streams=options.hub_dedupes_streams,
            replays_redelivered=options.hub_replays_redelivered), self.net, self.rng)
        self.nodes = {node_id: self._new_node(node_id, region)
                      for node_id, region in self.topology.regions.items()}
        self.touched: list[str] = []
        self.stats: dict[str, int] = dict.fromkeys(
            ("steps", "writes", "emits", "crashes", "partitions", "clock_steps_back",
             "liveness_steps"), 0)

    def _new_node(self, node_id: str, region: str) -> SimNode:
        disk = NodeDisk({spec.name: CollectionState(spec.kind)
                         for spec in self.topology.collections})
        for stream in self.topology.streams:
            disk.pending[stream] = []
            disk.stream_next[stream] = 1
        clock = SkewedClock(self.clock, self.rng.uniform(-0.5, 0.5))
        node = SimNode(node_id, region, disk, clock, None)
        self._boot(node)
        return node

    def replica_of(self, node: SimNode, collection: str) -> str:
        return self.hub.replica_of(node.node_id, collection)

    # Scheduler ------------------------------------------------------------------------

    def step(self, faults_on: bool) -> None:
        """One step: time moves, due messages land, timers fire, maybe a write or fault."""
        self.touched.clear()
        self.stats["steps"] += 1
        elapsed_ms = self.rng.randint(1, 8)
        self.now_ms += elapsed_ms
        self.clock.advance(elapsed_ms / 1000)
        for envelope in self.net.deliver_due(self.now_ms):
            self._deliver(envelope)
        for node in self.nodes.values():
            if node.up and self.now_ms >= node.next_tick_ms:
                self._tick(node)
        self.hub.merge(faults_on)
        if faults_on:
            if self.rng.random() < self.topology.write_p:
                self._write()
            if self.rng.random() < self.topology.fault_p:
                self._fault()

    def heal(self) -> None:
        """Start of the liveness phase: no more faults, every link and node back."""
        self.net.faults = Faults(latency_ms=self.topology.faults.latency_ms,
                                 jitter_ms=self.topology.faults.jitter_ms)
        self.net.partitioned.clear()
        for node in self.nodes.values():
            if not node.up:
                self._boot(node)

    def quiescent(self) -> bool:
        """Every durable queue drained and every cursor at the end of the fan-out log."""
        if self.hub.queue:
            return False
        return all(node.up and not node.disk.outbox and node.disk.fanout_position
                   == self.hub.log_end and not any(node.disk.pending.values())
                   for node in self.nodes.values())

    # Nodes ---------------------------------------------------------------------------

    def _boot(self, node: SimNode) -> None:
        """(Re)start: memory is fresh, the disk is as committed; resend at once."""
        node.hlc = HybridLogicalClock(node.node_id, node.clock, self.topology.max_drift_ms)
        if self.options.restore_hlc:
            # The persisted high-water mark keeps timestamps unique across restarts, as
            # the node's SQLite store does with the same `restore`.
            node.hlc.restore(node.disk.hlc_high)
        node.next_tick_ms = self.now_ms

    def _tick(self, node: SimNode) -> None:
        """Retry everything unacknowledged (at-least-once) and poll the fan-out log."""
        node.next_tick_ms = self.now_ms + self.topology.tick_ms
        size = self.topology.batch_max
        outbox = node.disk.outbox[:size * SEND_BATCHES_PER_TICK_MAX]
        for start in range(0, len(outbox), size):
            chunk = outbox[start:start + size]
            batch = StateBatch(node.node_id, chunk[0][0], chunk[-1][0],
                               tuple((name, op) for _, name, op in chunk))
            self.net.send(self.now_ms, node.node_id, True, batch)
        for stream, pending in node.disk.pending.items():
            for start in range(0, min(len(pending), size * 2), size):
                records = pending[start:start + size]
                self.net.send(self.now_ms, node.node_id, True, StreamBatch(
                    node.node_id, stream, records[0][0], tuple(r for _, r in records)))
        self.net.send(self.now_ms, node.node_id, True,
                      Fetch(node.node_id, node.disk.fanout_position))

    def _write(self) -> None:
        """One acknowledged local write or emit on a random live node."""
        live = [node for node in self.nodes.values() if node.up]
        if not live:
            return
        node = self.rng.choice(live)
        self.touched.append(node.node_id)
        if self.rng.random() < 0.25:
            self._emit(node, self.rng.choice(self.topology.streams))
            return
        spec = self.rng.choice(self.topology.collections)
        op, amount = self._local_op(node, spec)
        disk = node.disk
        self.options.apply(disk.replicas[spec.name], op)
        disk.outbox.append((disk.next_seq, spec.name, op))
        disk.next_seq += 1
        assert node.hlc is not None
        disk.hlc_high = max(disk.hlc_high, node.hlc.last)
        self.stats["writes"] += 1
        replica = self.replica_of(node, spec.name)
        self.observer.acknowledged(node.node_id, replica, spec.name, op)
        if amount:
            self.observer.counted(replica, spec.name, amount)

    def _local_op(self, node: SimNode, spec: CollectionSpec) -> tuple[Op, int]:
        """The op of one user write, and the amount when it is a counter's."""
        state = node.disk.replicas[spec.name]
        hlc = node.hlc
        assert hlc is not None
        if spec.kind == "map":
            value = None if self.rng.random() < 0.2 else b"v%d" % self.rng.randrange(1000)
            return state.put(hlc, self.rng.choice(KEYS), value), 0
        if spec.kind == "counter":
            amount = self.rng.choice(AMOUNTS)
            return state.increment(node.node_id, amount), amount
        present = sorted(elem for elem, tags in state.adds.items() if tags)
        if present and self.rng.random() < 0.4:
            return state.remove(self.rng.choice(present)), 0
        return state.add(hlc, self.rng.choice(ELEMS)), 0

    def _emit(self, node: SimNode, stream: str) -> None:
        seq = node.disk.stream_next[stream]
        node.disk.stream_next[stream] = seq + 1
        node.disk.pending[stream].append((seq, f"{node.node_id}/{stream}/{seq}".encode()))
        self.stats["emits"] += 1
        self.observer.emitted(node.node_id, stream, seq)

    def _deliver(self, envelope: Envelope) -> None:
        message = envelope.message
        if envelope.to_hub:
            self.hub.receive(self.now_ms, envelope.node, message)
            return
        node = self.nodes[envelope.node]
        if not node.up:
            return
        self.touched.append(node.node_id)
        disk = node.disk
        if isinstance(message, StateAck):
            acked = [(name, op) for seq, name, op in disk.outbox
                     if message.seq_first <= seq <= message.seq_last]
            if acked:
                self.observer.delta_acked(node.node_id, acked)
                disk.outbox = [entry for entry in disk.outbox
                               if not message.seq_first <= entry[0] <= message.seq_last]
        elif isinstance(message, StreamAck):
            pending = disk.pending[message.stream]
            disk.pending[message.stream] = [r for r in pending if r[0] > message.last_seq]
        elif isinstance(message, FanoutBatch):
            self._apply_remote(node, message.ops)
            if message.start <= disk.fanout_position:
                disk.fanout_position = max(disk.fanout_position, message.end)
        elif isinstance(message, Snapshot):
            self._apply_remote(node, message.ops)
            # A snapshot holds every entry below its position, so any one (even a
            # stale duplicate) lets the cursor move there without a gap.
            disk.fanout_position = max(disk.fanout_position, message.position)

    def _apply_remote(self, node: SimNode, ops: tuple[NamedOp, ...]) -> None:
        assert node.hlc is not None
        for name, op in ops:
            self.options.apply(node.disk.replicas[name], op)
            if isinstance(op, MapOp):
                node.hlc.observe(op.ts)
            elif isinstance(op, SetAddOp):
                node.hlc.observe(op.tag)

    # Faults --------------------------------------------------------------------------

    def _fault(self) -> None:
        node = self.rng.choice(list(self.nodes.values()))
        kind = self.rng.choice(("partition", "heal", "crash", "restart", "clock"))
        if kind == "partition":
            self.stats["partitions"] += node.node_id not in self.net.partitioned
            self.net.partitioned.add(node.node_id)
        elif kind == "heal":
            self.net.partitioned.discard(node.node_id)
        elif kind == "crash" and node.up:
            node.hlc = None
            self.stats["crashes"] += 1
        elif kind == "restart" and not node.up:
            self._boot(node)
        elif kind == "clock":
            # NTP stepping the wall clock back; forward steps come with time anyway.
            node.clock.offset_s -= self.rng.uniform(0.0, 1.5)
            self.stats["clock_steps_back"] += 1


# Running seeds -----------------------------------------------------------------------

def run_seed(seed: int, options: SimOptions | None = None,
             trace: Callable[[str], None] | None = None) -> SimResult:
    """Safety phase under faults, then liveness after healing; every failure message
    carries the command that replays this seed."""
    books = Books()
    sim = Simulation(seed, options or SimOptions(), books)
    books.sim = sim
    if trace is not None:
        trace(describe(sim.topology))
    try:
        failures = _run_phases(sim, books)
    except Exception as exc:  # a crash of the model under some seed is a finding too
        failures = [f"the model raised {exc!r}"]
    stats = _stats(sim)
    if trace is not None:
        trace(" ".join(f"{name}={value}" for name, value in stats.items()))
    return SimResult(seed, [f"SEED={seed}: {failure}; replay: {replay_command(seed)}"
                            for failure in failures], stats)


def _run_phases(sim: Simulation, books: Books) -> list[str]:
    for _ in range(sim.topology.safety_steps):
        sim.step(faults_on=True)
        failures = books.after_step()
        if failures:
            return failures
    sim.heal()
    while not sim.quiescent() and sim.stats["liveness_steps"] < LIVENESS_STEPS_MAX:
        sim.stats["liveness_steps"] += 1
        sim.step(faults_on=False)
        failures = books.after_step()
        if failures:
            return failures
    return check_liveness(sim, books)


def check(seeds: int, start: int = 0, options: SimOptions | None = None) -> list[SimResult]:
    return [run_seed(seed, options) for seed in range(start, start + seeds)]


def describe(topology: Topology) -> str:
    nodes = ",".join(f"{node}@{region}" for node, region in topology.regions.items())
    collections = ",".join(f"{c.name}:{c.kind}/{c.scope}" for c in topology.collections)
    faults = topology.faults
    return (f"nodes={nodes} collections={collections} streams={len(topology.streams)} "
            f"drop={faults.drop_p} dup={faults.duplicate_p} fault_p={topology.fault_p} "
            f"backlog_max={topology.backlog_max} max_drift_ms={topology.max_drift_ms}")


def _stats(sim: Simulation) -> dict[str, int | str]:
    net = sim.net.stats
    stats: dict[str, int | str] = dict(sim.stats)
    hub = sim.hub.stats
    stats.update(snapshots=hub.snapshots, merge_crashes=hub.merge_crashes,
                 fanout_entries=hub.fanout_entries, nodes=len(sim.nodes),
                 collections=len(sim.topology.collections),
                 sent=net.sent, dropped=net.dropped, duplicated=net.duplicated,
                 records=len(sim.hub.applied_records), digest=fingerprint(sim.hub))
    return stats
