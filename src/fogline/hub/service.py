"""The running hub: store, PKI, NATS (embedded or external), heartbeat intake, API.

`Hub.run()` owns every task and subprocess it starts inside one task group and
returns only after all of them have stopped, so Ctrl-C or SIGTERM leaves nothing
running (the embedded nats-server also dies with the hub if the hub is SIGKILLed).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Gauge

from fogline.clock import Clock, SystemClock
from fogline.core.health import HealthPolicy, revoke
from fogline.core.sync import CollectionDef, check_declaration
from fogline.errors import ConfigError
from fogline.fsutil import write_private
from fogline.hub.api import create_api
from fogline.hub.collections import CollectionStore
from fogline.hub.deployments import HubDeployments
from fogline.hub.desired import DesiredPublisher
from fogline.hub.enrollment import Enrollment
from fogline.hub.heartbeats import HeartbeatMetrics, HeartbeatProcessor
from fogline.hub.ingest import IngestWorker
from fogline.hub.ingest import ensure_streams as ensure_up_streams
from fogline.hub.nats_authority import NatsAuthority
from fogline.hub.pki import CertificateAuthority
from fogline.hub.purge_store import PurgeStore
from fogline.hub.purges import HubPurges, PurgeMetrics
from fogline.hub.store import HubStore, health_of
from fogline.hub.sync import HubSync, SyncMetrics, ensure_sync_streams
from fogline.manifest import AppManifest
from fogline.protocol import (
    HEARTBEAT_WILDCARD,
    HUB_QUEUE_GROUP,
    STATUSES,
    Command,
    command_subject,
    encode,
)
from fogline.transport.http_server import serve_http
from fogline.transport.nats_server import free_port, open_nats_server

log = logging.getLogger("fogline.hub")

FLUSH_INTERVAL_S = 0.25


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def load_admin_token(data_dir: Path) -> str:
    """The admin token in DIR/admin.token, created (mode 0600) at first start."""
    path = data_dir / "admin.token"
    if path.exists():
        return path.read_text().strip()
    token = "fla_" + secrets.token_urlsafe(32)
    write_private(path, token + "\n")
    return token


@dataclass
class HubConfig:
    data_dir: Path
    listen: str = "127.0.0.1:8700"
    db_url: str | None = None
    nats_url: str | None = None
    # The NATS URL nodes are told to use; defaults to the embedded server's address.
    nats_advertise: str | None = None
    heartbeat_interval_s: float = 5.0
    cert_lifetime_s: float = 86400.0
    policy: HealthPolicy = field(default_factory=HealthPolicy)
    # How often silent nodes are looked for; bounds offline-detection latency beyond
    # the missed-heartbeat rule.
    sweep_interval_s: float = 0.5
    tombstone_gc_interval_s: float = 60.0
    # How often rollouts are advanced and desired state published (also on any change).
    rollout_tick_s: float = 0.5


async def supervise(name: str, loop: Callable[[], Awaitable[None]],
                    restart_delay_max_s: float = 10.0) -> None:
    """Keep a hub loop running: an unexpected error is logged and the loop restarted
    with backoff, instead of taking the whole hub down."""
    delay_s = 0.5
    while True:
        started = time.monotonic()
        try:
            await loop()
            return
        except Exception:
            log.exception("%s failed; restarting in %.1fs", name, delay_s)
        if time.monotonic() - started > 60:
            delay_s = 0.5
        await asyncio.sleep(delay_s)
        delay_s = min(delay_s * 2, restart_delay_max_s)


class Hub:
    def __init__(self, config: HubConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.registry = CollectorRegistry()
        self.nats_urls: list[str] = []
        self.heartbeat_interval_s = config.heartbeat_interval_s
        self.api_url = ""
        self.ready = asyncio.Event()
        self._system_nc: NatsClient | None = None
        self._nc: NatsClient | None = None
        self.store: HubStore | None = None
        self.publisher: DesiredPublisher | None = None

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    # Setup --------------------------------------------------------------------------

    def _open_local_state(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # hub.url tells local tools where a running hub listens; a stale one would lie.
        for stale in ("hub.url", "nats.url"):
            (self.data_dir / stale).unlink(missing_ok=True)
        self.admin_token = load_admin_token(self.data_dir)
        now = dt.datetime.fromtimestamp(self.clock.now(), dt.UTC)
        self.ca = CertificateAuthority.open(self.data_dir / "pki", now)
        self.ca_pem = self.ca.cert_pem
        self.ca_fingerprint = self.ca.fingerprint
        self.authority = NatsAuthority.open(self.data_dir / "nats")
        db_url = self.config.db_url or f"sqlite:///{self.data_dir / 'hub.db'}"
        self.store = HubStore(db_url)
        self.enrollment = Enrollment(self.store, self.ca, self.authority, self.clock,
                                     self.config.cert_lifetime_s,
                                     self.config.heartbeat_interval_s)

    def _tls_files(self, host: str) -> tuple[Path, Path] | tuple[None, None]:
        """Server certificate for listeners that leave loopback; none on loopback."""
        if is_loopback(host):
            return None, None
        now = dt.datetime.fromtimestamp(self.clock.now(), dt.UTC)
        hosts = [host] if not is_wildcard(host) else ["127.0.0.1", "localhost",
                                                      socket.gethostname()]
        return self.ca.issue_server_certificate(hosts, self.data_dir / "pki", now)

    @contextlib.asynccontextmanager
    async def _open_nats(self, host: str) -> AsyncIterator[str]:
        if self.config.nats_url is not None:
            yield self.config.nats_url
            return
        reachable = "127.0.0.1" if is_wildcard(host) else host
        # Nodes were told this port at enrollment: keep it across hub restarts.
        port_file = self.data_dir / "nats" / "port"
        if port_file.exists():
            port = int(port_file.read_text())
        else:
            port = free_port(reachable)
            port_file.parent.mkdir(parents=True, exist_ok=True)
            port_file.write_text(f"{port}\n")
        cert, key = self._tls_files(host)
        assert self.store is not None
        config_text = self.authority.server_config(
            host=host, port=port, store_dir=self.data_dir / "nats", now_s=int(self.clock.now()),
            revocations=self.store.revocations(), tls_cert=cert, tls_key=key,
            tls_ca=self.data_dir / "pki" / "ca.crt")
        async with open_nats_server(config_text, self.data_dir / "nats", reachable, port):
            scheme = "tls" if cert is not None else "nats"
            yield f"{scheme}://{reachable}:{port}"

    async def _connect(self, url: str, creds: str, name: str) -> NatsClient:
        path = self.data_dir / "nats" / f"{name}.creds"
        write_private(path, creds)
        kwargs: dict[str, Any] = {}
        if url.startswith("tls://"):
            pki = self.data_dir / "pki"
            context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            now = dt.datetime.fromtimestamp(self.clock.now(), dt.UTC)
            context.load_cert_chain(*self.ca.issue_hub_client_certificate(pki, now))
            kwargs["tls"] = context
        return await nats.connect(url, user_credentials=str(path), name=f"fogline-{name}",
                                  max_reconnect_attempts=-1, reconnect_time_wait=0.5, **kwargs)

    async def push_account(self) -> None:
        """Send the fleet account JWT with the current revocations to the server."""
        assert self.store is not None and self._system_nc is not None
        jwt = self.authority.fleet_account_jwt(int(self.clock.now()), self.store.revocations())
        reply = await self._system_nc.request("$SYS.REQ.CLAIMS.UPDATE", jwt.encode(), timeout=5)
        if b'"error"' in reply.data:
            raise ConfigError(f"NATS refused the account update: {reply.data[:300]!r}")

    # Operations used by the API -----------------------------------------------------

    def revoke(self, node_id: str, reason: str, actor: str) -> dict[str, Any]:
        assert self.store is not None
        now_s = self.clock.now()
        row = self.store.get_node(node_id)
        self.store.revoke(node_id, revoke(health_of(row), now_s, reason), now_s)
        self.store.add_event(now_s, actor, "node.revoked", node_id, {"reason": reason})
        loop = self._loop
        future = asyncio.run_coroutine_threadsafe(self._announce_revocation(node_id, reason),
                                                  loop)
        future.result(timeout=10)
        return {"node_id": node_id, "status": "revoked", "reason": reason}

    def apply_bundle(self, manifest: dict[str, Any], bundle: bytes, digest: str,
                     key_id: str, signature: str, actor: str, reason: str) -> dict[str, Any]:
        """Apply an App: the deployments check the bundle; a new revision's collections
        are checked against the hub's and its bundle stored before it is recorded."""
        create: list[CollectionDef] = []

        def before_revision(parsed: AppManifest) -> None:
            # The app's collections exist at the hub before any node runs it; one that
            # conflicts with an existing collection refuses the whole apply.
            declared = [CollectionDef(c.name, c.type, c.scope)
                        for c in parsed.spec.collections]
            planned, _, errors = check_declaration(declared, self.collections.definitions())
            if errors:
                raise ConfigError(f"{parsed.metadata.name}: " + "; ".join(errors))
            assert self.publisher is not None
            asyncio.run_coroutine_threadsafe(self.publisher.store_bundle(digest, bundle),
                                             self._loop).result(timeout=60)
            create.extend(planned)

        result = self.deployments.apply(manifest, bundle, digest, key_id, signature, actor,
                                        reason, before_revision)
        for definition in create:
            if self.define_collection(definition) == "created":
                self.deployments.record_event(actor, "collection.created", definition.name,
                                              "", type=definition.type,
                                              scope=definition.scope, app=result["app"])
        return result

    def define_collection(self, definition: CollectionDef) -> str:
        future = asyncio.run_coroutine_threadsafe(self.sync.define(definition), self._loop)
        return future.result(timeout=15)

    async def _announce_revocation(self, node_id: str, reason: str) -> None:
        assert self._nc is not None
        # Tell the node first (its connection is cut the moment the account updates).
        await self._nc.publish(command_subject(node_id), encode(Command("revoked", reason)))
        await self._nc.flush(timeout=2)
        await self.push_account()

    # Running ------------------------------------------------------------------------

    async def _intake_loop(self, processor: HeartbeatProcessor) -> None:
        """Flush heartbeats and sweep for silent nodes, one after the other, so the two
        never race on the same rows within this hub."""
        assert self.store is not None
        nodes_gauge = Gauge("fogline_hub_nodes", "Nodes by status", ["status"],
                            registry=self.registry)
        next_sweep = 0.0
        while True:
            flushed = processor.pending
            changed = await asyncio.to_thread(processor.flush)
            if (flushed and self.deployments.active) or changed:
                # A step may have converged or breached just now; a node that came or
                # went changes where apps and sites are placed.
                self.deployments.poke()
            if self.clock.monotonic() >= next_sweep:
                if await asyncio.to_thread(processor.sweep):
                    self.deployments.poke()
                counts = await asyncio.to_thread(self.store.count_by_status)
                for status in STATUSES:
                    nodes_gauge.labels(status=status).set(counts.get(status, 0))
                next_sweep = self.clock.monotonic() + self.config.sweep_interval_s
            await asyncio.sleep(min(FLUSH_INTERVAL_S, self.config.sweep_interval_s))

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open_local_state)
        assert self.store is not None
        host, port = split_host_port(self.config.listen)
        try:
            async with self._open_nats(host) as nats_url:
                self.nats_urls = [self.config.nats_advertise or nats_url]
                now_s = int(self.clock.now())
                self._system_nc = await self._connect(
                    nats_url, self.authority.system_creds(now_s), "system")
                self._nc = await self._connect(nats_url, self.authority.hub_creds(now_s), "hub")
                try:
                    await self._serve(host, port)
                finally:
                    # close, not drain: every loop has stopped and acked its work, and a
                    # drain waits its full timeout on idle pull subscriptions.
                    await self._nc.close()
                    await self._system_nc.close()
        finally:
            self.store.close()

    async def _serve(self, host: str, port: int) -> None:
        assert self._nc is not None and self.store is not None
        await self.push_account()
        js = self._nc.jetstream(timeout=10)
        await ensure_sync_streams(js)
        await ensure_up_streams(js)
        ingest = IngestWorker(self.store.engine, js, self.clock, registry=self.registry)
        self.collections = CollectionStore(self.store.engine)
        self.sync = HubSync(self.collections, self.store, self._nc, js, self.clock,
                            SyncMetrics(self.registry))
        self.publisher = DesiredPublisher(self._nc, js)
        await self.publisher.open()
        self.deployments = HubDeployments(self.store, self.clock, self.publisher,
                                          self.config.rollout_tick_s)
        self.purges = HubPurges(PurgeStore(self.store.engine), self._nc, self.clock,
                                PurgeMetrics(self.registry))
        processor = HeartbeatProcessor(self.store, self.clock,  # type: ignore[arg-type]
                                       HeartbeatMetrics(self.registry), self.config.policy)

        async def on_heartbeat(msg: Msg) -> None:
            processor.receive(msg.subject, msg.data)

        await self._nc.subscribe(HEARTBEAT_WILDCARD, queue=HUB_QUEUE_GROUP, cb=on_heartbeat,
                                 pending_msgs_limit=500_000)
        api = create_api(self.store, self.enrollment, self,  # type: ignore[arg-type]
                         self.admin_token, self.registry)
        cert, key = self._tls_files(host)
        async with serve_http(api, host, port, tls_cert=cert, tls_key=key) as bound:
            scheme = "https" if cert is not None else "http"
            self.api_url = f"{scheme}://{'127.0.0.1' if is_wildcard(host) else host}:{bound}"
            (self.data_dir / "nats.url").write_text(self.nats_urls[0] + "\n")
            write_private(self.data_dir / "hub.url", self.api_url + "\n")
            log.info("hub API on %s, NATS at %s", self.api_url, self.nats_urls[0])
            self.ready.set()
            async with asyncio.TaskGroup() as group:
                group.create_task(supervise("heartbeat intake",
                                            lambda: self._intake_loop(processor)))
                group.create_task(supervise("collection merge", self.sync.run_merge))
                group.create_task(supervise("stream ingest", ingest.run))
                group.create_task(supervise("rollouts", self.deployments.run))
                group.create_task(supervise("snapshots", self.sync.run_snapshots))
                group.create_task(supervise("cache purges", self.purges.run))
                group.create_task(supervise("collection declarations",
                                            self.sync.run_declarations))
                group.create_task(supervise(
                    "tombstone collection",
                    lambda: self.sync.run_gc(self.config.tombstone_gc_interval_s)))

