"""The node's sites: origins it fronts as a shared cache (`kind: Site`, DESIGN issue 7).

`SiteFront` is a raw ASGI callable in front of the node's AppFront. A request whose
Host (without port, lowercased) is one of a site's `hosts` goes to that site; else one
whose path is a site's path prefix or lies under it (whole segments: `/catalog` takes
`/catalog` and `/catalog/x`, not `/catalogue`; the longest prefix wins). The path is
sent to the origin **as is**, prefix included, so a site's URLs are the origin's URLs
and purges by URL or prefix mean the same thing at the node and at the origin. A site
prefix shadows an app of the same name. Everything else falls through.

Each site has its own `CacheProxy` over a `CacheStore` at `DATA/cache/<site>.db`.
`apply(settings)` is level-based: it schedules a reconcile that closes the proxies of
sites gone or changed (their requests in flight are cancelled) and opens the ones
wanted; reconciles run one at a time in order, and `aclose()` waits for them and closes
every site.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fogline.clock import Clock
from fogline.errors import ConfigError, FoglineError
from fogline.protocol import SiteSetting

if TYPE_CHECKING:  # the cache (httpx among it) loads with the first site, not before
    from fogline.node.cache_proxy import CacheProxy
    from fogline.node.cache_store import CacheStore
    from fogline.node.purges import NodePurges, PurgeTarget

log = logging.getLogger("fogline.node.sites")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SITES_MAX = 64
# How long a request waits for a node that just reconnected to catch up on purges
# before it is passed to the origin instead of served from the cache.
FENCE_WAIT_S = 1.0
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # as fogline.site_spec: a file name


@dataclass(frozen=True)
class _Site:
    setting: SiteSetting
    store: CacheStore
    proxy: CacheProxy

    def purge_target(self) -> PurgeTarget:
        """This site's cache as fleet purges reach it (keys: origin + path)."""
        from fogline.node.purges import PurgeTarget

        base = self.proxy.key_base or ""
        return PurgeTarget(self.store, self.setting.name, base, (base + "/",))

    async def aclose(self) -> None:
        try:
            await self.proxy.aclose()  # its background work and httpx client
        finally:
            await asyncio.to_thread(self.store.close)  # finishes queued disk writes


def origin_base(origin: str) -> str:
    """scheme://host[:port] of an origin URL, normalised as cache keys are: the prefix of
    its site's cache keys, the same on every node."""
    from fogline.core.cachecontrol import origin_of, uri_key

    key = uri_key(origin)
    if key is None:
        raise ConfigError(f"origin URL must be http(s)://..., got {origin!r}")
    return origin_of(key)


def match(sites: dict[str, _Site], host: str, path: str) -> _Site | None:
    """The site serving (host, path): a host match first, then the longest prefix."""
    best: tuple[int, _Site] | None = None
    for site in sites.values():
        if host in site.setting.hosts:
            return site
        for prefix in site.setting.path_prefixes:
            bare = prefix.rstrip("/")
            if (path == bare or path.startswith(bare + "/")) \
                    and (best is None or len(bare) > best[0]):
                best = (len(bare), site)
    return best[1] if best else None


class SiteFront:
    def __init__(self, fallback: ASGIApp, cache_dir: Path, clock: Clock) -> None:
        self.fallback = fallback
        self.cache_dir = cache_dir
        self.clock = clock
        self._sites: dict[str, _Site] = {}
        self._lock = asyncio.Lock()
        self._reconciles: set[asyncio.Task[None]] = set()
        self.purges: NodePurges | None = None  # set by the agent

    @property
    def sites(self) -> dict[str, SiteSetting]:
        return {name: site.setting for name, site in self._sites.items()}

    def caches(self) -> dict[str, tuple[CacheProxy, CacheStore]]:
        """Each served site's proxy and store (for `cache_metrics.CacheCollector`)."""
        return {name: (site.proxy, site.store) for name, site in self._sites.items()}

    def purge_targets(self) -> list[PurgeTarget]:
        return [site.purge_target() for site in self._sites.values()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._sites:
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            host = host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host
            site = match(self._sites, host.lower(), scope["path"])
            if site is not None:
                if self.purges is not None and self.purges.fenced \
                        and not await self.purges.wait_caught_up(FENCE_WAIT_S):
                    scope = {**scope, "fogline.cache_bypass": True}
                await site.proxy(scope, receive, send)
                return
        await self.fallback(scope, receive, send)

    def apply(self, settings: tuple[SiteSetting, ...]) -> None:
        """Make the served sites match `settings`, soon (in a task: closing awaits)."""
        task = asyncio.get_running_loop().create_task(self.reconcile(settings))
        self._reconciles.add(task)
        task.add_done_callback(self._reconciles.discard)

    async def reconcile(self, settings: tuple[SiteSetting, ...]) -> None:
        wanted = {s.name: s for s in settings[:SITES_MAX]}
        async with self._lock:
            for name, site in list(self._sites.items()):
                if wanted.get(name) != site.setting:
                    del self._sites[name]  # no new requests from here on
                    await site.aclose()
                    log.info("site %s closed", name)
            for name, setting in wanted.items():
                if name in self._sites:
                    continue
                try:
                    self._sites[name] = self._open(setting)
                except FoglineError as exc:
                    log.error("site %s from the hub not served: %s", name, exc)
                    continue
                log.info("site %s serving %s from %s", name,
                         ", ".join((*setting.hosts, *setting.path_prefixes)), setting.origin)

    def _open(self, setting: SiteSetting) -> _Site:
        if not _NAME.match(setting.name):
            raise ConfigError(f"invalid site name {setting.name!r}")
        from fogline.core.cachepolicy import CacheConfig
        from fogline.node.cache_proxy import CacheProxy
        from fogline.node.cache_proxy_origin import OriginTls
        from fogline.node.cache_store import CacheStore

        store = CacheStore(self.cache_dir / f"{setting.name}.db", setting.memory_bytes,
                           setting.disk_bytes, self.clock)
        try:
            proxy = CacheProxy(setting.origin, store, self.clock,
                               CacheConfig(stale_if_error_s=setting.stale_if_error_s),
                               key_base=origin_base(setting.origin),
                               origin_tls=OriginTls(setting.tls_verify, setting.tls_ca_file,
                                                    setting.tls_server_name))
            site = _Site(setting, store, proxy)
            if self.purges is not None:  # purges it missed while it was not served
                self.purges.opened(site.purge_target())
        except FoglineError:
            store.close()
            raise
        return site

    async def aclose(self) -> None:
        """Wait for pending reconciles, then close every site."""
        await asyncio.gather(*self._reconciles, return_exceptions=True)
        async with self._lock:
            sites, self._sites = list(self._sites.values()), {}
            for site in sites:
                await site.aclose()
