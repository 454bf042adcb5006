"""The edge cache end to end: a real origin server, the CacheProxy served by uvicorn, httpx.

Each test is named after the RFC section it exercises. The proxy's clock is a
ManualClock started at the real time (the origin's Date fields are real), so Age and
staleness move only when a test advances it. The origin's Date is real time, so a
response fetched after the clock was advanced looks older by the advance (apparent age,
§4.2.3): responses refetched after an advance carry a longer max-age.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fogline.clock import ManualClock
from fogline.core.cachecontrol import format_http_date
from fogline.node.cache_proxy import CacheProxy
from fogline.node.cache_store import CacheStore
from fogline.transport.http_server import serve_http

Handler = Callable[[Request, int], Response]


@dataclass
class Origin:
    """An origin whose routes the tests set; it counts and records every request."""

    routes: dict[str, Handler] = field(default_factory=dict)
    requests: dict[str, list[Request]] = field(default_factory=dict)
    delay_s: float = 0.0

    def app(self) -> Starlette:
        async def handle(request: Request) -> Response:
            path = request.url.path
            seen = self.requests.setdefault(path, [])
            seen.append(request)
            n = len(seen)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            handler = self.routes.get(path)
            if handler is None:
                return Response("not found", 404)
            return handler(request, n)

        methods = ["GET", "HEAD", "POST", "PUT", "DELETE"]
        return Starlette(routes=[Route("/{path:path}", handle, methods=methods)])

    def count(self, path: str) -> int:
        return len(self.requests.get(path, []))

    def static(self, path: str, body: bytes | str, **headers: str) -> None:
        self.routes[path] = lambda _request, _n: Response(body, headers=_fields(headers))


def _fields(headers: dict[str, str]) -> dict[str, str]:
    return {name.replace("_", "-"): value for name, value in headers.items()}


@dataclass
class Env:
    origin: Origin
    proxy: CacheProxy
    clock: ManualClock
    client: httpx.AsyncClient
    store: CacheStore


@contextlib.asynccontextmanager
async def open_env() -> AsyncIterator[Env]:
    origin = Origin()
    clock = ManualClock(start_s=time.time())
    with CacheStore(None, 64 * 1024**2, 0, clock) as store:
        async with serve_http(origin.app(), "127.0.0.1", 0) as origin_port:
            proxy = CacheProxy(f"http://127.0.0.1:{origin_port}", store, clock,
                               origin_timeout_s=5)
            async with proxy, serve_http(proxy, "127.0.0.1", 0) as proxy_port:
                limits = httpx.Limits(max_connections=200)
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}",
                                             limits=limits, timeout=10) as client:
                    yield Env(origin, proxy, clock, client, store)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with open_env() as running:
        yield running


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def etag_route(origin: Origin, path: str) -> None:
    """ETag "v1" and max-age=1; a matching If-None-Match gets a 304 with max-age=60 and
    `x-version: n`."""

    def handler(request: Request, n: int) -> Response:
        headers = {"etag": '"v1"', "cache-control": "max-age=1", "x-version": str(n)}
        if request.headers.get("if-none-match") == '"v1"':
            return Response(status_code=304, headers={**headers, "cache-control": "max-age=60"})
        return Response(f"body {n}", headers=headers)

    origin.routes[path] = handler


async def test_rfc9111_4_2_1_fresh_hit_is_served_from_cache_with_age(env: Env) -> None:
    env.origin.static("/a", "hello", cache_control="max-age=60")
    first = await env.client.get("/a")
    second = await env.client.get("/a")
    assert (first.status_code, first.text, first.headers["x-cache"]) == (200, "hello", "MISS")
    assert (second.status_code, second.text, second.headers["x-cache"]) == (200, "hello", "HIT")
    assert second.headers["age"] == "0"
    assert env.origin.count("/a") == 1
    head = await env.client.head("/a")
    assert (head.headers["x-cache"], head.headers["content-length"]) == ("HIT", "5")
    assert env.proxy.stats()["hits"] == 2


async def test_rfc9111_4_2_3_age_grows_with_resident_time(env: Env) -> None:
    env.origin.static("/a", "hello", cache_control="max-age=60", age="3")
    await env.client.get("/a")
    env.clock.advance(7)
    response = await env.client.get("/a")
    assert response.headers["x-cache"] == "HIT"
    assert response.headers["age"] == "10"  # the origin's Age 3 + 7 s resident
    env.clock.advance(51)  # age 61 > max-age 60: stale, so the origin is asked again
    assert (await env.client.get("/a")).headers["x-cache"] == "MISS"
    assert env.origin.count("/a") == 2


async def test_rfc9111_4_3_etag_validation_304_updates_stored_headers(env: Env) -> None:
    etag_route(env.origin, "/e")
    assert (await env.client.get("/e")).headers["x-version"] == "1"
    env.clock.advance(5)
    response = await env.client.get("/e")
    assert response.headers["x-cache"] == "REVALIDATED"
    assert response.text == "body 1"  # the stored body, freshened
    assert response.headers["x-version"] == "2"  # §4.3.4: the 304's fields replace
    assert env.origin.requests["/e"][1].headers["if-none-match"] == '"v1"'
    assert response.headers["cache-control"] == "max-age=60"
    assert (await env.client.get("/e")).headers["x-cache"] == "HIT"
    assert env.proxy.stats()["revalidations"] == 1


async def test_rfc9111_4_3_1_last_modified_validation(env: Env) -> None:
    modified = format_http_date(time.time() - 3600)

    def handler(request: Request, n: int) -> Response:
        headers = {"last-modified": modified, "cache-control": "max-age=1"}
        if request.headers.get("if-modified-since") == modified:
            return Response(status_code=304, headers=headers)
        return Response(f"body {n}", headers=headers)

    env.origin.routes["/m"] = handler
    await env.client.get("/m")
    env.clock.advance(5)
    response = await env.client.get("/m")
    assert (response.headers["x-cache"], response.text) == ("REVALIDATED", "body 1")
    assert env.origin.requests["/m"][1].headers["if-modified-since"] == modified


async def test_rfc9111_4_1_vary_separates_variants(env: Env) -> None:
    def handler(request: Request, _n: int) -> Response:
        language = request.headers.get("accept-language", "none")
        return Response(f"in {language}",
                        headers={"vary": "Accept-Language", "cache-control": "max-age=60"})

    env.origin.routes["/v"] = handler
    english = await env.client.get("/v", headers={"accept-language": "en"})
    french = await env.client.get("/v", headers={"accept-language": "fr"})
    again = await env.client.get("/v", headers={"accept-language": "en"})
    none = await env.client.get("/v")
    assert [r.text for r in (english, french, again, none)] == ["in en", "in fr", "in en",
                                                                "in none"]
    assert [r.headers["x-cache"] for r in (english, french, again, none)] == [
        "MISS", "MISS", "HIT", "MISS"]
    assert env.origin.count("/v") == 3


async def test_rfc9111_5_2_2_5_no_store_is_never_stored(env: Env) -> None:
    env.origin.static("/n", "secret", cache_control="no-store, max-age=60")
    for _ in range(3):
        assert (await env.client.get("/n")).headers["x-cache"] == "MISS"
    assert env.origin.count("/n") == 3
    assert env.store.variants("http://127.0.0.1/n") == []


async def test_rfc9111_5_2_2_7_private_is_not_stored_by_a_shared_cache(env: Env) -> None:
    env.origin.static("/p", "mine", cache_control="private, max-age=60")
    await env.client.get("/p")
    await env.client.get("/p")
    assert env.origin.count("/p") == 2


async def test_rfc9111_4_4_post_invalidates_the_target(env: Env) -> None:
    env.origin.routes["/item"] = lambda request, n: Response(
        f"{request.method} {n}", headers={"cache-control": "max-age=60"})
    await env.client.get("/item")
    assert (await env.client.get("/item")).headers["x-cache"] == "HIT"
    posted = await env.client.post("/item", content=b"update")
    assert (posted.status_code, posted.text, posted.headers["x-cache"]) == (200, "POST 2",
                                                                            "PASS")
    after = await env.client.get("/item")
    assert (after.headers["x-cache"], after.text) == ("MISS", "GET 3")


async def test_rfc5861_3_stale_while_revalidate_serves_stale_and_refreshes(env: Env) -> None:
    env.origin.routes["/s"] = lambda _request, n: Response(
        f"v{n}", headers={"cache-control": f"max-age={1 if n == 1 else 60}, "
                                           "stale-while-revalidate=60"})
    await env.client.get("/s")
    env.clock.advance(5)
    stale = await env.client.get("/s")
    assert (stale.headers["x-cache"], stale.text, stale.headers["age"]) == ("STALE", "v1", "5")
    await eventually(lambda: env.proxy.stats()["in_flight"] == 0 and env.origin.count("/s") == 2)
    fresh = await env.client.get("/s")
    assert (fresh.headers["x-cache"], fresh.text) == ("HIT", "v2")


async def test_rfc5861_3_one_background_revalidation_per_key(env: Env) -> None:
    env.origin.routes["/s"] = lambda _request, n: Response(
        f"v{n}", headers={"cache-control": "max-age=1, stale-while-revalidate=60"})
    await env.client.get("/s")
    env.clock.advance(5)
    env.origin.delay_s = 0.3
    responses = await asyncio.gather(*(env.client.get("/s") for _ in range(20)))
    assert {r.headers["x-cache"] for r in responses} == {"STALE"}
    await eventually(lambda: env.proxy.stats()["in_flight"] == 0)
    assert env.origin.count("/s") == 2


async def test_rfc5861_4_stale_if_error_when_the_origin_answers_500(env: Env) -> None:
    env.origin.routes["/x"] = lambda _request, n: (
        Response("ok", headers={"cache-control": "max-age=1, stale-if-error=60"}) if n == 1
        else Response("broken", 500))
    await env.client.get("/x")
    env.clock.advance(10)
    response = await env.client.get("/x")
    assert (response.status_code, response.text) == (200, "ok")
    assert response.headers["x-cache"] == "STALE-IF-ERROR"
    env.clock.advance(60)  # past the stale-if-error window: the origin's error goes through
    assert (await env.client.get("/x")).status_code == 500
    stats = env.proxy.stats()
    assert (stats["stale_if_error"], stats["origin_errors"]) == (1, 2)


async def test_rfc5861_4_stale_if_error_when_the_origin_is_down() -> None:
    clock = ManualClock(start_s=time.time())
    origin = Origin()
    origin.static("/x", "ok", cache_control="max-age=1, stale-if-error=60")
    async with contextlib.AsyncExitStack() as stack:
        store = stack.enter_context(CacheStore(None, 1024**2, 0, clock))
        origin_server = contextlib.AsyncExitStack()
        origin_port = await origin_server.enter_async_context(
            serve_http(origin.app(), "127.0.0.1", 0))
        stack.push_async_callback(origin_server.aclose)  # idempotent once stopped
        proxy = await stack.enter_async_context(
            CacheProxy(f"http://127.0.0.1:{origin_port}", store, clock, origin_timeout_s=2))
        proxy_port = await stack.enter_async_context(serve_http(proxy, "127.0.0.1", 0))
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}"))
        await client.get("/x")
        await origin_server.aclose()  # the origin is gone: connections are refused
        clock.advance(10)
        served = await client.get("/x")
        assert (served.status_code, served.text) == (200, "ok")
        assert served.headers["x-cache"] == "STALE-IF-ERROR"
        missing = await client.get("/never-stored")
        assert missing.status_code == 502
        assert "origin unreachable" in missing.json()["error"]
        assert proxy.stats()["stale_if_error"] == 1


async def test_objects_over_max_object_bytes_stream_through_unstored() -> None:
    clock = ManualClock(start_s=time.time())
    origin = Origin()
    origin.static("/big", b"b" * 300_000, cache_control="max-age=60")
    with CacheStore(None, 1024**2, 0, clock) as store:
        async with serve_http(origin.app(), "127.0.0.1", 0) as origin_port:
            proxy = CacheProxy(f"http://127.0.0.1:{origin_port}", store, clock,
                               max_object_bytes=100_000)
            async with proxy, serve_http(proxy, "127.0.0.1", 0) as proxy_port, \
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{proxy_port}") as client:
                for _ in range(2):
                    response = await client.get("/big")
                    assert (response.status_code, len(response.content)) == (200, 300_000)
                    assert response.headers["x-cache"] == "MISS"
    assert origin.count("/big") == 2


async def test_rfc9110_14_2_range_from_a_complete_stored_response(env: Env) -> None:
    env.origin.static("/r", "0123456789", cache_control="max-age=60")
    await env.client.get("/r")
    part = await env.client.get("/r", headers={"range": "bytes=2-5"})
    assert (part.status_code, part.text) == (206, "2345")
    assert part.headers["content-range"] == "bytes 2-5/10"
    suffix = await env.client.get("/r", headers={"range": "bytes=-3"})
    assert (suffix.status_code, suffix.text) == (206, "789")
    beyond = await env.client.get("/r", headers={"range": "bytes=20-"})
    assert (beyond.status_code, beyond.headers["content-range"]) == (416, "bytes */10")
    assert env.origin.count("/r") == 1
    # A range on a miss: the cache fetches the whole response, stores it, serves the range.
    env.origin.static("/r2", "abcdef", cache_control="max-age=60")
    first = await env.client.get("/r2", headers={"range": "bytes=1-2"})
    assert (first.status_code, first.text) == (206, "bc")
    assert "range" not in env.origin.requests["/r2"][0].headers


async def test_rfc9111_4_3_2_client_conditional_answered_304_from_cache(env: Env) -> None:
    modified = format_http_date(time.time() - 3600)
    env.origin.static("/c", "content", cache_control="max-age=60", etag='"abc"',
                      last_modified=modified)
    await env.client.get("/c")
    by_tag = await env.client.get("/c", headers={"if-none-match": 'W/"abc"'})
    assert (by_tag.status_code, by_tag.headers["etag"], by_tag.content) == (304, '"abc"', b"")
    by_date = await env.client.get("/c", headers={"if-modified-since": modified})
    assert by_date.status_code == 304
    changed = await env.client.get("/c", headers={"if-none-match": '"other"'})
    assert (changed.status_code, changed.text) == (200, "content")
    assert env.origin.count("/c") == 1


async def test_rfc9111_5_2_1_7_only_if_cached_miss_is_504(env: Env) -> None:
    env.origin.static("/o", "x", cache_control="max-age=60")
    response = await env.client.get("/o", headers={"cache-control": "only-if-cached"})
    assert response.status_code == 504
    assert env.origin.count("/o") == 0


async def test_collapsing_100_concurrent_misses_make_one_origin_request(env: Env) -> None:
    env.origin.static("/hot", "x" * 10_000, cache_control="max-age=60")
    env.origin.delay_s = 0.3
    responses = await asyncio.gather(*(env.client.get("/hot") for _ in range(100)))
    assert {r.status_code for r in responses} == {200}
    assert {len(r.content) for r in responses} == {10_000}
    assert env.origin.count("/hot") == 1
    assert env.proxy.stats()["collapsed"] == 99


async def test_collapsing_does_not_share_a_private_response(env: Env) -> None:
    env.origin.routes["/me"] = lambda _request, n: Response(
        f"user {n}", headers={"cache-control": "private"})
    env.origin.delay_s = 0.2
    responses = await asyncio.gather(*(env.client.get("/me") for _ in range(5)))
    assert len({r.text for r in responses}) == 5
    assert env.origin.count("/me") == 5


async def test_a_hit_serves_what_is_stored_now_not_an_earlier_preparation(env: Env) -> None:
    etag_route(env.origin, "/p")
    assert (await env.client.get("/p")).headers["x-version"] == "1"
    hit = await env.client.get("/p")
    assert (hit.headers["x-cache"], hit.headers["x-version"]) == ("HIT", "1")
    env.clock.advance(5)  # stale: the 304 replaces the stored fields
    assert (await env.client.get("/p")).headers["x-cache"] == "REVALIDATED"
    hit = await env.client.get("/p")
    assert (hit.headers["x-cache"], hit.headers["x-version"]) == ("HIT", "2")
    assert (hit.headers["cache-control"], hit.text) == ("max-age=60", "body 1")
    env.origin.routes["/q"] = lambda request, n: Response(
        f"{request.method} {n}", headers={"cache-control": "max-age=60"})
    assert (await env.client.get("/q")).text == "GET 1"
    await env.client.post("/q")  # invalidates; the next GET stores a new response
    fetched = await env.client.get("/q")
    hit = await env.client.get("/q")
    assert (fetched.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    assert hit.text == fetched.text == "GET 3"
    assert env.proxy.results() == {"hit": 3, "miss": 3, "stale": 0, "revalidated": 1,
                                   "stale_if_error": 0, "pass": 1, "error": 0,
                                   "only_if_cached_miss": 0}


async def test_stale_responses_are_counted_by_reason(env: Env) -> None:
    env.origin.static("/w", "w", cache_control="max-age=1, stale-while-revalidate=60")
    env.origin.static("/m", "m", cache_control="max-age=1")
    await env.client.get("/w")
    await env.client.get("/m")
    env.clock.advance(5)
    assert (await env.client.get("/w")).headers["x-cache"] == "STALE"
    stale = await env.client.get("/m", headers={"cache-control": "max-stale=60"})
    assert stale.headers["x-cache"] == "STALE"
    await eventually(lambda: env.proxy.stats()["in_flight"] == 0)
    assert env.proxy.stale_served() == {"stale_while_revalidate": 1, "max_stale": 1,
                                        "origin_unreachable": 0, "origin_timeout": 0,
                                        "origin_error": 0}
    assert env.proxy.results()["stale"] == 2
