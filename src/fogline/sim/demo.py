"""`fogline demo`: a hub and a regional fleet on one machine, behind emulated WAN links.

A small composition of public pieces: a `fogline hub` process, one `fogline node`
process per node (each with its own bootstrap token), a `WanEmulator` link per node for
its hub API and NATS traffic with the region's RTT, and a scripted chaos timeline.
Later capabilities add their own steps through `DemoStep`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fogline.errors import ConfigError, RetryableError
from fogline.sim.demo_data import DataWorkload
from fogline.sim.procs import fogline_process, wait_for_file
from fogline.sim.wan import LinkConfig, WanEmulator, WanLink
from fogline.sim.wan_control import control_app
from fogline.transport.http_server import serve_http

DEFAULT_RTT_MS: dict[str, float] = {"us-east": 20.0, "eu-west": 80.0, "ap-south": 150.0}
POLL_INTERVAL_S = 0.2
DRAIN_TIMEOUT_S = 20.0
START_TIMEOUT_S = 60.0


def parse_rtt(text: str | None, regions: list[str]) -> dict[str, float]:
    """'80' (every region) or 'us-east=20,eu-west=80' -> RTT per region in ms."""
    rtt = {region: DEFAULT_RTT_MS.get(region, 50.0) for region in regions}
    if not text:
        return rtt
    try:
        if "=" not in text:
            return dict.fromkeys(regions, float(text))
        for item in text.split(","):
            region, _, value = item.partition("=")
            if region.strip() not in rtt:
                raise ConfigError(f"unknown region {region.strip()!r} in --rtt-ms")
            rtt[region.strip()] = float(value)
    except ValueError as exc:
        raise ConfigError(f"invalid --rtt-ms {text!r}: use 80 or us-east=20,eu-west=80") from exc
    if any(value < 0 for value in rtt.values()):
        raise ConfigError("--rtt-ms values must not be negative")
    return rtt


@dataclass(frozen=True)
class DemoConfig:
    data_dir: Path | None = None
    nodes: int = 3
    regions: tuple[str, ...] = tuple(DEFAULT_RTT_MS)
    rtt_ms: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RTT_MS))
    duration_s: float = 60.0
    chaos: bool = True
    partition_region: str = "eu-west"
    partition_at_s: float = 15.0
    partition_for_s: float = 15.0
    heartbeat_interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.nodes > 200:
            raise ConfigError("--nodes must be between 1 and 200")
        if self.duration_s < 0:
            raise ConfigError("--duration must not be negative")
        if self.chaos and self.partition_region not in self.regions:
            raise ConfigError(f"partition region {self.partition_region!r} has no nodes")


@dataclass
class DemoNode:
    name: str
    region: str
    rtt_ms: float
    api_link: WanLink
    nats_link: WanLink
    data_dir: Path
    node_id: str = ""
    hub_status: str = "starting"
    local: dict[str, Any] = field(default_factory=dict)
    measured_rtt_ms: list[float] = field(default_factory=list)
    last_seen_s: float | None = None
    version: str = ""
    ids_seen: set[str] = field(default_factory=set)


@dataclass
class DemoState:
    """Everything the live view and the JSON summary show."""

    started_at_s: float
    nodes: list[DemoNode] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "starting"
    hub_url: str = ""
    wan_url: str = ""
    data: Any = None
    data_dir: str = ""

    def elapsed_s(self) -> float:
        return time.time() - self.started_at_s

    def note(self, event: str, **detail: Any) -> None:
        self.timeline.append({"t_s": round(self.elapsed_s(), 3), "at_s": time.time(),
                              "event": event, **detail})


def node_names(config: DemoConfig) -> list[tuple[str, str]]:
    """(name, region) pairs spreading the nodes across regions round-robin."""
    counts: dict[str, int] = {}
    pairs = []
    for index in range(config.nodes):
        region = config.regions[index % len(config.regions)]
        counts[region] = counts.get(region, 0) + 1
        pairs.append((f"{region}-{counts[region]}", region))
    return pairs


class Demo:
    def __init__(self, config: DemoConfig,
                 on_update: Callable[[DemoState], None] | None = None) -> None:
        self.config = config
        self.on_update = on_update or (lambda _state: None)
        self.state = DemoState(started_at_s=time.time())
        self.data = DataWorkload()
        self.state.data = self.data
        self.partition: dict[str, Any] = {}

    @contextlib.contextmanager
    def _data_dir(self) -> Any:
        if self.config.data_dir is not None:
            self.config.data_dir.mkdir(parents=True, exist_ok=True)
            yield self.config.data_dir
            return
        path = Path(tempfile.mkdtemp(prefix="fogline-demo-"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    async def run(self) -> dict[str, Any]:
        with self._data_dir() as data:
            self.state.data_dir = str(data)
            async with contextlib.AsyncExitStack() as stack:
                hub_url, nats_url, admin = await self._start_hub(stack, data)
                wan = await stack.enter_async_context(WanEmulator())
                # The WAN is steerable at run time: curl $wan_url/links, .../partition.
                wan_port = await stack.enter_async_context(
                    serve_http(control_app(wan), "127.0.0.1", 0))
                self.state.wan_url = f"http://127.0.0.1:{wan_port}"
                (data / "wan.url").write_text(self.state.wan_url + "\n")
                async with httpx.AsyncClient(
                        base_url=hub_url, timeout=10,
                        headers={"Authorization": f"Bearer {admin}"}) as api:
                    await self._start_nodes(stack, data, wan, api, hub_url, nats_url)
                    await self._wait_ready(api)
                    await self.data.setup(api, [(n.name, n.data_dir)
                                                for n in self.state.nodes])
                    async with httpx.AsyncClient(timeout=2) as local:
                        await self._play(api, local)
                        await self._drain(api, local)
                    return await self._summary(api)
        raise AssertionError("unreachable")

    async def _start_hub(self, stack: contextlib.AsyncExitStack,
                         data: Path) -> tuple[str, str, str]:
        self.state.note("hub starting")
        hub_dir = data / "hub"
        log = data / "hub.log"
        process = await stack.enter_async_context(fogline_process(
            ["hub", "--data", str(hub_dir), "--listen", "127.0.0.1:0",
             "--heartbeat-interval", f"{self.config.heartbeat_interval_s}s",
             "--sweep-interval", "0.1s"], log))
        hub_url = await wait_for_file(hub_dir / "hub.url", process, START_TIMEOUT_S, log)
        nats_url = await wait_for_file(hub_dir / "nats.url", process, START_TIMEOUT_S, log)
        admin = (hub_dir / "admin.token").read_text().strip()
        self.state.hub_url = hub_url
        self.state.note("hub ready", url=hub_url, nats=nats_url)
        return hub_url, nats_url, admin

    async def _start_nodes(self, stack: contextlib.AsyncExitStack, data: Path,
                           wan: WanEmulator, api: httpx.AsyncClient, hub_url: str,
                           nats_url: str) -> None:
        api_host, api_port = _host_port(hub_url)
        nats_host, nats_port = _host_port(nats_url)
        for name, region in node_names(self.config):
            rtt = self.config.rtt_ms[region]
            one_way = LinkConfig(latency_ms=rtt / 2)
            node = DemoNode(
                name=name, region=region, rtt_ms=rtt,
                api_link=wan.add_link(f"{name}/api", (api_host, api_port), one_way),
                nats_link=wan.add_link(f"{name}/nats", (nats_host, nats_port), one_way),
                data_dir=data / "nodes" / name)
            response = await api.post("/v1/tokens", json={"ttl_s": 600, "region": region})
            response.raise_for_status()
            await stack.enter_async_context(fogline_process(
                ["node", "--data", str(node.data_dir), "--name", name, "--region", region,
                 "--hub", f"http://127.0.0.1:{node.api_link.port}",
                 "--token", response.json()["token"],
                 "--nats", f"nats://127.0.0.1:{node.nats_link.port}",
                 "--heartbeat-interval", f"{self.config.heartbeat_interval_s}s"],
                data / "nodes" / f"{name}.log"))
            self.state.nodes.append(node)
        self.state.note("nodes started", nodes=[n.name for n in self.state.nodes])

    async def _poll(self, api: httpx.AsyncClient) -> None:
        response = await api.get("/v1/nodes")
        by_name = {n["name"]: n for n in response.json()}
        async with httpx.AsyncClient(timeout=1) as local:
            for node in self.state.nodes:
                row = by_name.get(node.name)
                if row is not None:
                    node.node_id = row["id"]
                    node.ids_seen.add(row["id"])
                    node.last_seen_s = row["last_seen_s"]
                    node.version = row["version"]
                    rtt = row["load"].get("hub_rtt_ms")
                    if rtt and row["status"] == "ready" and (
                            not node.measured_rtt_ms or node.measured_rtt_ms[-1] != rtt):
                        node.measured_rtt_ms.append(rtt)
                    self._status_change(node, row)
                endpoint = node.data_dir / "endpoint"
                if endpoint.exists():
                    with contextlib.suppress(httpx.HTTPError, ValueError):
                        node.local = (await local.get(
                            endpoint.read_text().strip() + "/healthz")).json()
        self.state.samples.append({"t_s": round(self.state.elapsed_s(), 3),
                                   "status": {n.name: n.hub_status for n in self.state.nodes}})
        self.on_update(self.state)

    def _status_change(self, node: DemoNode, row: dict[str, Any]) -> None:
        if row["status"] == node.hub_status:
            return
        node.hub_status = row["status"]
        self.state.note("status", node=node.name, status=row["status"],
                        hub_since_s=row["status_since_s"],
                        local=node.local.get("status", "?"))
        part = self.partition
        if part and node.name in part["nodes"]:
            if row["status"] == "offline" and "offline_at_s" not in part["nodes"][node.name]:
                part["nodes"][node.name]["offline_at_s"] = row["status_since_s"]
                part["nodes"][node.name]["local_status_while_offline"] = node.local.get(
                    "status")
            if row["status"] == "ready" and "healed_at_s" in part:
                part["nodes"][node.name].setdefault("ready_at_s", row["status_since_s"])

    async def _wait_ready(self, api: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            await self._poll(api)
            if all(n.hub_status == "ready" for n in self.state.nodes):
                self.state.phase = "running"
                self.state.note("fleet ready", nodes=len(self.state.nodes))
                return
            await asyncio.sleep(POLL_INTERVAL_S)
        raise RetryableError("nodes did not become ready in time; see logs in "
                             f"{self.state.data_dir}")

    def _partitioned_nodes(self) -> list[DemoNode]:
        return [n for n in self.state.nodes if n.region == self.config.partition_region]

    def _cut(self) -> None:
        nodes = self._partitioned_nodes()
        for node in nodes:
            node.api_link.partition("reset")
            node.nats_link.partition("reset")
        self.partition = {"region": self.config.partition_region, "cut_at_s": time.time(),
                          "nodes": {n.name: {"node_id": n.node_id} for n in nodes}}
        self.state.phase = f"{self.config.partition_region} partitioned"
        self.state.note("partition", region=self.config.partition_region,
                        nodes=[n.name for n in nodes])

    def _heal(self) -> None:
        for node in self._partitioned_nodes():
            node.api_link.heal()
            node.nats_link.heal()
        self.partition["healed_at_s"] = time.time()
        self.data.healed()
        self.state.phase = "healed"
        self.state.note("heal", region=self.config.partition_region)

    async def _drain(self, api: httpx.AsyncClient, local: httpx.AsyncClient) -> None:
        """Give backlogs a moment to reach the hub before the summary counts them."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            await self.data.refresh(local)
            await self.data._hub_counts(api)
            if await self.data.settled(api):
                return
            await self._poll(api)
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _play(self, api: httpx.AsyncClient, local: httpx.AsyncClient) -> None:
        cfg = self.config
        cut_at, heal_at = cfg.partition_at_s, cfg.partition_at_s + cfg.partition_for_s
        while cfg.duration_s == 0 or self.state.elapsed_s() < cfg.duration_s:
            now = self.state.elapsed_s()
            if cfg.chaos and not self.partition and now >= cut_at:
                self._cut()
            if cfg.chaos and self.partition and "healed_at_s" not in self.partition and (
                    now >= heal_at):
                self._heal()
            await self.data.step(api, local)
            await self._poll(api)
            await asyncio.sleep(POLL_INTERVAL_S)
        if self.partition and "healed_at_s" not in self.partition:
            self._heal()

    async def _summary(self, api: httpx.AsyncClient) -> dict[str, Any]:
        events = (await api.get("/v1/events", params={"limit": 10_000})).json()
        enrollments = sum(e["kind"] == "node.enrolled" for e in events)
        partition = dict(self.partition)
        for entry in partition.get("nodes", {}).values():
            if "offline_at_s" in entry:
                entry["detection_s"] = round(entry["offline_at_s"] - partition["cut_at_s"], 3)
            if "ready_at_s" in entry:
                entry["recovery_s"] = round(entry["ready_at_s"] - partition["healed_at_s"], 3)
        return {
            "duration_s": round(self.state.elapsed_s(), 3),
            "heartbeat_interval_s": self.config.heartbeat_interval_s,
            "hub_url": self.state.hub_url,
            "wan_control_url": self.state.wan_url,
            "enrollments": enrollments,
            "nodes": [{
                "name": n.name, "region": n.region, "node_id": n.node_id,
                "ids_seen": sorted(n.ids_seen), "status": n.hub_status,
                "local_status": n.local.get("status"), "rtt_configured_ms": n.rtt_ms,
                "rtt_measured_ms": round(statistics.median(n.measured_rtt_ms), 2)
                if n.measured_rtt_ms else None,
            } for n in self.state.nodes],
            "partition": partition,
            "data": await self.data.summary(api),
            "timeline": self.state.timeline,
            "statuses": self.state.samples,
        }


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)

