"""The demo's app story: the factory app (examples/factory) on every node, edge vs cloud.

Every regional node runs the app, and so does `cloud-1`, a node of tier `cloud` next to
the hub (no WAN between them). Simulated machines (demo_devices) publish batched
vibration samples to their regional node's broker, and the same batches to the cloud
node's broker through their region's WAN link, as a cloud-only deployment would have
them do. Simulated users (demo_users, a process of its own) of each region call
`GET /factory/machines/<machine>` on their regional node directly (they are on the
edge node's site: no WAN link) and on the cloud node through a WAN link with the
region's RTT (one way = RTT/2). Both paths ask the same app for the same machines, and
both nodes hold those machines' state, so the comparison is like for like: the only
difference is where the app runs. A region's other nodes (`--nodes` above 3) get a
quarter of that traffic from their own users, so every node serves users whichever one a
rollout takes as its canary.

The app comes to the nodes through the hub (demo_rollouts) and changes version during
the run; a version's counters start at zero, so the figures here add up what was last
seen of each version a node ran (a version's last second before a switch may be missed).

When a region is cut off, its links to the cloud (users' and devices') are cut with its
links to the hub: the edge node keeps serving and ingesting, the cloud path fails, and
the app's summaries queue on the node and drain after the heal.

Where the app comes from: `examples/factory` of the source checkout this package runs
from (`pip install -e .`), found by walking up from this file; an installed wheel does
not ship the examples, so there `fogline demo --app DIR` names the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fogline.errors import ConfigError, TerminalError
from fogline.sim.demo_devices import DeviceFleet, NodeDevices, machines_for
from fogline.sim.demo_users import UserPath, read_stats, users_process
from fogline.sim.wan import LinkConfig, WanEmulator, WanLink

APP = "factory"
STREAM = "summaries"
USER_TO_EDGE = "direct: users are on the edge node's site (no WAN link)"
USER_TO_CLOUD = "through a WAN link per region, one way = the region's RTT / 2"
COMPARED = ("GET /factory/machines/<machine>: the same app and the same machines on both "
            "paths; the cloud node holds those machines' state because the devices send "
            "it a copy of every batch over their region's WAN link (a cloud-only setup)")
# The simulated devices' MQTT client logs (reconnects while their region is cut off) go
# to DATA/devices.log, not over the live view.
DEVICE_LOGGERS = ("gmqtt", "fogline.transport.mqtt_link")


def app_dir(given: Path | None = None) -> Path:
    """The app the demo runs: `given` (--app), or examples/factory of the source checkout
    this package runs from."""
    if given is not None:
        if not (given / "fogline.yaml").is_file():
            raise ConfigError(f"--app {given}: no fogline.yaml there")
        return given.resolve()
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "examples" / APP
        if (candidate / "fogline.yaml").is_file():
            return candidate
    raise ConfigError("the demo's app (examples/factory) is not next to this fogline "
                      "package; run from a source checkout (pip install -e .) or pass "
                      "--app DIR")


@dataclass(frozen=True)
class AppSettings:
    machines_per_node: int = 4
    samples_per_batch: int = 50
    batch_interval_s: float = 0.2
    user_rate_per_s: float = 20.0  # per path: each region's edge and cloud users


@dataclass
class AppNode:
    """One node running the app, as the demo sees it."""

    name: str
    region: str
    tier: str  # the node's tier: "near" for the regional nodes, "cloud"
    data_dir: Path
    rtt_ms: float = 0.0
    app: dict[str, Any] = field(default_factory=dict)
    summaries: dict[str, int] = field(default_factory=dict)
    backlog_max: int = 0
    at_hub: int = 0
    earlier: dict[str, int] = field(default_factory=dict)  # counters of versions replaced
    switches: int = 0  # versions replaced

    def stat(self, name: str) -> int:
        return self.earlier.get(name, 0) + int(self.app.get("stats", {}).get(name, 0))

    def saw(self, app: dict[str, Any]) -> None:
        """The app's latest status; its counters are banked when its revision changes."""
        if self.app and app and self.app.get("revision") != app.get("revision"):
            for name, value in self.app.get("stats", {}).items():
                if isinstance(value, int | float):
                    self.earlier[name] = self.earlier.get(name, 0) + int(value)
            self.switches += 1
        self.app = app or self.app

    def _local(self) -> tuple[str, dict[str, str]] | None:
        endpoint, token = self.data_dir / "endpoint", self.data_dir / "local.token"
        if not endpoint.exists() or not token.exists():
            return None
        return (endpoint.read_text().strip(),
                {"Authorization": f"Bearer {token.read_text().strip()}"})


@contextlib.contextmanager
def _logs_to(path: Path, names: tuple[str, ...]) -> Iterator[None]:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, propagate in zip(loggers, saved, strict=True):
            logger.removeHandler(handler)
            logger.propagate = propagate
        handler.close()


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


class AppWorkload:
    def __init__(self, app_dir: Path, settings: AppSettings | None = None) -> None:
        self.app_dir = app_dir
        self.settings = settings or AppSettings()
        self.nodes: dict[str, AppNode] = {}
        self.cloud: AppNode | None = None
        self.links: dict[str, list[WanLink]] = {}  # region -> its links to the cloud node
        self.devices: list[NodeDevices] = []
        self.paths: list[UserPath] = []
        self.users: dict[str, Any] = {}
        self.stats_path: Path | None = None
        self.cut: dict[str, Any] = {}
        self._users_process: asyncio.subprocess.Process | None = None
        self._devices: asyncio.Task[None] | None = None

    def setup(self, wan: WanEmulator, nodes: list[AppNode], cloud: AppNode) -> None:
        """WAN links from each region to the cloud node, the machines and the users."""
        self.nodes = {node.name: node for node in [*nodes, cloud]}
        self.cloud = cloud
        cloud_http = _host_port((cloud.data_dir / "endpoint").read_text().strip())
        cloud_mqtt = _host_port((cloud.data_dir / "mqtt.url").read_text().strip())
        first_of_region: dict[str, AppNode] = {}
        others: list[AppNode] = []
        for node in nodes:
            if node.region not in self.links:
                one_way = LinkConfig(latency_ms=node.rtt_ms / 2)
                self.links[node.region] = [
                    wan.add_link(f"{cloud.name}/http/{node.region}", cloud_http, one_way),
                    wan.add_link(f"{cloud.name}/mqtt/{node.region}", cloud_mqtt, one_way)]
                first_of_region[node.region] = node
            else:
                others.append(node)
            mqtt_link = self.links[node.region][1]
            self.devices.append(NodeDevices(
                node.name, node.region, (node.data_dir / "mqtt.url").read_text().strip(),
                f"mqtt://127.0.0.1:{mqtt_link.port}",
                machines_for(node.name, node.region, self.settings.machines_per_node)))
        machines = {d.node: tuple(m.name for m in d.machines) for d in self.devices}
        rate = self.settings.user_rate_per_s
        for region, node in first_of_region.items():
            host, port = _host_port((node.data_dir / "endpoint").read_text().strip())
            self.paths.append(UserPath(region, "edge", node.name, host, port,
                                       machines[node.name], rate))
            self.paths.append(UserPath(region, "cloud", cloud.name, "127.0.0.1",
                                       self.links[region][0].port, machines[node.name], rate))
        for node in others:
            host, port = _host_port((node.data_dir / "endpoint").read_text().strip())
            self.paths.append(UserPath(node.region, f"edge {node.name}", node.name, host,
                                       port, machines[node.name], rate / 4))

    def paths_by_node(self) -> dict[str, list[str]]:
        """Node name -> the keys of the user paths calling it."""
        by_node: dict[str, list[str]] = {}
        for path in self.paths:
            by_node.setdefault(path.node, []).append(path.key)
        return by_node

    @contextlib.asynccontextmanager
    async def traffic(self, data: Path) -> AsyncIterator[None]:
        """Devices publishing and users calling until the context exits; the users'
        final stats are read after their process has ended."""
        self.stats_path = data / "users" / "stats.json"
        fleet = DeviceFleet(self.devices, self.settings.samples_per_batch,
                            self.settings.batch_interval_s)
        with _logs_to(data / "devices.log", DEVICE_LOGGERS):
            devices = self._devices = asyncio.create_task(fleet.run())
            try:
                async with users_process(self.paths, self.stats_path,
                                         data / "users.log") as process:
                    self._users_process = process
                    yield
            finally:
                self._users_process = None
                devices.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await devices
                self.users = read_stats(self.stats_path)

    async def step(self, api: httpx.AsyncClient, local: httpx.AsyncClient) -> None:
        """Refresh what the view and the summary show: app state and counters per node,
        summaries emitted, queued and at the hub, the users' latency figures."""
        for node in self.nodes.values():
            where = node._local()
            if where is None:
                continue
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                apps = (await local.get(f"{where[0]}/local/apps", headers=where[1])).json()
                node.saw(next((a for a in apps if a["name"] == APP), {}))
                streams = (await local.get(f"{where[0]}/local/streams",
                                           headers=where[1])).json()
                stream = streams.get(STREAM, {})
                node.summaries = {"emitted": stream.get("next_seq", 1) - 1,
                                  "backlog": stream.get("records", 0)}
                node.backlog_max = max(node.backlog_max, node.summaries["backlog"])
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            names = {n["id"]: n["name"] for n in (await api.get("/v1/nodes")).json()}
            for row in (await api.get("/v1/streams")).json():
                name = names.get(row["node_id"])
                if row["stream"] == STREAM and name in self.nodes:
                    self.nodes[name].at_hub = row["last_seq"]
        if self.stats_path is not None:
            self.users = read_stats(self.stats_path) or self.users
        devices = self._devices
        if devices is not None and devices.done() and not devices.cancelled() \
                and devices.exception() is not None:
            raise TerminalError(f"the demo's devices failed: {devices.exception()!r}")
        process = self._users_process
        if process is not None and process.returncode is not None:
            raise TerminalError(f"the demo's users process exited ({process.returncode}); "
                                f"see {self.stats_path.parent.parent / 'users.log'}")

    def drained(self) -> bool:
        return all(n.summaries.get("backlog", 0) == 0
                   and n.at_hub >= n.summaries.get("emitted", 0) for n in self.nodes.values())

    def apps_running(self, healthz: dict[str, dict[str, Any]]) -> bool:
        """Whether every node's /healthz (by name) reports the app running."""
        return all(any(a.get("name") == APP and a.get("state") == "running"
                       for a in healthz.get(name, {}).get("apps", []))
                   for name in self.nodes) if self.nodes else True

    # The partition ------------------------------------------------------------------

    def region_links(self, region: str) -> list[WanLink]:
        return self.links.get(region, [])

    def _snapshot(self, region: str) -> dict[str, int]:
        nodes = [n for n in self.nodes.values() if n.region == region]
        devices = [d for d in self.devices if d.region == region]
        return {"messages": sum(n.stat("messages") for n in nodes),
                "requests": sum(n.stat("requests") for n in nodes),
                "device_batches_acked": sum(d.edge.acked for d in devices),
                "cloud_copies_acked": sum(d.cloud.acked for d in devices)}

    def partitioned(self, region: str, at_s: float) -> None:
        self.cut = {"region": region, "cut_at_s": at_s, "at_cut": self._snapshot(region)}

    def healed(self, at_s: float) -> None:
        if self.cut:
            self.cut["healed_at_s"] = at_s
            self.cut["at_heal"] = self._snapshot(self.cut["region"])

    def during_cut(self) -> dict[str, Any]:
        """What the cut-off region's users and devices saw during the cut (so far, while
        it lasts)."""
        cut = self.cut
        if not cut:
            return {}
        start, end = cut["cut_at_s"], cut.get("healed_at_s", time.time())
        paths = self.users.get("paths", {})

        def window(key: str) -> dict[str, int]:
            # Whole seconds inside the cut (the users count per wall-clock second).
            seconds = paths.get(key, {}).get("by_second", {})
            inside = [c for s, c in seconds.items() if start <= int(s) and int(s) + 1 <= end]
            return {"ok": sum(c[0] for c in inside), "failed": sum(c[1] for c in inside),
                    "seconds": len(inside)}

        before, after = cut["at_cut"], cut.get("at_heal") or self._snapshot(cut["region"])
        return {"region": cut["region"], "cut_s": round(end - start, 3),
                "healed": "healed_at_s" in cut,
                "edge_requests": window(f"{cut['region']}/edge"),
                "cloud_requests": window(f"{cut['region']}/cloud"),
                **{f"{key}_during_cut": after[key] - before[key] for key in before}}

    # What the view and the summary show ---------------------------------------------

    def regions(self) -> list[dict[str, Any]]:
        paths = self.users.get("paths", {})
        rows = []
        for path in self.paths:
            if path.kind != "edge":
                continue
            edge = paths.get(f"{path.region}/edge", {})
            cloud = paths.get(f"{path.region}/cloud", {})
            rtt = self.nodes[path.node].rtt_ms
            rows.append({"region": path.region, "rtt_ms": rtt, "edge_node": path.node,
                         "cloud_node": self.cloud.name if self.cloud else None,
                         "edge": _path_figures(edge), "cloud": _path_figures(cloud),
                         # What the cloud path costs beyond the network's round trip: the
                         # cloud node's own time plus the WAN emulator's lateness.
                         "cloud_p50_over_rtt_ms": None if cloud.get("p50_ms") is None
                         else round(cloud["p50_ms"] - rtt, 3),
                         "ratio_p50": _ratio(cloud.get("p50_ms"), edge.get("p50_ms")),
                         "ratio_p99": _ratio(cloud.get("p99_ms"), edge.get("p99_ms"))})
        return rows

    def node_rows(self) -> list[dict[str, Any]]:
        devices = {d.node: d for d in self.devices}
        rows = []
        for node in self.nodes.values():
            row: dict[str, Any] = {
                "node": node.name, "region": node.region, "tier": node.tier,
                "state": node.app.get("state", "starting"),
                "version": node.app.get("version", ""), "revision": node.app.get("revision"),
                "versions_replaced": node.switches,
                "restarts": node.app.get("restarts", 0), "reason": node.app.get("reason", ""),
                "messages": node.stat("messages"), "malformed": node.stat("malformed"),
                "requests": node.stat("requests"), "errors": node.stat("errors"),
                "handler_errors": node.stat("handler_errors"),
                "summaries_emitted": node.summaries.get("emitted", 0),
                "summaries_backlog": node.summaries.get("backlog", 0),
                "summaries_backlog_max": node.backlog_max, "summaries_at_hub": node.at_hub}
            if node.name in devices:
                d = devices[node.name]
                row["machines"] = [m.name for m in d.machines]
                row["device_batches"] = d.edge.to_dict()
                row["cloud_copies"] = d.cloud.to_dict()
            rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        s = self.settings
        return {
            "app": APP, "app_dir": str(self.app_dir),
            "compared": COMPARED, "user_to_edge": USER_TO_EDGE, "user_to_cloud": USER_TO_CLOUD,
            "machines_per_node": s.machines_per_node, "samples_per_batch": s.samples_per_batch,
            "batch_interval_s": s.batch_interval_s, "user_rate_per_path_per_s": s.user_rate_per_s,
            "latency": "client-side, open loop, kept-alive HTTP/1.1, from taking a connection "
                       "to the last byte; ratio = cloud / edge",
            "regions": self.regions(), "nodes": self.node_rows(),
            "partition": self.during_cut(),
        }


def _path_figures(stats: dict[str, Any]) -> dict[str, Any]:
    keys = ("ok", "failed", "p50_ms", "p99_ms", "max_ms", "recent_p99_ms", "errors",
            "warmed_up")
    return {key: stats.get(key) for key in keys}


def _ratio(cloud: float | None, edge: float | None) -> float | None:
    return round(cloud / edge, 1) if cloud and edge else None
