"""Hollow nodes: the node's real control logic with fake app execution, many per process.

Like KubeEdge's Edgemark, a hollow node is everything of a node that talks to the hub
and decides what runs, and nothing that runs it: its own enrollment identity and NATS
connection (node credentials, so the hub's permissions apply), heartbeats shaped like the
agent's (apps, desired generation, refusals; every interval and at once on a change),
and the real `NodeDeployments` loop with the real `get_desired`/`fetch_bundle` over NATS,
signature and digest checks and unpacking, and the real `NodePurges` over a small memory
cache (`fogline.sim.hollow_purges`). Only `NodeApps` is replaced: `HollowApps`
"starts" an app at once (or after a delay) and reports it running with a synthetic
traffic window drawn from a behaviour function, so a version can be made to fail gates.
Stream settings in the desired state are held but not applied: there is no outbox.

A thousand hollow nodes share one event loop: each costs a NATS connection, a few
tasks and a small data dir under one root (NodeDeployments keeps its bundles per data
dir, so unpacking is not shared; put the root on tmpfs to keep fsyncs cheap).
Each node records, on this process's monotonic clock, when it received each desired
generation and each app revision, when it had applied them and what windows its
heartbeats carried: the rollout benchmarks measure from these.

The module is longer than most (apps, node, enrollment, fleet) because the four are one
tool, used and read together.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import httpx
import nats
import nats.errors
import yaml
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fogline import __version__
from fogline.clock import Clock, SystemClock
from fogline.errors import ConfigError, FoglineError, ProtocolError, RetryableError
from fogline.node.artifacts import fetch_bundle, get_desired
from fogline.node.deployments import NodeDeployments
from fogline.node.identity import EnrollOptions, NodeFiles, enroll
from fogline.protocol import (
    AppStatus,
    AppWindow,
    DesiredApp,
    DesiredState,
    Heartbeat,
    Load,
    decode,
    desired_notify_subject,
    encode,
    heartbeat_subject,
    inbox_prefix,
)
from fogline.sim.hollow_purges import HollowPurges
from fogline.transport.cancellation import wait_or_wake

log = logging.getLogger("fogline.sim.hollow")

WINDOW_S = 10.0  # as the supervisor's RollingWindow
CONNECT_CONCURRENCY = 32
CONNECT_TIMEOUT_S = 10.0
RECONNECT_DELAY_S_MIN = 0.2
RECONNECT_DELAY_S_MAX = 5.0
DESIRED_RETRY_S_MAX = 5.0
WINDOW_LOG_MAX = 64
ENROLL_ATTEMPTS = 5
MB = 1024 * 1024


@dataclass(frozen=True)
class Traffic:
    """What a hollow app serves while it runs: a steady request rate with this share of
    errors and this p99; `start_delay_s` is how long it takes to come up."""

    requests_per_s: float = 50.0
    error_rate: float = 0.0
    p99_ms: float = 5.0
    start_delay_s: float = 0.0


# (node id, app, version) -> how that app behaves on that node.
Behaviour = Callable[[str, str, str], Traffic]


class ManifestNames:
    """(name, version) of unpacked bundles, read once per bundle directory: a directory
    named by its sha256 holds the same manifest on every node."""

    def __init__(self) -> None:
        self._by_digest: dict[str, tuple[str, str]] = {}

    def read(self, directory: Path) -> tuple[str, str]:
        known = self._by_digest.get(directory.name)
        if known is not None:
            return known
        data = yaml.safe_load((directory / "fogline.yaml").read_text(encoding="utf-8"))
        metadata = data["metadata"]
        found = (str(metadata["name"]), str(metadata["version"]))
        if len(directory.name) == 64:  # content-addressed: safe to share
            self._by_digest[directory.name] = found
        return found


@dataclass(frozen=True)
class _Running:
    name: str
    version: str
    revision: int
    since_s: float  # wall clock, as AppStatus reports it
    started_s: float  # monotonic, for the window
    traffic: Traffic


class HollowApps:
    """The part of `NodeApps` that `NodeDeployments` uses, with no worker processes."""

    def __init__(self, node_id: str, clock: Clock, behaviour: Behaviour,
                 manifests: ManifestNames, on_change: Callable[[], None] | None = None) -> None:
        self.node_id = node_id
        self.clock = clock
        self.behaviour = behaviour
        self.manifests = manifests
        self.on_change = on_change
        # Apps given locally (--app): a hollow node has none, so nothing is off limits.
        self.supervisors: dict[str, object] = {}
        self._running: dict[str, _Running] = {}
        # (monotonic time, app, revision) of every switch to a new revision, in order.
        self.activations: list[tuple[float, str, int]] = []

    def deployed(self) -> dict[str, int]:
        return {name: run.revision for name, run in self._running.items()}

    async def activate(self, directory: Path, revision: int,
                       timeout_s: float = 30.0) -> AppStatus:
        from fogline.node.apps.manager import ActivationFailed

        name, version = self.manifests.read(directory)
        current = self._running.get(name)
        if current is not None and current.revision == revision:
            return self._status(current, self.clock.monotonic())
        traffic = self.behaviour(self.node_id, name, version)
        if traffic.start_delay_s > timeout_s:
            raise ActivationFailed(f"app {name!r} revision {revision}: not ready within "
                                   f"{timeout_s:g}s")
        if traffic.start_delay_s > 0:
            await self.clock.sleep(traffic.start_delay_s)
        now_s = self.clock.monotonic()
        run = _Running(name, version, revision, self.clock.now(), now_s, traffic)
        self._running[name] = run
        self.activations.append((now_s, name, revision))
        self._changed()
        return self._status(run, now_s)

    async def remove(self, name: str) -> None:
        if self._running.pop(name, None) is not None:
            self._changed()

    def statuses(self) -> tuple[AppStatus, ...]:
        now_s = self.clock.monotonic()
        return tuple(self._status(run, now_s) for run in self._running.values())

    def activated_at(self, app: str, revision: int, after_s: float = 0.0) -> float | None:
        """When `app` first switched to `revision` at or after `after_s` (monotonic)."""
        return next((t for t, name, number in self.activations
                     if name == app and number == revision and t >= after_s), None)

    @staticmethod
    def _status(run: _Running, now_s: float) -> AppStatus:
        covered_s = min(WINDOW_S, max(0.0, now_s - run.started_s))
        requests = int(run.traffic.requests_per_s * covered_s)
        errors = round(requests * run.traffic.error_rate)
        window = AppWindow(seconds=WINDOW_S, requests=requests, errors=errors,
                           p99_ms=run.traffic.p99_ms if requests else 0.0)
        return AppStatus(name=run.name, version=run.version, state="running",
                         since_s=run.since_s, revision=run.revision, window=window)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


@dataclass(frozen=True)
class Enrolled:
    node_id: str
    files: NodeFiles
    nats_urls: list[str]
    heartbeat_interval_s: float
    region: str = ""


class HollowNode:
    """One hollow node: identity, hub link, heartbeats and the real deployment loop."""

    def __init__(self, enrolled: Enrolled, clock: Clock, behaviour: Behaviour,
                 manifests: ManifestNames, connect_gate: asyncio.Semaphore | None = None,
                 interval_s: float | None = None) -> None:
        self.node_id = enrolled.node_id
        self.files = enrolled.files
        self.nats_urls = enrolled.nats_urls
        self.interval_s = interval_s or enrolled.heartbeat_interval_s
        self.clock = clock
        self._gate = connect_gate
        self.apps = HollowApps(self.node_id, clock, behaviour, manifests, self.changed)
        self.deployments = NodeDeployments(self.files.dir, self.node_id,
                                           cast(Any, self.apps), clock, self._fetch,
                                           on_change=self.changed)
        self.purges = HollowPurges(self.node_id, enrolled.region, self.files.dir, clock)
        self.nc: NatsClient | None = None
        self.online = True
        self._online = asyncio.Event()
        self._online.set()
        self._wake = asyncio.Event()
        self._offered = asyncio.Event()
        self._seq = 0
        self._started_s = clock.now()
        # What the benchmarks read, all on this process's monotonic clock.
        self.received_at: dict[int, float] = {}  # desired generation -> first received
        self.applied_at: dict[int, float] = {}  # desired generation -> applied or refused
        self.revision_received_at: dict[tuple[str, int], float] = {}
        self.heartbeats_sent = 0
        self.connects = 0
        self.last_heartbeat_s: float | None = None
        # (monotonic send time, app, revision, requests, errors) of heartbeats with apps.
        self.window_log: deque[tuple[float, str, int, int, int]] = deque(maxlen=WINDOW_LOG_MAX)

    # Control ----------------------------------------------------------------------

    def take_offline(self) -> None:
        """Close the hub connection and stay away (heartbeats stop; deployments keep
        running locally, as on a real node)."""
        self.online = False
        self._online.clear()
        self._wake.set()

    def bring_online(self) -> None:
        self.online = True
        self._online.set()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected and self.heartbeats_sent > 0

    def changed(self) -> None:
        """Something the hub should hear about: heartbeat now."""
        self._wake.set()

    # Running ----------------------------------------------------------------------

    async def run(self) -> None:
        """Run until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self.deployments.run())
            group.create_task(self._watch_applied())
            group.create_task(self._link())

    async def _watch_applied(self) -> None:
        while True:
            await self._offered.wait()
            self._offered.clear()
            with contextlib.suppress(TimeoutError):
                await self.deployments.wait_idle(3600)
            generation = self.deployments.applied_generation
            if generation and generation not in self.applied_at:
                self.applied_at[generation] = self.clock.monotonic()

    async def _link(self) -> None:
        delay_s = RECONNECT_DELAY_S_MIN
        while True:
            await self._online.wait()
            try:
                nc = await self._connect()
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                log.debug("hollow %s: connect failed: %s", self.node_id, exc)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_DELAY_S_MAX)
                continue
            delay_s = RECONNECT_DELAY_S_MIN
            self.connects += 1
            try:
                await self._session(nc)
            finally:
                self.nc = None
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _connect(self) -> NatsClient:
        seed, jwt = self.files.nkey(), self.files.nats_jwt.read_text().strip()
        kwargs: dict[str, Any] = {}
        if any(url.startswith("tls://") for url in self.nats_urls):
            context = ssl.create_default_context(cafile=str(self.files.ca))
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(self.files.cert, self.files.key)
            kwargs["tls"] = context

        async def on_error(_exc: Exception) -> None:
            return None  # a lost connection ends the session; the link reconnects

        gate = self._gate or contextlib.nullcontext()
        async with gate:
            return await nats.connect(
                self.nats_urls, user_jwt_cb=lambda: jwt.encode(),
                signature_cb=lambda nonce: base64.b64encode(seed.sign(nonce.encode())),
                inbox_prefix=inbox_prefix(self.node_id), error_cb=on_error,
                allow_reconnect=False, connect_timeout=CONNECT_TIMEOUT_S,
                name=f"hollow-{self.node_id}", **kwargs)

    async def _session(self, nc: NatsClient) -> None:
        self.nc = nc
        await nc.subscribe(desired_notify_subject(self.node_id), cb=self._on_desired)
        ask = asyncio.create_task(self._ask_desired(nc))
        # As the agent's link session: purges over this connection, fenced until caught up.
        purges = asyncio.create_task(self.purges.purges.run(nc))
        try:
            while self.online and not nc.is_closed:
                if nc.is_connected:
                    await self._beat(nc)
                self._wake.clear()
                await wait_or_wake(self._wake, self.interval_s)
        finally:
            ask.cancel()
            purges.cancel()
            await asyncio.gather(ask, purges, return_exceptions=True)

    async def _ask_desired(self, nc: NatsClient) -> None:
        """On every connect, as the agent does: a push may have been missed meanwhile."""
        delay_s = 0.5
        while not nc.is_closed:
            try:
                state = await get_desired(nc, self.node_id)
            except (RetryableError, ProtocolError) as exc:
                log.debug("hollow %s: desired state: %s", self.node_id, exc)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, DESIRED_RETRY_S_MAX)
                continue
            self._offer(state)
            return

    async def _on_desired(self, msg: Msg) -> None:
        try:
            state = decode(msg.data)
        except ProtocolError as exc:
            log.warning("hollow %s: desired state refused: %s", self.node_id, exc)
            return
        if isinstance(state, DesiredState):
            self._offer(state)

    def _offer(self, state: DesiredState) -> None:
        now_s = self.clock.monotonic()
        try:
            if not self.deployments.offer(state):
                return
        except OSError as exc:  # not stored, so not acted on (as the agent does)
            log.error("hollow %s: cannot store desired state: %s", self.node_id, exc)
            return
        self.received_at.setdefault(state.generation, now_s)
        for app in state.apps:
            self.revision_received_at.setdefault((app.name, app.revision), now_s)
        self._offered.set()

    async def _fetch(self, app: DesiredApp) -> bytes:
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise RetryableError("the hub is not connected")
        return await fetch_bundle(nc, self.node_id, app)

    def heartbeat(self) -> Heartbeat:
        self._seq += 1
        now_s = self.clock.now()
        return Heartbeat(
            node_id=self.node_id, seq=self._seq, sent_at_s=now_s, interval_s=self.interval_s,
            version=__version__,
            load=Load(cpu_percent=5.0, memory_percent=20.0, load1=0.1, rss_bytes=40 * MB),
            uptime_s=now_s - self._started_s, apps=self.apps.statuses(),
            desired_generation=self.deployments.generation,
            refusals=self.deployments.refusals(), purge_seq=self.purges.applied_seq)

    async def _beat(self, nc: NatsClient) -> None:
        hb = self.heartbeat()
        sent_s = self.clock.monotonic()
        await nc.publish(heartbeat_subject(self.node_id), encode(hb))
        self.heartbeats_sent += 1
        self.last_heartbeat_s = sent_s
        for app in hb.apps:
            if app.window is not None:
                self.window_log.append((sent_s, app.name, app.revision, app.window.requests,
                                        app.window.errors))


# Enrollment ---------------------------------------------------------------------------

def create_token(hub_url: str, admin_token: str, uses: int, ttl_s: float = 3600) -> str:
    """A bootstrap token for `uses` enrollments, from the hub API."""
    response = httpx.post(f"{hub_url}/v1/tokens", json={"uses": uses, "ttl_s": ttl_s},
                          headers={"Authorization": f"Bearer {admin_token}"}, timeout=30)
    if response.status_code >= 400:
        raise ConfigError(f"the hub refused a token ({response.status_code}): "
                          f"{response.text[:300]}")
    return str(response.json()["token"])


def enroll_many(hub_url: str, token: str, count: int, root: Path, name_prefix: str = "hollow",
                workers: int = 8, labels: dict[str, str] | None = None,
                region: str = "") -> list[Enrolled]:
    """Enroll `count` nodes through the public API (keys made locally, as a node does),
    in parallel like a fleet booting; each gets `root/<name>/` as its data dir."""

    def one(index: int) -> Enrolled:
        name = f"{name_prefix}-{index:05d}"
        files = NodeFiles(root / name)
        options = EnrollOptions(hub_url=hub_url, token=token, name=name, region=region,
                                labels=dict(labels or {}))
        for attempt in range(ENROLL_ATTEMPTS):
            try:
                identity = enroll(files, options, {}, time.time())
            except RetryableError:
                if attempt == ENROLL_ATTEMPTS - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
                continue
            return Enrolled(identity.node_id, files, list(identity.nats_urls),
                            identity.heartbeat_interval_s, identity.region)
        raise AssertionError("unreachable")

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(count)))


# The fleet ----------------------------------------------------------------------------

class HollowFleet:
    """Many hollow nodes on one event loop. `behaviour` decides how each app version
    serves on each node; by default `by_version[version]`, else `default_traffic`."""

    def __init__(self, enrolled: Iterable[Enrolled], clock: Clock | None = None,
                 interval_s: float | None = None) -> None:
        self.clock = clock or SystemClock()
        self.by_version: dict[str, Traffic] = {}
        self.default_traffic = Traffic()
        self.behaviour: Behaviour = self._by_version
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)  # binds to a loop on first use
        manifests = ManifestNames()
        self.nodes = [HollowNode(e, self.clock, self._behave, manifests, gate, interval_s)
                      for e in enrolled]

    @classmethod
    def enroll(cls, hub_url: str, admin_token: str, count: int, root: Path,
               name_prefix: str = "hollow", interval_s: float | None = None,
               workers: int = 8) -> HollowFleet:
        """Enroll `count` nodes (blocking: call before the loop, or in a thread)."""
        token = create_token(hub_url, admin_token, count)
        return cls(enroll_many(hub_url, token, count, root, name_prefix, workers),
                   interval_s=interval_s)

    def _by_version(self, node_id: str, app: str, version: str) -> Traffic:
        return self.by_version.get(version, self.default_traffic)

    def _behave(self, node_id: str, app: str, version: str) -> Traffic:
        return self.behaviour(node_id, app, version)  # looked up per call: replaceable

    # Running ----------------------------------------------------------------------

    async def run(self) -> None:
        """Run every node until cancelled."""
        async with asyncio.TaskGroup() as group:
            for node in self.nodes:
                group.create_task(node.run(), name=f"hollow-{node.node_id}")

    @contextlib.asynccontextmanager
    async def running(self, connect_timeout_s: float = 120.0) -> AsyncIterator[HollowFleet]:
        """The fleet running (every node connected and heartbeating) inside the block."""
        task = asyncio.create_task(self.run(), name="hollow-fleet")
        try:
            await asyncio.sleep(0)
            await self.wait(lambda: all(n.connected for n in self.nodes), connect_timeout_s,
                            "every hollow node to connect", task)
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait(self, predicate: Callable[[], bool], timeout_s: float, what: str,
                   task: asyncio.Task[None] | None = None, interval_s: float = 0.05) -> float:
        """Until `predicate()` holds (TimeoutError after `timeout_s`); the monotonic time
        it was seen to hold. If `task` (the fleet) ends meanwhile, its error is raised."""
        deadline = self.clock.monotonic() + timeout_s
        while not predicate():
            if task is not None and task.done():
                task.result()
                raise FoglineError("the hollow fleet stopped")
            if self.clock.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
            await asyncio.sleep(interval_s)
        return self.clock.monotonic()

    # Views and control ------------------------------------------------------------

    def node(self, node_id: str) -> HollowNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def revisions(self, app: str) -> dict[str, int]:
        """Node id -> the revision of `app` it runs (0: none)."""
        return {n.node_id: n.apps.deployed().get(app, 0) for n in self.nodes}

    def on_revision(self, app: str, revision: int,
                    nodes: Iterable[HollowNode] | None = None) -> bool:
        chosen = self.nodes if nodes is None else nodes
        return all(n.apps.deployed().get(app) == revision for n in chosen)

    def take_offline(self, nodes: Iterable[HollowNode]) -> None:
        for node in nodes:
            node.take_offline()

    def bring_online(self, nodes: Iterable[HollowNode]) -> None:
        for node in nodes:
            node.bring_online()
