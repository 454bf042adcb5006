"""Benchmark `propagation`: a write on one edge node seen on another, through the hub.

The limit is physics: node A's op must cross A's link to the hub (R/2), the hub must
merge it, and the fan-out must cross B's link (R/2), so no design beats R, the emulated
round-trip time. Goal: p50 <= R + 10 ms.

A real `fogline hub` runs as a subprocess. Two real node agents (`NodeAgent`) run in
this process's event loop, each reaching the hub's NATS through its own WAN emulator
link with one-way latency R/2 (both directions). A write is timed from the call to
`Collection.put` on node A until node B's `watch()` yields it. Writes go out on a
jittered schedule, spaced wider than R so node A's stop-and-wait upload never holds
one write behind another. A few sparse writes follow, seconds apart, for the idle
case (pull fetches expiring and renewed); they are reported in conditions only.

To say where the time goes, a tap (a plain NATS connection with the hub's own
credentials, on loopback, no WAN) sees each StateBatch reach the server, each fan-out
the hub publishes, and the pull requests of the hub's merge worker and of node B's
consumer; every timestamp is on this process's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fogline import __version__
from fogline.bench import result
from fogline.bench.heartbeats import HubRun, running_hub
from fogline.core.crdt import MapOp
from fogline.core.sync import FanoutBatch, StateBatch, decode_sync, fanout_subject
from fogline.errors import FoglineError, NotFoundError
from fogline.hub.sync import FANOUT_STREAM, MERGE_CONSUMER, STATE_STREAM
from fogline.node.agent import NodeAgent, NodeConfig
from fogline.sim.wan import LinkConfig, WanEmulator

COLLECTION = "bench"
WAIT_RECEIVED_S = 10.0
READY_TIMEOUT_S = 90.0
WARMUP = 3  # untimed writes first: the hub's first sight of a node costs lookups


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Write:
    """One timed write and what the tap saw of it (perf_counter seconds)."""

    key: str
    start: float
    committed: float = 0.0
    at_server: float | None = None  # StateBatch reached the hub's NATS
    fanned_out: float | None = None  # hub published the FanoutBatch
    received: float | None = None  # node B's watch() yielded it


@dataclass
class Tap:
    """Timestamps of sync traffic as the NATS server sees it (loopback, no WAN)."""

    at_server: dict[str, float] = field(default_factory=dict)
    fanned_out: dict[str, float] = field(default_factory=dict)
    merge_pulls: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    b_pulls: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    nc: NatsClient | None = None

    async def start(self, url: str, creds: Path, node_b: str) -> None:
        self.nc = await nats.connect(url, user_credentials=str(creds), name="bench-tap",
                                     allow_reconnect=False)

        def keys_of(data: bytes) -> list[str]:
            with contextlib.suppress(FoglineError):
                message = decode_sync(data)
                if isinstance(message, StateBatch | FanoutBatch):
                    return [op.key for _, op in message.ops if isinstance(op, MapOp)]
            return []

        async def on_state(msg: Msg) -> None:
            now = time.perf_counter()
            for key in keys_of(msg.data):
                self.at_server.setdefault(key, now)

        async def on_fanout(msg: Msg) -> None:
            now = time.perf_counter()
            for key in keys_of(msg.data):
                self.fanned_out.setdefault(key, now)

        def pulls(into: list[tuple[float, dict[str, Any]]]) -> Any:
            async def on_pull(msg: Msg) -> None:
                with contextlib.suppress(ValueError):
                    into.append((time.perf_counter(), json.loads(msg.data or b"{}")))
            return on_pull

        await self.nc.subscribe("fl.node.*.state", cb=on_state)
        await self.nc.subscribe(fanout_subject("global"), cb=on_fanout)
        await self.nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{STATE_STREAM}.{MERGE_CONSUMER}",
                                cb=pulls(self.merge_pulls))
        await self.nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{FANOUT_STREAM}.{node_b}",
                                cb=pulls(self.b_pulls))
        await self.nc.flush()

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


async def _wait_ready(agents: list[NodeAgent], tasks: list[asyncio.Task[None]]) -> float:
    """Until every agent has bootstrapped and knows the collection; returns seconds."""
    started = time.perf_counter()
    deadline = started + READY_TIMEOUT_S
    while time.perf_counter() < deadline:
        for task in tasks:
            if task.done():
                task.result()  # raises what killed the agent
                raise RuntimeError("a node agent stopped during start")
        ready = 0
        for agent in agents:
            if agent.ready.is_set():
                with contextlib.suppress(NotFoundError):
                    agent.collections.definition(COLLECTION)
                    ready += 1
        if ready == len(agents):
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise TimeoutError(f"nodes did not learn collection {COLLECTION!r} in {READY_TIMEOUT_S}s")


async def _measure(agents: list[NodeAgent], count: int, spacing_s: float,
                   sparse: int) -> tuple[list[Write], list[Write], float]:
    """Write on A; B's watch stamps each arrival. Returns (spaced writes, sparse
    writes, end of the spaced phase).

    Spaced: a jittered schedule, so the pull consumers always have a fetch waiting.
    Sparse: each write after the last arrived plus 0.2-2.2 s, so writes also land
    while a fetch is timing out and being renewed (an idle fleet's case)."""
    a, b = agents
    coll = a.collections.collection(COLLECTION)
    pending: dict[str, Write] = {}
    arrived: dict[str, asyncio.Event] = {}

    async def watch() -> None:
        async for change in b.collections.watch():
            if change.collection == COLLECTION and not change.local and isinstance(
                    change.op, MapOp):
                write = pending.get(change.op.key)
                if write is not None and write.received is None:
                    write.received = time.perf_counter()
                    arrived[write.key].set()

    async def put(key: str) -> Write:
        write = pending[key] = Write(key, time.perf_counter())
        arrived[key] = asyncio.Event()
        await coll.put(key, {"key": key, "at": time.time()})
        write.committed = time.perf_counter()
        return write

    async def received(write: Write, timeout_s: float = WAIT_RECEIVED_S) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived[write.key].wait(), max(0.01, timeout_s))

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.sleep(0.1)  # the watcher has registered its queue
        for i in range(WARMUP):
            await received(await put(f"warm{i}"))
        loop = asyncio.get_running_loop()
        spaced: list[Write] = []
        next_at = loop.time()
        for i in range(count):
            spaced.append(await put(f"w{i:05d}"))
            next_at += spacing_s * random.uniform(1.0, 1.5)
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        deadline = time.perf_counter() + WAIT_RECEIVED_S
        for write in spaced:
            await received(write, deadline - time.perf_counter())
        spaced_end = time.perf_counter()
        sparse_writes: list[Write] = []
        for i in range(sparse):
            await asyncio.sleep(random.uniform(0.2, 2.2))
            sparse_writes.append(await put(f"s{i:05d}"))
            await received(sparse_writes[-1])
        return spaced, sparse_writes, spaced_end
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


async def _drive(hub: HubRun, workdir: Path, rtt_ms: float, count: int,
                 spacing_s: float, sparse: int) -> dict[str, Any]:
    nats_url = (hub.data / "nats.url").read_text().strip()
    token = hub.create_token(uses=2)
    tap = Tap()
    agents: list[NodeAgent] = []
    tasks: list[asyncio.Task[None]] = []
    out: dict[str, Any] = {}
    async with WanEmulator() as wan:
        try:
            for name in ("a", "b"):
                link = wan.add_link(f"{name}/nats", host_port(nats_url),
                                    LinkConfig(latency_ms=rtt_ms / 2))
                agent = NodeAgent(NodeConfig(
                    data_dir=workdir / name, hub_url=hub.url, token=token,
                    name=f"bench-{name}", nats_url=f"nats://127.0.0.1:{link.port}",
                    heartbeat_interval_s=1.0))
                agents.append(agent)
                tasks.append(asyncio.create_task(agent.run(), name=f"node-{name}"))
            out["ready_s"] = await _wait_ready(agents, tasks)
            await tap.start(nats_url, hub.data / "nats" / "hub.creds",
                            agents[1].state.node_id)
            out["writes"], out["sparse"], spaced_end = await _measure(
                agents, count, spacing_s, sparse)
            for write in [*out["writes"], *out["sparse"]]:
                write.at_server = tap.at_server.get(write.key)
                write.fanned_out = tap.fanned_out.get(write.key)
            out["merge_pulls"] = [p for p in tap.merge_pulls if p[0] <= spaced_end]
            out["b_pulls"] = [p for p in tap.b_pulls if p[0] <= spaced_end]
        finally:
            await tap.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for agent in agents:
                if hasattr(agent, "collections"):
                    await asyncio.to_thread(agent.collections.close)
    return out


def _pull_stats(pulls: list[tuple[float, dict[str, Any]]], writes: int) -> dict[str, Any]:
    """How a pull consumer fetched: every wait for work is a single-message pull
    request with `expires` (see fogline.transport.jetstream.fetch_ready), held by the
    server until a message comes. About one per write, spaced like the writes, means
    each fetch returned as its message arrived rather than waiting out its timeout."""
    probes = sorted(t for t, req in pulls if req.get("batch") == 1)
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(probes)]
    return {
        "pull_requests": len(pulls),
        "fetches": len(probes),
        "fetches_per_write": _r(len(probes) / writes, 2) if writes else None,
        "fetch_cycle_ms_p50": _r(percentile(gaps, 50)),
        "fetch_cycle_ms_max": _r(max(gaps, default=None)),
    }


def run(quick: bool = False, writes: int | None = None, rtt_ms: float | None = None,
        sparse: int | None = None) -> dict[str, Any]:
    """Run the benchmark; `writes`, `rtt_ms` and `sparse` override the sizes (tests)."""
    rtt = rtt_ms if rtt_ms is not None else (40.0 if quick else 80.0)
    count = writes or (50 if quick else 200)
    sparse_count = sparse if sparse is not None else (10 if quick else 40)
    spacing_s = max(0.05, rtt / 1000 + 0.02)
    workdir = Path(tempfile.mkdtemp(prefix="fogline-bench-propagation-"))
    try:
        with running_hub(workdir, interval_s=1.0) as hub:
            with hub.client() as client:
                response = client.post("/v1/collections", json={
                    "name": COLLECTION, "type": "map", "scope": "global"})
                response.raise_for_status()
            started = time.perf_counter()
            m = asyncio.run(_drive(hub, workdir, rtt, count, spacing_s, sparse_count))
            run_s = time.perf_counter() - started
            hub_log = hub.log_tail()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    done: list[Write] = m["writes"]
    ms = 1000.0
    total = [(w.received - w.start) * ms for w in done if w.received is not None]
    lost = len(done) - len(total)
    sparse_writes: list[Write] = m["sparse"]
    sparse_total = [(w.received - w.start) * ms for w in sparse_writes
                    if w.received is not None]

    def segment(a: str, b: str, writes: list[Write] = done) -> list[float]:
        return [(getattr(w, b) - getattr(w, a)) * ms for w in writes
                if getattr(w, a) is not None and getattr(w, b) is not None]

    commit = segment("start", "committed")
    upload = segment("committed", "at_server")
    hub_ms = segment("at_server", "fanned_out")
    download = segment("fanned_out", "received")
    figure = percentile(total, 50) or float("nan")
    one_way_ms = rtt / 2
    conditions: dict[str, Any] = {
        "rtt_ms": rtt,
        "one_way_latency_ms": rtt / 2,
        "writes": len(done),
        "writes_lost": lost,
        "spacing_ms": f"{spacing_s * 1000:.0f}-{spacing_s * 1500:.0f}, jittered schedule",
        "p50_ms": _r(percentile(total, 50)),
        "p90_ms": _r(percentile(total, 90)),
        "p99_ms": _r(percentile(total, 99)),
        "min_ms": _r(min(total, default=None)),
        "max_ms": _r(max(total, default=None)),
        "segments_p50_ms": {
            "local_commit_on_a": _r(percentile(commit, 50), 2),
            "a_to_hub_nats (floor R/2)": _r(percentile(upload, 50)),
            "hub_merge_worker (fetch, merge, fan-out publish)": _r(percentile(hub_ms, 50)),
            "hub_nats_to_b_watch (floor R/2)": _r(percentile(download, 50)),
        },
        "segments_p90_ms": {
            "local_commit_on_a": _r(percentile(commit, 90), 2),
            "a_to_hub_nats": _r(percentile(upload, 90)),
            "hub_merge_worker": _r(percentile(hub_ms, 90)),
            "hub_nats_to_b_watch": _r(percentile(download, 90)),
        },
        "sparse_writes": len(sparse_writes),
        "sparse_lost": len(sparse_writes) - len(sparse_total),
        "sparse_p50_ms": _r(percentile(sparse_total, 50)),
        "sparse_p90_ms": _r(percentile(sparse_total, 90)),
        "sparse_max_ms": _r(max(sparse_total, default=None)),
        "sparse_over_goal": sum(t > rtt + 10 for t in sparse_total),
        "sparse_segments_max_ms": {
            "a_to_hub_nats": _r(max(segment("committed", "at_server", sparse_writes),
                                    default=None)),
            "hub_merge_worker": _r(max(segment("at_server", "fanned_out", sparse_writes),
                                       default=None)),
            "hub_nats_to_b_watch": _r(max(segment("fanned_out", "received", sparse_writes),
                                          default=None)),
        },
        "sparse_note": "each write 0.2-2.2 s after the previous arrived, so some land while "
                       "a consumer's 1 s fetch expires and is renewed; not in the figure. "
                       "Outliers come from nats-py fetch(batch > 1): a stale 408 from an "
                       "expired pull request ends the next fetch's no_wait probe, which "
                       "then pulls plainly and holds a lone message until the batch "
                       "fills, its deadline or the next stale status",
        "overhead_over_floor_p50_ms": {
            "a_upload": _r(percentile([u - one_way_ms for u in upload], 50)),
            "hub": _r(percentile(hub_ms, 50)),
            "b_download": _r(percentile([d - one_way_ms for d in download], 50)),
            "total_over_R": _r(figure - rtt),
        },
        "hub_merge_worker_pulls": _pull_stats(m["merge_pulls"], len(done) + WARMUP),
        "node_b_pulls": _pull_stats(m["b_pulls"], len(done) + WARMUP),
        "pull_note": "pull requests the tap saw in the spaced phase (warm-up included): "
                     "each fetch(batch, timeout=1 s) was one no_wait probe with expires, "
                     "which the server holds until a message comes, then ends",
        "segments_note": "timestamps: A's put() call and return, the tap's receipt of the "
                         "StateBatch and FanoutBatch at the hub's NATS (loopback), B's "
                         "watch(); all one clock",
        "nodes": "2 NodeAgents in the bench's event loop, each through its own WAN link",
        "collection": f"{COLLECTION} (map, global scope)",
        "ready_after_s": round(m["ready_s"], 1),
        "run_s": round(run_s, 1),
        "wan": "fogline.sim.wan user-space proxy, same event loop, no jitter",
        "fogline": __version__,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
    }
    if "Traceback" in hub_log:
        conditions["hub_log_tail"] = hub_log[-1500:]
    return result(name="propagation", figure=_r(figure) or 0.0, unit="ms p50 edge->hub->edge",
                  peer="R (the limit)", peer_figure=rtt, better="lower",
                  goal="p50 <= R + 10 ms", met=bool(figure <= rtt + 10),
                  conditions=conditions, samples=len(total))


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
