"""Drains the outbox to JetStream: priority first, within each stream's budget.

Many records travel in one JetStream message (an `UpBatch`, about 256 KiB) on
`fl.node.<node>.up.<stream>` with `Nats-Msg-Id = <node>:<stream>:<first>-<last>`, so a
republished batch is dropped by JetStream inside its duplicate window and by the hub's
cursor after it. Rows are deleted only after the PubAck. One batch per stream is in
flight at a time, so a stream's records can never overtake each other.

Publishing retries forever with capped backoff on purpose: the outbox holds the
records, and giving up would only mean reading the same batch again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace

import msgspec
import nats
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter

from fogline.clock import Clock
from fogline.core.outbox import (
    StreamPolicy,
    TokenBucket,
    UpBatch,
    batch_msg_id,
    encode_batch,
    plan_batches,
    up_subject,
)
from fogline.node.outbox import Outbox
from fogline.node.outbox_store import OutboxBatch
from fogline.transport.cancellation import raise_if_cancelling

log = logging.getLogger("fogline.node.outbox")

BATCH_BYTES_MAX = 256 * 1024
PUBLISH_TIMEOUT_S = 5.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
IDLE_WAIT_S = 1.0



class OutboxSender:
    """Reads planned batches from the outbox, publishes them, acks them locally."""

    def __init__(self, outbox: Outbox, js: JetStreamContext, node_id: str, clock: Clock,
                 policies: Mapping[str, StreamPolicy] | None = None, *,
                 registry: CollectorRegistry | None = None,
                 batch_bytes_max: int = BATCH_BYTES_MAX,
                 publish_timeout_s: float = PUBLISH_TIMEOUT_S,
                 backoff_max_s: float = BACKOFF_MAX_S) -> None:
        self.outbox = outbox
        self.js = js
        self.node_id = node_id
        self.clock = clock
        self.policies = dict(policies) if policies is not None else None
        self.batch_bytes_max = batch_bytes_max
        self.publish_timeout_s = publish_timeout_s
        self.backoff_max_s = backoff_max_s
        self._buckets: dict[str, TokenBucket] = {}
        self._bucket_policies: dict[str, StreamPolicy] = {}
        self.batches_sent = 0
        self.publish_failures = 0
        self._sent: Counter | None = None
        self._failed: Counter | None = None
        if registry is not None:
            self._sent = Counter("fogline_outbox_sent_batches", "Batches acked by JetStream",
                                 ["stream"], registry=registry)
            self._failed = Counter("fogline_outbox_publish_failures",
                                   "Batch publishes that failed and were retried",
                                   ["stream"], registry=registry)

    def policy(self, stream: str) -> StreamPolicy:
        if self.policies is not None and stream in self.policies:
            return self.policies[stream]
        return self.outbox.policy(stream)

    async def run(self) -> None:
        """Send until cancelled; an in-flight batch is handed back to the outbox."""
        delay_s = BACKOFF_MIN_S
        while True:
            try:
                await self.send_round()
                delay_s = BACKOFF_MIN_S
            except Exception:  # a failed local ack or a bug: log, back off, carry on
                raise_if_cancelling()
                log.exception("outbox sender round failed; retrying in %.2fs", delay_s)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, self.backoff_max_s)

    async def send_round(self) -> int:
        """Plan once and send what the plan allows; waits when there is nothing to send.
        Returns the number of records acknowledged."""
        now_s = self.clock.monotonic()
        commits = self.outbox.commits
        backlogs = {name: replace(backlog, priority=self.policy(name).priority)
                    for name, backlog in self.outbox.backlogs().items()}
        plan = plan_batches(backlogs, self._buckets_for(backlogs, now_s), now_s,
                            self.batch_bytes_max)
        if not plan.batches:
            # Budgets or an empty outbox: wait, but wake for any new record (it may be
            # of a higher priority or an unthrottled stream).
            await self.outbox.wait_for_records(min(plan.wait_s or IDLE_WAIT_S, IDLE_WAIT_S),
                                               after=commits)
            return 0
        sent = 0
        for planned in plan.batches:
            batch = await self.outbox.read_batch(planned.stream, planned.bytes_max)
            if batch is None:
                continue
            bucket = self._buckets.get(batch.stream)
            if bucket is not None:
                bucket.take(batch.n_bytes, self.clock.monotonic())
            try:
                await self._publish(batch)
                await self.outbox.ack(batch)
            except BaseException:
                # Read again later; a batch that did reach JetStream is a duplicate there.
                self.outbox.release(batch.stream)
                raise
            sent += len(batch.records)
        return sent

    def _buckets_for(self, backlogs: Mapping[str, object],
                     now_s: float) -> dict[str, TokenBucket]:
        for stream in backlogs:
            policy = self.policy(stream)
            # A new policy (e.g. the hub's Stream manifest) gets a new bucket.
            if self._bucket_policies.get(stream) is not policy:
                self._bucket_policies[stream] = policy
                bucket = policy.bucket(now_s)
                if bucket is not None:
                    self._buckets[stream] = bucket
                else:
                    self._buckets.pop(stream, None)
        return self._buckets

    async def _publish(self, batch: OutboxBatch) -> None:
        """Publish until JetStream acknowledges, backing off between attempts."""
        payload = encode_batch(UpBatch(
            stream=batch.stream, first_seq=batch.first_seq, gap_before=batch.gap_before,
            dropped_total=batch.dropped_total, emitted_at_s=batch.emitted_at_s,
            records=[msgspec.Raw(record) for record in batch.records]))
        subject = up_subject(self.node_id, batch.stream)
        headers = {"Nats-Msg-Id": batch_msg_id(self.node_id, batch.stream, batch.first_seq,
                                               batch.last_seq)}
        delay_s = BACKOFF_MIN_S
        failures = 0
        while True:
            try:
                await self.js.publish(subject, payload, timeout=self.publish_timeout_s,
                                      headers=headers)
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                raise_if_cancelling()
                failures += 1
                self.publish_failures += 1
                if self._failed is not None:
                    self._failed.labels(stream=batch.stream).inc()
                if failures == 1:
                    log.warning("upstream publish of %s failed (%s: %s); retrying",
                                headers["Nats-Msg-Id"], type(exc).__name__, exc)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, self.backoff_max_s)
                continue
            if failures:
                log.info("upstream publish of %s succeeded after %d failures",
                         headers["Nats-Msg-Id"], failures)
            self.batches_sent += 1
            if self._sent is not None:
                self._sent.labels(stream=batch.stream).inc()
            return
