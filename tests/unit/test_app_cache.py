"""The node's AppCache in-process: a real CacheStore on disk, real origins over HTTP.

The clock is a ManualClock started at the real time (origins' Date fields are real),
so TTLs and freshness move only when a test advances it. The worker side and the RPC
between are covered by tests/integration/test_app_cache.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fogline.clock import ManualClock
from fogline.core.cachecontrol import uri_key
from fogline.errors import ConfigError, RetryableError
from fogline.node.app_cache import AppCache
from fogline.node.apps.cache_rules import FETCH_RESPONSE_BYTES_MAX, app_prefix, encode_value
from fogline.node.apps.host import AppServices
from fogline.transport.http_server import serve_http

Handler = Callable[[Request, int], Response]


@dataclass
class Origin:
    """An origin whose routes a test sets; it counts every request per path."""

    routes: dict[str, Handler] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0
    url: str = ""

    def app(self) -> Starlette:
        async def handle(request: Request) -> Response:
            n = self.counts[request.url.path] = self.counts.get(request.url.path, 0) + 1
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            handler = self.routes.get(request.url.path)
            return handler(request, n) if handler else Response("not found", 404)

        return Starlette(routes=[Route("/{path:path}", handle,
                                       methods=["GET", "HEAD", "POST"])])

    def static(self, path: str, body: bytes | str, **headers: str) -> None:
        self.routes[path] = lambda _r, _n: Response(
            body, headers={k.replace("_", "-"): v for k, v in headers.items()})


@contextlib.asynccontextmanager
async def open_origin() -> AsyncIterator[Origin]:
    origin = Origin()
    async with serve_http(origin.app(), "127.0.0.1", 0) as port:
        origin.url = f"http://127.0.0.1:{port}"
        yield origin


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start_s=time.time())


@pytest.fixture
async def cache(tmp_path: Path, clock: ManualClock) -> AsyncIterator[AppCache]:
    app_cache = AppCache(tmp_path / "cache" / "_apps.db", clock)
    yield app_cache
    await app_cache.aclose()


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    async with open_origin() as running:
        yield running


# ctx.cache ------------------------------------------------------------------------------

async def test_entries_expire_after_their_ttl(cache: AppCache, clock: ManualClock) -> None:
    cache.put("shop", "k", encode_value({"v": 1}), 10, ["t"])
    assert cache.get("shop", "k") == encode_value({"v": 1})
    clock.advance(9.9)
    assert cache.get("shop", "k") is not None
    clock.advance(0.1)
    assert cache.get("shop", "k") is None
    cache.put("shop", "k", b"\xa1x", 5, [])  # a put after expiry stores afresh
    assert cache.get("shop", "k") == b"\xa1x"


async def test_apps_never_see_each_others_keys(cache: AppCache) -> None:
    cache.put("shop", "k", b"\xa4shop", 60, [])
    assert cache.get("blog", "k") is None
    cache.put("blog", "k", b"\xa4blog", 60, [])
    assert (cache.get("shop", "k"), cache.get("blog", "k")) == (b"\xa4shop", b"\xa4blog")
    assert cache.delete("blog", "k") and not cache.delete("blog", "k")
    assert cache.get("shop", "k") == b"\xa4shop"
    assert {key: n for key, n in cache.counts.items() if key[0] == "blog"} == {
        ("blog", "get", "miss"): 1, ("blog", "get", "hit"): 1, ("blog", "put", "ok"): 1,
        ("blog", "delete", "deleted"): 1, ("blog", "delete", "absent"): 1}


async def test_fleet_purges_reach_app_entries_by_tag_prefix_and_url(
        cache: AppCache, origin: Origin) -> None:
    cache.put("shop", "p1", b"\x01", 60, ["prices"])
    cache.put("shop", "p2", b"\x02", 60, ["stock"])
    cache.put("blog", "p1", b"\x03", 60, ["prices"])
    # Tags are not namespaced per app: one purge clears every app's entries with it.
    assert cache.store.purge_tags({"prices"}) == 2
    assert (cache.get("shop", "p1"), cache.get("shop", "p2"), cache.get("blog", "p1")) \
        == (None, b"\x02", None)
    cache.put("blog", "p1", b"\x03", 60, [])
    assert cache.store.purge_prefix(app_prefix("shop")) == 1
    assert (cache.get("shop", "p2"), cache.get("blog", "p1")) == (None, b"\x03")
    # A fetched response is keyed by its URL and carries the origin's Cache-Tag.
    origin.static("/a", "A", cache_control="max-age=60", cache_tag="prices")
    url = origin.url + "/a"
    assert (await cache.fetch("shop", url))[3] == "MISS"
    assert (await cache.fetch("shop", url))[3] == "HIT"
    key = uri_key(url)
    assert key is not None and cache.store.purge_url(key) == 1
    assert (await cache.fetch("shop", url))[3] == "MISS"
    assert cache.store.purge_tags({"prices"}) == 1
    assert (await cache.fetch("shop", url))[3] == "MISS"


async def test_entries_survive_a_restart_of_the_node(tmp_path: Path,
                                                      clock: ManualClock) -> None:
    first = AppCache(tmp_path / "_apps.db", clock, memory_bytes_max=1024)
    first.put("shop", "k", b"\xa1v", 60, ["t"])
    await first.aclose()
    second = AppCache(tmp_path / "_apps.db", clock)
    try:
        assert second.get("shop", "k") == b"\xa1v"
        assert second.store.purge_tags({"t"}) == 1
    finally:
        await second.aclose()


async def test_the_node_checks_again_what_a_worker_sends(cache: AppCache) -> None:
    with pytest.raises(ConfigError, match="TTL must be > 0"):
        cache.put("shop", "k", b"\xa1v", 0, [])
    with pytest.raises(ConfigError, match="must be bytes"):
        cache.put("shop", "k", "not encoded", 1, [])
    with pytest.raises(ConfigError, match="cache tag"):
        cache.put("shop", "k", b"\xa1v", 1, ["a b"])
    with pytest.raises(ConfigError, match="must not be empty"):
        cache.get("shop", "")
    with pytest.raises(ConfigError, match="http:// or https://"):
        await cache.fetch("shop", "file:///etc/passwd")
    assert cache.get("shop", "k") is None  # nothing was stored


async def test_app_services_route_cache_calls_under_the_apps_name(cache: AppCache) -> None:
    def unused() -> None:
        raise AssertionError("not a collection call")

    shop = AppServices("shop", {}, frozenset(), unused, unused, cache)  # type: ignore[arg-type]
    blog = AppServices("blog", {}, frozenset(), unused, unused, cache)  # type: ignore[arg-type]
    await shop.call("cache.put", ["k", b"\xa1v", 60, ["t"]])
    assert await shop.call("cache.get", ["k"]) == b"\xa1v"
    assert await blog.call("cache.get", ["k"]) is None
    assert await shop.call("cache.delete", ["k"]) is True
    with pytest.raises(ConfigError, match=r"malformed 'cache\.put'"):
        await shop.call("cache.put", ["k", b"\xa1v"])
    bare = AppServices("shop", {}, frozenset(), unused, unused)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no app cache"):
        await bare.call("cache.get", ["k"])


async def test_a_closed_cache_refuses_calls(tmp_path: Path, clock: ManualClock) -> None:
    app_cache = AppCache(tmp_path / "_apps.db", clock)
    await app_cache.aclose()
    await app_cache.aclose()  # idempotent
    with pytest.raises(ConfigError, match="closed"):
        app_cache.get("shop", "k")
    with pytest.raises(ConfigError, match="closed"):
        await app_cache.fetch("shop", "http://127.0.0.1:1/")


# ctx.fetch ------------------------------------------------------------------------------

async def test_fetch_misses_then_hits_and_hides_its_own_x_cache(cache: AppCache,
                                                                 origin: Origin) -> None:
    origin.static("/a", "hello", cache_control="max-age=60", x_cache="origin-cdn")
    status, headers, body, x_cache = await cache.fetch("shop", origin.url + "/a")
    assert (status, body, x_cache) == (200, b"hello", "MISS")
    assert ["x-cache", "origin-cdn"] in headers and headers.count(["x-cache", "MISS"]) == 0
    assert (await cache.fetch("shop", origin.url + "/a"))[2:] == [b"hello", "HIT"]
    assert origin.counts["/a"] == 1
    assert (cache.counts["shop", "fetch", "hit"], cache.counts["shop", "fetch", "miss"]) \
        == (1, 1)


async def test_fetch_revalidates_with_a_conditional_request(cache: AppCache,
                                                            origin: Origin) -> None:
    def etag(request: Request, n: int) -> Response:
        headers = {"etag": '"v1"', "cache-control": "no-cache"}
        if request.headers.get("if-none-match") == '"v1"':
            return Response(status_code=304, headers=headers)
        return Response(f"body {n}", headers=headers)

    origin.routes["/e"] = etag
    assert (await cache.fetch("shop", origin.url + "/e"))[2:] == [b"body 1", "MISS"]
    assert (await cache.fetch("shop", origin.url + "/e"))[2:] == [b"body 1", "REVALIDATED"]
    assert origin.counts["/e"] == 2


async def test_concurrent_misses_make_one_origin_request(cache: AppCache,
                                                         origin: Origin) -> None:
    origin.static("/slow", "once", cache_control="max-age=60")
    origin.delay_s = 0.3
    replies = await asyncio.gather(*(cache.fetch("shop", origin.url + "/slow") for _ in range(10)))
    assert {r[2] for r in replies} == {b"once"} and origin.counts["/slow"] == 1


async def test_a_stored_response_stands_in_for_a_failed_origin(
        tmp_path: Path, clock: ManualClock) -> None:
    app_cache = AppCache(tmp_path / "_apps.db", clock)
    try:
        async with open_origin() as origin:
            origin.static("/a", "kept", cache_control="max-age=1, stale-if-error=600")
            url = origin.url + "/a"
            assert (await app_cache.fetch("shop", url))[3] == "MISS"
        clock.advance(5)  # stale, and the origin is gone
        assert (await app_cache.fetch("shop", url))[2:] == [b"kept", "STALE-IF-ERROR"]
        with pytest.raises(RetryableError, match="origin unreachable"):
            await app_cache.fetch("shop", url + "?other")
    finally:
        await app_cache.aclose()


async def test_errors_from_the_origin_are_responses(cache: AppCache, origin: Origin) -> None:
    origin.routes["/down"] = lambda _r, _n: Response("maintenance", 503)
    status, _, body, x_cache = await cache.fetch("shop", origin.url + "/down")
    assert (status, body, x_cache) == (503, b"maintenance", "MISS")
    assert (await cache.fetch("shop", origin.url + "/nothing"))[0] == 404


async def test_posts_pass_through_and_invalidate(cache: AppCache, origin: Origin) -> None:
    origin.static("/r", "v", cache_control="max-age=60")
    origin.routes["/r"] = lambda request, n: Response(
        f"{request.method} {n}", headers={"cache-control": "max-age=60"})
    assert (await cache.fetch("shop", origin.url + "/r"))[2:] == [b"GET 1", "MISS"]
    reply = await cache.fetch("shop", origin.url + "/r", "POST", [["content-type", "text/plain"]],
                              b"payload")
    assert reply[2:] == [b"POST 2", "PASS"]
    assert (await cache.fetch("shop", origin.url + "/r"))[2:] == [b"GET 3", "MISS"]


async def test_a_response_over_the_cap_is_refused(cache: AppCache, origin: Origin) -> None:
    big = b"x" * (FETCH_RESPONSE_BYTES_MAX + 1)
    origin.static("/big", big, cache_control="max-age=60")
    with pytest.raises(ConfigError, match="larger than"):
        await cache.fetch("shop", origin.url + "/big")
    origin.static("/fits", big[:FETCH_RESPONSE_BYTES_MAX], cache_control="max-age=60")
    assert len((await cache.fetch("shop", origin.url + "/fits"))[2]) == FETCH_RESPONSE_BYTES_MAX


async def test_origins_and_fetches_in_flight_are_bounded(tmp_path: Path,
                                                         clock: ManualClock) -> None:
    app_cache = AppCache(tmp_path / "_apps.db", clock, origins_max=1, fetches_max=2,
                         fetch_timeout_s=0.5)
    try:
        async with open_origin() as one, open_origin() as two:
            one.static("/a", "1", cache_control="max-age=60")
            two.static("/a", "2", cache_control="max-age=60")
            assert (await app_cache.fetch("shop", one.url + "/a"))[2] == b"1"
            # The proxy of `one` is closed to make room; its stored responses stay.
            assert (await app_cache.fetch("shop", two.url + "/a"))[2] == b"2"
            assert app_cache.stats()["origins"] == 1
            assert (await app_cache.fetch("shop", one.url + "/a"))[2:] == [b"1", "HIT"]
            one.delay_s = 0.3
            slow = asyncio.ensure_future(app_cache.fetch("shop", one.url + "/b"))
            await asyncio.sleep(0.05)
            with pytest.raises(RetryableError, match="origins in flight"):
                await app_cache.fetch("shop", two.url + "/b")
            other = asyncio.ensure_future(app_cache.fetch("shop", one.url + "/c"))
            await asyncio.sleep(0.05)
            with pytest.raises(RetryableError, match="fetches in flight"):
                await app_cache.fetch("shop", one.url + "/d")
            assert [(await slow)[0], (await other)[0]] == [404, 404]
            one.delay_s = 1.0
            with pytest.raises(RetryableError, match=r"longer than 0\.5 s"):
                await app_cache.fetch("shop", one.url + "/e")
    finally:
        await app_cache.aclose()
