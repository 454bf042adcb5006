"""Sans-IO decisions for durable streams: admission, bandwidth, batching, exactly-once.

The node's outbox and the hub's ingest are IO shells around these functions, so the
property tests and the simulator exercise the same rules that run in production:

- `admit` decides what a full stream does with one more record (block or drop the
  oldest); it never loses a record silently: a drop is an explicit, counted outcome.
- `TokenBucket` and `plan_batches` choose which stream sends next: strict priority
  (higher first), each stream held to its own bytes/s budget.
- `ingest_step` / `plan_ingest` let the hub apply batches exactly once and in order per
  (node, stream) from the highest seq it has applied, whatever JetStream redelivers or
  reorders. A gap is accepted only where the node reported dropped records.

A batch travels as one msgpack `UpBatch` on `fl.node.<node>.up.<stream>`; its records
are contiguous seqs `first_seq .. first_seq + len(records) - 1`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import msgspec

from fogline.errors import ConfigError, ProtocolError
from fogline.protocol import MAX_MESSAGE_BYTES, PROTOCOL_VERSION

# Leaves room for the batch envelope and headers under NATS' default 1 MiB max_payload.
MAX_RECORD_BYTES = 1_000_000
DEFAULT_QUOTA_BYTES = 256 * 1024 * 1024
# A bucket holds at least this much, so a thin budget still sends useful batches.
BURST_BYTES_MIN = 4096
UP_WILDCARD = "fl.node.*.up.>"

Overflow = Literal["block", "drop-oldest"]
OVERFLOWS: tuple[str, ...] = ("block", "drop-oldest")

# Stream names become subject tokens.
_STREAM_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def check_stream_name(stream: str) -> str:
    if not isinstance(stream, str) or not _STREAM_NAME.match(stream):
        raise ConfigError(f"invalid stream name {stream!r}: use 1-64 of [a-z0-9_-], "
                          "starting with a letter or digit")
    return stream


def up_subject(node_id: str, stream: str) -> str:
    return f"fl.node.{node_id}.up.{stream}"


def parse_up_subject(subject: str) -> tuple[str, str]:
    """(node id, stream) of an upstream subject; ProtocolError if it is not one."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[:2] != ["fl", "node"] or parts[3] != "up":
        raise ProtocolError(f"not an upstream subject: {subject!r}")
    if not _STREAM_NAME.match(parts[4]):
        raise ProtocolError(f"invalid stream name in {subject!r}")
    return parts[2], parts[4]


def batch_msg_id(node_id: str, stream: str, first_seq: int, last_seq: int) -> str:
    """JetStream `Nats-Msg-Id`: a republished batch is dropped within the dup window."""
    return f"{node_id}:{stream}:{first_seq}-{last_seq}"


# Policy ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamPolicy:
    """How one stream competes for the link and what happens when its disk share is full.

    `overflow="block"` (the default) makes producers wait; `"drop-oldest"` must be chosen
    explicitly and every drop is counted and reported upstream.
    """

    priority: int = 0
    bandwidth_bps: float | None = None
    quota_bytes: int = DEFAULT_QUOTA_BYTES
    overflow: Overflow = "block"
    # Token bucket depth; default: one second of bandwidth (at least BURST_BYTES_MIN).
    burst_bytes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ConfigError(f"stream priority must be an integer, got {self.priority!r}")
        if self.bandwidth_bps is not None and not (
                isinstance(self.bandwidth_bps, int | float) and math.isfinite(self.bandwidth_bps)
                and self.bandwidth_bps > 0):
            raise ConfigError("stream bandwidth_bps must be a positive number of bytes/s or "
                              f"None (unlimited), got {self.bandwidth_bps!r}")
        if isinstance(self.quota_bytes, bool) or not isinstance(self.quota_bytes, int) \
                or self.quota_bytes <= 0:
            raise ConfigError(f"stream quota_bytes must be a positive integer, "
                              f"got {self.quota_bytes!r}")
        if self.overflow not in OVERFLOWS:
            raise ConfigError(f"stream overflow must be one of {', '.join(OVERFLOWS)}, "
                              f"got {self.overflow!r}")
        if self.burst_bytes is not None and (
                isinstance(self.burst_bytes, bool) or not isinstance(self.burst_bytes, int)
                or self.burst_bytes <= 0):
            raise ConfigError(f"stream burst_bytes must be a positive integer, "
                              f"got {self.burst_bytes!r}")

    def bucket(self, now_s: float) -> TokenBucket | None:
        if self.bandwidth_bps is None:
            return None
        burst = self.burst_bytes or max(BURST_BYTES_MIN, int(self.bandwidth_bps))
        return TokenBucket(self.bandwidth_bps, burst, now_s)


class TokenBucket:
    """Bytes/s budget. A take is granted whenever the bucket is not in debt and may
    drive it into debt, so a record larger than the burst still goes out, and the
    long-run rate stays at `rate_bps` (sent <= burst + rate * t + one batch)."""

    def __init__(self, rate_bps: float, burst_bytes: float, now_s: float) -> None:
        if rate_bps <= 0 or burst_bytes <= 0:
            raise ConfigError("a token bucket needs a positive rate and burst")
        self.rate_bps = float(rate_bps)
        self.burst_bytes = float(burst_bytes)
        self._tokens = float(burst_bytes)
        self._updated_s = now_s

    def _refill(self, now_s: float) -> None:
        if now_s > self._updated_s:
            self._tokens = min(self.burst_bytes,
                               self._tokens + (now_s - self._updated_s) * self.rate_bps)
            self._updated_s = now_s

    def wait_s(self, now_s: float) -> float:
        """Seconds until a take would be granted (0 means now)."""
        self._refill(now_s)
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_bps

    def take(self, n_bytes: int, now_s: float) -> float:
        """Spend `n_bytes` and return 0, or spend nothing and return the wait in s."""
        wait = self.wait_s(now_s)
        if wait > 0:
            return wait
        self._tokens -= n_bytes
        return 0.0


# Admission ------------------------------------------------------------------------

@dataclass(frozen=True)
class Admit:
    pass


@dataclass(frozen=True)
class Block:
    pass


@dataclass(frozen=True)
class DropOldest:
    bytes_to_free: int


Admission = Admit | Block | DropOldest


def admit(used_bytes: int, record_bytes: int, policy: StreamPolicy) -> Admission:
    """What to do with one more record of `record_bytes` on a stream using `used_bytes`.

    A record that could never fit the quota is refused (ProtocolError), not blocked
    forever and not allowed to flush the whole stream.
    """
    if record_bytes > policy.quota_bytes:
        raise ProtocolError(f"record of {record_bytes} bytes exceeds the stream quota of "
                            f"{policy.quota_bytes} bytes")
    excess = used_bytes + record_bytes - policy.quota_bytes
    if excess <= 0:
        return Admit()
    if policy.overflow == "drop-oldest":
        return DropOldest(excess)
    return Block()


# Batch planning -------------------------------------------------------------------

@dataclass(frozen=True)
class Backlog:
    records: int
    n_bytes: int
    priority: int = 0


@dataclass(frozen=True)
class PlannedBatch:
    stream: str
    bytes_max: int


@dataclass(frozen=True)
class Plan:
    batches: tuple[PlannedBatch, ...]
    # When nothing can go now only because of budgets: seconds until one can.
    wait_s: float | None = None


def plan_batches(backlogs: Mapping[str, Backlog], buckets: Mapping[str, TokenBucket],
                 now_s: float, batch_bytes_max: int) -> Plan:
    """The next batches to send, highest priority first, at most one per stream.

    Strict priority: a stream whose backlog exceeds one batch ends the plan, so lower
    priorities wait; a stream over its budget is skipped and does not hold others back.
    Batches are capped by the stream's burst so a thin budget sends small batches
    evenly rather than one large batch followed by a long pause. Buckets are not
    charged here: the sender takes the bytes it actually read.
    """
    batches: list[PlannedBatch] = []
    waits: list[float] = []
    waiting = [name for name, backlog in backlogs.items() if backlog.records > 0]
    for stream in sorted(waiting, key=lambda name: (-backlogs[name].priority, name)):
        backlog = backlogs[stream]
        bytes_max = batch_bytes_max
        bucket = buckets.get(stream)
        if bucket is not None:
            wait = bucket.wait_s(now_s)
            if wait > 0:
                waits.append(wait)
                continue
            bytes_max = max(1, min(bytes_max, int(bucket.burst_bytes)))
        batches.append(PlannedBatch(stream, bytes_max))
        if backlog.n_bytes > bytes_max:
            break
    if batches:
        return Plan(tuple(batches))
    return Plan((), min(waits) if waits else None)


# Wire batch -----------------------------------------------------------------------

class UpBatch(msgspec.Struct, frozen=True, tag="up"):
    """Records `first_seq ..` of one stream; `gap_before` records right before
    `first_seq` were dropped on the node; `dropped_total` is its running count."""

    stream: str
    first_seq: int
    gap_before: int
    dropped_total: int
    emitted_at_s: list[float]
    records: list[msgspec.Raw]
    v: int = PROTOCOL_VERSION

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.records) - 1


_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(UpBatch)


def encode_batch(batch: UpBatch) -> bytes:
    assert batch.records and len(batch.records) == len(batch.emitted_at_s)
    return _batch_encoder.encode(batch)


def decode_batch(data: bytes) -> UpBatch:
    """Decode an upstream batch, rejecting oversize, malformed and unknown versions."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"batch of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        batch = _batch_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed batch: {exc}") from exc
    if batch.v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {batch.v}")
    if not batch.records or len(batch.records) != len(batch.emitted_at_s):
        raise ProtocolError("batch needs one emitted_at_s per record and at least one record")
    if batch.first_seq < 1 or batch.gap_before < 0 or batch.dropped_total < 0:
        raise ProtocolError("batch seq and drop counts must be positive")
    return batch


# Exactly-once ingest --------------------------------------------------------------

IngestAction = Literal["apply", "duplicate", "later"]


@dataclass(frozen=True)
class IngestStep:
    """What the hub does with one batch given the cursor `last_seq` before it."""

    action: IngestAction
    last_seq: int       # cursor after this step
    skip: int = 0       # leading records already applied (an overlapping re-batch)
    dropped: int = 0    # records the node dropped right before this batch
    lost: int = 0       # records given up on (never reported as dropped, never arrived)


def ingest_step(last_seq: int, first_seq: int, count: int, gap_before: int,
                give_up: bool = False) -> IngestStep:
    """Apply, skip as a duplicate, or wait for the batches that fill a gap.

    Records at or below `last_seq` were applied already. A gap up to `gap_before`
    records is what the node dropped; a larger gap means an earlier batch has not
    arrived yet, so this one waits (`later`) — unless `give_up`, when the unexplained
    part is counted as `lost` rather than stalling the stream forever.
    """
    assert count >= 1 and first_seq >= 1 and gap_before >= 0
    end = first_seq + count - 1
    if end <= last_seq:
        return IngestStep("duplicate", last_seq)
    if first_seq <= last_seq + 1:
        return IngestStep("apply", end, skip=last_seq + 1 - first_seq)
    gap = first_seq - last_seq - 1
    if gap <= gap_before:
        return IngestStep("apply", end, dropped=gap)
    if give_up:
        return IngestStep("apply", end, dropped=gap_before, lost=gap - gap_before)
    return IngestStep("later", last_seq)


@dataclass(frozen=True)
class BatchMeta:
    first_seq: int
    count: int
    gap_before: int
    give_up: bool = False


def plan_ingest(last_seq: int, batches: Sequence[BatchMeta]) -> tuple[list[IngestStep], int]:
    """Steps for several batches of one (node, stream), aligned with `batches`, and the
    cursor after them. Batches are taken in seq order, so one fetch that holds a later
    batch before an earlier one still applies both."""
    steps: list[IngestStep | None] = [None] * len(batches)
    order = sorted(range(len(batches)), key=lambda i: batches[i].first_seq)
    for index in order:
        meta = batches[index]
        step = ingest_step(last_seq, meta.first_seq, meta.count, meta.gap_before,
                           meta.give_up)
        steps[index] = step
        last_seq = step.last_seq
    return [step for step in steps if step is not None], last_seq
