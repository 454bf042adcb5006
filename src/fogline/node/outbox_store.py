"""The outbox file: SQLite layout and the statements the writer thread runs.

Only the outbox's writer thread calls this, so no statement here needs a lock. Counts
per stream live in `StreamState` (rebuilt from the file at open) so planning and
scrapes never touch SQLite; `acked_seq` and `dropped_total` are persistent.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DROP_SCAN_ROWS = 1000
READ_RECORDS_MAX = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    stream TEXT NOT NULL, seq INTEGER NOT NULL, emitted_at_s REAL NOT NULL,
    data BLOB NOT NULL, PRIMARY KEY (stream, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (
    stream TEXT PRIMARY KEY, acked_seq INTEGER NOT NULL, dropped_total INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class StreamStats:
    """A snapshot of one stream of the outbox."""

    name: str
    next_seq: int
    acked_seq: int
    records: int          # backlog: stored, not yet acknowledged upstream
    n_bytes: int
    dropped_total: int    # persistent: records dropped by the drop-oldest policy
    emitted_total: int    # since this process opened the outbox
    sent_total: int
    timeouts_total: int   # emits refused after waiting on a full stream
    blocked_emitters: int
    full: bool


@dataclass(eq=False)
class StreamState:
    """Mutable state of one stream, owned by the writer thread."""

    name: str
    next_seq: int = 1
    acked_seq: int = 0
    dropped_total: int = 0
    records: int = 0
    n_bytes: int = 0
    inflight_last: int = 0
    inflight_records: int = 0
    inflight_bytes: int = 0
    emitted_total: int = 0
    sent_total: int = 0
    timeouts_total: int = 0
    full: bool = False
    blocked: deque[Any] = field(default_factory=deque)

    def set_inflight(self, last_seq: int, records: int, n_bytes: int) -> None:
        self.inflight_last, self.inflight_records, self.inflight_bytes = (
            last_seq, records, n_bytes)

    def keep_session(self, old: StreamState) -> None:
        """Carry per-process counters and the in-flight batch over a reload."""
        self.emitted_total, self.sent_total = old.emitted_total, old.sent_total
        self.timeouts_total, self.full = old.timeouts_total, old.full
        if old.inflight_last:
            self.set_inflight(old.inflight_last, old.inflight_records, old.inflight_bytes)

    def snapshot(self) -> StreamStats:
        return StreamStats(self.name, self.next_seq, self.acked_seq, self.records,
                           self.n_bytes, self.dropped_total, self.emitted_total,
                           self.sent_total, self.timeouts_total, len(self.blocked), self.full)


@dataclass(frozen=True)
class OutboxBatch:
    """Contiguous records of one stream read for sending, in flight until acked."""

    stream: str
    first_seq: int
    gap_before: int
    dropped_total: int
    emitted_at_s: list[float]
    records: list[bytes]
    n_bytes: int

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.records) - 1




Row = tuple[str, int, float, bytes]


class OutboxStore:
    """One SQLite connection (WAL) over DIR/outbox.db; explicit transactions."""

    def __init__(self, path: Path, synchronous: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def begin(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self._conn.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def load(self) -> dict[str, StreamState]:
        streams: dict[str, StreamState] = {}
        for stream, acked, dropped in self._conn.execute(
                "SELECT stream, acked_seq, dropped_total FROM streams"):
            streams[stream] = StreamState(stream, next_seq=acked + 1, acked_seq=acked,
                                          dropped_total=dropped)
        for stream, count, n_bytes, top in self._conn.execute(
                "SELECT stream, count(*), sum(length(data)), max(seq) FROM records "
                "GROUP BY stream"):
            state = streams.setdefault(stream, StreamState(stream))
            state.records, state.n_bytes = count, n_bytes
            state.next_seq = max(state.next_seq, top + 1)
        return streams

    def add_stream(self, name: str) -> None:
        self._conn.execute("INSERT OR IGNORE INTO streams VALUES (?, 0, 0)", (name,))

    def insert(self, rows: list[Row]) -> None:
        if rows:
            self._conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)

    def drop_oldest(self, state: StreamState, bytes_needed: int) -> bool:
        """Delete the oldest records not in flight until `bytes_needed` are free; False
        (and nothing deleted) if only in-flight records could make the room."""
        if state.n_bytes - state.inflight_bytes < bytes_needed:
            return False
        lower = max(state.inflight_last, state.acked_seq)
        freed = count = 0
        last = lower
        while freed < bytes_needed:
            rows = self._conn.execute(
                "SELECT seq, length(data) FROM records WHERE stream = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (state.name, last, DROP_SCAN_ROWS)).fetchall()
            assert rows, "byte accounting disagrees with the records table"
            for seq, size in rows:
                freed, count, last = freed + size, count + 1, seq
                if freed >= bytes_needed:
                    break
        self._conn.execute("DELETE FROM records WHERE stream = ? AND seq > ? AND seq <= ?",
                           (state.name, lower, last))
        state.records -= count
        state.n_bytes -= freed
        state.dropped_total += count
        self._conn.execute("UPDATE streams SET dropped_total = ? WHERE stream = ?",
                           (state.dropped_total, state.name))
        return True

    def read_batch(self, state: StreamState, bytes_max: int) -> OutboxBatch | None:
        """The oldest contiguous records after the acked ones, about `bytes_max` (at
        least one record); `gap_before` counts the drops right before the first."""
        rows = self._conn.execute(
            "SELECT seq, emitted_at_s, data FROM records WHERE stream = ? AND seq > ? "
            "ORDER BY seq LIMIT ?", (state.name, state.acked_seq, READ_RECORDS_MAX))
        seqs: list[int] = []
        times: list[float] = []
        records: list[bytes] = []
        n_bytes = 0
        for seq, emitted_at_s, data in rows:
            if records and (n_bytes + len(data) > bytes_max or seq != seqs[-1] + 1):
                break
            seqs.append(seq)
            times.append(emitted_at_s)
            records.append(data)
            n_bytes += len(data)
        rows.close()
        if not records:
            return None
        # Everything at or below acked_seq is gone upstream; what is missing between it
        # and the first stored record was dropped.
        gap_before = seqs[0] - state.acked_seq - 1
        assert gap_before >= 0
        return OutboxBatch(state.name, seqs[0], gap_before, state.dropped_total, times,
                           records, n_bytes)

    def ack(self, stream: str, last_seq: int) -> None:
        """Delete everything up to `last_seq` and remember it went upstream."""
        self.begin()
        try:
            self._conn.execute("DELETE FROM records WHERE stream = ? AND seq <= ?",
                               (stream, last_seq))
            self._conn.execute("UPDATE streams SET acked_seq = ? WHERE stream = ?",
                               (last_seq, stream))
            self.commit()
        except BaseException:
            self.rollback()
            raise
