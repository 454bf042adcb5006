"""The node's durable outbox: `emit` returns once the record is on disk.

Records wait here (one SQLite file, WAL) until `OutboxSender` has them acknowledged by
JetStream, so a slow, lossy or absent link never loses an acknowledged record.

Durability and fsync policy. One writer thread owns the connection and commits emits
in groups (group commit): it takes every emit that queued up while its previous commit
ran — at most GROUP_RECORDS_MAX records, gathered for at most GROUP_WINDOW_S (10 ms) —
writes them in one transaction and only then answers the emitters. So every
acknowledged emit is committed to the WAL:

- `fsync="normal"` (default): PRAGMA synchronous=NORMAL. A commit survives a process
  crash or kill -9. After a power cut or OS crash the commits since the WAL was last
  synced (at checkpoints) can be missing; the file is never corrupted.
- `fsync="full"`: PRAGMA synchronous=FULL. The WAL is fsynced at each group commit, so
  an acknowledged emit survives power loss too; one fsync is shared by the whole group.

Seqs are per stream, assigned at commit, monotonic and persistent: the next seq is one
above the highest seq stored or acknowledged upstream. Quota accounting counts encoded
record bytes (not SQLite page overhead). On a full stream, `block` makes emit wait
(until `timeout_s`, then RetryableError, nothing written) and raises the
`fogline_outbox_stream_full` alarm; `drop-oldest` deletes the oldest records not yet
handed to the network and counts them persistently (the count travels upstream).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
from prometheus_client import CollectorRegistry

from fogline.clock import Clock
from fogline.core.outbox import (
    MAX_RECORD_BYTES,
    Admit,
    Backlog,
    DropOldest,
    StreamPolicy,
    admit,
    check_stream_name,
)
from fogline.errors import ConfigError, FoglineError, ProtocolError, RetryableError, TerminalError
from fogline.node.outbox_metrics import OutboxCollector
from fogline.node.outbox_store import OutboxBatch, OutboxStore, Row, StreamState, StreamStats

log = logging.getLogger("fogline.node.outbox")

GROUP_RECORDS_MAX = 10_000
GROUP_WINDOW_S = 0.010
BLOCK_TIMEOUT_S = 30.0

Fsync = Literal["normal", "full"]
T = TypeVar("T")


@dataclass(eq=False)
class _Request:
    """One emit or one sender operation waiting for the writer thread."""

    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Any] | concurrent.futures.Future[Any]


@dataclass(eq=False)
class _Emit(_Request):
    stream: str = ""
    data: bytes = b""
    emitted_at_s: float = 0.0
    deadline_s: float = 0.0


@dataclass(eq=False)
class _Op(_Request):
    run: Callable[[], Any] = field(default=lambda: None)


def _settle(outcomes: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, value in outcomes:
        if future.done():
            continue  # the emitter was cancelled; its record may still be stored
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


class Outbox:
    """Durable per-stream queues in `path`, written by one group-committing thread."""

    def __init__(self, path: Path, clock: Clock,
                 policies: Mapping[str, StreamPolicy] | None = None, *,
                 default_policy: StreamPolicy | None = None, fsync: Fsync = "normal",
                 block_timeout_s: float = BLOCK_TIMEOUT_S,
                 max_record_bytes: int = MAX_RECORD_BYTES,
                 registry: CollectorRegistry | None = None) -> None:
        if fsync not in ("normal", "full"):
            raise ConfigError(f"fsync must be 'normal' or 'full', got {fsync!r}")
        self.path = Path(path)
        self.clock = clock
        self.policies = {check_stream_name(name): p for name, p in (policies or {}).items()}
        self.default_policy = default_policy or StreamPolicy()
        # Set by the hub's Stream manifests: they win over what apps or flags say.
        self.fleet_policies: dict[str, StreamPolicy] = {}
        self.block_timeout_s = block_timeout_s
        self.max_record_bytes = max_record_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._queue: deque[_Request] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._closed = False
        self._commits = 0
        self._records_waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._store = OutboxStore(self.path, fsync.upper())
        self._streams = self._store.load()
        self._registry = registry
        self._collector = OutboxCollector(self.stats) if registry is not None else None
        if registry is not None and self._collector is not None:
            registry.register(self._collector)
        self._thread = threading.Thread(target=self._run, name="fogline-outbox", daemon=True)
        self._thread.start()

    # Public API (any thread) ----------------------------------------------------------

    def policy(self, stream: str) -> StreamPolicy:
        fleet = self.fleet_policies.get(stream)
        if fleet is not None:
            return fleet
        return self.policies.get(stream, self.default_policy)

    async def emit(self, stream: str, record: Any, timeout_s: float | None = None) -> int:
        """Store `record` durably and return its seq in `stream`."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._submit(self._make_emit(stream, record, timeout_s, loop, future))
        return await future

    def emit_sync(self, stream: str, record: Any, timeout_s: float | None = None) -> int:
        """`emit` for threads without an event loop (never call it on the loop thread)."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._submit(self._make_emit(stream, record, timeout_s, None, future))
        return future.result()

    def stats(self) -> dict[str, StreamStats]:
        """A snapshot per stream (counts may be a group commit stale)."""
        return {name: state.snapshot() for name, state in list(self._streams.items())}

    def backlogs(self) -> dict[str, Backlog]:
        """What is waiting to be sent, per stream, for `plan_batches`."""
        return {name: Backlog(s.records - s.inflight_records, s.n_bytes - s.inflight_bytes,
                              self.policy(name).priority)
                for name, s in list(self._streams.items())
                if s.records - s.inflight_records > 0}

    @property
    def commits(self) -> int:
        """How many group commits stored records so far (for `wait_for_records`)."""
        return self._commits

    async def wait_for_records(self, timeout_s: float, after: int) -> None:
        """Return once a commit after the `after`-th stored records, or after
        `timeout_s`: the sender sleeps without missing a commit that raced its plan."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self._records_waiter = (loop, event)
        # A timer rather than asyncio.wait_for: on 3.11 a cancel racing the timeout can
        # come out as TimeoutError, which would swallow the cancellation.
        timer = loop.call_later(timeout_s, event.set)
        try:
            if self._commits == after:
                await event.wait()
        finally:
            timer.cancel()
            self._records_waiter = None

    async def read_batch(self, stream: str, bytes_max: int) -> OutboxBatch | None:
        """The oldest unsent records of `stream` (at least one, about `bytes_max`),
        marked in flight until `ack` or `release`."""
        return await self._call(lambda: self._read_batch(stream, bytes_max))

    async def ack(self, batch: OutboxBatch) -> None:
        """JetStream has the batch: delete it for good."""
        await self._call(lambda: self._ack(batch))

    def release(self, stream: str) -> None:
        """The in-flight batch was not delivered; it will be read again. Does not wait
        (usable while a sender is being cancelled); the writer applies it in order."""
        if not self._closing:
            self._submit(_Op(None, concurrent.futures.Future(), lambda: self._release(stream)))

    def close(self) -> None:
        """Commit what is queued, fail waiting emits, stop the writer, close the file."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        self._thread.join()
        self._closed = True
        # An emit that slipped in while the writer stopped must not wait forever.
        self._fail_all(TerminalError("the outbox closed before this request completed"))
        if self._registry is not None and self._collector is not None:
            self._registry.unregister(self._collector)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Submitting -----------------------------------------------------------------------

    def _make_emit(self, stream: str, record: Any, timeout_s: float | None,
                   loop: asyncio.AbstractEventLoop | None, future: Any) -> _Emit:
        check_stream_name(stream)
        try:
            data = self._encoder.encode(record)
        except (TypeError, ValueError, OverflowError, msgspec.MsgspecError) as exc:
            raise ProtocolError(f"record for stream {stream!r} cannot be encoded: {exc}") \
                from exc
        if len(data) > self.max_record_bytes:
            raise ProtocolError(f"record of {len(data)} bytes for stream {stream!r} exceeds "
                                f"the limit of {self.max_record_bytes} bytes; nothing written")
        admit(0, len(data), self.policy(stream))  # refuses a record larger than the quota
        wait_s = self.block_timeout_s if timeout_s is None else timeout_s
        return _Emit(loop, future, stream, data, self.clock.now(),
                     self.clock.monotonic() + wait_s)

    def _submit(self, request: _Request) -> None:
        if self._closing:
            raise TerminalError("the outbox is closed")
        self._queue.append(request)
        self._wake.set()

    async def _call(self, run: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._submit(_Op(loop, future, run))
        return await future

    # Writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                self._wake.wait(self._next_wait_s())
                self._wake.clear()
                closing = self._closing
                self._step()
                while closing and self._queue:
                    self._step()
                if closing:
                    return
        finally:
            self._fail_all(TerminalError("the outbox closed before this request completed"))
            self._store.close()

    def _next_wait_s(self) -> float | None:
        deadlines: list[float] = [e.deadline_s for s in self._streams.values()
                                  for e in s.blocked]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self.clock.monotonic())

    def _step(self) -> None:
        """One group: take what queued up (bounded in count and time), commit it."""
        emits: list[_Emit] = []
        ops: list[_Op] = []
        started_s = self.clock.monotonic()
        while self._queue and len(emits) < GROUP_RECORDS_MAX:
            request = self._queue.popleft()
            if isinstance(request, _Emit):
                emits.append(request)
                if len(emits) % 512 == 0 and \
                        self.clock.monotonic() - started_s >= GROUP_WINDOW_S:
                    break
            else:
                assert isinstance(request, _Op)
                ops.append(request)
        outcomes: list[tuple[_Request, Any]] = []
        if emits or self._any_blocked():
            outcomes += self._commit(emits)
        for op in ops:
            try:
                outcomes.append((op, op.run()))
            except Exception as exc:
                outcomes.append((op, exc))
        if ops and self._any_blocked():
            outcomes += self._commit([])  # an ack may have made room
        outcomes += self._expire()
        self._resolve(outcomes)
        if self._queue:
            self._wake.set()

    def _any_blocked(self) -> bool:
        return any(state.blocked for state in self._streams.values())

    def _commit(self, emits: list[_Emit]) -> list[tuple[_Request, Any]]:
        """Admit the blocked emits, then the new ones, in one transaction."""
        accepted: list[tuple[_Request, Any]] = []
        rows: list[Row] = []
        candidates: list[_Emit] = []
        for state in self._streams.values():
            candidates += state.blocked
            state.blocked.clear()
        try:
            self._store.begin()
            for emit in candidates + emits:
                state = self._stream(emit.stream)
                if state.blocked:
                    state.blocked.append(emit)  # first in, first out behind the blocked
                    continue
                decision = admit(state.n_bytes, len(emit.data), self.policy(emit.stream))
                if isinstance(decision, DropOldest):
                    self._store.insert(rows)  # the oldest may be in this very group
                    rows.clear()
                    if self._store.drop_oldest(state, decision.bytes_to_free):
                        decision = Admit()
                if not isinstance(decision, Admit):
                    state.blocked.append(emit)
                    continue
                seq = state.next_seq
                state.next_seq += 1
                state.records += 1
                state.n_bytes += len(emit.data)
                state.emitted_total += 1
                rows.append((emit.stream, seq, emit.emitted_at_s, emit.data))
                accepted.append((emit, seq))
            self._store.insert(rows)
            self._store.commit()
        except Exception as exc:  # disk full, I/O error, a bug: never kill the writer
            return self._recover(candidates + emits, exc)
        self._alarm_transitions()
        if accepted:
            self._commits += 1
        if accepted and self._records_waiter is not None:
            loop, event = self._records_waiter
            self._call_soon(loop, event.set)
        return accepted

    def _recover(self, emits: list[_Emit], exc: Exception) -> list[tuple[_Request, Any]]:
        """A failed commit stored nothing: rebuild the counts from the file, tell every
        emitter of the group (the blocked ones too) that nothing was written."""
        self._store.rollback()
        log.error("outbox commit failed: %s", exc)
        old = self._streams
        self._streams = self._store.load()
        for name, state in self._streams.items():
            if name in old:
                state.keep_session(old[name])
        error = RetryableError(f"outbox write failed, nothing written: {exc}", delay_s=1.0)
        return [(emit, error) for emit in emits]

    def _stream(self, name: str) -> StreamState:
        state = self._streams.get(name)
        if state is None:
            state = self._streams[name] = StreamState(name)
            self._store.add_stream(name)
        return state

    def _alarm_transitions(self) -> None:
        for state in self._streams.values():
            full = bool(state.blocked)
            if full and not state.full:
                log.warning("stream %r is full (%d of %d bytes, overflow=block): emitters "
                            "wait until the hub takes records", state.name, state.n_bytes,
                            self.policy(state.name).quota_bytes)
            elif state.full and not full:
                log.info("stream %r accepts records again", state.name)
            state.full = full

    def _expire(self) -> list[tuple[_Request, Any]]:
        now_s = self.clock.monotonic()
        expired: list[tuple[_Request, Any]] = []
        for state in self._streams.values():
            if not any(emit.deadline_s <= now_s for emit in state.blocked):
                continue
            quota = self.policy(state.name).quota_bytes
            keep: deque[_Emit] = deque()
            for emit in state.blocked:
                if emit.deadline_s > now_s:
                    keep.append(emit)
                    continue
                state.timeouts_total += 1
                expired.append((emit, RetryableError(
                    f"stream {state.name!r} is full ({state.n_bytes} of {quota} bytes, "
                    "overflow=block) and the hub did not take records in time; emit "
                    "timed out, nothing written", delay_s=1.0)))
            state.blocked = keep
        if expired:
            self._alarm_transitions()
        return expired

    def _read_batch(self, stream: str, bytes_max: int) -> OutboxBatch | None:
        state = self._streams.get(stream)
        if state is None or state.records - state.inflight_records <= 0:
            return None
        if state.inflight_last:
            raise TerminalError(f"stream {stream!r} already has a batch in flight")
        batch = self._store.read_batch(state, bytes_max)
        if batch is not None:
            state.set_inflight(batch.last_seq, len(batch.records), batch.n_bytes)
        return batch

    def _ack(self, batch: OutboxBatch) -> None:
        state = self._streams[batch.stream]
        if state.inflight_last != batch.last_seq:
            raise TerminalError(f"ack of a batch of {batch.stream!r} that is not in flight")
        self._store.ack(batch.stream, batch.last_seq)
        state.acked_seq = batch.last_seq
        state.records -= state.inflight_records
        state.n_bytes -= state.inflight_bytes
        state.sent_total += state.inflight_records
        state.set_inflight(0, 0, 0)

    def _release(self, stream: str) -> None:
        state = self._streams.get(stream)
        if state is not None:
            state.set_inflight(0, 0, 0)

    # Answering ------------------------------------------------------------------------

    def _resolve(self, outcomes: Iterable[tuple[_Request, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        for request, value in outcomes:
            if request.loop is None:
                future = request.future
                if isinstance(value, BaseException):
                    future.set_exception(value)
                else:
                    future.set_result(value)
            else:
                by_loop.setdefault(request.loop, []).append((request.future, value))
        for loop, items in by_loop.items():
            self._call_soon(loop, _settle, items)

    @staticmethod
    def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None],
                   *args: Any) -> None:
        # A closed loop raises RuntimeError: nobody is waiting for the answer any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback, *args)

    def _fail_all(self, error: FoglineError) -> None:
        outcomes: list[tuple[_Request, Any]] = [(r, error) for r in self._queue]
        self._queue.clear()
        for state in self._streams.values():
            outcomes += [(emit, error) for emit in state.blocked]
            state.blocked.clear()
        self._resolve(outcomes)
