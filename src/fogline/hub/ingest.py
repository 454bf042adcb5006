"""Hub ingest: upstream batches from JetStream into SQL, exactly once, in order.

Nodes publish `UpBatch`es to the `FL_UP` stream. Every hub process runs an
`IngestWorker` on the one durable pull consumer `fl-ingest`, so N hubs share the work.
A fetch is applied in one SQL transaction: the per-(node, stream) cursor row is locked,
`plan_ingest` (fogline.core.outbox) says which records are new, they are inserted and
the cursor moves; only after the commit are the messages acked. A redelivered batch is a
duplicate by the cursor; a batch that arrives before an earlier one is nak'ed with a
delay and applied once the gap is filled. So the effect is exactly once, in seq order.

`FL_UP` is a work queue with `discard=new`: when the hub falls behind until the stream
is full, nodes get publish errors and keep records in their outbox instead of JetStream
silently dropping old ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import sqlalchemy as sa
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.engine import Connection, Engine

from fogline.clock import Clock
from fogline.core.outbox import (
    UP_WILDCARD,
    BatchMeta,
    UpBatch,
    decode_batch,
    parse_up_subject,
    plan_ingest,
)
from fogline.errors import ConfigError, ProtocolError
from fogline.hub.store import metadata, upsert
from fogline.protocol import MAX_MESSAGE_BYTES, valid_node_id
from fogline.transport.cancellation import raise_if_cancelling
from fogline.transport.jetstream import fetch_ready

log = logging.getLogger("fogline.hub.ingest")

FL_UP = "FL_UP"
INGEST_CONSUMER = "fl-ingest"
DUPLICATE_WINDOW_S = 120.0
STREAM_MAX_BYTES = 1 << 30
FETCH_BATCH = 32
FETCH_TIMEOUT_S = 1.0
ACK_WAIT_S = 30.0
# A batch waiting for an earlier one is retried with a growing delay; after this many
# deliveries the missing records are counted as lost instead of stalling the stream.
GAP_WAIT_DELIVERIES_MAX = 60
GAP_WAIT_DELAY_MAX_S = 2.0
TRANSACTION_ATTEMPTS = 3
READ_LIMIT_MAX = 1000

records = sa.Table(
    "fl_records", metadata,
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("stream", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("emitted_at_s", sa.Float, nullable=False),
    sa.Column("received_at_s", sa.Float, nullable=False),
    # The record exactly as the node encoded it (msgpack).
    sa.Column("record", sa.LargeBinary, nullable=False),
)

cursors = sa.Table(
    "fl_stream_cursors", metadata,
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("stream", sa.String(64), primary_key=True),
    sa.Column("last_seq", sa.BigInteger, nullable=False, default=0),
    sa.Column("records", sa.BigInteger, nullable=False, default=0),
    sa.Column("dropped", sa.BigInteger, nullable=False, default=0),
    sa.Column("lost", sa.BigInteger, nullable=False, default=0),
    sa.Column("node_dropped_total", sa.BigInteger, nullable=False, default=0),
    sa.Column("updated_at_s", sa.Float, nullable=False, default=0.0),
)


async def ensure_streams(js: JetStreamContext, *, max_bytes: int = STREAM_MAX_BYTES,
                         replicas: int = 1) -> None:
    """Create (or update) the `FL_UP` stream; idempotent, safe from every hub process."""
    config = StreamConfig(
        name=FL_UP, subjects=[UP_WILDCARD], retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE, discard=DiscardPolicy.NEW, max_bytes=max_bytes,
        max_msg_size=MAX_MESSAGE_BYTES, duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas)
    try:
        await js.add_stream(config)
    except BadRequestError:
        try:
            await js.update_stream(config)
        except BadRequestError as exc:
            raise ConfigError(f"stream {FL_UP} exists with a conflicting configuration: "
                              f"{exc}") from exc



@dataclass(frozen=True)
class _Incoming:
    index: int
    node_id: str
    stream: str
    batch: UpBatch
    give_up: bool


@dataclass(frozen=True)
class Outcome:
    """What to tell JetStream about one message after the transaction."""

    action: str          # "ack", "nak" (redeliver after delay_s) or "term" (refused)
    delay_s: float = 0.0




class IngestWorker:
    """One hub process's share of the `fl-ingest` consumer."""

    def __init__(self, engine: Engine, js: JetStreamContext, clock: Clock, *,
                 registry: CollectorRegistry | None = None, fetch_batch: int = FETCH_BATCH,
                 fetch_timeout_s: float = FETCH_TIMEOUT_S,
                 ack_wait_s: float = ACK_WAIT_S) -> None:
        self.engine = engine
        self.js = js
        self.clock = clock
        self.fetch_batch = fetch_batch
        self.fetch_timeout_s = fetch_timeout_s
        self.ack_wait_s = ack_wait_s
        self.counts: dict[str, int] = defaultdict(int)
        self._metrics: dict[str, Counter] = {}
        if registry is not None:
            self._metrics = {
                "records": Counter("fogline_ingest_records", "Records written to SQL",
                                   registry=registry),
                "batches": Counter("fogline_ingest_batches", "Upstream batches by outcome",
                                   ["outcome"], registry=registry),
                "dropped": Counter("fogline_ingest_dropped_records",
                                   "Records nodes reported dropped (drop-oldest)",
                                   registry=registry),
                "lost": Counter("fogline_ingest_lost_records",
                                "Records given up on after waiting for a gap",
                                registry=registry),
            }

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Fetch and apply until cancelled."""
        subscription = await self._subscribe()
        if ready is not None:
            ready.set()
        delay_s = 0.1
        try:
            while True:
                try:
                    messages = await fetch_ready(subscription, self.fetch_batch,
                                                 self.fetch_timeout_s)
                except TimeoutError:
                    raise_if_cancelling()
                    continue
                except nats.errors.Error as exc:
                    raise_if_cancelling()
                    log.warning("ingest fetch failed (%s); retrying", exc)
                    await self.clock.sleep(delay_s)
                    delay_s = min(delay_s * 2, 5.0)
                    continue
                delay_s = 0.1
                try:
                    await self.handle(messages)
                except Exception:  # unacked messages come back after ack_wait
                    raise_if_cancelling()
                    log.exception("ingest of %d messages failed", len(messages))
                    await self.clock.sleep(1.0)
        finally:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        config = ConsumerConfig(
            durable_name=INGEST_CONSUMER, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s, max_deliver=-1, max_ack_pending=self.fetch_batch * 16)
        delay_s = 0.1
        while True:
            try:
                return await self.js.pull_subscribe(UP_WILDCARD, durable=INGEST_CONSUMER,
                                                     stream=FL_UP, config=config)
            except (TimeoutError, nats.errors.Error) as exc:
                raise_if_cancelling()
                log.warning("ingest consumer unavailable (%s); retrying", exc)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)

    async def handle(self, messages: Sequence[Msg]) -> None:
        """Apply one fetch in one transaction, then ack, nak or terminate each message."""
        if not messages:
            return
        outcomes = await asyncio.to_thread(self.apply, messages)
        for message, outcome in zip(messages, outcomes, strict=True):
            with contextlib.suppress(nats.errors.Error):
                if outcome.action == "ack":
                    await message.ack()
                elif outcome.action == "nak":
                    await message.nak(delay=outcome.delay_s)
                else:
                    await message.term()

    def apply(self, messages: Sequence[Msg]) -> list[Outcome]:
        """Decode, then write what is new; a failed transaction naks the whole fetch."""
        outcomes = [Outcome("ack")] * len(messages)
        incoming: list[_Incoming] = []
        for index, message in enumerate(messages):
            try:
                node_id, stream = parse_up_subject(message.subject)
                if not valid_node_id(node_id):
                    raise ProtocolError(f"invalid node id {node_id!r}")
                batch = decode_batch(message.data)
                if batch.stream != stream:
                    raise ProtocolError(f"batch of stream {batch.stream!r} on {stream!r}")
            except ProtocolError as exc:
                log.warning("refused upstream message on %s: %s", message.subject, exc)
                self._count("refused")
                outcomes[index] = Outcome("term")
                continue
            deliveries = message.metadata.num_delivered or 1
            incoming.append(_Incoming(index, node_id, stream, batch,
                                      deliveries > GAP_WAIT_DELIVERIES_MAX))
        if not incoming:
            return outcomes
        for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
            try:
                with self.engine.begin() as conn:
                    waits = self._apply_in(conn, incoming)
                break
            except sa.exc.DBAPIError as exc:  # deadlock, serialization, lost connection
                log.warning("ingest transaction failed (attempt %d): %s", attempt, exc)
                if attempt == TRANSACTION_ATTEMPTS:
                    return [o if o.action == "term" else Outcome("nak", 1.0) for o in outcomes]
        for item in incoming:
            if item.index in waits:
                deliveries = messages[item.index].metadata.num_delivered or 1
                delay_s = min(GAP_WAIT_DELAY_MAX_S, 0.05 * 2 ** min(deliveries, 8))
                outcomes[item.index] = Outcome("nak", delay_s)
        return outcomes

    def _apply_in(self, conn: Connection, incoming: list[_Incoming]) -> set[int]:
        """Write new records and move cursors; returns indexes that must wait."""
        now_s = self.clock.now()
        groups: dict[tuple[str, str], list[_Incoming]] = defaultdict(list)
        for item in incoming:
            groups[(item.node_id, item.stream)].append(item)
        keys = sorted(groups)
        # Creating missing cursors first takes the write lock on SQLite up front.
        upsert(conn, cursors,
               [{"node_id": n, "stream": s, "last_seq": 0, "records": 0, "dropped": 0,
                 "lost": 0, "node_dropped_total": 0, "updated_at_s": now_s}
                for n, s in keys], update=[])
        rows: list[dict[str, Any]] = []
        waits: set[int] = set()
        for node_id, stream in keys:  # locked in one order, so hubs cannot deadlock
            items = groups[(node_id, stream)]
            cursor = conn.execute(
                sa.select(cursors).where(cursors.c.node_id == node_id,
                                         cursors.c.stream == stream)
                .with_for_update()).mappings().one()
            steps, last_seq = plan_ingest(cursor["last_seq"], [
                BatchMeta(i.batch.first_seq, len(i.batch.records), i.batch.gap_before,
                          i.give_up) for i in items])
            applied = dropped = lost = 0
            for item, step in zip(items, steps, strict=True):
                self._count(step.action)
                if step.action == "later":
                    waits.add(item.index)
                    continue
                if step.action == "duplicate":
                    continue
                batch = item.batch
                for offset in range(step.skip, len(batch.records)):
                    rows.append({"node_id": node_id, "stream": stream,
                                 "seq": batch.first_seq + offset,
                                 "emitted_at_s": batch.emitted_at_s[offset],
                                 "received_at_s": now_s,
                                 "record": bytes(batch.records[offset])})
                applied += len(batch.records) - step.skip
                dropped += step.dropped
                lost += step.lost
            if lost:
                log.error("gave up waiting for %d records of %s/%s: counted as lost",
                          lost, node_id, stream)
            reported = max(i.batch.dropped_total for i in items)
            conn.execute(cursors.update().where(cursors.c.node_id == node_id,
                                                cursors.c.stream == stream).values(
                last_seq=last_seq, records=cursors.c.records + applied,
                dropped=cursors.c.dropped + dropped, lost=cursors.c.lost + lost,
                node_dropped_total=sa.func.max(cursors.c.node_dropped_total, reported)
                if conn.dialect.name == "sqlite"
                else sa.func.greatest(cursors.c.node_dropped_total, reported),
                updated_at_s=now_s))
            self._count("records", applied)
            self._count("dropped", dropped)
            self._count("lost", lost)
        if rows:
            upsert(conn, records, rows, update=[])
        return waits

    def _count(self, name: str, amount: int = 1) -> None:
        if not amount:
            return
        self.counts[name] += amount
        if not self._metrics:
            return
        if name in ("records", "dropped", "lost"):
            self._metrics[name].inc(amount)
        else:
            outcome = "applied" if name == "apply" else name
            self._metrics["batches"].labels(outcome=outcome).inc(amount)


# Queries for the API -----------------------------------------------------------------

def list_streams(engine: Engine, node_id: str | None = None) -> list[dict[str, Any]]:
    """Every (node, stream) the hub has heard of, with counts."""
    query = sa.select(cursors).order_by(cursors.c.node_id, cursors.c.stream)
    if node_id is not None:
        query = query.where(cursors.c.node_id == node_id)
    with engine.connect() as conn:
        return [dict(row) for row in conn.execute(query).mappings()]


def read_records(engine: Engine, node_id: str, stream: str, after_seq: int = 0,
                 limit: int = 100) -> list[dict[str, Any]]:
    """Records of one stream of one node in seq order, decoded from msgpack."""
    limit = max(1, min(limit, READ_LIMIT_MAX))
    query = (sa.select(records.c.seq, records.c.emitted_at_s, records.c.received_at_s,
                       records.c.record)
             .where(records.c.node_id == node_id, records.c.stream == stream,
                    records.c.seq > after_seq)
             .order_by(records.c.seq).limit(limit))
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [{"seq": seq, "emitted_at_s": emitted, "received_at_s": received,
             "record": msgspec.msgpack.decode(data)} for seq, emitted, received, data in rows]
