"""`fogline demo`: a hub and a regional fleet on one machine, behind emulated WAN links.

A small composition of public pieces: a `fogline hub` process, one `fogline node`
process per node (each with its own bootstrap token), a `WanEmulator` link per node for
its hub API and NATS traffic with the region's RTT, and a scripted chaos timeline.
Stories ride on top: the data story (demo_data: a global collection and a stream), the
app story (demo_apps: the factory app on every node plus `cloud-1`, a node of tier
`cloud` next to the hub, with simulated machines and users comparing edge and cloud) and
the rollout story (demo_rollouts: the app deployed through the hub, v2 rolled out in
steps, v3 rolled back by its error-rate gate).
The module is a little over fogline's ~400-line aim: it is the one place that owns the
processes, the links and the timeline, and splitting that would scatter the story.
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
import psutil

from fogline.errors import ConfigError, RetryableError
from fogline.sim.demo_apps import AppNode, AppSettings, AppWorkload, app_dir
from fogline.sim.demo_catalog import CacheNode, CacheSettings, CacheStory
from fogline.sim.demo_data import DataWorkload
from fogline.sim.demo_rollouts import FIRST_DEPLOY_TIMEOUT_S, RolloutSettings, RolloutStory
from fogline.sim.procs import fogline_process, wait_for_file
from fogline.sim.wan import LinkConfig, WanEmulator, WanLink
from fogline.sim.wan_control import control_app
from fogline.transport.http_server import serve_http

DEFAULT_RTT_MS: dict[str, float] = {"us-east": 20.0, "eu-west": 80.0, "ap-south": 150.0}
POLL_INTERVAL_S = 0.2
DRAIN_TIMEOUT_S = 20.0
START_TIMEOUT_S = 60.0
APPS_POLL_INTERVAL_S = 1.0
RESOURCES_INTERVAL_S = 5.0
CLOUD_NODE = "cloud-1"


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
    duration_s: float = 100.0  # room for the partition (15-30 s) and both rollouts
    chaos: bool = True
    partition_region: str = "eu-west"
    partition_at_s: float = 15.0
    partition_for_s: float = 15.0
    heartbeat_interval_s: float = 1.0
    apps: bool = True  # the factory app on every node, a cloud node, devices and users
    app_dir: Path | None = None  # default: examples/factory of the source checkout
    app_settings: AppSettings = field(default_factory=AppSettings)
    data_story: bool = True
    rollouts: bool = True  # v2 and v3 after v1 (which always goes through the hub)
    rollout_settings: RolloutSettings = field(default_factory=RolloutSettings)
    cache: bool = True  # the catalog origin, its sites, shoppers, a purge and a node kill
    cache_settings: CacheSettings = field(default_factory=CacheSettings)

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
    api_link: WanLink | None  # None: the cloud node, next to the hub
    nats_link: WanLink | None
    data_dir: Path
    tier: str = "near"
    node_id: str = ""
    hub_status: str = "starting"
    local: dict[str, Any] = field(default_factory=dict)
    measured_rtt_ms: list[float] = field(default_factory=list)
    last_seen_s: float | None = None
    version: str = ""
    ids_seen: set[str] = field(default_factory=set)
    process: asyncio.subprocess.Process | None = None
    args: list[str] = field(default_factory=list)


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
    apps: AppWorkload | None = None
    rollouts: RolloutStory | None = None
    cache: CacheStory | None = None
    data_dir: str = ""
    processes: int = 0
    rss_mb: float = 0.0
    rss_mb_max: float = 0.0

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
        self.apps = AppWorkload(app_dir(config.app_dir), config.app_settings) \
            if config.apps else None
        self.state.apps = self.apps
        self.rollouts: RolloutStory | None = None
        self.cache = CacheStory(config.cache_settings, self.state.note, self._kill,
                                self._restart) if config.cache else None
        self.state.cache = self.cache
        self._stack: contextlib.AsyncExitStack | None = None
        self.partition: dict[str, Any] = {}
        self._apps_polled_s = self._resources_sampled_s = 0.0
        self._local: httpx.AsyncClient | None = None

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
            if self.apps is not None:
                self.rollouts = self.state.rollouts = RolloutStory(
                    self.apps.app_dir, data, self.config.rollout_settings,
                    self.state.started_at_s, self.state.note,
                    lambda: {n.node_id: n.name for n in self.state.nodes},
                    self.config.rollouts)
            async with contextlib.AsyncExitStack() as stack:
                self._stack = stack
                hub_url, nats_url, admin = await self._start_hub(stack, data)
                wan = await stack.enter_async_context(WanEmulator())
                # The WAN is steerable at run time: curl $wan_url/links, .../partition.
                wan_port = await stack.enter_async_context(
                    serve_http(control_app(wan), "127.0.0.1", 0))
                self.state.wan_url = f"http://127.0.0.1:{wan_port}"
                (data / "wan.url").write_text(self.state.wan_url + "\n")
                # One client each for the hub and for the nodes, for the whole run: making
                # an httpx client costs ~20 ms of CPU (its TLS context), which once per poll
                # stalled this loop, and with it the WAN links, five times a second.
                api = await stack.enter_async_context(httpx.AsyncClient(
                    base_url=hub_url, timeout=10,
                    headers={"Authorization": f"Bearer {admin}"}))
                local = self._local = await stack.enter_async_context(
                    httpx.AsyncClient(timeout=2))
                await self._start_nodes(stack, data, wan, api, hub_url, nats_url)
                await self._wait_ready(api)
                if self.config.data_story:
                    await self.data.setup(api, [(n.name, n.data_dir)
                                                for n in self._regional()])
                async with self._app_traffic(wan, data), \
                        self._cache_traffic(wan, api, hub_url, admin, data):
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
            await self._start_node(stack, data, api, node,
                                   f"http://127.0.0.1:{node.api_link.port}",
                                   f"nats://127.0.0.1:{node.nats_link.port}")
        if self.apps is not None:
            # Next to the hub: no WAN link between them.
            cloud = DemoNode(name=CLOUD_NODE, region="cloud", rtt_ms=0.0, api_link=None,
                             nats_link=None, data_dir=data / "nodes" / CLOUD_NODE,
                             tier="cloud")
            await self._start_node(stack, data, api, cloud, hub_url, nats_url)
        self.state.note("nodes started", nodes=[n.name for n in self.state.nodes])

    async def _start_node(self, stack: contextlib.AsyncExitStack, data: Path,
                          api: httpx.AsyncClient, node: DemoNode, hub_url: str,
                          nats_url: str) -> None:
        response = await api.post("/v1/tokens", json={"ttl_s": 600, "region": node.region})
        response.raise_for_status()
        # No --app: the app comes through the hub (demo_rollouts).
        node.args = ["node", "--data", str(node.data_dir), "--name", node.name,
                     "--region", node.region, "--tier", node.tier, "--hub", hub_url,
                     "--token", response.json()["token"], "--nats", nats_url,
                     "--heartbeat-interval", f"{self.config.heartbeat_interval_s}s"]
        node.process = await stack.enter_async_context(fogline_process(
            node.args, data / "nodes" / f"{node.name}.log"))
        self.state.nodes.append(node)

    def _node(self, name: str) -> DemoNode:
        return next(n for n in self.state.nodes if n.name == name)

    async def _kill(self, name: str) -> None:
        """SIGKILL: no goodbye to the hub, no flush; its users find out by themselves."""
        process = self._node(name).process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def _restart(self, name: str) -> None:
        """The same node again: its data dir (identity, caches, purge count) and port."""
        node = self._node(name)
        assert self._stack is not None
        port = (node.data_dir / "endpoint").read_text().strip().rpartition(":")[2]
        node.process = await self._stack.enter_async_context(fogline_process(
            [*node.args, "--listen", f"127.0.0.1:{port}"],
            node.data_dir.parent / f"{node.name}.log"))

    def _regional(self) -> list[DemoNode]:
        return [n for n in self.state.nodes if n.api_link is not None]

    @contextlib.asynccontextmanager
    async def _app_traffic(self, wan: WanEmulator, data: Path) -> Any:
        """The app story's devices and users, running while the context is open."""
        if self.apps is None:
            yield
            return
        self.apps.setup(wan, [AppNode(n.name, n.region, n.tier, n.data_dir, n.rtt_ms)
                              for n in self._regional()],
                        next(AppNode(n.name, n.region, n.tier, n.data_dir)
                             for n in self.state.nodes if n.api_link is None))
        self.state.note("app traffic", app=self.apps.app_dir.name,
                        machines=sum(len(d.machines) for d in self.apps.devices),
                        user_paths=len(self.apps.paths))
        async with self.apps.traffic(data):
            yield

    @contextlib.asynccontextmanager
    async def _cache_traffic(self, wan: WanEmulator, api: httpx.AsyncClient, hub_url: str,
                             admin: str, data: Path) -> Any:
        """The cache story's origin, sites and shoppers, while the context is open."""
        if self.cache is None:
            yield
            return
        nodes = [CacheNode(n.name, n.region, n.rtt_ms,
                           (n.data_dir / "endpoint").read_text().strip())
                 for n in self._regional()]
        async with self.cache.running(wan, api, hub_url, admin, nodes, data):
            yield

    async def _poll(self, api: httpx.AsyncClient) -> None:
        response = await api.get("/v1/nodes")
        by_name = {n["name"]: n for n in response.json()}
        local = self._local
        assert local is not None  # made in run() before the first poll
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
                        endpoint.read_text().strip() + "/healthz", timeout=1)).json()
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
        """Every node ready at the hub, then (with the app story) the app's first version
        applied through the hub and running on every node."""
        deadline, ready = time.monotonic() + START_TIMEOUT_S, False
        while time.monotonic() < deadline:
            await self._poll(api)
            if not ready and all(n.hub_status == "ready" for n in self.state.nodes):
                ready = True
                self.state.note("fleet ready", nodes=len(self.state.nodes))
                self.state.phase = "deploying the app through the hub"
                deadline = time.monotonic() + FIRST_DEPLOY_TIMEOUT_S
            if ready and (self.rollouts is None or (await self.rollouts.first_deployed(
                    api, [n.node_id for n in self.state.nodes]) and all(
                    any(a.get("state") == "running" for a in n.local.get("apps", []))
                    for n in self.state.nodes))):
                self.state.phase = "running"
                return
            await asyncio.sleep(POLL_INTERVAL_S)
        what = "the app did not reach every node" if ready else "nodes did not become ready"
        raise RetryableError(f"{what} in time; see logs in {self.state.data_dir}")

    def _partitioned_nodes(self) -> list[DemoNode]:
        return [n for n in self._regional() if n.region == self.config.partition_region]

    def _partitioned_links(self) -> list[WanLink]:
        """The region's links to the hub and, for its users and devices, to the cloud."""
        links = [link for n in self._partitioned_nodes()
                 for link in (n.api_link, n.nats_link) if link is not None]
        if self.apps is not None:
            links += self.apps.region_links(self.config.partition_region)
        if self.cache is not None:
            links += self.cache.region_links(self.config.partition_region)
        return links

    def _cut(self) -> None:
        nodes, cut_at_s = self._partitioned_nodes(), time.time()
        for link in self._partitioned_links():
            link.partition("reset")
        if self.apps is not None:
            self.apps.partitioned(self.config.partition_region, cut_at_s)
        self.partition = {"region": self.config.partition_region, "cut_at_s": cut_at_s,
                          "nodes": {n.name: {"node_id": n.node_id} for n in nodes}}
        self.state.phase = f"{self.config.partition_region} partitioned"
        self.state.note("partition", region=self.config.partition_region,
                        nodes=[n.name for n in nodes])

    def _heal(self) -> None:
        for link in self._partitioned_links():
            link.heal()
        self.partition["healed_at_s"] = time.time()
        if self.apps is not None:
            self.apps.healed(self.partition["healed_at_s"])
        self.data.healed()
        self.state.phase = "healed"
        self.state.note("heal", region=self.config.partition_region)

    async def _drain(self, api: httpx.AsyncClient, local: httpx.AsyncClient) -> None:
        """Give backlogs a moment to reach the hub before the summary counts them."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            data_settled = True
            if self.config.data_story:
                await self.data.refresh(local)
                await self.data._hub_counts(api)
                data_settled = await self.data.settled(api)
            if self.apps is not None:
                await self.apps.step(api, local)
            if data_settled and (self.apps is None or self.apps.drained()):
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
            if cfg.data_story:
                await self.data.step(api, local)
            if now - self._resources_sampled_s >= RESOURCES_INTERVAL_S:
                self._resources_sampled_s = now
                self._sample_resources()
            if self.rollouts is not None:
                await self.rollouts.step(api, now)
            if self.cache is not None:
                self.cache.names = {n.node_id: n.name for n in self.state.nodes}
                await self.cache.step(api, now)
            if self.apps is not None and now - self._apps_polled_s >= APPS_POLL_INTERVAL_S:
                self._apps_polled_s = now
                await self.apps.step(api, local)
            await self._poll(api)
            await asyncio.sleep(POLL_INTERVAL_S)
        if self.partition and "healed_at_s" not in self.partition:
            self._heal()

    def _cache_summary(self) -> dict[str, Any] | None:
        """The cache story's figures, with what the killed node's outage cost the
        factory's users calling it directly (they have no client SDK to fail over)."""
        if self.cache is None:
            return None
        summary = self.cache.summary()
        kill = summary.get("kill") or {}
        if kill and self.apps is not None:
            ready_s = next((e["hub_since_s"] for e in self.state.timeline
                            if e["event"] == "status" and e.get("node") == kill["node"]
                            and e.get("status") == "ready"
                            and e["at_s"] > kill.get("restarted_at_s", float("inf"))), None)
            until_s = (ready_s if ready_s is not None else time.time()) + 1.0
            path = self.apps.users.get("paths", {}).get(f"{kill['region']}/edge", {})
            kill["ready_again_after_s"] = round(ready_s - kill["killed_at_s"], 3) \
                if ready_s is not None else None
            kill["factory_edge_users"] = window_counts(path.get("by_second", {}),
                                                       kill["killed_at_s"], until_s)
        return summary

    def _sample_resources(self) -> None:
        """RSS of the whole demo: this process and every process it started."""
        me = psutil.Process()
        processes = [me, *me.children(recursive=True)]
        rss = 0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                rss += process.memory_info().rss
        self.state.processes = len(processes)
        self.state.rss_mb = round(rss / 2**20, 1)
        self.state.rss_mb_max = max(self.state.rss_mb_max, self.state.rss_mb)

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
                "name": n.name, "region": n.region, "tier": n.tier, "node_id": n.node_id,
                "ids_seen": sorted(n.ids_seen), "status": n.hub_status,
                "local_status": n.local.get("status"), "rtt_configured_ms": n.rtt_ms,
                "rtt_measured_ms": round(statistics.median(n.measured_rtt_ms), 2)
                if n.measured_rtt_ms else None,
            } for n in self.state.nodes],
            "partition": partition,
            "data": await self.data.summary(api) if self.config.data_story else None,
            "apps": self.apps.summary() if self.apps is not None else None,
            "rollouts": self.rollouts.summary(self.apps.users, self.apps.paths_by_node())
            if self.rollouts is not None and self.apps is not None else None,
            "cache": self._cache_summary(),
            "resources": {"processes": self.state.processes, "rss_mb_max": self.state.rss_mb_max,
                          "cores": psutil.cpu_count()},
            "timeline": self.state.timeline,
            "statuses": self.state.samples,
        }


def window_counts(by_second: dict[str, list[int]], from_s: float,
                  to_s: float) -> dict[str, int]:
    """ok and failed requests of a path's per-second counts in [from_s, to_s]."""
    counts = [by_second.get(str(second), [0, 0])
              for second in range(int(from_s), int(to_s) + 1)]
    return {"ok": sum(c[0] for c in counts), "failed": sum(c[1] for c in counts)}


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)
