"""Heartbeat intake and liveness sweeps: the registry's view of each node's status.

Heartbeats arrive on a NATS queue group shared by all hub processes. `receive` decodes
and keeps the newest heartbeat per node; `flush` runs the sans-IO health rules over a
batch and writes it in one transaction, so thousands of nodes cost a few SQL round
trips a second instead of one per heartbeat.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

from fogline.clock import Clock
from fogline.core.health import HealthPolicy, NodeHealth, check_liveness, observe_heartbeat
from fogline.errors import ProtocolError
from fogline.hub.store import HeartbeatUpdate, HubStore
from fogline.protocol import Heartbeat, decode, node_id_from_subject

log = logging.getLogger("fogline.hub.heartbeats")

PENDING_NODES_MAX = 200_000


@dataclass
class HeartbeatMetrics:
    registry: CollectorRegistry
    received: Counter = field(init=False)
    rejected: Counter = field(init=False)
    transitions: Counter = field(init=False)
    flush_seconds: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.received = Counter("fogline_hub_heartbeats_received_total",
                                "Heartbeats accepted", registry=self.registry)
        self.rejected = Counter("fogline_hub_heartbeats_rejected_total",
                                "Heartbeats refused", ["reason"], registry=self.registry)
        self.transitions = Counter("fogline_hub_node_status_transitions_total",
                                   "Node status changes", ["status"], registry=self.registry)
        self.flush_seconds = Histogram("fogline_hub_heartbeat_flush_seconds",
                                       "Time to write one batch of heartbeats",
                                       registry=self.registry)


@dataclass(frozen=True)
class Transition:
    node_id: str
    before: NodeHealth
    after: NodeHealth


class HeartbeatProcessor:
    def __init__(self, store: HubStore, clock: Clock, metrics: HeartbeatMetrics,
                 policy: HealthPolicy = HealthPolicy()) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.policy = policy
        self._pending: dict[str, tuple[Heartbeat, float]] = {}

    def receive(self, subject: str, data: bytes) -> None:
        """Accept one heartbeat message; bad ones are counted and dropped."""
        try:
            message = decode(data)
            if not isinstance(message, Heartbeat):
                raise ProtocolError("not a heartbeat")
            if node_id_from_subject(subject) != message.node_id:
                raise ProtocolError("node id in heartbeat does not match its subject")
            if message.interval_s <= 0:
                raise ProtocolError("heartbeat interval must be positive")
        except ProtocolError as exc:
            self.metrics.rejected.labels(reason=type(exc).__name__).inc()
            log.warning("heartbeat on %s refused: %s", subject, exc)
            return
        if len(self._pending) >= PENDING_NODES_MAX and message.node_id not in self._pending:
            self.metrics.rejected.labels(reason="backlog").inc()
            return
        self._pending[message.node_id] = (message, self.clock.now())
        self.metrics.received.inc()

    def flush(self) -> list[Transition]:
        """Write the pending heartbeats; return the status changes they caused."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, {}
        with self.metrics.flush_seconds.time():
            current = self.store.health_by_node(batch)
            updates: list[HeartbeatUpdate] = []
            transitions: list[Transition] = []
            for node_id, (hb, received_s) in batch.items():
                before = current.get(node_id)
                if before is None:
                    self.metrics.rejected.labels(reason="unknown-node").inc()
                    continue
                after = observe_heartbeat(before, hb.failing_checks, hb.interval_s,
                                          received_s, self.policy)
                if after.status != before.status:
                    transitions.append(Transition(node_id, before, after))
                updates.append(HeartbeatUpdate(
                    node_id=node_id, health=after, seq=hb.seq, version=hb.version,
                    endpoint=hb.endpoint, failing_checks=hb.failing_checks,
                    sync_clean_ms=hb.sync_clean_hlc_ms,
                    load={"cpu_percent": hb.load.cpu_percent,
                          "memory_percent": hb.load.memory_percent,
                          "load1": hb.load.load1, "rss_bytes": hb.load.rss_bytes,
                          "uptime_s": hb.uptime_s, "hub_rtt_ms": hb.hub_rtt_ms}))
            self.store.apply_heartbeats(updates)
        self._record(transitions)
        return transitions

    def sweep(self) -> list[Transition]:
        """Mark silent nodes offline."""
        now_s = self.clock.now()
        changes: dict[str, NodeHealth] = {}
        transitions: list[Transition] = []
        silent = self.store.silent_health(now_s, self.policy.missed_heartbeats_offline)
        for node_id, before in silent.items():
            after = check_liveness(before, now_s, self.policy)
            if after != before:
                changes[node_id] = after
                transitions.append(Transition(node_id, before, after))
        self.store.set_health(changes)
        self._record(transitions)
        return transitions

    def _record(self, transitions: list[Transition]) -> None:
        for t in transitions:
            self.metrics.transitions.labels(status=t.after.status).inc()
            log.info("node %s: %s -> %s %s", t.node_id, t.before.status, t.after.status,
                     t.after.reason)
        self.store.add_events([
            {"at_s": t.after.status_since_s, "actor": "hub", "kind": "node.status",
             "subject": t.node_id, "detail": {"from": t.before.status, "to": t.after.status,
                                              "reason": t.after.reason}}
            for t in transitions])
