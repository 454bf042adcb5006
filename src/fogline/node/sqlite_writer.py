"""One SQLite writer per database file, with group commit.

Callers submit small functions `fn(conn)`; a single thread runs every function queued
since its last commit inside one transaction (each in its own SAVEPOINT, so one failing
call rolls back only itself), commits once, then completes every caller. Under load many
writes share one commit; an idle writer commits a lone write at once, so no write waits
for a timer.

fsync policy: `normal` (WAL + synchronous=NORMAL, the default) makes a commit durable
against process crashes (kill -9) at once and against power loss at the next WAL
checkpoint; `full` (synchronous=FULL) fsyncs every commit, for devices where power loss
is likely. A write is acknowledged to its caller only after its transaction committed.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Literal, TypeVar

from fogline.errors import ConfigError, RetryableError

T = TypeVar("T")
FsyncPolicy = Literal["normal", "full"]
BATCH_CALLS_MAX = 10_000
QUEUE_CALLS_MAX = 100_000

_Call = tuple[Callable[[sqlite3.Connection], object], Future]


def connect(path: Path, fsync: FsyncPolicy = "normal") -> sqlite3.Connection:
    if fsync not in ("normal", "full"):
        raise ConfigError(f"fsync policy must be 'normal' or 'full', got {fsync!r}")
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={fsync.upper()}")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class GroupCommitWriter:
    def __init__(self, path: Path, fsync: FsyncPolicy = "normal",
                 on_commit: Callable[[], None] | None = None) -> None:
        self.path = path
        self._conn = connect(path, fsync)
        self._reader = connect(path, fsync)
        self._reader_lock = threading.Lock()
        self._queue: queue.Queue[_Call | None] = queue.Queue(QUEUE_CALLS_MAX)
        self._on_commit = on_commit
        self.commits = 0
        self._thread = threading.Thread(target=self._run, name=f"sqlite-writer:{path.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            calls = [first]
            while len(calls) < BATCH_CALLS_MAX:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                calls.append(item)
            self._commit(calls)
        self._conn.close()

    def _commit(self, calls: list[_Call]) -> None:
        # A caller that was cancelled while queued gets nothing done (it was never
        # acknowledged); once running, a future can no longer be cancelled, so setting
        # its result below cannot fail.
        calls = [(fn, future) for fn, future in calls if future.set_running_or_notify_cancel()]
        if not calls:
            return
        results: list[tuple[Future, object, BaseException | None]] = []
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, future in calls:
                conn.execute("SAVEPOINT call")
                try:
                    value = fn(conn)
                except Exception as exc:  # the caller gets its own error; others go on
                    conn.execute("ROLLBACK TO call")
                    results.append((future, None, exc))
                else:
                    results.append((future, value, None))
                conn.execute("RELEASE call")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = RetryableError(f"SQLite commit failed: {exc}")
            for _, future in calls:
                future.set_exception(error)
            return
        self.commits += 1
        for future, value, error in results:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
        if self._on_commit is not None:
            self._on_commit()

    def submit_sync(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        try:
            self._queue.put((fn, future), timeout=10)  # type: ignore[arg-type]
        except queue.Full as exc:
            raise RetryableError("SQLite writer queue is full") from exc
        return future

    async def submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` in the next group commit; return once it is durable."""
        return await asyncio.wrap_future(self.submit_sync(fn))

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on a separate connection (WAL readers never block the writer)."""
        with self._reader_lock:
            return fn(self._reader)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(10)
        self._reader.close()
