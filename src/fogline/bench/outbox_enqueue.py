"""Benchmark `outbox-enqueue`: durable emits per second with group commit.

Many concurrent emitters (tasks on one event loop, as an app's handlers would be) each
`await outbox.emit(...)`, which returns only once the record is committed to SQLite
(WAL, synchronous=NORMAL). The peer is the physical limit of the same file format on
the same disk: raw SQLite `executemany`, 1,000 rows per transaction, into the same
table, encoding the same records. The two alternate in one run, each on a fresh file;
the figures are medians.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from fogline import __version__
from fogline.bench import result
from fogline.clock import SystemClock
from fogline.node.outbox import Outbox
from fogline.node.outbox_store import OutboxStore

NAME = "outbox-enqueue"
GOAL_PER_S = 100_000
EMITTERS = 256
ROWS_PER_TRANSACTION = 1000
RECORD = {"t": 1_700_000_000.125, "sensor": "s-017", "v": 23.5, "unit": "C"}


def _event_loop_runner() -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


async def _emit_all(path: Path, records: int, emitters: int) -> float:
    outbox = Outbox(path, SystemClock())
    per_emitter = records // emitters

    async def emitter() -> None:
        for _ in range(per_emitter):
            await outbox.emit("telemetry", RECORD)

    try:
        started = time.perf_counter()
        await asyncio.gather(*(emitter() for _ in range(emitters)))
        elapsed = time.perf_counter() - started
        assert outbox.stats()["telemetry"].records == per_emitter * emitters
    finally:
        await outbox.aclose()
    return per_emitter * emitters / elapsed


def _fogline_rate(workdir: Path, records: int, emitters: int) -> float:
    rate: float = _event_loop_runner()(_emit_all(workdir / "fogline.db", records, emitters))
    return rate


def _raw_rate(workdir: Path, records: int) -> float:
    path = workdir / "raw.db"
    OutboxStore(path, "NORMAL").close()  # the outbox's own schema and pragmas
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    encode = msgspec.msgpack.Encoder().encode
    try:
        started = time.perf_counter()
        for start in range(0, records, ROWS_PER_TRANSACTION):
            now_s = time.time()
            rows = [("telemetry", seq + 1, now_s, encode(RECORD))
                    for seq in range(start, min(records, start + ROWS_PER_TRANSACTION))]
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO records VALUES (?, ?, ?, ?)", rows)
            conn.execute("COMMIT")
        return records / (time.perf_counter() - started)
    finally:
        conn.close()


def run(quick: bool = False) -> dict[str, Any]:
    records = 50_000 if quick else 200_000
    rounds = 2 if quick else 3
    ours: list[float] = []
    peers: list[float] = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="fl-bench-outbox-") as tmp:
            ours.append(_fogline_rate(Path(tmp), records, EMITTERS))
        with tempfile.TemporaryDirectory(prefix="fl-bench-outbox-") as tmp:
            peers.append(_raw_rate(Path(tmp), records))
    figure = statistics.median(ours)
    peer_figure = statistics.median(peers)
    return result(
        name=NAME, figure=round(figure), unit="records/s",
        peer=f"raw SQLite executemany, {ROWS_PER_TRANSACTION} rows per transaction",
        peer_figure=round(peer_figure), better="higher",
        goal=f">= {GOAL_PER_S:,} durable emits/s", met=figure >= GOAL_PER_S,
        conditions={
            "records_per_round": records, "emitters": EMITTERS,
            "record_bytes": len(msgspec.msgpack.encode(RECORD)),
            "sqlite": "WAL, synchronous=NORMAL (the outbox default fsync policy)",
            "fogline_rounds": [round(r) for r in ours],
            "peer_rounds": [round(r) for r in peers],
            "event_loop": "uvloop" if _event_loop_runner() is not asyncio.run else "asyncio",
            "cores": os.cpu_count(), "cores_used": 2,
            "cores_note": "emitters on the event loop thread, commits on the writer thread",
            "sqlite_version": sqlite3.sqlite_version, "python": platform.python_version(),
            "platform": platform.platform(), "fogline": __version__, "quick": quick,
        },
        samples=rounds)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
