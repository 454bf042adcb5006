"""The edge node agent: keeps an identity, reports to the hub, serves its endpoints.

Local first: `/healthz` and `/metrics` are served whether or not the hub is reachable.
The hub link connects to NATS with the node's own credentials, heartbeats, listens for
commands and renews its certificate and JWT well before they expire, swapping to a new
connection without a gap. A revoked node stops talking to the hub and says so locally.

Apps come from `--app` directories and from the hub's deployments: the node's desired
state arrives on `fl.cmd.<id>.desired` and is asked for on every (re)connect, and
`NodeDeployments` applies it, from the bundles on disk when the hub is away.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import logging
import shutil
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psutil
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fogline import __version__
from fogline.clock import Clock, SystemClock
from fogline.core.outbox import StreamPolicy
from fogline.core.sync import refused_collections
from fogline.errors import AuthError, ConfigError, FoglineError, ProtocolError, RetryableError
from fogline.node import identity as ident
from fogline.node.app_cache import AppCache
from fogline.node.apps.front import AppFront
from fogline.node.apps.manager import AppsCollector, NodeApps
from fogline.node.artifacts import fetch_bundle, get_desired
from fogline.node.cache_metrics import CacheCollector
from fogline.node.capabilities import current_load
from fogline.node.collections import NodeCollections
from fogline.node.declare import declare_collections
from fogline.node.deployments import NodeDeployments
from fogline.node.enroll_once import enroll_if_needed
from fogline.node.http import NodeState, create_node_app, load_local_token
from fogline.node.http_meter import HttpMeter
from fogline.node.outbox import Outbox
from fogline.node.outbox_sender import OutboxSender
from fogline.node.purges import NodePurges, PurgeTarget
from fogline.node.sites import SiteFront
from fogline.node.sqlite_writer import FsyncPolicy
from fogline.node.sync import NodeSync
from fogline.protocol import (
    Command,
    DesiredApp,
    DesiredState,
    Heartbeat,
    command_subject,
    decode,
    desired_notify_subject,
    encode,
    heartbeat_subject,
    inbox_prefix,
)
from fogline.transport.cancellation import wait_or_wake
from fogline.transport.http_server import serve_http

# Every key of the apps' cache starts with one of these (ctx.cache, ctx.fetch).
APP_CACHE_PREFIXES = ("app://", "http://", "https://")
log = logging.getLogger("fogline.node")

# Renew once two thirds of a credential's lifetime have passed.
RENEW_AT_FRACTION = 2 / 3
RECONNECT_BACKOFF_MAX_S = 5.0
DESIRED_BACKOFF_MAX_S = 30.0
DISK_FREE_MIN_BYTES = 64 * 1024 * 1024


@dataclass
class NodeConfig:
    data_dir: Path
    hub_url: str | None = None
    token: str | None = None
    name: str | None = None
    region: str = ""
    zone: str = ""
    tier: str = "near"
    labels: dict[str, str] = field(default_factory=dict)
    listen: str = "127.0.0.1:0"
    heartbeat_interval_s: float | None = None
    nats_url: str | None = None
    ca_sha256: str | None = None
    fsync: FsyncPolicy = "normal"
    # Stream name -> StreamPolicy fields (priority, bandwidth_bps, quota_bytes, overflow).
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)
    # App directories to run (each with a fogline.yaml).
    apps: list[str] = field(default_factory=list)
    # The device-side MQTT broker; None runs the embedded one when apps are configured.
    mqtt_url: str | None = None
    mqtt_listen: str = "127.0.0.1:0"


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("deployments stopped: %r", task.exception(), exc_info=task.exception())


class NodeAgent:
    def __init__(self, config: NodeConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.files = ident.NodeFiles(config.data_dir)
        self.state = NodeState(started_at_s=self.clock.now())
        self.ready = asyncio.Event()
        self._process = psutil.Process()
        self._seq = 0
        self._nc: NatsClient | None = None
        # Set to send the next heartbeat now (reconnected, an app changed state).
        self._wake_heartbeat = asyncio.Event()
        self._clean_mark_ms = 0
        self._sender: OutboxSender | None = None
        # Set to ask the hub for the desired state again (a push may have been missed
        # while the link was down).
        self._refresh_desired = asyncio.Event()
        # Read manifests now: a bad app stops the node before it enrolls or listens.
        # Always there, with no local app too: deployed apps may arrive at any time.
        # ctx.cache / ctx.fetch of every app: one store, opened on first use.
        self.app_cache = AppCache(config.data_dir / "cache" / "_apps.db", self.clock)
        self.apps = NodeApps(config.apps, self.clock, app_cache=self.app_cache)
        self.deployments: NodeDeployments | None = None
        self.purges: NodePurges | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._mqtt_lock = asyncio.Lock()

    # Identity -----------------------------------------------------------------------

    async def _identity(self) -> ident.Identity:
        """The stored identity; enroll first if there is none (`fogline node` usually
        has done that before exec'ing the agent)."""
        options = dataclasses.asdict(self.config)
        await asyncio.to_thread(enroll_if_needed, options)
        return self.files.load_identity()

    def _interval_s(self, identity: ident.Identity) -> float:
        return self.config.heartbeat_interval_s or identity.heartbeat_interval_s

    # NATS ---------------------------------------------------------------------------

    async def _connect(self, identity: ident.Identity) -> NatsClient:
        seed = self.files.nkey()
        jwt = self.files.nats_jwt.read_text().strip()
        urls = [self.config.nats_url] if self.config.nats_url else identity.nats_urls
        kwargs: dict[str, Any] = {}
        if any(url.startswith("tls://") for url in urls):
            context = ssl.create_default_context(cafile=str(self.files.ca))
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.load_cert_chain(self.files.cert, self.files.key)
            kwargs["tls"] = context

        async def on_error(exc: Exception) -> None:
            log.warning("hub link: %s", exc)

        async def on_disconnect() -> None:
            self.state.hub_connected = False

        async def on_reconnect() -> None:
            self.state.hub_connected = True
            if self.purges is not None:  # before anything else: we may have missed some
                self.purges.fence()
            self._wake_heartbeat.set()
            self._refresh_desired.set()

        return await nats.connect(
            servers=urls, name=f"fogline-node-{identity.node_id}",
            user_jwt_cb=lambda: jwt.encode(),
            signature_cb=lambda nonce: base64.b64encode(seed.sign(nonce.encode())),
            inbox_prefix=inbox_prefix(identity.node_id), connect_timeout=3,
            allow_reconnect=True, max_reconnect_attempts=-1,
            # Retry faster when heartbeats are frequent, never slower than once a second.
            reconnect_time_wait=min(1.0, self._interval_s(identity) / 4),
            error_cb=on_error, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
            **kwargs)

    async def _connect_with_retry(self, identity: ident.Identity) -> NatsClient:
        delay_s = 0.5
        while True:
            try:
                return await self._connect(identity)
            except (OSError, TimeoutError, nats.errors.Error) as exc:
                log.info("hub NATS unreachable (%s); retrying in %.1fs", exc, delay_s)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_BACKOFF_MAX_S)

    async def _on_command(self, msg: Msg) -> None:
        try:
            command = decode(msg.data)
        except ProtocolError as exc:
            log.warning("command refused: %s", exc)
            return
        if isinstance(command, Command) and command.kind == "revoked":
            self._mark_revoked(command.reason)

    def _mark_revoked(self, reason: str) -> None:
        if not self.state.revoked:
            log.error("this node was revoked by the hub: %s", reason or "no reason given")
        self.state.revoked = True
        self.state.hub_connected = False

    # Health and heartbeats ----------------------------------------------------------

    def failing_checks(self) -> tuple[str, ...]:
        failing = []
        if shutil.disk_usage(self.files.dir).free < DISK_FREE_MIN_BYTES:
            failing.append("disk")
        return tuple(failing)

    def heartbeat(self, identity: ident.Identity) -> Heartbeat:
        self._seq += 1
        deployments = self.deployments
        return Heartbeat(
            node_id=identity.node_id, seq=self._seq, sent_at_s=self.clock.now(),
            interval_s=self._interval_s(identity), version=__version__,
            load=self.http_meter.load(current_load(self._process), self.clock.monotonic()),
            failing_checks=self.failing_checks(),
            uptime_s=self.clock.now() - self.state.started_at_s, endpoint=self.state.endpoint,
            hub_rtt_ms=self.state.hub_rtt_ms, sync_clean_hlc_ms=self._clean_mark_ms,
            apps=tuple(status.clipped() for status in self.apps.statuses()),
            desired_generation=deployments.generation if deployments is not None else 0,
            refusals=deployments.refusals() if deployments is not None else (),
            purge_seq=self.purges.applied_seq if self.purges is not None else 0)

    async def _link_session(self, identity: ident.Identity) -> ident.Identity:
        """One NATS connection: heartbeat until it closes or credentials were renewed.

        Renewal happens while this connection is still up; the caller then reconnects
        with the new JWT, so not a single heartbeat is skipped.
        """
        nc = await self._connect_with_retry(identity)
        self._nc = nc
        self.state.hub_connected = True
        sync = asyncio.create_task(self._sync(nc, identity))
        if self._sender is None:  # one sender (and one set of metrics) per process
            self._sender = OutboxSender(self.outbox, nc.jetstream(timeout=5),
                                        identity.node_id, self.clock,
                                        registry=self.state.registry)
        self._sender.js = nc.jetstream(timeout=5)
        sender = asyncio.create_task(self._sender.run())
        desired = asyncio.create_task(self._desired_sync(nc, identity))
        assert self.purges is not None
        purges = asyncio.create_task(self.purges.run(nc))
        try:
            await nc.subscribe(command_subject(identity.node_id), cb=self._on_command)
            interval_s = self._interval_s(identity)
            while not nc.is_closed and not self.state.revoked:
                if nc.is_connected:
                    await self._send_heartbeat(nc, identity)
                if self._renewal_due(identity):
                    renewed = await self._try_renew(identity)
                    if renewed is not None:
                        return renewed
                # Wake early on reconnect or an app's change: the hub learns at once.
                self._wake_heartbeat.clear()
                await wait_or_wake(self._wake_heartbeat, interval_s)
            if nc.is_closed and "revoked" in str(nc.last_error).lower():
                self._mark_revoked(str(nc.last_error))
            return identity
        finally:
            self.state.hub_connected = False
            for task in (sync, sender, desired, purges):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            with contextlib.suppress(Exception):
                await nc.close()

    async def _sync(self, nc: NatsClient, identity: ident.Identity) -> None:
        """Collection sync; first the hub learns the collections this node's apps declare
        (it drops ops for collections it does not know)."""
        declared = self.apps.declared_collections()
        delay_s = 0.5
        while declared:
            try:
                result = await declare_collections(nc, identity.node_id, declared)
            except FoglineError as exc:
                log.info("declaring app collections at the hub: %s; retrying", exc)
                await self.clock.sleep(delay_s)
                delay_s = min(delay_s * 2, RECONNECT_BACKOFF_MAX_S)
                continue
            refused = refused_collections(declared, result)
            if refused:
                log.error("the hub refused app collections: %s", refused)
                await self.apps.refuse(refused)
            break
        await NodeSync(self.collections, nc, identity.node_id, self.clock).run()

    def _purge_targets(self) -> list[PurgeTarget]:
        """Every cache a fleet purge reaches: each site's, and the apps' once open
        (`ctx.cache` entries by tag; URL and prefix purges name sites' paths)."""
        targets = self.sites.purge_targets()
        store = self.app_cache.opened
        if store is not None:
            targets.append(PurgeTarget(store, "", None, APP_CACHE_PREFIXES))
        return targets

    # Deployments --------------------------------------------------------------------

    async def _desired_sync(self, nc: NatsClient, identity: ident.Identity) -> None:
        """Take the hub's pushes of this node's desired state, and ask for it now and
        after every reconnect: a push is sent once, when the state changes."""
        await nc.subscribe(desired_notify_subject(identity.node_id), cb=self._on_desired)
        while True:
            self._refresh_desired.clear()
            delay_s = 0.5
            while True:
                try:
                    state = await get_desired(nc, identity.node_id)
                    break
                except (RetryableError, ProtocolError) as exc:
                    log.info("asking the hub for the desired state: %s; retrying in %.1fs",
                             exc, delay_s)
                    await self.clock.sleep(delay_s)
                    delay_s = min(delay_s * 2, DESIRED_BACKOFF_MAX_S)
            await self._offer(state)
            assert self.deployments is not None
            self.deployments.retry_now()  # fetches that failed while the hub was away
            await self._refresh_desired.wait()

    async def _on_desired(self, msg: Msg) -> None:
        try:
            state = decode(msg.data)
        except ProtocolError as exc:
            log.warning("desired state refused: %s", exc)
            return
        if not isinstance(state, DesiredState):
            log.warning("desired state refused: got %s", type(state).__name__)
            return
        await self._offer(state)

    async def _offer(self, state: DesiredState) -> None:
        assert self.deployments is not None  # the link starts after the deployments
        if state.apps:
            try:
                await self._ensure_mqtt()
            except (FoglineError, OSError) as exc:  # the apps still serve HTTP without it
                log.error("cannot start the embedded MQTT broker: %s", exc)
        try:
            self.deployments.offer(state)
        except OSError as exc:  # not written, so not acted on; the next push retries
            log.error("cannot store desired state generation %d: %s", state.generation, exc)

    def _deployments_changed(self) -> None:
        self._apply_stream_settings()
        assert self.deployments is not None
        self.sites.apply(self.deployments.desired.sites)
        self._wake_heartbeat.set()

    def _apply_stream_settings(self) -> None:
        """The hub's Stream manifests become the outbox's fleet policies (they win over
        what apps and flags say); a stream no longer listed goes back to those."""
        assert self.deployments is not None
        policies = {}
        for setting in self.deployments.desired.streams:
            try:
                policies[setting.name] = StreamPolicy(
                    priority=setting.priority, bandwidth_bps=setting.bandwidth_bps,
                    overflow=setting.overflow,  # type: ignore[arg-type]
                    **({"quota_bytes": setting.quota_bytes} if setting.quota_bytes else {}))
            except ConfigError as exc:
                log.error("stream policy %s from the hub ignored: %s", setting.name, exc)
        if policies != self.outbox.fleet_policies:
            log.info("fleet stream policies: %s", ", ".join(sorted(policies)) or "none")
            self.outbox.fleet_policies = policies

    async def _fetch_bundle(self, app: DesiredApp) -> bytes:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise RetryableError("the hub is not connected")
        return await fetch_bundle(nc, self.state.node_id, app)

    async def _send_heartbeat(self, nc: NatsClient, identity: ident.Identity) -> None:
        started_s = self.clock.monotonic()
        try:
            await nc.flush(timeout=max(1.0, self._interval_s(identity)))
            self.state.hub_rtt_ms = (self.clock.monotonic() - started_s) * 1000
        except (nats.errors.Error, TimeoutError):
            return
        mark = await self.collections.clean_mark_ms()
        if mark is not None:
            self._clean_mark_ms = mark
        hb = self.heartbeat(identity)
        await nc.publish(heartbeat_subject(identity.node_id), encode(hb))
        self.state.heartbeats_sent += 1
        self.state.last_heartbeat_s = hb.sent_at_s

    def _renewal_due(self, identity: ident.Identity) -> bool:
        lifetime_s = identity.expires_at_s - identity.issued_at_s
        return self.clock.now() >= identity.issued_at_s + lifetime_s * RENEW_AT_FRACTION

    async def _try_renew(self, identity: ident.Identity) -> ident.Identity | None:
        """Renew once; None if the hub cannot be reached right now."""
        try:
            renewed = await asyncio.to_thread(ident.renew, self.files, identity,
                                              self.clock.now())
        except AuthError as exc:
            self._mark_revoked(str(exc))
            return None
        except FoglineError as exc:
            log.warning("credential renewal failed: %s", exc)
            return None
        self.state.renewals += 1
        log.info("credentials renewed until %.0f", renewed.expires_at_s)
        return renewed

    async def _hub_link(self, identity: ident.Identity) -> None:
        delay_s = 1.0
        while not self.state.revoked:
            if self.clock.now() >= identity.expires_at_s:
                # Offline past expiry: the old JWT cannot connect, so renew over HTTPS.
                renewed = await self._try_renew(identity)
                if renewed is None:
                    await self.clock.sleep(delay_s)
                    delay_s = min(delay_s * 2, 30.0)
                    continue
                identity = renewed
            identity = await self._link_session(identity)

    # Running ------------------------------------------------------------------------

    async def run(self) -> None:
        # A small pool for blocking work (SQLite reads, renewals): every idle thread
        # costs memory on a small device.
        asyncio.get_running_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="node-io"))
        host, _, port = self.config.listen.rpartition(":")
        local_token = load_local_token(self.config.data_dir)
        collections: list[NodeCollections] = []
        outboxes: list[Outbox] = []
        node_app = create_node_app(self.state, lambda: collections[0] if collections else None,
                                   local_token, lambda: outboxes[0] if outboxes else None,
                                   lambda: self.apps, lambda: self.deployments)
        apps = self.apps
        self.state.registry.register(AppsCollector(lambda: apps))
        # Sites (kind: Site) first: their hosts and prefixes are the operator's choice.
        self.sites = SiteFront(AppFront(node_app, lambda: apps.supervisors),
                               self.config.data_dir / "cache", self.clock)
        self.state.registry.register(CacheCollector(self.sites.caches))
        self.http_meter = HttpMeter(self.sites)  # counts for the routing table
        self.http_meter.register(self.state.registry)
        app: Any = self.http_meter
        apps.on_change = lambda _: self._wake_heartbeat.set()
        async with contextlib.AsyncExitStack() as stack:
            self._stack = stack
            stack.push_async_callback(self.sites.aclose)  # after the server stops
            stack.push_async_callback(self.app_cache.aclose)  # after the apps stop
            bound = await stack.enter_async_context(serve_http(app, host, int(port)))
            self.state.endpoint = f"http://{host}:{bound}"
            identity = await self._identity()
            self.collections = NodeCollections(self.config.data_dir / "state.db",
                                               identity.node_id, self.clock,
                                               self.config.fsync)
            stack.callback(self.collections.close)
            # Emits work from here on, hub or no hub: they wait in the outbox.
            policies = {name: StreamPolicy(**fields)
                        for name, fields in self.config.streams.items()}
            self.outbox = Outbox(self.config.data_dir / "outbox.db", self.clock, policies,
                                 fsync=self.config.fsync, registry=self.state.registry)
            stack.callback(self.outbox.close)
            collections.append(self.collections)
            outboxes.append(self.outbox)
            self.state.node_id = identity.node_id
            self.state.name = identity.name
            self.state.region = identity.region
            self.purges = NodePurges(identity.node_id, identity.region,
                                     self.config.data_dir / "cache" / "purges.json",
                                     self.clock, self._purge_targets)
            self.sites.purges = self.purges
            self.app_cache.on_open = lambda store: self.purges.opened(  # type: ignore[union-attr]
                PurgeTarget(store, "", None, APP_CACHE_PREFIXES))
            # It reads the desired state stored before a restart: local first.
            self.deployments = NodeDeployments(
                self.config.data_dir, identity.node_id, self.apps, self.clock,
                self._fetch_bundle, on_change=self._deployments_changed)
            self._apply_stream_settings()
            self.sites.apply(self.deployments.desired.sites)
            await self._start_apps(stack, identity)
            deploying = asyncio.create_task(self.deployments.run())
            deploying.add_done_callback(_log_crash)

            async def stop_deploying() -> None:
                deploying.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await deploying

            stack.push_async_callback(stop_deploying)  # before the apps stop
            write_endpoint = self.config.data_dir / "endpoint"
            write_endpoint.write_text(self.state.endpoint + "\n")
            self.ready.set()
            log.info("node %s (%s) serving on %s", identity.node_id, identity.name,
                     self.state.endpoint)
            await self._hub_link(identity)
            # Revoked: keep serving local endpoints (they report the revocation)
            # until the operator stops the process.
            await asyncio.Event().wait()

    async def _start_apps(self, stack: contextlib.AsyncExitStack,
                          identity: ident.Identity) -> None:
        assert self.deployments is not None
        if self.config.apps or self.deployments.desired.apps or self.config.mqtt_url:
            await self._ensure_mqtt()
        node = {"id": identity.node_id, "region": identity.region, "tier": identity.tier,
                "labels": dict(identity.labels)}
        await self.apps.start(self.collections, self.outbox, node, self.state.mqtt_url or None,
                              self.config.data_dir / "apps" / "envs")
        stack.push_async_callback(self.apps.stop)

    async def _ensure_mqtt(self) -> None:
        """The devices' broker: the configured one, else the embedded one, started the
        first time the node has an app (a node without apps does not pay for it)."""
        async with self._mqtt_lock:
            if self.state.mqtt_url:
                return
            mqtt_url = self.config.mqtt_url
            if mqtt_url is None:
                from fogline.transport.mqtt_broker import open_mqtt_broker

                assert self._stack is not None
                broker = await self._stack.enter_async_context(open_mqtt_broker(
                    self.config.data_dir / "mqtt", self.config.mqtt_listen))
                mqtt_url = broker.url
            self.state.mqtt_url = mqtt_url
            (self.config.data_dir / "mqtt.url").write_text(mqtt_url + "\n")
            # Apps built from now on connect to it (the broker may start after the apps
            # did: the first deployment of a node that had none).
            self.apps.set_mqtt_url(mqtt_url)
