"""Heartbeat intake and liveness sweeps: the registry's view of each node's status.

Heartbeats arrive on a NATS queue group shared by all hub processes. `receive` decodes
and keeps the newest heartbeat per node; `flush` runs the sans-IO health rules over a
batch and writes it in one transaction, so thousands of nodes cost a few SQL round
trips a second instead of one per heartbeat. The apps a heartbeat reports replace the
node's stored ones in the same write; an app entering or leaving `failed` is recorded as
an `app.state` event (see fogline.core.appstatus).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram

from fogline.clock import Clock
from fogline.core.appstatus import AppChange, failure_changes
from fogline.core.health import HealthPolicy, NodeHealth, check_liveness, observe_heartbeat
from fogline.errors import ProtocolError
from fogline.hub.store import HeartbeatUpdate, HubStore
from fogline.protocol import APP_REASON_CHARS_MAX, Heartbeat, decode, node_id_from_subject

log = logging.getLogger("fogline.hub.heartbeats")

PENDING_NODES_MAX = 200_000


@dataclass
class HeartbeatMetrics:
    registry: CollectorRegistry
    received: Counter = field(init=False)
    rejected: Counter = field(init=False)
    transitions: Counter = field(init=False)
    app_transitions: Counter = field(init=False)
    flush_seconds: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.received = Counter("fogline_hub_heartbeats_received_total",
                                "Heartbeats accepted", registry=self.registry)
        self.rejected = Counter("fogline_hub_heartbeats_rejected_total",
                                "Heartbeats refused", ["reason"], registry=self.registry)
        self.transitions = Counter("fogline_hub_node_status_transitions_total",
                                   "Node status changes", ["status"], registry=self.registry)
        self.app_transitions = Counter("fogline_hub_app_failure_transitions_total",
                                       "Apps entering or leaving the failed state",
                                       ["to"], registry=self.registry)
        self.flush_seconds = Histogram("fogline_hub_heartbeat_flush_seconds",
                                       "Time to write one batch of heartbeats",
                                       registry=self.registry)


@dataclass(frozen=True)
class Transition:
    node_id: str
    before: NodeHealth
    after: NodeHealth


@dataclass(frozen=True)
class NodeAppChange:
    node_id: str
    at_s: float
    change: AppChange


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

    @property
    def pending(self) -> int:
        """Heartbeats received and not yet written."""
        return len(self._pending)

    def flush(self) -> list[Transition]:
        """Write the pending heartbeats; return the status changes they caused."""
        if not self._pending:
            return []
        batch, self._pending = self._pending, {}
        with self.metrics.flush_seconds.time():
            current = self.store.observed_by_node(batch)
            updates: list[HeartbeatUpdate] = []
            transitions: list[Transition] = []
            app_changes: list[NodeAppChange] = []
            for node_id, (hb, received_s) in batch.items():
                if node_id not in current:
                    self.metrics.rejected.labels(reason="unknown-node").inc()
                    continue
                before, apps_before = current[node_id]
                after = observe_heartbeat(before, hb.failing_checks, hb.interval_s,
                                          received_s, self.policy)
                if after.status != before.status:
                    transitions.append(Transition(node_id, before, after))
                apps = tuple(app.clipped() for app in hb.apps)
                if before.status != "revoked":  # a revoked node's row no longer changes
                    app_changes.extend(NodeAppChange(node_id, received_s, change)
                                       for change in failure_changes(apps_before, apps))
                updates.append(HeartbeatUpdate(
                    node_id=node_id, health=after, seq=hb.seq, version=hb.version,
                    endpoint=hb.endpoint, failing_checks=hb.failing_checks,
                    sync_clean_ms=hb.sync_clean_hlc_ms, apps=apps,
                    refusals=tuple(r if len(r.reason) <= APP_REASON_CHARS_MAX else
                                   msgspec.structs.replace(
                                       r, reason=r.reason[:APP_REASON_CHARS_MAX])
                                   for r in hb.refusals),
                    desired_generation=hb.desired_generation, purge_seq=hb.purge_seq,
                    load={"cpu_percent": hb.load.cpu_percent,
                          "memory_percent": hb.load.memory_percent,
                          "load1": hb.load.load1, "rss_bytes": hb.load.rss_bytes,
                          "uptime_s": hb.uptime_s, "hub_rtt_ms": hb.hub_rtt_ms,
                          "http_inflight": hb.load.http_inflight,
                          "http_rps": hb.load.http_rps}))
            self.store.apply_heartbeats(updates)
        self._record(transitions, app_changes)
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

    def _record(self, transitions: list[Transition],
                app_changes: list[NodeAppChange] | None = None) -> None:
        """Count, log and write the changes to the audit log, in one transaction."""
        for t in transitions:
            self.metrics.transitions.labels(status=t.after.status).inc()
            log.info("node %s: %s -> %s %s", t.node_id, t.before.status, t.after.status,
                     t.after.reason)
        events: list[dict[str, Any]] = [
            {"at_s": t.after.status_since_s, "actor": "hub", "kind": "node.status",
             "subject": t.node_id, "detail": {"from": t.before.status, "to": t.after.status,
                                              "reason": t.after.reason}}
            for t in transitions]
        for a in app_changes or []:
            c = a.change
            self.metrics.app_transitions.labels(to=c.after).inc()
            log.info("node %s app %s: %s -> %s %s", a.node_id, c.app, c.before, c.after,
                     c.reason)
            events.append({"at_s": a.at_s, "actor": "hub", "kind": "app.state",
                           "subject": a.node_id,
                           "detail": {"app": c.app, "version": c.version, "from": c.before,
                                      "to": c.after, "restarts": c.restarts,
                                      "reason": c.reason}})
        self.store.add_events(events)
