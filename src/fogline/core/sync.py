"""Collection sync messages and the rules for who receives what.

Nodes send their local ops to the hub as `StateBatch`es; the hub merges them and fans
changed ops out as `FanoutBatch`es on one subject per replica scope. Which replica an op
belongs to is decided here, purely: a `global` collection has one replica, a `region`
collection one per region, a `node` collection one per node (kept on that node and
backed up at the hub).

Apps declare the collections they use; a node asks the hub to create them with a
`DeclareCollections` request on its own `declare_subject` and gets a `DeclareResult`.
"""

from __future__ import annotations

import re

import msgspec

from fogline.core.crdt import COLLECTION_TYPES, SCOPES, CollectionType, Op, Scope
from fogline.errors import ConfigError, ProtocolError

SYNC_VERSION = 1
MAX_BATCH_BYTES = 512 * 1024
# One app manifest's worth of declarations, with room to spare.
DECLARE_DEFS_MAX = 256
DECLARE_BYTES_MAX = 64 * 1024
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class CollectionDef(msgspec.Struct, frozen=True, array_like=True):
    name: str
    type: CollectionType
    scope: Scope


class StateBatch(msgspec.Struct, frozen=True, tag="sb"):
    """Ops a node wrote locally, in its commit order; seq numbers are the node's."""

    origin: str
    seq_first: int
    seq_last: int
    ops: list[tuple[str, Op]]
    v: int = SYNC_VERSION


class FanoutBatch(msgspec.Struct, frozen=True, tag="fb"):
    """Definitions and merged ops the hub sends to every replica of a scope, and the
    horizon below which that replica's tombstones may be dropped (0: none)."""

    defs: list[CollectionDef] = []
    ops: list[tuple[str, Op]] = []
    gc_before_ms: int = 0
    v: int = SYNC_VERSION


class Snapshot(msgspec.Struct, frozen=True, tag="snap"):
    """The hub's state of every replica a node holds, to bootstrap or catch up."""

    defs: list[CollectionDef]
    ops: list[tuple[str, Op]]
    # The fan-out stream sequence the node's consumer resumes after.
    resume_after_seq: int
    v: int = SYNC_VERSION


class DeclareCollections(msgspec.Struct, frozen=True, tag="decl"):
    """A node asks the hub to create the collections its apps declare."""

    defs: list[CollectionDef]
    v: int = SYNC_VERSION


class DeclareResult(msgspec.Struct, frozen=True, tag="declr"):
    """The hub's answer: names it created, names that already existed alike, and why
    the others were refused (each refused definition changed nothing)."""

    created: list[str] = []
    existing: list[str] = []
    errors: list[str] = []
    v: int = SYNC_VERSION


SyncMessage = StateBatch | FanoutBatch | Snapshot | DeclareCollections | DeclareResult
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SyncMessage)


def encode_sync(message: SyncMessage) -> bytes:
    return _encoder.encode(message)


def decode_sync(data: bytes, limit_bytes: int = 64 * MAX_BATCH_BYTES) -> SyncMessage:
    if len(data) > limit_bytes:
        raise ProtocolError(f"sync message of {len(data)} bytes exceeds {limit_bytes}")
    try:
        message = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed sync message: {exc}") from exc
    if message.v != SYNC_VERSION:
        raise ProtocolError(f"unsupported sync version {message.v}")
    return message


def check_definition(name: str, kind: str, scope: str) -> CollectionDef:
    if not _NAME.match(name):
        raise ConfigError(f"invalid collection name {name!r}: lowercase letters, digits, "
                          "'-' and '_', at most 63")
    if kind not in COLLECTION_TYPES:
        raise ConfigError(f"collection type must be one of {', '.join(COLLECTION_TYPES)}")
    if scope not in SCOPES:
        raise ConfigError(f"collection scope must be one of {', '.join(SCOPES)}")
    return CollectionDef(name, kind, scope)  # type: ignore[arg-type]


def replica_key(scope: Scope, region: str, node_id: str) -> str:
    """Which replica of a collection a node's op lands in."""
    if scope == "global":
        return "global"
    if scope == "region":
        return f"region.{region or 'none'}"
    return f"node.{node_id}"


def replica_scope(key: str) -> Scope:
    """The scope of the collections a replica key holds."""
    return key.split(".", 1)[0]  # type: ignore[return-value]


def fanout_subject(key: str) -> str:
    return f"fl.state.{key}"


def node_fanout_subjects(region: str, node_id: str) -> list[str]:
    """Every fan-out subject a node consumes: its region's, its own and the global one."""
    return [fanout_subject("global"), fanout_subject(f"region.{region or 'none'}"),
            fanout_subject(f"node.{node_id}")]


def state_subject(node_id: str) -> str:
    return f"fl.node.{node_id}.state"


def snapshot_subject(node_id: str) -> str:
    return f"fl.node.{node_id}.req.snapshot"


def declare_subject(node_id: str) -> str:
    return f"fl.node.{node_id}.declare"


DECLARE_WILDCARD = "fl.node.*.declare"


def refused_collections(declared: list[CollectionDef],
                        result: DeclareResult) -> dict[str, str]:
    """The declared collections the hub neither created nor found alike, each with the
    hub's error that names it (the node stops the apps that use them)."""
    accepted = set(result.created) | set(result.existing)
    return {d.name: next((e for e in result.errors if repr(d.name) in e), "refused")
            for d in declared if d.name not in accepted}


def check_declaration(defs: list[CollectionDef],
                      known: dict[str, CollectionDef]) -> tuple[list[CollectionDef], list[str],
                                                                list[str]]:
    """Plan a declaration against the collections that exist, definition by definition:
    (to create, names that exist alike, errors). An invalid definition, one that
    conflicts with an existing collection or one declared twice differently is reported
    and left out; the rest go ahead, so one app's mistake does not hold back the
    collections of the node's other apps. Pure; an oversize declaration is refused whole.
    """
    if len(defs) > DECLARE_DEFS_MAX:
        return [], [], [f"{len(defs)} collections in one declaration; at most "
                        f"{DECLARE_DEFS_MAX}"]
    wanted: dict[str, CollectionDef] = {}
    twice: set[str] = set()
    errors: list[str] = []
    for d in defs:
        try:
            d = check_definition(d.name, d.type, d.scope)
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        first = wanted.setdefault(d.name, d)
        if first != d and d.name not in twice:
            twice.add(d.name)
            errors.append(f"collection {d.name!r} is declared both as {first.type}/"
                          f"{first.scope} and as {d.type}/{d.scope}")
    create: list[CollectionDef] = []
    existing: list[str] = []
    for name, d in wanted.items():
        if name in twice:
            continue
        other = known.get(name)
        if other is None:
            create.append(d)
        elif (other.type, other.scope) == (d.type, d.scope):
            existing.append(name)
        else:
            errors.append(f"collection {name!r} exists as {other.type}/{other.scope}, "
                          f"not {d.type}/{d.scope}; type and scope cannot change")
    return create, existing, errors
