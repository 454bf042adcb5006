"""Benchmark `drain`: how fast a node's backlog reaches the hub after a partition.

A backlog is built while the node is partitioned (its sender is not running), then the
link comes back: the figure is records per second from starting the sender until the
hub's ingest has committed the last record to SQL. Everything is real and on this
machine: a JetStream nats-server (file storage), the node's SQLite outbox, one
`OutboxSender`, one `IngestWorker` writing to the embedded hub's SQLite database.

There is no peer doing the same job, so the goal (20,000 records/s) stands in as the
peer figure and the ratio reads "times the goal".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats

from fogline import __version__
from fogline.bench import result
from fogline.clock import SystemClock
from fogline.hub.ingest import IngestWorker, ensure_streams, list_streams
from fogline.hub.store import HubStore
from fogline.node.outbox import Outbox
from fogline.node.outbox_sender import BATCH_BYTES_MAX, OutboxSender
from fogline.transport.nats_server import free_port, open_nats_server

NAME = "drain"
GOAL_PER_S = 20_000
NODE_ID = "bench-node"
RECORD = {"t": 1_700_000_000.125, "sensor": "s-017", "v": 23.5, "unit": "C"}
DRAIN_TIMEOUT_S = 120.0


async def _backlog(outbox: Outbox, records: int) -> None:
    for start in range(0, records, 5000):
        await asyncio.gather(*(outbox.emit("telemetry", RECORD)
                               for _ in range(min(5000, records - start))))


async def _drain(workdir: Path, records: int) -> dict[str, float]:
    clock = SystemClock()
    port = free_port()
    config = (f'host: "127.0.0.1"\nport: {port}\n'
              f'jetstream {{ store_dir: "{workdir / "nats" / "js"}" }}\n')
    store = HubStore(f"sqlite:///{workdir / 'hub.db'}")
    outbox = Outbox(workdir / "outbox.db", clock)
    try:
        started = time.perf_counter()
        await _backlog(outbox, records)
        backlog_s = time.perf_counter() - started
        async with open_nats_server(config, workdir / "nats", "127.0.0.1", port):
            hub_nc = await nats.connect(f"nats://127.0.0.1:{port}")
            node_nc = await nats.connect(f"nats://127.0.0.1:{port}")
            try:
                await ensure_streams(hub_nc.jetstream())
                worker = IngestWorker(store.engine, hub_nc.jetstream(), clock)
                sender = OutboxSender(outbox, node_nc.jetstream(), NODE_ID, clock)
                ready = asyncio.Event()
                ingest = asyncio.create_task(worker.run(ready))
                await asyncio.wait_for(ready.wait(), 10)
                started = time.perf_counter()
                sending = asyncio.create_task(sender.run())
                try:
                    deadline = started + DRAIN_TIMEOUT_S
                    while not _hub_has(store, records):
                        if time.perf_counter() > deadline:
                            raise TimeoutError(f"drain did not finish in {DRAIN_TIMEOUT_S}s")
                        await asyncio.sleep(0.01)
                    drain_s = time.perf_counter() - started
                finally:
                    for task in (sending, ingest):
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
            finally:
                await node_nc.close()
                await hub_nc.close()
        return {"drain_s": drain_s, "backlog_s": backlog_s,
                "batches": float(sender.batches_sent)}
    finally:
        await outbox.aclose()
        store.close()


def _hub_has(store: HubStore, records: int) -> bool:
    rows = list_streams(store.engine, NODE_ID)
    return bool(rows) and rows[0]["last_seq"] >= records


def run(quick: bool = False) -> dict[str, Any]:
    records = 50_000 if quick else 200_000
    with tempfile.TemporaryDirectory(prefix="fl-bench-drain-") as tmp:
        timings = asyncio.run(_drain(Path(tmp), records))
    figure = records / timings["drain_s"]
    return result(
        name=NAME, figure=round(figure), unit="records/s",
        peer="none: the goal stands in as the peer figure", peer_figure=GOAL_PER_S,
        better="higher", goal=f">= {GOAL_PER_S:,} records/s from backlog to hub SQL",
        met=figure >= GOAL_PER_S,
        conditions={
            "backlog_records": records, "record_bytes": len(msgspec.msgpack.encode(RECORD)),
            "drain_s": round(timings["drain_s"], 3),
            "backlog_build_s": round(timings["backlog_s"], 3),
            "batches": int(timings["batches"]), "batch_bytes_max": BATCH_BYTES_MAX,
            "path": "SQLite outbox -> JetStream (file storage, loopback) -> ingest worker "
                    "-> hub SQLite (one transaction per fetch)",
            "hub_processes": 1, "cores": os.cpu_count(),
            "sqlite_version": sqlite3.sqlite_version, "python": platform.python_version(),
            "platform": platform.platform(), "fogline": __version__, "quick": quick,
        },
        samples=1)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
