"""`ctx` inside an app worker: what a handler may touch on the node.

Reads are local and synchronous: the worker opens the node's `state.db` itself (SQLite
WAL lets readers run beside the node's writer) and decodes rows with the same functions
the node uses. Writes go to the node over the worker's channel as `Rpc` frames and
return once the node has made them durable, so one process owns every write and its
group commit. `update(key, fn)` runs `fn` here and asks the node to compare-and-put;
if another write came first, `fn` runs again on the newer value. `ctx.cache` and
`ctx.fetch` are RPCs to the node's app cache too (`cache_client`).
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from fogline.app import NodeInfo
from fogline.clock import Clock
from fogline.core.sync import CollectionDef
from fogline.errors import (
    ConfigError,
    FoglineError,
    NotFoundError,
    ProtocolError,
    RetryableError,
)
from fogline.node.apps.cache_client import FetchResponse, WorkerCache, fetch
from fogline.node.collections import (
    decode_value,
    decoded_value,
    encode_value,
    read_contains,
    read_map_get,
    read_map_items,
    read_map_row,
    read_state,
)

# Compare-and-put attempts before `update` gives up (only hot keys written by other
# processes at the same moment ever retry).
UPDATE_ATTEMPTS_MAX = 100
_ERRORS: dict[str, type[FoglineError]] = {
    cls.__name__: cls for cls in (ConfigError, NotFoundError, ProtocolError, RetryableError)}

RpcCall = Callable[[str, list[Any]], Awaitable[Any]]


def rpc_error(kind: str, message: str) -> FoglineError:
    """The node's error as the exception the handler would have got in-process."""
    return _ERRORS.get(kind, FoglineError)(message)


class StructuredLog:
    """`ctx.log`: one JSON object per line on stderr, which the node collects."""

    def __init__(self, app: str, level: int = 20, stream: Any = None) -> None:
        self.app = app
        self.level = level
        self._stream = stream or sys.stderr

    def _write(self, level: str, rank: int, event: str, fields: dict[str, Any]) -> None:
        if rank < self.level:
            return
        record = {"ts": round(time.time(), 6), "level": level, "app": self.app,
                  "event": event, **fields}
        self._stream.write(json.dumps(record, default=repr) + "\n")
        self._stream.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self._write("debug", 10, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._write("info", 20, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._write("warning", 30, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._write("error", 40, event, fields)


class StateReader:
    """A read-only connection to the node's `state.db`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.path.exists():
                raise NotFoundError(f"{self.path}: the node has no state yet")
            self._conn = sqlite3.connect(self.path, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA query_only=1")
            self._conn.execute("PRAGMA busy_timeout=5000")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class WorkerCollection:
    """One declared collection as a handler sees it (`CollectionHandle`)."""

    def __init__(self, definition: CollectionDef, reader: StateReader, rpc: RpcCall) -> None:
        self.definition = definition
        self.name = definition.name
        self._reader = reader
        self._rpc = rpc

    def _require(self, kind: str) -> None:
        if self.definition.type != kind:
            raise ConfigError(f"collection {self.name!r} is a {self.definition.type}, "
                              f"not a {kind}")

    # map
    def get(self, key: str, default: Any = None) -> Any:
        self._require("map")
        return read_map_get(self._reader.conn, self.name, key, default)

    def items(self, prefix: str = "") -> list[tuple[str, Any]]:
        self._require("map")
        return read_map_items(self._reader.conn, self.name, prefix)

    async def put(self, key: str, value: Any) -> None:
        self._require("map")
        await self._rpc("put", [self.name, key, encode_value(value)])

    async def delete(self, key: str) -> None:
        self._require("map")
        await self._rpc("delete", [self.name, key])

    async def update(self, key: str, fn: Callable[[Any], Any]) -> Any:
        """Read-modify-write one key; `fn` may run more than once (keep it pure)."""
        self._require("map")
        for _ in range(UPDATE_ATTEMPTS_MAX):
            current = read_map_row(self._reader.conn, self.name, key)
            old = decode_value(current.value) if current and current.value else None
            new = fn(old)
            expected = msgspec.to_builtins(current.ts) if current else None
            if await self._rpc("cas", [self.name, key, expected, encode_value(new)]):
                return new
        raise RetryableError(f"update of {self.name}[{key!r}] lost {UPDATE_ATTEMPTS_MAX} "
                             "races in a row")

    # counter
    async def incr(self, amount: int = 1) -> None:
        self._require("counter")
        await self._rpc("incr", [self.name, amount])

    async def decr(self, amount: int = 1) -> None:
        await self.incr(-amount)

    def value(self) -> Any:
        return decoded_value(self.definition, read_state(self._reader.conn, self.definition))

    # set
    async def add(self, elem: Any) -> None:
        self._require("set")
        await self._rpc("add", [self.name, encode_value(elem)])

    async def remove(self, elem: Any) -> None:
        self._require("set")
        await self._rpc("remove", [self.name, encode_value(elem)])

    def contains(self, elem: Any) -> bool:
        self._require("set")
        return read_contains(self._reader.conn, self.name, encode_value(elem))


Publish = Callable[[str, bytes, int], Awaitable[None]]


def encode_payload(payload: Any) -> bytes:
    """What `ctx.publish` sends: bytes and str as they are, anything else as JSON."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    try:
        return msgspec.json.encode(payload)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ConfigError(f"payload cannot be encoded as JSON: {exc}") from exc


class WorkerContext:
    """The `Context` a worker hands to every handler of its app."""

    def __init__(self, *, config: Mapping[str, Any], node: NodeInfo, clock: Clock,
                 log: StructuredLog, reader: StateReader, rpc: RpcCall,
                 collections: Mapping[str, str], streams: frozenset[str],
                 publish: Publish | None) -> None:
        self._config = config
        self._node = node
        self._clock = clock
        self._log = log
        self._reader = reader
        self._rpc = rpc
        self._declared = collections  # name -> type, from the manifest
        self._streams = streams
        self._publish = publish
        self._handles: dict[str, WorkerCollection] = {}
        self._cache = WorkerCache(rpc)

    @property
    def config(self) -> Mapping[str, Any]:
        return self._config

    @property
    def log(self) -> StructuredLog:
        return self._log

    @property
    def node(self) -> NodeInfo:
        return self._node

    def now(self) -> float:
        return self._clock.now()

    @property
    def cache(self) -> WorkerCache:
        return self._cache

    async def fetch(self, url: str, method: str = "GET",
                    headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
                    body: bytes | str | None = None) -> FetchResponse:
        return await fetch(self._rpc, url, method, headers, body)

    def collection(self, name: str) -> WorkerCollection:
        handle = self._handles.get(name)
        if handle is None:
            kind = self._declared.get(name)
            if kind is None:
                raise ConfigError(f"collection {name!r} is not declared in this app's "
                                  "fogline.yaml (spec.collections)")
            # Scope does not matter to reads and writes here; the node knows it.
            handle = WorkerCollection(CollectionDef(name, kind, "node"),  # type: ignore[arg-type]
                                      self._reader, self._rpc)
            self._handles[name] = handle
        return handle

    async def emit(self, stream: str, record: Any) -> None:
        if stream not in self._streams:
            raise ConfigError(f"stream {stream!r} is not declared in this app's "
                              "fogline.yaml (spec.streams)")
        await self._rpc("emit", [stream, record])

    async def publish(self, topic: str, payload: Any, qos: int = 0) -> None:
        if self._publish is None:
            raise ConfigError("this node has no MQTT broker to publish to")
        if isinstance(qos, bool) or qos not in (0, 1, 2):
            raise ConfigError(f"qos must be 0, 1 or 2, got {qos!r}")
        if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
            raise ConfigError(f"cannot publish to topic {topic!r}: a topic is a non-empty "
                              "string without wildcards")
        await self._publish(topic, encode_payload(payload), qos)
