"""`ctx.cache` and `ctx.fetch` in an app worker: thin clients of the node's app cache.

One process owns the cache: the node agent (`fogline.node.app_cache`). So both go to
it as `Rpc` frames (`cache.get`, `cache.put`, `cache.delete`, `fetch`), which also lets
the agent collapse concurrent misses of every worker of every app into one origin
request. Arguments are checked here first (`cache_rules`), so a bad call raises its
`ConfigError` in the handler without a round trip; the node checks them again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from fogline.errors import ProtocolError
from fogline.node.apps.cache_rules import (
    check_fetch,
    check_key,
    check_tags,
    check_ttl,
    decode_value,
    encode_value,
)

RpcCall = Callable[[str, list[Any]], Awaitable[Any]]

# X-Cache values whose body came from the cache (REVALIDATED: after a 304).
HIT_STATES = frozenset({"HIT", "STALE", "REVALIDATED", "STALE-IF-ERROR"})
_CHARSET = re.compile(r";\s*charset=\"?([\w.:-]+)", re.IGNORECASE)


class WorkerCache:
    """`ctx.cache`: this app's share of the node-wide app cache."""

    def __init__(self, rpc: RpcCall) -> None:
        self._rpc = rpc

    async def get(self, key: str) -> Any:
        """The value stored under `key`, or None (never stored, expired or purged)."""
        data = await self._rpc("cache.get", [check_key(key)])
        return None if data is None else decode_value(data)

    async def put(self, key: str, value: Any, ttl: float | None = None,
                  tags: tuple[str, ...] | list[str] | frozenset[str] = ()) -> None:
        """Store `value` for `ttl` seconds; purging any of `tags` removes it."""
        args = [check_key(key), encode_value(value), check_ttl(ttl), sorted(check_tags(tags))]
        await self._rpc("cache.put", args)

    async def delete(self, key: str) -> bool:
        """Remove `key`; whether there was an entry."""
        return bool(await self._rpc("cache.delete", [check_key(key)]))


@dataclass(frozen=True)
class FetchResponse:
    """What `ctx.fetch` answers. `headers` has lower-case names (a repeated field's
    values joined by ", "; `raw_headers` keeps each line); `x_cache` is the node cache's
    verdict (HIT, MISS, STALE, REVALIDATED, STALE-IF-ERROR or PASS)."""

    url: str
    status: int
    raw_headers: tuple[tuple[str, str], ...]
    body: bytes
    x_cache: str
    headers: Mapping[str, str] = field(init=False)

    def __post_init__(self) -> None:
        joined: dict[str, str] = {}
        for name, value in self.raw_headers:
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
        object.__setattr__(self, "headers", MappingProxyType(joined))

    @property
    def hit(self) -> bool:
        """The body came from the node's cache (possibly after a 304)."""
        return self.x_cache in HIT_STATES

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        """The body decoded with the Content-Type's charset (UTF-8 by default)."""
        found = _CHARSET.search(self.headers.get("content-type", ""))
        try:
            return self.body.decode(found.group(1) if found else "utf-8", errors="replace")
        except LookupError:  # a charset Python does not know
            return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body decoded as JSON; ProtocolError if it is not."""
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise ProtocolError(f"the response from {self.url} is not valid JSON: "
                                f"{exc}") from exc


def fetch_response(url: str, reply: Any) -> FetchResponse:
    """The node's `fetch` reply, [status, [[name, value], ...], body, x_cache]."""
    try:
        status, headers, body, x_cache = reply
        raw = tuple((str(name), str(value)) for name, value in headers)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed fetch reply from the node: {exc}") from exc
    if not isinstance(status, int) or not isinstance(body, bytes) \
            or not isinstance(x_cache, str):
        raise ProtocolError("malformed fetch reply from the node")
    return FetchResponse(url, status, raw, body, x_cache)


async def fetch(rpc: RpcCall, url: str, method: str = "GET",
                headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
                body: bytes | str | None = None) -> FetchResponse:
    """`ctx.fetch`: an HTTP request through the node's shared cache (RFC 9111)."""
    request = check_fetch(url, method, headers, body)
    reply = await rpc("fetch", [request.url, request.method,
                                [list(pair) for pair in request.headers], request.body])
    return fetch_response(request.url, reply)
