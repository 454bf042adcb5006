"""Benchmark `heartbeats`: how many heartbeats the hub processes per core-second.

There is no software peer for this job, so the limit is the goal itself: 10,000 nodes
at a 10 s interval is 1,000 heartbeats/s, which must fit in one hub core.

A real `fogline hub` runs as a subprocess (so psutil sees its CPU and RSS apart from
the load generator and from its nats-server child). N simulated nodes enroll through
the public API, each with its own keys and NATS JWT, and then each publishes
heartbeats over its own NATS connection from this one process, exactly as a node
would. Phases:

- steady state: every node heartbeats each interval from a jittered start; hub CPU% and
  RSS are read over the window, then the registry must list all N as `ready`.
- quiet: a few seconds with no heartbeats (shorter than the offline timeout), giving the
  hub's cost per live node (sweeps) apart from its cost per heartbeat.
- capacity: rounds in which every node sends one heartbeat, back to back, at most one
  round per hub flush interval, so each heartbeat is a row write as it would be with
  10,000 distinct nodes (faster rounds would let the hub coalesce a node's heartbeats
  and flatter the figure). figure = heartbeats counted by the hub's own metric per
  second of hub CPU, fixed costs included. An unpaced burst follows, reported only
  in conditions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import psutil
from nats.aio.client import Client as NatsClient

from fogline import __version__
from fogline.bench import result
from fogline.hub.service import FLUSH_INTERVAL_S
from fogline.node.identity import NodeFiles
from fogline.protocol import Heartbeat, Load, encode, heartbeat_subject, inbox_prefix
from fogline.sim.hollow import enroll_many

FOGLINE = [sys.executable, "-m", "fogline"]
INTERVAL_S = 5.0
GOAL_PER_CORE = 1000.0  # 10,000 nodes / 10 s
MB = 1024 * 1024


# A hub subprocess (shared with the node-rss benchmark) ------------------------------

@dataclass
class HubRun:
    """A `fogline hub` subprocess and what a client needs to talk to it."""

    data: Path
    process: subprocess.Popen[bytes]
    log: Path
    url: str = ""
    admin_token: str = ""

    def client(self, timeout_s: float = 30.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout_s,
                            headers={"Authorization": f"Bearer {self.admin_token}"})

    def async_client(self, timeout_s: float = 30.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {self.admin_token}"})

    def create_token(self, uses: int) -> str:
        with self.client() as client:
            response = client.post("/v1/tokens", json={"uses": uses, "ttl_s": 3600})
        response.raise_for_status()
        return str(response.json()["token"])

    def nodes(self) -> list[dict[str, Any]]:
        with self.client() as client:
            response = client.get("/v1/nodes")
        response.raise_for_status()
        return list(response.json())

    def nats_server(self) -> psutil.Process | None:
        """The hub's embedded nats-server child, if it runs one."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                if "nats-server" in child.name():
                    return child
        return None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-3000:]
        return ""


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`; a no-op for a process already gone."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str,
               interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@contextlib.contextmanager
def running_hub(workdir: Path, interval_s: float = INTERVAL_S) -> Iterator[HubRun]:
    """Start `fogline hub` on a free port; stop it (and its nats-server) on exit."""
    data = workdir / "hub"
    data.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "hub.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [*FOGLINE, "hub", "--data", str(data), "--listen", "127.0.0.1:0",
             "--heartbeat-interval", f"{interval_s:g}s"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    hub = HubRun(data=data, process=process, log=log_path)
    try:
        def started() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"hub exited at start:\n{hub.log_tail()}")
            return (data / "hub.url").exists()

        wait_until(started, 60, "the hub to start")
        hub.url = (data / "hub.url").read_text().strip()
        hub.admin_token = (data / "admin.token").read_text().strip()
        yield hub
    finally:
        stop_process(process)


# Simulated nodes --------------------------------------------------------------------

def node_heartbeat(node_id: str, seq: int, now_s: float, uptime_s: float,
                   interval_s: float = INTERVAL_S) -> Heartbeat:
    """A heartbeat with the fields a real node fills, so the payload size is real."""
    return Heartbeat(node_id=node_id, seq=seq, sent_at_s=now_s, interval_s=interval_s,
                     version=__version__,
                     load=Load(cpu_percent=12.5, memory_percent=41.0, load1=0.42,
                               rss_bytes=38 * MB),
                     uptime_s=uptime_s, endpoint="http://127.0.0.1:8080")


@dataclass
class SimNode:
    """One enrolled node's credentials and its NATS connection in the load generator."""

    node_id: str
    files: NodeFiles
    nats_urls: list[str]
    nc: NatsClient | None = None
    seq: int = 0
    sent_at: dict[int, float] = field(default_factory=dict)
    started_s: float = field(default_factory=time.time)

    async def connect(self) -> None:
        seed, jwt = self.files.nkey(), self.files.nats_jwt.read_text().strip()

        async def on_error(_exc: Exception) -> None:
            return None  # counted through is_connected / is_closed instead

        self.nc = await nats.connect(
            self.nats_urls, user_jwt_cb=lambda: jwt.encode(),
            signature_cb=lambda nonce: base64.b64encode(seed.sign(nonce.encode())),
            inbox_prefix=inbox_prefix(self.node_id), error_cb=on_error,
            allow_reconnect=False, connect_timeout=10, name=f"bench-{self.node_id}")

    async def beat(self, interval_s: float) -> int:
        """Publish the next heartbeat, shaped like a real node's; return its seq."""
        assert self.nc is not None
        self.seq += 1
        now = time.time()
        hb = node_heartbeat(self.node_id, self.seq, now, now - self.started_s, interval_s)
        self.sent_at[self.seq] = now
        await self.nc.publish(heartbeat_subject(self.node_id), encode(hb))
        return self.seq

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.close()


def enroll_nodes(hub: HubRun, count: int, root: Path, workers: int = 8) -> list[SimNode]:
    """Enroll `count` nodes through the public API, in parallel like a fleet booting."""
    enrolled = enroll_many(hub.url, hub.create_token(uses=count), count, root,
                           name_prefix="sim", workers=workers)
    return [SimNode(e.node_id, e.files, e.nats_urls) for e in enrolled]


async def _gather_limited(calls: list[Callable[[], Any]], limit: int) -> list[Any]:
    semaphore = asyncio.Semaphore(limit)

    async def guarded(call: Callable[[], Any]) -> Any:
        async with semaphore:
            return await call()

    return list(await asyncio.gather(*(guarded(c) for c in calls)))


# Measuring the hub ------------------------------------------------------------------

def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def received_total(client: httpx.AsyncClient) -> float:
    response = await client.get("/metrics")
    response.raise_for_status()
    match = re.search(r"^fogline_hub_heartbeats_received_total (\S+)$", response.text, re.M)
    if match is None:
        raise RuntimeError("hub /metrics has no fogline_hub_heartbeats_received_total")
    return float(match.group(1))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Sampler:
    """Samples RSS and CPU% of the hub and its nats-server once a second."""

    hub: psutil.Process
    nats_server: psutil.Process | None
    hub_rss: list[float] = field(default_factory=list)
    nats_rss: list[float] = field(default_factory=list)
    hub_cpu: list[float] = field(default_factory=list)

    async def run(self) -> None:
        self.hub.cpu_percent(None)
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(psutil.Error):
                self.hub_cpu.append(self.hub.cpu_percent(None))
                self.hub_rss.append(self.hub.memory_info().rss / MB)
                if self.nats_server is not None:
                    self.nats_rss.append(self.nats_server.memory_info().rss / MB)


# The benchmark ----------------------------------------------------------------------

async def _steady(node: SimNode, interval_s: float, delay_s: float) -> None:
    """Heartbeat every interval on an absolute schedule, so sends do not drift."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(delay_s)
    next_at = loop.time()
    while True:
        await node.beat(interval_s)
        next_at += interval_s
        await asyncio.sleep(max(0.0, next_at - loop.time()))


async def _snapshot_latency(client: httpx.AsyncClient, by_id: dict[str, SimNode],
                            intake_ms: list[float]) -> int:
    """Registry snapshot: count ready nodes; add each node's send-to-intake latency
    (hub's `last_seen_s` minus our send time of the seq the row holds)."""
    response = await client.get("/v1/nodes")
    response.raise_for_status()
    ready = 0
    for row in response.json():
        node = by_id.get(row["id"])
        if node is None:
            continue
        ready += row["status"] == "ready"
        sent = node.sent_at.get(row["heartbeat_seq"])
        if sent is not None and row["last_seen_s"] is not None:
            intake_ms.append((row["last_seen_s"] - sent) * 1000)
    return ready


async def _probe_visibility(client: httpx.AsyncClient, nodes: list[SimNode], probes: int,
                            poll_s: float = 0.02) -> list[float]:
    """Time from sending one extra heartbeat to seeing its seq through the API.

    Each probe starts at a random phase of the hub's flush cycle: sent right after the
    previous probe became visible it would always land just after a flush."""
    visible_ms: list[float] = []
    for node in random.sample(nodes, min(probes, len(nodes))):
        await asyncio.sleep(random.uniform(0, FLUSH_INTERVAL_S))
        seq = await node.beat(INTERVAL_S)
        assert node.nc is not None
        await node.nc.flush()
        sent = node.sent_at[seq]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = (await client.get(f"/v1/nodes/{node.node_id}")).json()
            if row["heartbeat_seq"] >= seq:
                visible_ms.append((time.time() - sent) * 1000)
                break
            await asyncio.sleep(poll_s)
    return visible_ms


async def _capacity(nodes: list[SimNode], duration_s: float, min_round_s: float) -> int:
    """Rounds of one heartbeat per node; returns heartbeats sent."""
    loop = asyncio.get_running_loop()
    sent = 0
    end = loop.time() + duration_s
    while loop.time() < end:
        round_start = loop.time()
        for index, node in enumerate(nodes):
            await node.beat(INTERVAL_S)
            sent += 1
            if index % 64 == 63:
                await asyncio.sleep(0)  # let the connections' flushers write
        await asyncio.sleep(max(0.0, round_start + min_round_s - loop.time()))
    return sent


async def _wait_drained(client: httpx.AsyncClient, start: float, sent: int,
                        timeout_s: float = 60.0) -> float:
    """Wait until the hub counted everything sent, or its counter stops moving."""
    last, still_since = -1.0, time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total = await received_total(client)
        if total - start >= sent:
            return total
        if total != last:
            last, still_since = total, time.monotonic()
        elif time.monotonic() - still_since > 2.0:
            return total
        await asyncio.sleep(0.2)
    return await received_total(client)


@dataclass(frozen=True)
class Reading:
    """Cumulative counters at one instant; subtract two for a phase."""

    received: float
    hub_cpu_s: float
    nats_cpu_s: float
    generator_cpu_s: float
    at_s: float

    def __sub__(self, other: Reading) -> Reading:
        return Reading(self.received - other.received, self.hub_cpu_s - other.hub_cpu_s,
                       self.nats_cpu_s - other.nats_cpu_s,
                       self.generator_cpu_s - other.generator_cpu_s, self.at_s - other.at_s)

    def percent(self, cpu_s: float) -> float:
        return 100 * cpu_s / self.at_s if self.at_s > 0 else 0.0


@dataclass
class Probe:
    """What the driver reads: the hub's heartbeat counter and three processes' CPU."""

    client: httpx.AsyncClient
    hub: psutil.Process
    nats_server: psutil.Process | None
    generator: psutil.Process = field(default_factory=psutil.Process)

    async def read(self) -> Reading:
        received = await received_total(self.client)
        nats_cpu = cpu_seconds(self.nats_server) if self.nats_server else 0.0
        return Reading(received, cpu_seconds(self.hub), nats_cpu,
                       cpu_seconds(self.generator), time.monotonic())


async def _stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()


async def _burst(probe: Probe, nodes: list[SimNode], duration_s: float,
                 min_round_s: float) -> tuple[Reading, int, float]:
    """One capacity run: (counters delta incl. the hub draining, sent, send seconds)."""
    await asyncio.sleep(2 * FLUSH_INTERVAL_S)
    before = await probe.read()
    sent = await _capacity(nodes, duration_s, min_round_s)
    send_s = time.monotonic() - before.at_s
    await _wait_drained(probe.client, before.received, sent)
    await asyncio.sleep(2 * FLUSH_INTERVAL_S)  # the last flush is hub work too
    return await probe.read() - before, sent, send_s


async def _drive(hub: HubRun, nodes: list[SimNode], window_s: float, capacity_s: float,
                 quiet_s: float, probes: int) -> dict[str, Any]:
    """All phases against one hub with connected nodes; returns raw measurements."""
    by_id = {n.node_id: n for n in nodes}
    out: dict[str, Any] = {}
    tasks: list[asyncio.Task[None]] = []
    async with hub.async_client() as client:
        probe = Probe(client, psutil.Process(hub.process.pid), hub.nats_server())
        try:
            t0 = time.monotonic()
            await _gather_limited([n.connect for n in nodes], 32)
            out["connect_s"] = time.monotonic() - t0

            # (a) steady state: measure only after every node has sent at least once.
            tasks.extend(asyncio.create_task(
                _steady(n, INTERVAL_S, random.uniform(0, INTERVAL_S))) for n in nodes)
            await asyncio.sleep(INTERVAL_S + 4 * FLUSH_INTERVAL_S)
            sampler = Sampler(probe.hub, probe.nats_server)
            sampler_task = asyncio.create_task(sampler.run())
            before = await probe.read()
            await asyncio.sleep(window_s)
            out["steady"] = await probe.read() - before
            sampler_task.cancel()
            out.update(hub_cpu_max_1s=max(sampler.hub_cpu, default=None),
                       hub_rss_mb=max(sampler.hub_rss, default=None),
                       nats_rss_mb=max(sampler.nats_rss, default=None))

            # Registry check and latencies, still under steady load (outside the window).
            intake_ms: list[float] = []
            ready = await _snapshot_latency(client, by_id, intake_ms)
            await asyncio.sleep(INTERVAL_S / 2)
            ready = min(ready, await _snapshot_latency(client, by_id, intake_ms))
            out.update(nodes_ready=ready, intake_ms=intake_ms,
                       visible_ms=await _probe_visibility(client, nodes, probes))

            # Quiet: N live nodes, no heartbeats (shorter than the offline timeout), for
            # the hub's cost that grows with the fleet rather than with the message rate.
            await _stop_tasks(tasks)
            for node in nodes:
                node.sent_at.clear()
            await asyncio.sleep(2 * FLUSH_INTERVAL_S)
            before = await probe.read()
            await asyncio.sleep(quiet_s)
            out["quiet"] = await probe.read() - before

            # (b) capacity, paced so no heartbeat is coalesced; then unpaced.
            out["paced"], out["paced_sent"], out["paced_send_s"] = await _burst(
                probe, nodes, capacity_s, FLUSH_INTERVAL_S)
            out["unpaced"], out["unpaced_sent"], out["unpaced_send_s"] = await _burst(
                probe, nodes, capacity_s / 2, 0.0)
            out["connections_closed"] = sum(1 for n in nodes if n.nc is None or n.nc.is_closed)
        finally:
            await _stop_tasks(tasks)
            await _gather_limited([n.close for n in nodes], 64)
    return out


def _nats_server_version() -> str:
    from fogline.transport.nats_server import nats_server_binary

    with contextlib.suppress(Exception):
        done = subprocess.run([str(nats_server_binary()), "--version"], capture_output=True,
                              text=True, timeout=10)
        return done.stdout.strip()
    return "unknown"


def run(quick: bool = False, nodes: int | None = None,
        window_s: float | None = None) -> dict[str, Any]:
    """Run the benchmark; `nodes` and `window_s` override the sizes (for tests)."""
    count = nodes or (200 if quick else 1000)
    window = window_s or (10.0 if quick else 60.0)
    capacity_s = min(4.0 if quick else 10.0, max(2.0, window))
    quiet_s = min(3.0 if quick else 5.0, window)
    probes = 5 if quick or nodes else 20
    workdir = Path(tempfile.mkdtemp(prefix="fogline-bench-heartbeats-"))
    try:
        with running_hub(workdir) as hub:
            t0 = time.monotonic()
            sim = enroll_nodes(hub, count, workdir / "nodes")
            enroll_s = time.monotonic() - t0
            m = asyncio.run(_drive(hub, sim, window, capacity_s, quiet_s, probes))
            hub_log = hub.log_tail()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    steady: Reading = m["steady"]
    quiet: Reading = m["quiet"]
    paced: Reading = m["paced"]
    unpaced: Reading = m["unpaced"]
    figure = paced.received / paced.hub_cpu_s if paced.hub_cpu_s > 0 else 0.0
    all_ready = m["nodes_ready"] == count
    # Cost model: a fixed share per live node (sweeps) plus a cost per heartbeat.
    per_node_s = quiet.hub_cpu_s / quiet.at_s / count
    per_hb_s = max(paced.hub_cpu_s - quiet.hub_cpu_s / quiet.at_s * paced.at_s,
                   0.0) / max(paced.received, 1)
    projected = 1 / (per_node_s + per_hb_s / 10) if per_node_s + per_hb_s > 0 else None
    conditions: dict[str, Any] = {
        "nodes": count,
        "heartbeat_interval_s": INTERVAL_S,
        "steady_window_s": round(steady.at_s, 1),
        "steady_heartbeats_per_s": _r(steady.received / steady.at_s),
        "steady_hub_cpu_percent": _r(steady.percent(steady.hub_cpu_s)),
        "steady_hub_cpu_percent_max_1s": _r(m["hub_cpu_max_1s"]),
        "hub_rss_mb": _r(m["hub_rss_mb"]),
        "nats_server_rss_mb": _r(m["nats_rss_mb"]),
        "steady_nats_server_cpu_percent": _r(steady.percent(steady.nats_cpu_s)),
        "steady_load_generator_cpu_percent": _r(steady.percent(steady.generator_cpu_s)),
        "nodes_ready": m["nodes_ready"],
        "all_ready": all_ready,
        "intake_latency_ms_p50": _r(percentile(m["intake_ms"], 50), 2),
        "intake_latency_ms_p99": _r(percentile(m["intake_ms"], 99), 2),
        "intake_latency_note": "node send to hub receive (row last_seen_s), "
                               f"{len(m['intake_ms'])} samples, same clock",
        "registry_visible_ms_p50": _r(percentile(m["visible_ms"], 50)),
        "registry_visible_ms_max": _r(max(m["visible_ms"], default=None)),
        "registry_visible_note": f"send to seq readable via GET /v1/nodes/ID, "
                                 f"{len(m['visible_ms'])} probes polled every 20 ms; "
                                 f"hub flushes every {FLUSH_INTERVAL_S * 1000:.0f} ms",
        "quiet_hub_cpu_percent": _r(quiet.percent(quiet.hub_cpu_s)),
        "quiet_note": f"{count} live nodes, no heartbeats for {quiet.at_s:.0f} s: "
                      "sweep and loop cost",
        "capacity_pacing": f"one heartbeat per node per round, rounds >= "
                           f"{FLUSH_INTERVAL_S * 1000:.0f} ms apart (no coalescing)",
        "capacity_s": round(m["paced_send_s"], 1),
        "capacity_sent": m["paced_sent"],
        "capacity_processed": int(paced.received),
        "capacity_processed_per_s": _r(paced.received / m["paced_send_s"]),
        "capacity_hub_cpu_percent": _r(paced.percent(paced.hub_cpu_s)),
        "capacity_nats_server_cpu_percent": _r(paced.percent(paced.nats_cpu_s)),
        "capacity_load_generator_cpu_percent": _r(paced.percent(paced.generator_cpu_s)),
        "unpaced_s": round(m["unpaced_send_s"], 1),
        "unpaced_sent": m["unpaced_sent"],
        "unpaced_processed": int(unpaced.received),
        "unpaced_processed_per_s": _r(unpaced.received / m["unpaced_send_s"]),
        "unpaced_hub_cpu_percent": _r(unpaced.percent(unpaced.hub_cpu_s)),
        "unpaced_load_generator_cpu_percent": _r(unpaced.percent(unpaced.generator_cpu_s)),
        "unpaced_per_hub_cpu_s": _r(unpaced.received / unpaced.hub_cpu_s
                                    if unpaced.hub_cpu_s > 0 else None),
        "unpaced_note": "rounds back to back; the hub keeps one heartbeat per node per "
                        "flush, so rows written < messages (flattering)",
        "hub_cpu_us_per_heartbeat": _r(per_hb_s * 1e6),
        "hub_cpu_us_per_live_node_per_s": _r(per_node_s * 1e6, 2),
        "projected_nodes_per_core_10s": round(projected) if projected else None,
        "projection_note": "1 / (per-node-per-s + per-heartbeat / 10 s), from quiet and "
                           "paced phases",
        "heartbeat_bytes": len(encode(node_heartbeat("nd-0123456789", 1, time.time(), 1.0))),
        "connections_closed_early": m["connections_closed"],
        "enroll_s": round(enroll_s, 1),
        "connect_s": round(m["connect_s"], 1),
        "store": "sqlite (embedded, WAL)",
        "nats_server": _nats_server_version(),
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "load_generator": "same machine, one process, one NATS connection per node",
    }
    if "Traceback" in hub_log:
        conditions["hub_log_tail"] = hub_log[-1500:]
    return result(
        name="heartbeats", figure=round(figure, 1), unit="heartbeats per hub CPU-second",
        peer="goal: 1,000 hb/s per core (10,000 nodes at 10 s)", peer_figure=GOAL_PER_CORE,
        better="higher", goal=">= 1,000 heartbeats/s per hub core, all nodes ready",
        met=bool(figure >= GOAL_PER_CORE and all_ready), conditions=conditions,
        samples=int(paced.received))


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
