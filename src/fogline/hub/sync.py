"""Collection sync at the hub: merge what nodes send, fan out what changed.

Nodes publish `StateBatch`es to the JetStream stream FL_STATE. Merge workers (a durable
pull consumer shared by every hub process) merge each fetched group of batches into the
SQL replicas in one transaction, publish the changed ops to FL_FANOUT on one subject per
replica, and only then ack. A redelivered batch is fanned out in full, so a hub that
crashed between commit and fan-out still delivers every change. Each node reads its
replicas through its own durable consumer on FL_FANOUT, created here when it asks for a
snapshot, so it resumes exactly where it stopped after any outage.

Nodes may also declare the collections their apps use (`fl.node.<id>.declare`,
request/reply): the hub creates the missing ones through the same `define` path as the
API; a definition that is invalid or conflicts with an existing collection is refused
and changes nothing, the others are created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from prometheus_client import CollectorRegistry, Counter

from fogline.clock import Clock
from fogline.core.crdt import MapOp, Op
from fogline.core.sync import (
    DECLARE_BYTES_MAX,
    DECLARE_WILDCARD,
    CollectionDef,
    DeclareCollections,
    DeclareResult,
    FanoutBatch,
    Snapshot,
    StateBatch,
    check_declaration,
    decode_sync,
    encode_sync,
    fanout_subject,
    node_fanout_subjects,
    replica_key,
)
from fogline.core.tombstones import gc_horizon_ms, marks_in_scope
from fogline.errors import ConfigError, FoglineError, ProtocolError
from fogline.hub.collections import CollectionStore, Located
from fogline.hub.store import HubStore
from fogline.protocol import HUB_QUEUE_GROUP, node_id_from_subject
from fogline.transport.cancellation import raise_if_cancelling
from fogline.transport.jetstream import fetch_ready

log = logging.getLogger("fogline.hub.sync")

STATE_STREAM = "FL_STATE"
FANOUT_STREAM = "FL_FANOUT"
MERGE_CONSUMER = "fl-merge"
RETENTION_S = 7 * 86400
FETCH_BATCH = 64
FANOUT_OPS_MAX = 2000
CONFLICT_EVENTS_MAX = 100


async def ensure_sync_streams(js: JetStreamContext) -> None:
    for name, subjects in ((STATE_STREAM, ["fl.node.*.state"]), (FANOUT_STREAM, ["fl.state.>"])):
        config = StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE,
                              retention=RetentionPolicy.LIMITS, max_age=RETENTION_S,
                              duplicate_window=120, max_msg_size=8 * 1024 * 1024)
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            await js.update_stream(config)


class SyncMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.ops_merged = Counter("fogline_hub_collection_ops_merged_total",
                                  "Ops merged into hub replicas", registry=registry)
        self.ops_changed = Counter("fogline_hub_collection_ops_changed_total",
                                   "Merged ops that changed a replica", registry=registry)
        self.conflicts = Counter("fogline_hub_collection_conflicts_total",
                                 "Concurrent map writes that lost", ["collection"],
                                 registry=registry)
        self.tombstones_collected = Counter(
            "fogline_hub_collection_tombstones_collected_total",
            "Tombstones dropped once every replica in scope has seen them", registry=registry)
        self.rejected = Counter("fogline_hub_collection_ops_rejected_total",
                                "Ops refused (unknown collection, bad batch)", ["reason"],
                                registry=registry)
        self.declarations = Counter("fogline_hub_collection_declarations_total",
                                    "Collection declarations from nodes (refused: at "
                                    "least one definition refused)", ["result"],
                                    registry=registry)


class HubSync:
    def __init__(self, collections: CollectionStore, registry_store: HubStore,
                 nc: NatsClient, js: JetStreamContext, clock: Clock,
                 metrics: SyncMetrics) -> None:
        self.collections = collections
        self.registry_store = registry_store
        self.nc = nc
        self.js = js
        self.clock = clock
        self.metrics = metrics
        self._regions: dict[str, str] = {}
        self._defs: dict[str, CollectionDef] = {}

    # Definitions --------------------------------------------------------------------

    async def define(self, definition: CollectionDef) -> str:
        result = await asyncio.to_thread(self.collections.define, definition, self.clock.now())
        self._defs[definition.name] = definition
        # Definitions travel on the global subject: every node learns every collection.
        await self.js.publish(fanout_subject("global"),
                              encode_sync(FanoutBatch(defs=[definition])))
        return result

    async def declare(self, node_id: str, data: bytes) -> DeclareResult:
        """Answer one node's declaration: create the missing collections; refuse, with
        a reason and without changing anything, each one that is invalid or conflicts
        with an existing collection (see `check_declaration`)."""
        try:
            request = decode_sync(data, DECLARE_BYTES_MAX)
            if not isinstance(request, DeclareCollections):
                raise ProtocolError(f"expected a collection declaration, got "
                                    f"{type(request).__name__}")
        except ProtocolError as exc:
            return DeclareResult(errors=[str(exc)])
        known = await asyncio.to_thread(self.collections.definitions)
        create, existing, errors = check_declaration(request.defs, known)
        created: list[CollectionDef] = []
        for definition in create:
            try:
                result = await self.define(definition)
            except ConfigError as exc:  # another hub or the API defined it otherwise
                errors.append(str(exc))
                continue
            if result == "created":
                created.append(definition)
            else:
                existing.append(definition.name)
        now_s = self.clock.now()
        await asyncio.to_thread(self.registry_store.add_events, [
            {"at_s": now_s, "actor": f"node:{node_id}", "kind": "collection.created",
             "subject": d.name, "detail": {"type": d.type, "scope": d.scope}}
            for d in created])
        return DeclareResult(created=[d.name for d in created], existing=existing,
                             errors=errors)

    async def run_declarations(self) -> None:
        async def respond(msg: Msg) -> None:
            try:
                node_id = node_id_from_subject(msg.subject)
                result = await self.declare(node_id, msg.data)
            except Exception:
                # No reply: the node times out and retries, the right outcome for a
                # failure of ours (an error reply would read as a refusal).
                log.exception("declaration on %s failed", msg.subject)
                return
            self.metrics.declarations.labels(
                result="refused" if result.errors else "accepted").inc()
            if result.errors:
                log.warning("declaration from %s refused: %s", node_id,
                            "; ".join(result.errors)[:2000])
            if msg.reply:
                await msg.respond(encode_sync(result))

        subscription = await self.nc.subscribe(DECLARE_WILDCARD, queue=HUB_QUEUE_GROUP,
                                               cb=respond)
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    def _definition(self, name: str) -> CollectionDef | None:
        if name not in self._defs:
            self._defs = self.collections.definitions()
        return self._defs.get(name)

    def _region(self, node_id: str) -> str:
        if node_id not in self._regions:
            self._regions[node_id] = str(self.registry_store.get_node(node_id)["region"])
        return self._regions[node_id]

    # Merging ------------------------------------------------------------------------

    def _locate(self, node_id: str, batch: StateBatch) -> list[Located]:
        located: list[Located] = []
        for name, op in batch.ops:
            definition = self._definition(name)
            if definition is None:
                self.metrics.rejected.labels(reason="unknown-collection").inc()
                log.warning("node %s wrote unknown collection %r", node_id, name)
                continue
            located.append((replica_key(definition.scope, self._region(node_id), node_id),
                            name, op))
        return located

    def merge_messages(self, msgs: list[Msg]) -> dict[str, list[tuple[str, Op]]]:
        """Merge fetched batches; return the ops to fan out, by replica."""
        located: list[Located] = []
        replay: list[Located] = []
        for msg in msgs:
            try:
                batch = decode_sync(msg.data)
                node_id = node_id_from_subject(msg.subject)
                if not isinstance(batch, StateBatch) or batch.origin != node_id:
                    raise ProtocolError("not a state batch from this node")
                ops = self._locate(node_id, batch)
            except (ProtocolError, FoglineError) as exc:
                self.metrics.rejected.labels(reason=type(exc).__name__).inc()
                log.warning("state batch on %s refused: %s", msg.subject, exc)
                continue
            located.extend(ops)
            if msg.metadata.num_delivered > 1:
                replay.extend(ops)
        outcome = self.collections.merge(located)
        self.metrics.ops_merged.inc(len(located))
        self.metrics.ops_changed.inc(len(outcome.changed))
        for _, collection, _ in outcome.conflicts:
            self.metrics.conflicts.labels(collection=collection).inc()
        self._feed_conflicts(outcome.conflicts)
        fanout: dict[str, list[tuple[str, Op]]] = defaultdict(list)
        seen: set[int] = set()
        for replica, collection, op in [*outcome.changed, *replay]:
            if id(op) not in seen:
                seen.add(id(op))
                fanout[replica].append((collection, op))
        return fanout

    def _feed_conflicts(self, conflicts: list[tuple[str, str, MapOp]]) -> None:
        """The change feed of lost writes (`fogline get events`), capped per batch so a
        hot key cannot flood the audit log; the metric counts every one."""
        now_s = self.clock.now()
        self.registry_store.add_events([
            {"at_s": now_s, "actor": "hub", "kind": "collection.conflict",
             "subject": collection,
             "detail": {"replica": replica, "key": lost.key, "lost_writer": lost.ts.node,
                        "lost_at_ms": lost.ts.wall_ms}}
            for replica, collection, lost in conflicts[:CONFLICT_EVENTS_MAX]])

    async def _publish_fanout(self, fanout: dict[str, list[tuple[str, Op]]]) -> None:
        for replica, ops in fanout.items():
            for start in range(0, len(ops), FANOUT_OPS_MAX):
                await self.js.publish(fanout_subject(replica), encode_sync(
                    FanoutBatch(ops=ops[start:start + FANOUT_OPS_MAX])))

    async def run_merge(self) -> None:
        subscription = await self.js.pull_subscribe(
            "fl.node.*.state", durable=MERGE_CONSUMER, stream=STATE_STREAM,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=10_000,
                                  ack_wait=30))
        while True:
            try:
                msgs = await fetch_ready(subscription, FETCH_BATCH, 1.0)
            except TimeoutError:  # nats-py raises both its own and asyncio's
                raise_if_cancelling()
                continue
            if not msgs:
                continue
            fanout = await asyncio.to_thread(self.merge_messages, msgs)
            await self._publish_fanout(fanout)
            for msg in msgs:
                await msg.ack()

    # Tombstones ---------------------------------------------------------------------

    async def collect_tombstones(self) -> dict[str, int]:
        """One pass of the tombstone rule over every replica; returns the horizons."""
        info = await self.js.consumer_info(STATE_STREAM, MERGE_CONSUMER)
        backlog = info.num_pending + info.num_ack_pending
        marks = await asyncio.to_thread(self.registry_store.sync_marks)
        replicas = await asyncio.to_thread(self.collections.replicas_with_tombstones)
        horizons: dict[str, int] = {}
        for replica in replicas:
            horizon = gc_horizon_ms(marks_in_scope(replica, marks), backlog)
            if horizon is None:
                continue
            dropped = await asyncio.to_thread(self.collections.collect_tombstones, replica,
                                              horizon)
            self.metrics.tombstones_collected.inc(dropped)
            await self.js.publish(fanout_subject(replica),
                                  encode_sync(FanoutBatch(gc_before_ms=horizon)))
            horizons[replica] = horizon
        return horizons

    async def run_gc(self, interval_s: float) -> None:
        while True:
            await self.clock.sleep(interval_s)
            await self.collect_tombstones()

    # Snapshots ----------------------------------------------------------------------

    async def snapshot_for(self, node_id: str) -> Snapshot:
        """The hub's state of every replica the node holds.

        The node's fan-out consumer is created (at the stream's tail) before the state
        is read, and never moved afterwards: ops are merged into SQL before they are
        fanned out, so whatever the consumer has not delivered yet is either in this
        snapshot or still ahead of it. A retried or stale request therefore cannot open
        a gap; at worst the node merges some ops twice, which changes nothing.
        """
        region = await asyncio.to_thread(self._region, node_id)
        info = await self.js.stream_info(FANOUT_STREAM)
        try:
            await self.js.consumer_info(FANOUT_STREAM, node_id)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(FANOUT_STREAM, ConsumerConfig(
                durable_name=node_id,
                filter_subjects=node_fanout_subjects(region, node_id),
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=info.state.last_seq + 1, ack_policy=AckPolicy.ALL,
                max_ack_pending=20_000, ack_wait=30))
        replicas = [s.removeprefix("fl.state.") for s in node_fanout_subjects(region, node_id)]
        defs = await asyncio.to_thread(self.collections.definitions)
        ops = await asyncio.to_thread(self.collections.replica_ops, replicas)
        return Snapshot(defs=list(defs.values()), ops=[(c, op) for _, c, op in ops],
                        resume_after_seq=info.state.last_seq)

    async def run_snapshots(self) -> None:
        async def respond(msg: Msg) -> None:
            try:
                snapshot = await self.snapshot_for(node_id_from_subject(msg.subject))
            except FoglineError as exc:
                log.warning("snapshot for %s refused: %s", msg.subject, exc)
                return
            await msg.respond(encode_sync(snapshot))

        await self.nc.subscribe("fl.node.*.req.snapshot", queue=HUB_QUEUE_GROUP, cb=respond)
        await asyncio.Event().wait()


