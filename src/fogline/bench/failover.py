"""Benchmark `failover`: from a node's death to the first successful request elsewhere.

A real `fogline hub` (heartbeat interval 1 s) and three real nodes run as processes;
every node fronts the same site, whose origin runs in this process. A `fogline.client`
reaches each node through its own WAN emulator link (RTTs 10, 20 and 30 ms), and sends
GETs back to back. Each round kills the node in use with SIGKILL and times, on this
process's monotonic clock, from the kill to the first successful response from another
node; the killed node is restarted (same data, same port) for later rounds, each node
killed at most three times (a fourth time would be flapping, which the hub quarantines).

The limit named by the issue is one heartbeat interval: "when a node dies, new requests
go elsewhere within one heartbeat interval". The figure is the worst round; p50, p90
and every round are in conditions, with the GETs that failed (should be none: an
idempotent request in flight to the dead node is sent again elsewhere) and how long the
hub's routing table took to stop listing the node as serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fogline import __version__
from fogline.bench import result
from fogline.bench.heartbeats import FOGLINE, HubRun, running_hub, stop_process
from fogline.bench.propagation import percentile
from fogline.client import Client
from fogline.runtime import fast_loop_factory
from fogline.sim.wan import LinkConfig, WanEmulator
from fogline.transport.http_server import serve_http
from fogline.transport.nats_server import free_port

INTERVAL_S = 1.0
ONE_WAY_MS = {"f1": 5.0, "f2": 10.0, "f3": 15.0}
ROUND_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 60.0


@dataclass
class BenchNode:
    name: str
    data: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    node_id: str = ""

    def start(self, hub: HubRun, token: str) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [*FOGLINE, "node", "--data", str(self.data), "--name", self.name,
                 "--hub", hub.url, "--token", token, "--heartbeat-interval",
                 f"{INTERVAL_S:g}s", "--listen", f"127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self) -> float:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        self.process.wait(10)
        return killed


@dataclass
class Round:
    killed: str
    failover_ms: float | None = None
    to: str = ""
    failed_gets: int = 0
    table_drop_s: float | None = None


@dataclass
class Traffic:
    """Back-to-back GETs through the client: (completed at, node, ok)."""

    client: Client
    results: list[tuple[float, str, bool]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                response = await self.client.get("/bench/item")
                ok = response.status_code == 200
                self.results.append((time.monotonic(), response.extensions["fogline_node_id"],
                                     ok))
            except Exception:  # the figure counts them; the run goes on
                self.results.append((time.monotonic(), "", False))
            await asyncio.sleep(0.001)


def _origin() -> contextlib.AbstractAsyncContextManager[int]:
    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse("item", headers={"Cache-Control": "no-store"})

    return serve_http(Starlette(routes=[Route("/bench/{path:path}", item)]), "127.0.0.1", 0)


async def _until(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


async def _routes(hub: HubRun) -> dict[str, dict[str, Any]]:
    async with hub.async_client() as http:
        response = await http.get("/v1/routes")
    response.raise_for_status()
    return {r["node_id"]: r for r in response.json()["routes"]}


async def _one_round(client: Client, nodes: dict[str, BenchNode], hub: HubRun,
                     token: str) -> Round:
    try:
        await _until(lambda: _up(client, 2), READY_TIMEOUT_S, "two nodes up at the client")
    except TimeoutError as exc:
        states = {n.name: n.process.poll() if n.process else None for n in nodes.values()}
        raise TimeoutError(f"{exc}: candidates {client.candidates()}, exit codes {states}, "
                           f"table {await _routes(hub)}") from None
    traffic = Traffic(client)
    stop = asyncio.Event()
    task = asyncio.create_task(traffic.run(stop))
    try:
        await _until(lambda: _current(client), 5, "a node in use")
        await asyncio.sleep(0.2)
        victim = next(n for n in nodes.values() if n.node_id == client.current)
        killed = await asyncio.to_thread(victim.kill)
        measured = Round(killed=victim.name)

        async def elsewhere() -> tuple[float, str] | None:
            return next(((t, node) for t, node, ok in traffic.results
                         if t > killed and ok and node != victim.node_id), None)

        at, node = await _until(elsewhere, ROUND_TIMEOUT_S, "a success elsewhere")
        measured.failover_ms = round((at - killed) * 1000, 2)
        measured.to = next(n.name for n in nodes.values() if n.node_id == node)
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await task
    measured.failed_gets = sum(1 for t, _, ok in traffic.results if not ok)

    async def dropped() -> bool:
        return not (await _routes(hub))[victim.node_id]["serving"]

    await _until(dropped, 10 * INTERVAL_S, "the table to drop the node")
    measured.table_drop_s = round(time.monotonic() - killed, 2)
    victim.start(hub, token)
    return measured


async def _up(client: Client, count: int) -> bool:
    return sum(client.router.is_up(n) for n in client.router.node_ids) >= count


async def _current(client: Client) -> bool:
    return client.current is not None


async def _measure(hub: HubRun, workdir: Path, rounds: int) -> tuple[list[Round], dict[str, Any]]:
    token = hub.create_token(uses=len(ONE_WAY_MS))
    nodes = {name: BenchNode(name, workdir / name, free_port(), workdir / f"{name}.log")
             for name in ONE_WAY_MS}
    async with _origin() as origin_port, WanEmulator() as wan:
        async with hub.async_client() as http:
            response = await http.post("/v1/sites", json={"name": "bench", "spec": {
                "origin": f"http://127.0.0.1:{origin_port}", "path_prefixes": ["/bench"]}})
            response.raise_for_status()
        try:
            for node in nodes.values():
                node.start(hub, token)
            resolve = {}
            for name, node in nodes.items():
                link = wan.add_link(name, ("127.0.0.1", node.port),
                                    LinkConfig(latency_ms=ONE_WAY_MS[name]))
                resolve[f"http://127.0.0.1:{node.port}"] = f"http://127.0.0.1:{link.port}"

            async def all_serving() -> bool:
                routes = await _routes(hub)
                serving = {r["endpoint"]: r for r in routes.values() if r["serving"]}
                for node in nodes.values():
                    route = serving.get(f"http://127.0.0.1:{node.port}")
                    if route is None:
                        return False
                    node.node_id = route["node_id"]
                async with httpx.AsyncClient(timeout=5) as http:
                    for url in resolve.values():
                        with contextlib.suppress(httpx.HTTPError):
                            if (await http.get(f"{url}/bench/ready")).status_code == 200:
                                continue
                        return False
                return True

            await _until(all_serving, READY_TIMEOUT_S, "three nodes serving the site")
            measured = []
            async with Client(hub.url, token=hub.admin_token, site="bench", resolve=resolve,
                              probe_interval_s=0.25) as client:
                for _ in range(rounds):
                    measured.append(await _one_round(client, nodes, hub, token))
                stats = dict(client.stats.__dict__)
            return measured, stats
        finally:
            for node in nodes.values():
                if node.process is not None:
                    await asyncio.to_thread(stop_process, node.process)


def run(quick: bool = False) -> dict[str, Any]:
    # Each node dies at most 3 times: a fourth return from offline within 10 minutes is
    # flapping, and the hub quarantines the node (docs/health.md), as it should.
    rounds = 4 if quick else 3 * len(ONE_WAY_MS)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fogline-failover-") as tmp, \
            running_hub(Path(tmp), INTERVAL_S) as hub, \
            asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
        measured, stats = runner.run(_measure(hub, Path(tmp), rounds))
    times = [r.failover_ms for r in measured if r.failover_ms is not None]
    worst = max(times) if times else float("inf")
    limit_ms = INTERVAL_S * 1000
    failed = sum(r.failed_gets for r in measured)
    return result(
        name="failover", figure=worst, unit="ms",
        peer="one heartbeat interval (the limit)", peer_figure=limit_ms, better="lower",
        goal=f"every failover <= 1 heartbeat interval ({limit_ms:g} ms)",
        met=len(times) == rounds and worst <= limit_ms,
        conditions={
            "figure": "worst round, kill -9 to the first successful GET from another node",
            "p50_ms": percentile(times, 50), "p90_ms": percentile(times, 90),
            "max_ms": worst, "rounds": [r.__dict__ for r in measured],
            "failed_gets": failed,
            "table_drop_s_max": max((r.table_drop_s or 0.0) for r in measured),
            "heartbeat_interval_s": INTERVAL_S,
            "client_rtt_ms": {name: 2 * ms for name, ms in ONE_WAY_MS.items()},
            "client_stats": stats, "nodes": len(ONE_WAY_MS),
            "load_average_1m": {"before": round(load_before, 2),
                                "after": round(os.getloadavg()[0], 2)},
            "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "fogline": __version__, "quick": quick,
        },
        samples=len(times))
