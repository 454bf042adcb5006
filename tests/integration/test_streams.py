"""Durable streams end to end: outbox -> real JetStream -> hub ingest -> real SQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import sqlalchemy as sa
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from fogline.clock import SystemClock
from fogline.core.outbox import StreamPolicy, UpBatch, encode_batch, up_subject
from fogline.errors import ConfigError, ProtocolError, RetryableError, TerminalError
from fogline.hub import ingest
from fogline.hub.ingest import IngestWorker, ensure_streams, list_streams, read_records
from fogline.hub.store import HubStore
from fogline.node.outbox import Outbox
from fogline.node.outbox_sender import OutboxSender
from fogline.transport.nats_server import free_port, open_nats_server

pytestmark = pytest.mark.timeout(120)
NODE = "n-1"
CLOCK = SystemClock()


class NatsServer:
    """A JetStream server that can be stopped and started again on the same port and
    store, as after a crash or an upgrade of the hub's NATS."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self._running: contextlib.AbstractAsyncContextManager[Any] | None = None

    async def start(self) -> None:
        config = (f'host: "127.0.0.1"\nport: {self.port}\n'
                  f'jetstream {{ store_dir: "{self.work_dir / "js"}" }}\n')
        self._running = open_nats_server(config, self.work_dir, "127.0.0.1", self.port)
        await self._running.__aenter__()

    async def stop(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            await running.__aexit__(None, None, None)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    nats_server = NatsServer(tmp_path / "nats")
    await nats_server.start()
    try:
        yield nats_server
    finally:
        await nats_server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def hub_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubStore]:
    url = (f"sqlite:///{tmp_path}/hub.db" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    store = HubStore(url)  # fogline.hub.ingest is imported: its tables are created too
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[HubStore]:
    store = HubStore(f"sqlite:///{tmp_path}/hub.db")
    try:
        yield store
    finally:
        store.close()


async def connect(url: str) -> NatsClient:
    return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1,
                              connect_timeout=2)


@contextlib.asynccontextmanager
async def running(*coroutines: Any) -> AsyncIterator[list[asyncio.Task[Any]]]:
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def hub_side(url: str, engine: sa.Engine, workers: int = 1) -> AsyncIterator[
        list[IngestWorker]]:
    """Hub processes' ingest: each worker on its own connection, one shared consumer."""
    clients = [await connect(url) for _ in range(workers)]
    try:
        await ensure_streams(clients[0].jetstream())
        pool = [IngestWorker(engine, nc.jetstream(), CLOCK, ack_wait_s=2.0) for nc in clients]
        readies = [asyncio.Event() for _ in pool]
        async with running(*(w.run(ready) for w, ready in zip(pool, readies, strict=True))):
            for ready in readies:
                await asyncio.wait_for(ready.wait(), 10)
            yield pool
    finally:
        for nc in clients:
            await nc.close()


@contextlib.asynccontextmanager
async def node_side(url: str, outbox: Outbox, **kwargs: Any) -> AsyncIterator[OutboxSender]:
    nc = await connect(url)
    try:
        sender = OutboxSender(outbox, nc.jetstream(), NODE, CLOCK, publish_timeout_s=1.0,
                              backoff_max_s=0.5, **kwargs)
        async with running(sender.run()):
            yield sender
    finally:
        await nc.close()


async def eventually(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def cursor(engine: sa.Engine, stream: str, node_id: str = NODE) -> dict[str, Any]:
    rows = [r for r in list_streams(engine, node_id) if r["stream"] == stream]
    return rows[0] if rows else {"last_seq": 0, "records": 0, "dropped": 0}


def hub_seqs(engine: sa.Engine, stream: str, node_id: str = NODE) -> list[int]:
    table = ingest.records
    with engine.connect() as conn:
        return list(conn.execute(sa.select(table.c.seq).where(
            table.c.node_id == node_id, table.c.stream == stream).order_by(table.c.seq))
            .scalars())


def hub_records(engine: sa.Engine, stream: str) -> dict[int, Any]:
    out: dict[int, Any] = {}
    after = 0
    while batch := read_records(engine, NODE, stream, after_seq=after, limit=1000):
        out.update((row["seq"], row["record"]) for row in batch)
        after = batch[-1]["seq"]
    return out


def outbox_rows(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])


def metric(registry: CollectorRegistry, name: str, stream: str) -> float | None:
    return registry.get_sample_value(name, {"stream": stream})


# Delivery -------------------------------------------------------------------------


async def test_ten_thousand_records_arrive_exactly_once_in_order(
        tmp_path: Path, server: NatsServer, hub_store: HubStore) -> None:
    registry = CollectorRegistry()
    outbox = Outbox(tmp_path / "outbox.db", CLOCK, registry=registry)
    try:
        emitted: dict[int, dict[str, int]] = {}

        async def producer(p: int) -> None:
            for j in range(200):
                record = {"p": p, "j": j}
                emitted[await outbox.emit("telemetry", record)] = record

        await asyncio.gather(*(producer(p) for p in range(50)))
        assert sorted(emitted) == list(range(1, 10_001))
        async with hub_side(server.url, hub_store.engine, workers=2), \
                node_side(server.url, outbox):
            await eventually(lambda: cursor(hub_store.engine, "telemetry")["last_seq"]
                             == 10_000, 30, "10k records at the hub")
            await eventually(lambda: outbox.stats()["telemetry"].records == 0, 5,
                             "the outbox to empty after the PubAcks")
        assert hub_seqs(hub_store.engine, "telemetry") == list(range(1, 10_001))
        assert hub_records(hub_store.engine, "telemetry") == emitted
        assert cursor(hub_store.engine, "telemetry")["records"] == 10_000
        assert metric(registry, "fogline_outbox_sent_records_total", "telemetry") == 10_000
        assert outbox_rows(tmp_path / "outbox.db") == 0
    finally:
        await outbox.aclose()


async def test_hub_applies_duplicated_and_reordered_batches_once(
        server: NatsServer, hub_store: HubStore) -> None:
    """Batches published out of order, twice under other msg ids (so JetStream's dedup
    cannot help), re-batched with overlap, and garbage: the hub's cursor decides."""
    def batch(first: int, last: int, gap_before: int = 0) -> bytes:
        seqs = range(first, last + 1)
        return encode_batch(UpBatch(
            stream="s", first_seq=first, gap_before=gap_before, dropped_total=gap_before,
            emitted_at_s=[1.0] * len(seqs),
            records=[msgspec.Raw(msgspec.msgpack.encode({"seq": s})) for s in seqs]))

    async with hub_side(server.url, hub_store.engine, workers=2) as workers:
        nc = await connect(server.url)
        try:
            js = nc.jetstream()
            subject = up_subject("n-fake", "s")
            sends = [(batch(11, 20), "b2"), (batch(1, 10), "b1"), (batch(1, 10), "b1-again"),
                     (batch(5, 15), "rebatch"), (b"\xc1garbage", "bad"),
                     (batch(26, 30, gap_before=5), "after-drops")]
            for payload, msg_id in sends:
                await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
            await js.publish(up_subject("n-fake", "other"), batch(1, 2),
                             headers={"Nats-Msg-Id": "wrong-stream"})
        finally:
            await nc.close()
        await eventually(lambda: cursor(hub_store.engine, "s", "n-fake")["last_seq"] == 30,
                         20, "all batches applied")
        await eventually(lambda: sum(w.counts["refused"] for w in workers) == 2, 5,
                         "garbage and a mislabelled batch refused")
    assert hub_seqs(hub_store.engine, "s", "n-fake") == [*range(1, 21), *range(26, 31)]
    state = cursor(hub_store.engine, "s", "n-fake")
    assert (state["records"], state["dropped"], state["lost"]) == (25, 5, 0)
    assert [r["record"] for r in read_records(hub_store.engine, "n-fake", "s", 18, 3)] == [
        {"seq": 19}, {"seq": 20}, {"seq": 26}]


async def test_sender_survives_a_nats_restart_and_delivers_what_was_emitted_meanwhile(
        tmp_path: Path, server: NatsServer, sqlite_store: HubStore) -> None:
    engine = sqlite_store.engine
    outbox = Outbox(tmp_path / "outbox.db", CLOCK)
    try:
        for start in range(0, 20_000, 1000):
            await asyncio.gather(*(outbox.emit("telemetry", {"i": i})
                                   for i in range(start, start + 1000)))
        async with hub_side(server.url, engine), node_side(server.url, outbox) as sender:
            await eventually(lambda: cursor(engine, "telemetry")["last_seq"] > 2000, 20,
                             "the drain to start")
            await server.stop()
            started = time.monotonic()
            offline = await asyncio.gather(*(outbox.emit("telemetry", {"i": i})
                                             for i in range(20_000, 21_000)))
            assert time.monotonic() - started < 5  # local first: emit never waits on NATS
            assert offline == list(range(20_001, 21_001))
            await asyncio.sleep(1.0)
            await server.start()
            await eventually(lambda: cursor(engine, "telemetry")["last_seq"] == 21_000, 60,
                             "every record after the restart")
            assert sender.publish_failures > 0
        assert hub_seqs(engine, "telemetry") == list(range(1, 21_001))
        assert cursor(engine, "telemetry")["records"] == 21_000
        records = hub_records(engine, "telemetry")
        assert all(records[seq] == {"i": seq - 1} for seq in range(1, 21_001))
    finally:
        await outbox.aclose()


async def test_high_priority_stream_overtakes_a_bulk_backlog_under_a_bandwidth_cap(
        tmp_path: Path, server: NatsServer, sqlite_store: HubStore) -> None:
    engine = sqlite_store.engine
    budget_bps = 50_000
    policies = {"bulk": StreamPolicy(priority=0, bandwidth_bps=budget_bps),
                "alerts": StreamPolicy(priority=10)}
    outbox = Outbox(tmp_path / "outbox.db", CLOCK, policies)
    try:
        pad = "x" * 480
        await asyncio.gather(*(outbox.emit("bulk", {"i": i, "pad": pad})
                               for i in range(2000)))  # ~1 MB: 20 s at the budget
        async with hub_side(server.url, engine), node_side(server.url, outbox):
            started = time.monotonic()
            await eventually(lambda: cursor(engine, "bulk")["records"] > 0, 10, "bulk flows")
            await asyncio.sleep(0.5)
            alerted = time.monotonic()
            for i in range(20):
                await outbox.emit("alerts", {"alarm": i})
            await eventually(lambda: cursor(engine, "alerts")["last_seq"] == 20, 5,
                             "alerts at the hub")
            alert_latency_s = time.monotonic() - alerted
            elapsed_s = time.monotonic() - started
            bulk_at_hub = cursor(engine, "bulk")["records"]
        assert alert_latency_s < 2.0
        assert bulk_at_hub < 2000                          # the backlog is still draining
        bulk_bytes = bulk_at_hub * len(msgspec.msgpack.encode({"i": 0, "pad": pad}))
        assert bulk_bytes <= budget_bps * (elapsed_s + 1) + 2 * budget_bps
    finally:
        await outbox.aclose()


# Overflow policies and bad input --------------------------------------------------


async def test_block_policy_backpressures_and_times_out_with_a_clear_error(
        tmp_path: Path, server: NatsServer, sqlite_store: HubStore) -> None:
    registry = CollectorRegistry()
    path = tmp_path / "outbox.db"
    outbox = Outbox(path, CLOCK, {"cmd": StreamPolicy(quota_bytes=2000)}, registry=registry)
    try:
        record = {"pad": "y" * 90}
        admitted = 0
        while True:
            try:
                await outbox.emit("cmd", record, timeout_s=0.2)
            except RetryableError as exc:
                assert "is full" in str(exc) and "nothing written" in str(exc)
                break
            admitted += 1
        assert admitted == 2000 // len(msgspec.msgpack.encode(record))
        assert outbox_rows(path) == admitted
        assert metric(registry, "fogline_outbox_emit_timeouts_total", "cmd") == 1

        waiting = asyncio.create_task(outbox.emit("cmd", record, timeout_s=30))
        await eventually(lambda: metric(registry, "fogline_outbox_stream_full", "cmd") == 1,
                         5, "the stream-full alarm")
        assert metric(registry, "fogline_outbox_blocked_emitters", "cmd") == 1
        assert not waiting.done()
        async with hub_side(server.url, sqlite_store.engine), node_side(server.url, outbox):
            seq = await asyncio.wait_for(waiting, 20)
            assert seq == admitted + 1
            await eventually(lambda: cursor(sqlite_store.engine, "cmd")["last_seq"] == seq,
                             20, "the blocked record at the hub")
        assert metric(registry, "fogline_outbox_stream_full", "cmd") == 0
        assert hub_seqs(sqlite_store.engine, "cmd") == list(range(1, seq + 1))
    finally:
        await outbox.aclose()


async def test_drop_oldest_drops_counts_and_reports_upstream(
        tmp_path: Path, server: NatsServer, sqlite_store: HubStore) -> None:
    engine = sqlite_store.engine
    path = tmp_path / "outbox.db"
    policies = {"debug": StreamPolicy(quota_bytes=5000, overflow="drop-oldest")}
    registry = CollectorRegistry()
    outbox = Outbox(path, CLOCK, policies, registry=registry)
    try:
        for i in range(500):
            await outbox.emit("debug", {"i": i, "pad": "z" * 80})
        stats = outbox.stats()["debug"]
        assert stats.dropped_total > 400 and stats.records + stats.dropped_total == 500
        assert stats.n_bytes <= 5000
        assert metric(registry, "fogline_outbox_dropped_records_total", "debug") == \
            stats.dropped_total
    finally:
        await outbox.aclose()
    outbox = Outbox(path, CLOCK, policies)   # drops are counted persistently
    try:
        assert outbox.stats()["debug"].dropped_total == stats.dropped_total
        async with hub_side(server.url, engine), node_side(server.url, outbox):
            await eventually(lambda: cursor(engine, "debug")["last_seq"] == 500, 20,
                             "the surviving records at the hub")
        state = cursor(engine, "debug")
        assert state["dropped"] == state["node_dropped_total"] == stats.dropped_total
        assert state["records"] == stats.records
        assert hub_seqs(engine, "debug") == list(range(stats.dropped_total + 1, 501))
        assert hub_records(engine, "debug")[500]["i"] == 499
    finally:
        await outbox.aclose()


async def test_a_record_too_large_or_not_encodable_is_refused_and_nothing_written(
        tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    outbox = Outbox(path, CLOCK)
    try:
        with pytest.raises(ProtocolError, match="exceeds the limit"):
            await outbox.emit("telemetry", {"blob": b"\x00" * (2 << 20)})
        with pytest.raises(ProtocolError, match="cannot be encoded"):
            await outbox.emit("telemetry", {"obj": object()})
        with pytest.raises(ProtocolError, match="exceeds"):
            outbox.emit_sync("telemetry", "x" * 1_100_000)
        assert outbox_rows(path) == 0
        assert await outbox.emit("telemetry", {"ok": True}) == 1
    finally:
        await outbox.aclose()


async def test_full_fsync_policy_and_emit_from_threads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fsync"):
        Outbox(tmp_path / "bad.db", CLOCK, fsync="always")  # type: ignore[arg-type]
    outbox = Outbox(tmp_path / "outbox.db", CLOCK, fsync="full")
    try:
        seqs = await asyncio.gather(*(asyncio.to_thread(outbox.emit_sync, "logs", {"t": t})
                                      for t in range(8)))
        assert sorted(seqs) == list(range(1, 9))
        assert await outbox.emit("logs", {"t": "async"}) == 9
    finally:
        await outbox.aclose()
    with pytest.raises(TerminalError, match="closed"):
        await outbox.emit("logs", {"late": True})


# Crashes --------------------------------------------------------------------------

CHILD = """
import asyncio, sys
from pathlib import Path
from fogline.clock import SystemClock
from fogline.node.outbox import Outbox

async def main(path, round_):
    outbox = Outbox(Path(path), SystemClock())
    async def emitter(task):
        j = 0
        while True:
            seq = await outbox.emit("storm", {"round": round_, "task": task, "j": j})
            sys.stdout.write(f"{seq} {round_} {task} {j}\\n")
            sys.stdout.flush()
            j += 1
    await asyncio.gather(*(emitter(t) for t in range(16)))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def storm_then_kill(path: Path, round_: int, acks_before_kill: int) -> list[str]:
    """Run an emitting child and SIGKILL it mid-storm; the lines it printed are the
    records it had acknowledged."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), str(round_), stdout=asyncio.subprocess.PIPE)
    assert child.stdout is not None
    lines: list[str] = []
    killed = False
    try:
        while len(lines) < acks_before_kill:
            line = await asyncio.wait_for(child.stdout.readline(), 20)
            assert line, "the child exited early"
            lines.append(line.decode())
        os.kill(child.pid, signal.SIGKILL)
        killed = True
        rest = await child.stdout.read()
        lines += [line + "\n" for line in rest.decode().split("\n") if line]
    finally:
        # Process.kill() polls (and so reaps) the child before asyncio's watcher does,
        # which then reports 255: signal only a child not killed yet.
        if not killed:
            child.kill()
        await child.wait()
    assert child.returncode == -signal.SIGKILL
    return [line for line in lines if line.endswith("\n")]  # a torn last line was not acked


async def test_kill_9_mid_storm_five_times_loses_no_acknowledged_record(
        tmp_path: Path, server: NatsServer, sqlite_store: HubStore) -> None:
    path = tmp_path / "outbox.db"
    rng = random.Random(7)
    acknowledged: dict[int, dict[str, int]] = {}
    for round_ in range(5):
        for line in await storm_then_kill(path, round_, rng.randint(200, 2000)):
            seq, r, task, j = map(int, line.split())
            assert seq not in acknowledged, "a seq was handed out twice"
            assert all(seq > s for s, rec in acknowledged.items() if rec["round"] < r)
            acknowledged[seq] = {"round": r, "task": task, "j": j}
    with contextlib.closing(sqlite3.connect(path)) as conn:
        stored = {seq: msgspec.msgpack.decode(data) for seq, data in
                  conn.execute("SELECT seq, data FROM records WHERE stream = 'storm'")}
    assert all(stored.get(seq) == record for seq, record in acknowledged.items())
    top = max(stored)
    assert sorted(stored) == list(range(1, top + 1))   # committed seqs have no holes

    outbox = Outbox(path, CLOCK)
    try:
        assert outbox.stats()["storm"].next_seq == top + 1
        async with hub_side(server.url, sqlite_store.engine), node_side(server.url, outbox):
            await eventually(lambda: cursor(sqlite_store.engine, "storm")["last_seq"] == top,
                             30, "the storm at the hub")
    finally:
        await outbox.aclose()
    assert hub_seqs(sqlite_store.engine, "storm") == list(range(1, top + 1))
    assert hub_records(sqlite_store.engine, "storm") == stored
