"""Wire messages between nodes and the hub, and the subjects they travel on.

Messages are msgspec Structs encoded as msgpack. Every message carries a version `v`;
decoders reject unknown versions and payloads above `MAX_MESSAGE_BYTES`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, NewType

import msgspec

from fogline.errors import ProtocolError

NodeId = NewType("NodeId", str)

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
HUB_QUEUE_GROUP = "fl-hub"

Status = Literal["ready", "degraded", "quarantined", "offline", "revoked"]
STATUSES: tuple[str, ...] = ("ready", "degraded", "quarantined", "offline", "revoked")
Tier = Literal["device", "near", "far", "cloud"]
TIERS: tuple[str, ...] = ("device", "near", "far", "cloud")
AppState = Literal["starting", "running", "restarting", "failed", "stopped"]
APP_STATES: tuple[str, ...] = ("starting", "running", "restarting", "failed", "stopped")
# A heartbeat reporting more apps is refused. A longer reason is cut, not refused: an
# app's error text must never cost its node its liveness at the hub.
APPS_PER_NODE_MAX = 256
APP_REASON_CHARS_MAX = 1000

# Node ids become subject tokens: no '.', '*', '>' or whitespace.
_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def valid_node_id(text: str) -> bool:
    return bool(_NODE_ID.match(text))


# Subjects -------------------------------------------------------------------------

def heartbeat_subject(node_id: str) -> str:
    return f"fl.node.{node_id}.hb"


HEARTBEAT_WILDCARD = "fl.node.*.hb"


def command_subject(node_id: str) -> str:
    return f"fl.cmd.{node_id}"


def desired_notify_subject(node_id: str) -> str:
    """The hub publishes a node's new DesiredState here (within the node's fl.cmd)."""
    return f"fl.cmd.{node_id}.desired"


def desired_get_subject(node_id: str) -> str:
    """Request/reply: the node asks for its current DesiredState (empty payload)."""
    return f"fl.node.{node_id}.desired"


def artifact_subject(node_id: str) -> str:
    """Request/reply: the node fetches a chunk of a bundle it was told to run."""
    return f"fl.node.{node_id}.artifact"


DESIRED_GET_WILDCARD = "fl.node.*.desired"
ARTIFACT_WILDCARD = "fl.node.*.artifact"

# Purges go to every node at once on one subject; a node that saw a gap in their
# sequence (or reconnected) asks for what it missed, and acknowledges what it applied.
PURGE_SUBJECT = "fl.purge"
PURGES_GET_WILDCARD = "fl.node.*.purges"
PURGED_WILDCARD = "fl.node.*.purged"


def purges_get_subject(node_id: str) -> str:
    """Where a node asks for the purges after the last one it applied."""
    return f"fl.node.{node_id}.purges"


def purged_subject(node_id: str) -> str:
    """Where a node says which purge it has applied, and when."""
    return f"fl.node.{node_id}.purged"
# JetStream buckets of the hub: desired state per node (KV) and bundles (Object Store).
DESIRED_BUCKET = "fl-desired"
ARTIFACT_BUCKET = "fl-artifacts"


def inbox_prefix(node_id: str) -> str:
    return f"_INBOX.{node_id}"


def node_id_from_subject(subject: str) -> str:
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != "fl" or parts[1] != "node":
        raise ProtocolError(f"not a node subject: {subject!r}")
    return parts[2]


# Messages -------------------------------------------------------------------------

class Capabilities(msgspec.Struct, frozen=True):
    cores: int
    memory_bytes: int
    arch: str
    os: str
    gpu: bool
    version: str
    python: str = ""
    accelerators: tuple[str, ...] = ()


class Load(msgspec.Struct, frozen=True):
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    load1: float = 0.0
    rss_bytes: int = 0
    # The node's HTTP front (user traffic, not /healthz or /metrics): requests being
    # served when the heartbeat left, and requests per second since the previous one.
    # Clients and the hub's routing table weigh nodes by them.
    http_inflight: int = 0
    http_rps: float = 0.0


class AppWindow(msgspec.Struct, frozen=True):
    """An app's recent traffic on one node: counts over the last `seconds` and the p99
    of its HTTP handling time; `metrics` are the other counters over the same window
    (timeouts, handler_errors, malformed, ...)."""

    seconds: float
    requests: Annotated[int, msgspec.Meta(ge=0)] = 0
    errors: Annotated[int, msgspec.Meta(ge=0)] = 0
    p99_ms: float = 0.0
    metrics: Annotated[dict[str, float], msgspec.Meta(max_length=32)] = {}


class AppStatus(msgspec.Struct, frozen=True):
    """One app on a node as its supervisor sees it. `reason` says why it is not running
    (e.g. "memory limit 256 MB exceeded"); `since_s` is when it entered `state`."""

    name: Annotated[str, msgspec.Meta(max_length=64)]
    version: Annotated[str, msgspec.Meta(max_length=64)]
    state: AppState
    restarts: Annotated[int, msgspec.Meta(ge=0)] = 0
    reason: str = ""
    since_s: float = 0.0
    # The deployment revision running (0 for an app given to the node locally).
    revision: Annotated[int, msgspec.Meta(ge=0)] = 0
    # What the app served in the last `window_s` seconds: rollout gates read these.
    window: AppWindow | None = None

    def clipped(self) -> AppStatus:
        """This status with `reason` cut to APP_REASON_CHARS_MAX characters."""
        if len(self.reason) <= APP_REASON_CHARS_MAX:
            return self
        return msgspec.structs.replace(self, reason=self.reason[:APP_REASON_CHARS_MAX - 1] + "…")


class BundleRefusal(msgspec.Struct, frozen=True):
    """A deployed revision the node will not run, and why (`code` as in
    fogline.bundle.BundleRejected: unsigned, unknown-key, bad-signature, ...)."""

    app: str
    revision: int
    code: str
    reason: str = ""


class Heartbeat(msgspec.Struct, frozen=True, tag="hb"):
    node_id: str
    seq: int
    sent_at_s: float
    interval_s: float
    version: str
    load: Load = Load()
    # Names of health checks that currently fail; empty means healthy.
    failing_checks: tuple[str, ...] = ()
    uptime_s: float = 0.0
    endpoint: str = ""
    # Round trip to the hub's NATS server measured by the node (PING/PONG), 0 if unknown.
    hub_rtt_ms: float = 0.0
    # The node's HLC (ms) at a moment it had no collection op left to upload; 0 if never.
    # The hub's tombstone collection waits for it (see fogline.core.tombstones).
    sync_clean_hlc_ms: int = 0
    # Every app the node supervises; nodes without apps (or older nodes) send none.
    apps: Annotated[tuple[AppStatus, ...], msgspec.Meta(max_length=APPS_PER_NODE_MAX)] = ()
    # The generation of desired state the node has acted on, and the deployed bundles
    # it refused (it keeps running what it had).
    desired_generation: int = 0
    refusals: Annotated[tuple[BundleRefusal, ...],
                        msgspec.Meta(max_length=APPS_PER_NODE_MAX)] = ()
    # The sequence number of the last cache purge the node applied.
    purge_seq: int = 0
    v: int = PROTOCOL_VERSION


class Command(msgspec.Struct, frozen=True, tag="cmd"):
    """An instruction from the hub to one node (e.g. `revoked`)."""

    kind: str
    reason: str = ""
    v: int = PROTOCOL_VERSION


class DesiredApp(msgspec.Struct, frozen=True):
    """One app a node should run: which revision, and the bundle that holds it."""

    name: str
    revision: int
    version: str
    digest: str
    size: int
    key_id: str
    signature: str


class PublisherKey(msgspec.Struct, frozen=True):
    key_id: str
    public_key: str  # base64 of the raw 32-byte ed25519 key


class StreamSetting(msgspec.Struct, frozen=True):
    """A fleet-wide upstream stream policy (a `kind: Stream` manifest); fields as in
    fogline.core.outbox.StreamPolicy."""

    name: str
    priority: int = 0
    bandwidth_bps: float | None = None
    quota_bytes: int = 0  # 0: the node's default
    overflow: str = "block"


class SiteSetting(msgspec.Struct, frozen=True):
    """An origin this node fronts as a shared cache (a `kind: Site` manifest placed on
    it); see fogline.site_spec."""

    name: str
    origin: str
    hosts: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()
    memory_bytes: int = 64 * 1024 * 1024
    disk_bytes: int = 512 * 1024 * 1024
    stale_if_error_s: float = 0.0
    # The origin connection (https origins): verify its certificate, against this CA
    # file on the node (else the default trust store), with this SNI and checked name.
    tls_verify: bool = True
    tls_ca_file: str | None = None
    tls_server_name: str | None = None


class DesiredState(msgspec.Struct, frozen=True, tag="desired"):
    """Everything the hub wants one node to run. `generation` grows with every change
    for the node, so a node never acts on an older state after a newer one."""

    node_id: str
    generation: int
    apps: tuple[DesiredApp, ...] = ()
    keys: tuple[PublisherKey, ...] = ()
    streams: tuple[StreamSetting, ...] = ()
    sites: tuple[SiteSetting, ...] = ()
    v: int = PROTOCOL_VERSION


# Bundles travel to nodes in chunks well under MAX_MESSAGE_BYTES.
ARTIFACT_CHUNK_BYTES = 512 * 1024


class ArtifactRequest(msgspec.Struct, frozen=True, tag="artifact-get"):
    """A node asks for `ARTIFACT_CHUNK_BYTES` of a bundle from `offset`; the hub serves
    only bundles in that node's desired state."""

    digest: str
    offset: int = 0
    v: int = PROTOCOL_VERSION


class ArtifactChunk(msgspec.Struct, frozen=True, tag="artifact"):
    digest: str
    offset: int
    total: int
    data: bytes = b""
    # Set instead of data when the hub will not serve it (unknown, not yours).
    error: str = ""
    v: int = PROTOCOL_VERSION


class DesiredRequest(msgspec.Struct, frozen=True, tag="desired-get"):
    v: int = PROTOCOL_VERSION


PURGE_VALUES_MAX = 64
PURGES_PER_REPLY_MAX = 1000


class Purge(msgspec.Struct, frozen=True, tag="purge"):
    """Remove cached objects on the nodes: `kind` is tag, url or prefix, `values` what
    to match. An empty `region` (or `site`) means every region (every site)."""

    seq: int
    kind: str
    values: Annotated[tuple[str, ...], msgspec.Meta(max_length=PURGE_VALUES_MAX)]
    issued_at_s: float
    region: str = ""
    site: str = ""
    v: int = PROTOCOL_VERSION


class PurgesRequest(msgspec.Struct, frozen=True, tag="purges-get"):
    after: int
    v: int = PROTOCOL_VERSION


class PurgeLog(msgspec.Struct, frozen=True, tag="purges"):
    """The hub's answer: purges after the asked sequence, oldest first. `reset` says the
    node is too far behind (or never counted): it must empty its caches instead, then
    continue from `last_seq`. `more`: ask again after the last one given."""

    purges: Annotated[tuple[Purge, ...], msgspec.Meta(max_length=PURGES_PER_REPLY_MAX)]
    last_seq: int
    reset: bool = False
    more: bool = False
    v: int = PROTOCOL_VERSION


class PurgeAck(msgspec.Struct, frozen=True, tag="purged"):
    seq: int
    applied_at_s: float
    removed: int = 0
    v: int = PROTOCOL_VERSION


Message = (Heartbeat | Command | DesiredState | ArtifactRequest | ArtifactChunk
           | DesiredRequest | Purge | PurgesRequest | PurgeLog | PurgeAck)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """Decode a wire message, rejecting oversize, malformed and unknown versions."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        message = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed message: {exc}") from exc
    if message.v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {message.v}")
    return message
