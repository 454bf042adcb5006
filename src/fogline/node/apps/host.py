"""The node's side of app workers' writes: each `Rpc` becomes a durable local write.

A worker may only touch what its manifest declares; the worker checks that too, but
the node is the one that owns the state, so it checks again. `cache.*` and `fetch` go
to the node-wide `AppCache` under this app's name, which is what keeps one app's keys
out of another's reach.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fogline.core.hlc import Hlc
from fogline.errors import ConfigError, FoglineError
from fogline.node.collections import NodeCollections
from fogline.node.outbox import Outbox

if TYPE_CHECKING:
    from fogline.node.app_cache import AppCache

CACHE_OPS = frozenset({"cache.get", "cache.put", "cache.delete", "fetch"})


class AppServices:
    """Collections, streams and the app cache, as one app's workers may use them."""

    def __init__(self, app: str, collections: Mapping[str, str], streams: frozenset[str],
                 get_collections: Callable[[], NodeCollections],
                 get_outbox: Callable[[], Outbox], app_cache: AppCache | None = None) -> None:
        self.app = app
        self.collections = collections
        self.streams = streams
        self._get_collections = get_collections
        self._get_outbox = get_outbox
        self._app_cache = app_cache

    def _collection(self, name: Any) -> Any:
        if name not in self.collections:
            raise ConfigError(f"app {self.app!r} did not declare collection {name!r}")
        return self._get_collections().collection(name)

    async def call(self, op: str, args: list[Any]) -> Any:
        try:
            if op in CACHE_OPS:
                return await self._cache_call(op, args)
            if op == "emit":
                stream, record = args
                if stream not in self.streams:
                    raise ConfigError(f"app {self.app!r} did not declare stream {stream!r}")
                return await self._get_outbox().emit(stream, record)
            collection = self._collection(args[0])
            if op == "put":
                await collection.put_encoded(args[1], _bytes(args[2]))
            elif op == "cas":
                expected = Hlc(*args[2]) if args[2] is not None else None
                return await collection.compare_and_put(args[1], expected, _bytes(args[3]))
            elif op == "delete":
                await collection.delete(args[1])
            elif op == "incr":
                await collection.incr(args[1])
            elif op == "add":
                await collection.add_encoded(_bytes(args[1]))
            elif op == "remove":
                await collection.remove_encoded(_bytes(args[1]))
            else:
                raise ConfigError(f"unknown operation {op!r}")
        except (ValueError, TypeError, IndexError) as exc:
            raise ConfigError(f"malformed {op!r} request: {exc}") from exc
        return None

    async def _cache_call(self, op: str, args: list[Any]) -> Any:
        cache = self._app_cache
        if cache is None:
            raise ConfigError("this node has no app cache")
        if op == "cache.get":
            (key,) = args
            return cache.get(self.app, key)
        if op == "cache.put":
            key, value, ttl_s, tags = args
            return cache.put(self.app, key, value, ttl_s, tags)
        if op == "cache.delete":
            (key,) = args
            return cache.delete(self.app, key)
        url, method, headers, body = args
        return await cache.fetch(self.app, url, method, headers, body)


def _bytes(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise ConfigError(f"expected encoded bytes, got {type(value).__name__}")
    return value


def error_fields(exc: BaseException) -> tuple[str, str]:
    """(kind, message) for an RpcReply: fogline errors keep their class."""
    if isinstance(exc, FoglineError):
        return type(exc).__name__, str(exc)
    return "FoglineError", f"{type(exc).__name__}: {exc}"
