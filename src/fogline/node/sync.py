"""Collection sync on the node: local ops up to the hub, merged ops down from it.

Up: pending ops (committed locally, in order) go to JetStream in batches whose
`Nats-Msg-Id` names the node's sequence range, so a retry after a lost PubAck is a
duplicate JetStream drops. Rows leave the pending table only after the PubAck.
Down: the node's durable consumer on FL_FANOUT (created by the hub with a snapshot)
delivers every merged op of its replicas; the node merges and acks, and after any
outage resumes where it stopped. Without a consumer it asks the hub for a snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from fogline.clock import Clock
from fogline.core.sync import (
    FanoutBatch,
    Snapshot,
    StateBatch,
    decode_sync,
    encode_sync,
    replica_scope,
    snapshot_subject,
    state_subject,
)
from fogline.errors import ProtocolError
from fogline.node.collections import NodeCollections
from fogline.transport.cancellation import raise_if_cancelling
from fogline.transport.jetstream import fetch_ready

log = logging.getLogger("fogline.node.sync")

FANOUT_STREAM = "FL_FANOUT"
SEND_OPS_MAX = 2000
FETCH_MAX = 256
SNAPSHOT_TIMEOUT_S = 30.0


class NodeSync:
    def __init__(self, collections: NodeCollections, nc: NatsClient, node_id: str,
                 clock: Clock) -> None:
        self.collections = collections
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=5)
        self.node_id = node_id
        self.clock = clock
        self.sent_ops = 0
        self.received_ops = 0

    async def run(self) -> None:
        """Sync until cancelled or the connection closes for good."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._send_loop())
                group.create_task(self._receive_loop())
        except Exception:
            log.exception("collection sync stopped")
            raise

    # Up -----------------------------------------------------------------------------

    async def send_pending(self) -> int:
        batch = await asyncio.to_thread(self.collections.pending_batch, SEND_OPS_MAX)
        if not batch:
            return 0
        first, last = batch[0][0], batch[-1][0]
        message = StateBatch(origin=self.node_id, seq_first=first, seq_last=last,
                             ops=[(name, op) for _, name, op in batch])
        await self.js.publish(state_subject(self.node_id), encode_sync(message),
                              headers={"Nats-Msg-Id": f"{self.node_id}:state:{first}-{last}"})
        await self.collections.acknowledge(last)
        self.sent_ops += len(batch)
        return len(batch)

    async def _send_loop(self) -> None:
        delay_s = 0.1
        while not self.nc.is_closed:
            self.collections.pending_changed.clear()
            try:
                if await self.send_pending():
                    delay_s = 0.1
                    continue
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("sync upload paused: %s", exc)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.collections.pending_changed.wait(), 1.0)

    # Down ---------------------------------------------------------------------------

    async def bootstrap(self) -> None:
        """Load the hub's snapshot; the hub restarts our consumer right after it."""
        reply = await self.nc.request(snapshot_subject(self.node_id), b"",
                                      timeout=SNAPSHOT_TIMEOUT_S)
        snapshot = decode_sync(reply.data)
        if not isinstance(snapshot, Snapshot):
            raise ProtocolError("snapshot reply is not a snapshot")
        await self.collections.merge_remote(snapshot.ops, snapshot.defs)
        await self.collections.set_meta("bootstrapped", b"1")
        log.info("bootstrapped from hub snapshot: %d collections, %d ops",
                 len(snapshot.defs), len(snapshot.ops))

    async def _receive_loop(self) -> None:
        delay_s = 0.2
        while not self.nc.is_closed:
            try:
                if self.collections.meta("bootstrapped") is None:
                    await self.bootstrap()
                subscription = await self.js.pull_subscribe_bind(
                    durable=self.node_id, stream=FANOUT_STREAM)
                await self._consume(subscription)
            except nats.js.errors.NotFoundError:
                # Our consumer is gone (new node, or the hub expired it): start over.
                await self._forget_bootstrap()
            except (nats.errors.Error, TimeoutError) as exc:
                log.info("sync download paused: %s", exc)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    async def _forget_bootstrap(self) -> None:
        await self.collections.writer.submit(
            lambda c: c.execute("DELETE FROM meta WHERE k='bootstrapped'"))

    async def _consume(self, subscription: JetStreamContext.PullSubscription) -> None:
        while not self.nc.is_closed:
            try:
                msgs = await fetch_ready(subscription, FETCH_MAX, 1.0)
            except TimeoutError:  # nats-py raises both its own and asyncio's
                raise_if_cancelling()
                continue
            if not msgs:  # a fetch that expired server-side returns nothing
                continue
            ops = []
            defs = []
            horizons: list[tuple[str, int]] = []
            for msg in msgs:
                try:
                    batch = decode_sync(msg.data)
                except ProtocolError as exc:
                    log.warning("fan-out message refused: %s", exc)
                    continue
                if isinstance(batch, FanoutBatch):
                    ops.extend(batch.ops)
                    defs.extend(batch.defs)
                    if batch.gc_before_ms:
                        horizons.append((replica_scope(msg.subject.removeprefix(
                            "fl.state.")), batch.gc_before_ms))
            await self.collections.merge_remote(ops, defs)
            for scope, before_ms in horizons:  # after the ops that came before them
                await self.collections.collect_tombstones(scope, before_ms)
            self.received_ops += len(ops)
            await msgs[-1].ack()  # AckPolicy.ALL: acknowledges the whole fetch
