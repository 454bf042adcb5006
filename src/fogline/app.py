"""The App SDK: what user code imports to run on a fogline node.

```python
from fogline import App
app = App("factory")

@app.route("GET", "/machines/{machine}")
async def machine(req, ctx): ...          # -> dict | list | str | bytes | None | Response

@app.on_topic("factory/+/vibration", codec="json")
async def vibration(msg, ctx): ...        # msg.topic, msg.payload, msg.received_at

@app.every("10s")
async def flush(ctx): ...
```

Decorators validate at import time, so a bad app fails to load with a `ConfigError`
instead of failing on its first request. This module is pure: the node's runtime owns
sockets, processes and the event loop and calls `match_route`, `handlers_for_topic`,
`decode_message` and `to_response`. Apps see the node only through `Context`, a
Protocol, so they never import node internals. Sync handlers are allowed; `is_async`
tells the runtime to run them off the event loop.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, Protocol, TypeVar

import msgspec

from fogline.core.approutes import (
    MethodNotAllowed,
    RouteMatch,
    RouteTable,
    Schedule,
    check_method,
    check_topic_filter,
    parse_interval,
    parse_path_template,
    topic_matches,
)
from fogline.errors import ConfigError, ProtocolError

__all__ = [
    "App",
    "AppLogger",
    "CollectionHandle",
    "Context",
    "Message",
    "MethodNotAllowed",
    "NodeInfo",
    "Request",
    "Response",
    "RouteHandler",
    "RouteMatch",
    "ScheduleHandler",
    "TopicHandler",
    "decode_message",
    "decode_payload",
    "to_response",
    "topic_matches",
]

Codec = Literal["json", "msgpack", "raw"]
CODECS: tuple[str, ...] = ("json", "msgpack", "raw")
APP_NAME_CHARS_MAX = 63
PAYLOAD_BYTES_MAX = 1024 * 1024
TOPIC_CACHE_MAX = 4096

_APP_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_json_decoder = msgspec.json.Decoder()
_msgpack_decoder = msgspec.msgpack.Decoder()
_json_encoder = msgspec.json.Encoder()

F = TypeVar("F", bound=Callable[..., Any])


# Data ---------------------------------------------------------------------------------

def _frozen_mapping(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class Request:
    """An HTTP request as a route handler sees it. Header names are lower-case; a query
    key given twice keeps its last value."""

    method: str
    path: str
    path_params: Mapping[str, str] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def __post_init__(self) -> None:
        for name in ("path_params", "query", "headers"):
            object.__setattr__(self, name, _frozen_mapping(getattr(self, name)))

    def json(self) -> Any:
        """The body decoded as JSON; ProtocolError (HTTP 400 at the front) if it is not."""
        try:
            return _json_decoder.decode(self.body)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"request body is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class Response:
    """An HTTP response; handlers may also return plain values (see `to_response`)."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    media_type: str = "text/plain; charset=utf-8"

    def __post_init__(self) -> None:
        if isinstance(self.status, bool) or not isinstance(self.status, int) \
                or not 100 <= self.status <= 599:
            raise ConfigError(f"response status must be an integer 100-599, got "
                              f"{self.status!r}")
        if not isinstance(self.body, bytes):
            raise ConfigError(f"response body must be bytes, got {type(self.body).__name__}")
        object.__setattr__(self, "headers", _frozen_mapping(self.headers))

    @classmethod
    def json(cls, content: Any, status: int = 200,
             headers: Mapping[str, str] | None = None) -> Response:
        try:
            body = _json_encoder.encode(content)
        except (TypeError, msgspec.EncodeError) as exc:
            raise ConfigError(f"response content cannot be encoded as JSON: {exc}") from exc
        return cls(status, body, headers or {}, "application/json")

    @classmethod
    def text(cls, content: str, status: int = 200,
             headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, content.encode(), headers or {}, "text/plain; charset=utf-8")

    @classmethod
    def binary(cls, content: bytes, status: int = 200,
               headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, bytes(content), headers or {}, "application/octet-stream")


@dataclass(frozen=True)
class Message:
    """A device message for a topic handler; `payload` is decoded per the handler's
    codec, `raw` is the bytes as received, `received_at` the node clock's wall time."""

    topic: str
    payload: Any
    raw: bytes
    received_at: float
    qos: int = 0


@dataclass(frozen=True)
class NodeInfo:
    """The node an app runs on."""

    id: str
    region: str
    tier: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _frozen_mapping(self.labels))


# What apps see of the node --------------------------------------------------------------

class CollectionHandle(Protocol):
    """A replicated collection (`fogline.node.collections.Collection` implements it).
    Reads are local and synchronous; writes are durable when they return."""

    name: str

    def get(self, key: str, default: Any = None) -> Any: ...
    def items(self, prefix: str = "") -> list[tuple[str, Any]]: ...
    async def put(self, key: str, value: Any) -> None: ...
    async def delete(self, key: str) -> None: ...
    async def update(self, key: str, fn: Callable[[Any], Any]) -> Any: ...
    async def incr(self, amount: int = 1) -> None: ...
    async def decr(self, amount: int = 1) -> None: ...
    def value(self) -> Any: ...
    async def add(self, elem: Any) -> None: ...
    async def remove(self, elem: Any) -> None: ...
    def contains(self, elem: Any) -> bool: ...


class AppLogger(Protocol):
    """Structured logging: an event name plus fields (`ctx.log.info("flushed", n=3)`)."""

    def debug(self, event: str, **fields: Any) -> None: ...
    def info(self, event: str, **fields: Any) -> None: ...
    def warning(self, event: str, **fields: Any) -> None: ...
    def error(self, event: str, **fields: Any) -> None: ...


class CacheHandle(Protocol):
    """`ctx.cache`: this app's keys in the node's app cache (no other app sees them).
    Values are bytes, str or JSON-like and come back as the same type; `put` needs a
    TTL in seconds (at most 30 days); a purge of any of its `tags` removes an entry."""

    async def get(self, key: str) -> Any: ...
    async def put(self, key: str, value: Any, ttl: float | None = None,
                  tags: tuple[str, ...] | list[str] | frozenset[str] = ()) -> None: ...
    async def delete(self, key: str) -> bool: ...


class FetchedResponse(Protocol):
    """What `ctx.fetch` answers; `x_cache` is the node cache's verdict (HIT, MISS,
    STALE, REVALIDATED, STALE-IF-ERROR, PASS), `hit` whether the body came from it."""

    @property
    def url(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Mapping[str, str]: ...
    @property
    def body(self) -> bytes: ...
    @property
    def x_cache(self) -> str: ...
    @property
    def hit(self) -> bool: ...
    @property
    def ok(self) -> bool: ...
    @property
    def text(self) -> str: ...
    def json(self) -> Any: ...


class Context(Protocol):
    """Everything a handler may touch on the node; the runtime supplies one per app."""

    @property
    def config(self) -> Mapping[str, Any]: ...
    @property
    def log(self) -> AppLogger: ...
    @property
    def node(self) -> NodeInfo: ...
    def now(self) -> float: ...
    def collection(self, name: str) -> CollectionHandle: ...
    async def emit(self, stream: str, record: Any) -> None: ...
    async def publish(self, topic: str, payload: Any, qos: int = 0) -> None: ...
    @property
    def cache(self) -> CacheHandle: ...
    async def fetch(self, url: str, method: str = "GET",
                    headers: Mapping[str, str] | None = None,
                    body: bytes | str | None = None) -> FetchedResponse: ...


# Handlers -----------------------------------------------------------------------------

RouteFn = Callable[[Request, Context], Any]
TopicFn = Callable[[Message, Context], Any]
ScheduleFn = Callable[[Context], Awaitable[None] | None]


def _is_async(fn: Callable[..., Any]) -> bool:
    if not callable(fn):
        raise ConfigError(f"a handler must be callable, got {fn!r}")
    return inspect.iscoroutinefunction(fn)


@dataclass(frozen=True)
class RouteHandler:
    method: str
    path: str
    fn: RouteFn
    is_async: bool


@dataclass(frozen=True)
class TopicHandler:
    pattern: str
    codec: Codec
    qos: int
    fn: TopicFn
    is_async: bool


@dataclass(frozen=True)
class ScheduleHandler:
    interval_s: float
    fn: ScheduleFn
    is_async: bool

    def schedule(self, start_s: float) -> Schedule:
        """A fresh pure schedule for the runtime to drive with its clock."""
        return Schedule(self.interval_s, start_s)


class App:
    """A named set of HTTP routes, topic handlers and schedules."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or len(name) > APP_NAME_CHARS_MAX \
                or not _APP_NAME.match(name):
            raise ConfigError(f"app name {name!r} must be 1-{APP_NAME_CHARS_MAX} characters "
                              "of a-z, 0-9 and '-', not starting or ending with '-'")
        self.name = name
        self.routes: list[RouteHandler] = []
        self.topics: list[TopicHandler] = []
        self.schedules: list[ScheduleHandler] = []
        self._table: RouteTable[RouteHandler] = RouteTable()
        self._topic_cache: dict[str, tuple[TopicHandler, ...]] = {}

    def __repr__(self) -> str:
        return (f"App({self.name!r}, routes={len(self.routes)}, topics={len(self.topics)}, "
                f"schedules={len(self.schedules)})")

    # Decorators -----------------------------------------------------------------------

    def route(self, method: str, path: str) -> Callable[[F], F]:
        """Serve `method path` (e.g. `"GET", "/machines/{machine}"`) with `fn(req, ctx)`."""
        verb = check_method(method)
        template = parse_path_template(path)

        def register(fn: F) -> F:
            handler = RouteHandler(verb, path, fn, _is_async(fn))
            self._table.add(verb, template, handler)
            self.routes.append(handler)
            return fn

        return register

    def on_topic(self, pattern: str, codec: str = "json", qos: int = 1) -> Callable[[F], F]:
        """Call `fn(msg, ctx)` for each device message whose topic matches `pattern`."""
        check_topic_filter(pattern)
        if codec not in CODECS:
            raise ConfigError(f"codec {codec!r} is not one of {', '.join(CODECS)}")
        if isinstance(qos, bool) or qos not in (0, 1, 2):
            raise ConfigError(f"qos must be 0, 1 or 2, got {qos!r}")

        def register(fn: F) -> F:
            self.topics.append(TopicHandler(pattern, codec, qos, fn,  # type: ignore[arg-type]
                                            _is_async(fn)))
            self._topic_cache.clear()
            return fn

        return register

    def every(self, interval: str | float) -> Callable[[F], F]:
        """Call `fn(ctx)` every `interval` (`"10s"`, `"500ms"`, `"5m"`) on the node clock;
        a run missed during a pause happens once, not once per missed interval."""
        interval_s = parse_interval(interval)

        def register(fn: F) -> F:
            self.schedules.append(ScheduleHandler(interval_s, fn, _is_async(fn)))
            return fn

        return register

    # Dispatch (pure; the runtime calls these) -----------------------------------------

    def match_route(self, method: str,
                    path: str) -> RouteMatch[RouteHandler] | MethodNotAllowed | None:
        """`(handler, path_params)`, `MethodNotAllowed(allowed)` (405) or None (404)."""
        return self._table.match(method.upper(), path)

    def handlers_for_topic(self, topic: str) -> tuple[TopicHandler, ...]:
        """Every handler whose filter matches `topic`, in registration order."""
        cached = self._topic_cache.get(topic)
        if cached is not None:
            return cached
        found = tuple(h for h in self.topics if topic_matches(h.pattern, topic))
        if len(self._topic_cache) >= TOPIC_CACHE_MAX:
            self._topic_cache.clear()  # crude but bounded; device topics repeat a lot
        self._topic_cache[topic] = found
        return found

    def subscriptions(self) -> dict[str, int]:
        """Topic filter -> highest QoS asked for it: what the ingest subscribes to."""
        wanted: dict[str, int] = {}
        for handler in self.topics:
            wanted[handler.pattern] = max(handler.qos, wanted.get(handler.pattern, 0))
        return wanted


# Codecs and return values -------------------------------------------------------------

def decode_payload(codec: str, raw: bytes, bytes_max: int = PAYLOAD_BYTES_MAX) -> Any:
    """Decode a device payload; ProtocolError if it is too big or malformed."""
    if len(raw) > bytes_max:
        raise ProtocolError(f"payload of {len(raw)} bytes exceeds {bytes_max}")
    try:
        if codec == "json":
            return _json_decoder.decode(raw)
        if codec == "msgpack":
            return _msgpack_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"payload is not valid {codec}: {exc}") from exc
    if codec == "raw":
        return bytes(raw)
    raise ConfigError(f"codec {codec!r} is not one of {', '.join(CODECS)}")


def decode_message(handler: TopicHandler, topic: str, raw: bytes, received_at: float,
                   qos: int = 0, bytes_max: int = PAYLOAD_BYTES_MAX) -> Message:
    """The `Message` for `handler`; ProtocolError (naming the topic) if malformed, in
    which case the runtime counts and logs it and does not call the handler."""
    try:
        payload = decode_payload(handler.codec, raw, bytes_max)
    except ProtocolError as exc:
        raise ProtocolError(f"topic {topic!r}: {exc}") from exc
    return Message(topic, payload, bytes(raw), received_at, qos)


def to_response(value: Any) -> Response:
    """A handler's return value as a Response: dict/list -> JSON 200, str -> text 200,
    bytes -> octet-stream 200, None -> 204, Response as is; anything else ConfigError."""
    if isinstance(value, Response):
        return value
    if isinstance(value, dict | list):
        return Response.json(value)
    if isinstance(value, str):
        return Response.text(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return Response.binary(bytes(value))
    if value is None:
        return Response(204, b"", {}, "text/plain; charset=utf-8")
    raise ConfigError(f"a route handler returned {type(value).__name__}; return a dict, "
                      "list, str, bytes, None or fogline.Response")
