"""The node-wide app cache behind `ctx.cache` and `ctx.fetch` (issue 7, edge cache).

One `CacheStore` (`DATA/cache/_apps.db`; the underscore keeps it apart from every
`kind: Site` store, whose names cannot start with one) holds both:

- app entries under `app://<app>/<key>` (see `fogline.node.apps.cache_rules`), with
  their tags and an expiry in the metadata. An expired entry is never served; it stays
  until a put replaces it or the LRU evicts it (deleting it on read would block the
  loop on a disk commit).
- fetched responses under their normalised URL, stored by one `CacheProxy` per origin
  (all the RFC 9111 logic: freshness, Vary, validation with 304, no-store,
  stale-while-revalidate, stale-if-error, collapsing of concurrent misses). `fetch`
  drives the proxy as the ASGI app it is, with the URL's host as Host, so a fetched
  URL and a Site request for it have the same key and a purge by URL finds both.

This module runs in the agent's event loop only (the store's single owner thread), and
every worker of every app goes through it, so collapsing works across them all. The
store opens on first use: a node without apps pays nothing; the fleet purge reaching
`store` opens it, which is harmless.

Limits: `ORIGINS_MAX` proxies (the least recently used idle one is closed to make
room), `FETCHES_MAX` fetches in flight, `FETCH_TIMEOUT_S` per fetch, the response body
cap of `cache_rules`. One httpx pool serves every origin; redirects are not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from fogline.clock import Clock
from fogline.errors import ConfigError, RetryableError
from fogline.node.apps.cache_rules import (
    FETCH_RESPONSE_BYTES_MAX,
    EntryMeta,
    FetchRequest,
    check_encoded,
    check_fetch,
    check_key,
    check_tags,
    check_ttl,
    decode_meta,
    encode_meta,
    is_live,
    store_key,
)

if TYPE_CHECKING:  # the cache (httpx among it) loads with the first use, not before
    import httpx

    from fogline.node.cache_proxy import CacheProxy
    from fogline.node.cache_store import CacheStore

MEMORY_BYTES_MAX = 32 * 1024**2
DISK_BYTES_MAX = 256 * 1024**2
ORIGINS_MAX = 64
FETCHES_MAX = 256
FETCH_TIMEOUT_S = 30.0
ORIGIN_TIMEOUT_S = 10.0  # each of connect, read, write and pool wait
POOL_CONNECTIONS_MAX = 100
POOL_KEEPALIVE_MAX = 20

# [status, [[name, value], ...], body, x_cache]: what the `fetch` RPC answers.
FetchReply = list[Any]


class _TooLarge(Exception):
    """The response body passed FETCH_RESPONSE_BYTES_MAX (raised from the ASGI send)."""


class AppCache:
    """`ctx.cache` and `ctx.fetch` for every app of the node. See the module docstring."""

    def __init__(self, path: Path, clock: Clock, *, memory_bytes_max: int = MEMORY_BYTES_MAX,
                 disk_bytes_max: int = DISK_BYTES_MAX, origins_max: int = ORIGINS_MAX,
                 fetches_max: int = FETCHES_MAX, fetch_timeout_s: float = FETCH_TIMEOUT_S,
                 origin_timeout_s: float = ORIGIN_TIMEOUT_S) -> None:
        self.path = path
        self.clock = clock
        self._budgets = (memory_bytes_max, disk_bytes_max)
        self._origins_max = origins_max
        self._fetches_max = fetches_max
        self._fetch_timeout_s = fetch_timeout_s
        self._origin_timeout_s = origin_timeout_s
        self._store: CacheStore | None = None
        self._client: httpx.AsyncClient | None = None
        self._proxies: OrderedDict[str, CacheProxy] = OrderedDict()
        self._busy: Counter[str] = Counter()  # origin -> fetches using its proxy
        self._fetching = 0
        self._closed = False
        # (app, call, result) -> calls: get hit|miss, put ok, delete deleted|absent,
        # fetch <X-Cache in lower case>; the node's /metrics shows them.
        self.counts: Counter[tuple[str, str, str]] = Counter()
        # Called with the store when it opens (fleet purges catch it up).
        self.on_open: Callable[[CacheStore], None] | None = None

    @property
    def opened(self) -> CacheStore | None:
        """The store if it is open, without opening it."""
        return None if self._closed else self._store

    @property
    def store(self) -> CacheStore:
        """The store, opened on first use (ConfigError once closed)."""
        if self._closed:
            raise ConfigError("the app cache is closed")
        if self._store is None:
            from fogline.node.cache_store import CacheStore

            self._store = CacheStore(self.path, *self._budgets, self.clock)
            if self.on_open is not None:
                self.on_open(self._store)
        return self._store

    # ctx.cache ------------------------------------------------------------------------

    def get(self, app: str, key: object) -> bytes | None:
        entry = self.store.get(store_key(app, check_key(key)))
        live = entry is not None and is_live(decode_meta(entry.metadata), self.clock.now())
        self.counts[app, "get", "hit" if live else "miss"] += 1
        return entry.body if entry is not None and live else None

    def put(self, app: str, key: object, value: object, ttl_s: object,
            tags: object) -> None:
        from fogline.node.cache_store import Entry

        now_s = self.clock.now()
        entry = Entry(store_key(app, check_key(key)), "",
                      encode_meta(EntryMeta(now_s + check_ttl(ttl_s))), check_encoded(value),
                      check_tags(tags), now_s)
        self.store.put(entry)
        self.counts[app, "put", "ok"] += 1

    def delete(self, app: str, key: object) -> bool:
        deleted = self.store.delete(store_key(app, check_key(key))) > 0
        self.counts[app, "delete", "deleted" if deleted else "absent"] += 1
        return deleted

    # ctx.fetch ------------------------------------------------------------------------

    async def fetch(self, app: str, url: object, method: object = "GET",
                    headers: object = None, body: object = None) -> FetchReply:
        """The response to the request, through the cache; ConfigError for a request
        `ctx.fetch` does not send or a body over the cap, RetryableError when the origin
        did not answer (and nothing stored could stand in) or too much is in flight."""
        request = check_fetch(url, method, headers, body)
        if self._fetching >= self._fetches_max:
            raise RetryableError(f"{self._fetching} fetches in flight on this node, the "
                                 "most it runs at once", delay_s=0.1)
        self._fetching += 1
        origin = request.origin
        try:
            proxy, evicted = self._acquire(origin)
            try:
                if evicted is not None:
                    await evicted.aclose()
                async with asyncio.timeout(self._fetch_timeout_s):
                    reply = await _exchange(proxy, request)
            finally:
                self._busy[origin] -= 1
                if not self._busy[origin]:
                    del self._busy[origin]
        except TimeoutError as exc:
            raise RetryableError(f"fetch {request.url} took longer than "
                                 f"{self._fetch_timeout_s} s") from exc
        finally:
            self._fetching -= 1
        self.counts[app, "fetch", reply[3].lower()] += 1
        return reply

    def _acquire(self, origin: str) -> tuple[CacheProxy, CacheProxy | None]:
        """The origin's proxy, marked busy; and the idle one evicted to make room."""
        proxy = self._proxies.get(origin)
        evicted = None
        if proxy is not None:
            self._proxies.move_to_end(origin)
        else:
            if len(self._proxies) >= self._origins_max:
                idle = next((o for o in self._proxies if not self._busy[o]), None)
                if idle is None:
                    raise RetryableError(f"fetches to {len(self._proxies)} origins in "
                                         "flight, the most this node keeps", delay_s=0.1)
                evicted = self._proxies.pop(idle)
            proxy = self._open_proxy(origin)
            self._proxies[origin] = proxy
        self._busy[origin] += 1
        return proxy, evicted

    def _open_proxy(self, origin: str) -> CacheProxy:
        import httpx

        from fogline.node.cache_proxy import CacheProxy

        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._origin_timeout_s), follow_redirects=False,
                limits=httpx.Limits(max_connections=POOL_CONNECTIONS_MAX,
                                    max_keepalive_connections=POOL_KEEPALIVE_MAX))
        return CacheProxy(origin, self.store, self.clock, client=self._client,
                          max_object_bytes=FETCH_RESPONSE_BYTES_MAX)

    # Lifecycle ------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        return {"origins": len(self._proxies), "fetching": self._fetching}

    async def aclose(self) -> None:
        """Close every proxy (their background revalidations), the pool and the store."""
        if self._closed:
            return
        self._closed = True
        proxies = list(self._proxies.values())
        self._proxies.clear()
        await asyncio.gather(*(p.aclose() for p in proxies), return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        if self._store is not None:
            await asyncio.to_thread(self._store.close)  # finishes queued disk writes


async def _exchange(proxy: CacheProxy, request: FetchRequest) -> FetchReply:
    """Send `request` through `proxy` as an ASGI call and collect the response."""
    path, _, query = request.target.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": request.method, "scheme": request.scheme, "root_path": "",
             "path": unquote(path), "raw_path": path.encode("latin-1"),
             "query_string": query.encode("latin-1"), "server": None, "client": None,
             "headers": [(b"host", request.netloc.encode("latin-1")),
                         *((n.encode("latin-1"), v.encode("latin-1"))
                           for n, v in request.headers)]}
    body_sent = False
    start: dict[str, Any] = {}
    chunks: list[bytes] = []
    size = 0

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if body_sent:
            return {"type": "http.disconnect"}
        body_sent = True
        return {"type": "http.request", "body": request.body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal size
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > FETCH_RESPONSE_BYTES_MAX:
                raise _TooLarge
            chunks.append(chunk)

    try:
        await proxy(scope, receive, send)
    except _TooLarge:
        raise ConfigError(f"the response from {request.url} is larger than "
                          f"{FETCH_RESPONSE_BYTES_MAX} bytes, the most ctx.fetch "
                          "returns") from None
    return _reply(request, start["status"], start["headers"], b"".join(chunks))


def _reply(request: FetchRequest, status: int, raw: Sequence[tuple[bytes, bytes]],
           body: bytes) -> FetchReply:
    headers = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in raw]
    # The proxy appends its own X-Cache last (an origin may send one of its own).
    ours = max((i for i, (n, _) in enumerate(headers) if n == "x-cache"), default=None)
    x_cache = headers.pop(ours)[1] if ours is not None else "MISS"
    if ours is None or x_cache == "ERROR":
        # The proxy answered for itself: the origin failed (ERROR), or only-if-cached.
        reason = ""
        with contextlib.suppress(ValueError, AttributeError):
            reason = str(json.loads(body).get("error", ""))
        if status in (502, 504) and reason.startswith("origin "):
            raise RetryableError(f"fetch {request.url}: {reason}")
        return [status, headers, body, "MISS"]
    return [status, headers, body, x_cache]
