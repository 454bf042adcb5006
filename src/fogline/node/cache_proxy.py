"""The node's edge cache: a reverse-proxy shared cache in front of one origin.

A raw ASGI callable and only the IO shell: every caching rule is a call into
`fogline.core.cachepolicy` (DESIGN.md §3 rule 4), storage is `CacheStore`, the origin
is `OriginClient`. Per request:

- unsafe methods go to the origin, then `invalidated_uris` are deleted from the store;
- GET/HEAD: the stored variants under `uri_key(target)` are decoded (the metadata is
  the msgspec-encoded `StoredResponse`), `select_stored` picks one and `decide` says
  what to do. Fresh → `X-Cache: HIT`; Stale → `STALE` (with a background revalidation
  for stale-while-revalidate, one at a time per key); Validate → a conditional request,
  304 → `REVALIDATED`; Miss → `MISS`; OnlyIfCachedMiss → 504. A stored response answers
  the client's own conditional (304, `not_modified`) and range (206/416,
  `range_to_serve`) requests.
- collapsing: origin exchanges run as tasks in `_in_flight`, keyed by the method, the
  key and the validators sent; concurrent requests await the same task. A waiter uses
  the result only if it was stored and its Vary matches the waiter's request (a
  response not stored may be private to the leader's client); otherwise it asks the
  origin itself, as Varnish's hit-for-pass does.
- a failed origin (no answer, or 500/502/503/504) is answered from the stored response
  when `on_error` allows (`X-Cache: STALE-IF-ERROR`), else with the origin's error or a
  JSON 502/504.

Close with `aclose()` (or `async with`): it cancels background revalidations and
closes the pool it owns.

A plain fresh hit on a key's only variant, most hits, skips the full rules: the
variant is prepared once (`cache_proxy_send.PreparedVariants`) and
`fogline.core.cachehit.plain_hit_age` says whether the request is such a hit.
`results()` and `stale_served()` count how requests were answered, for
`cache_metrics`.

(About 470 lines, past the ~400 aim: the origin exchange lives in
`cache_proxy_origin` and what is sent in `cache_proxy_send`; what is left is one
request flow whose branches share the collapsing table and the counters.)
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from fogline.clock import Clock
from fogline.core.cachecontrol import Headers, cache_tags, make_headers, uri_key, without
from fogline.core.cachehit import plain_hit_age
from fogline.core.cachepolicy import (
    ERROR_STATUSES,
    SHARED_CACHE,
    CacheConfig,
    Fresh,
    Miss,
    OnlyIfCachedMiss,
    Stale,
    StoredResponse,
    Validate,
    conditional_headers,
    decide,
    invalidated_uris,
    on_error,
    select_for_update,
    select_stored,
    storable,
    to_stored,
    update_stored_from_304,
    vary_key,
    vary_matches,
)
from fogline.errors import ConfigError
from fogline.node.cache_proxy_origin import (
    Failure,
    Fetched,
    OriginClient,
    OriginTls,
    Reply,
    Streamed,
    end_to_end,
)
from fogline.node.cache_proxy_send import (
    Prepared,
    PreparedVariants,
    send_fetched,
    send_json,
    send_plain_hit,
    send_stored,
)
from fogline.node.cache_store import CacheStore, Entry

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

MAX_OBJECT_BYTES = 8 * 1024**2
REQUEST_BODY_BYTES_MAX = 16 * 1024**2
IN_FLIGHT_MAX = 10_000
# The client's conditional and range fields: the cache answers them from a complete
# stored response, so the origin gets its own validators or none.
CLIENT_CONDITIONALS = frozenset({"if-none-match", "if-modified-since", "if-range", "range"})
COUNTERS = ("hits", "misses", "stale", "revalidations", "collapsed", "origin_errors",
            "stale_if_error", "passed")
# Per request, how it was answered (`results()`): X-Cache's value, or `error` (the
# origin failed and nothing stored could stand in) or `only_if_cached_miss` (504).
RESULTS = ("hit", "miss", "stale", "revalidated", "stale_if_error", "pass", "error",
           "only_if_cached_miss")
# Why a stale response was served (`stale_served()`): RFC 5861's stale-while-revalidate,
# the request's max-stale, or stale-if-error when the origin gave no answer (refused,
# reset: a partition), timed out, or answered with an error status.
STALE_REASONS = ("stale_while_revalidate", "max_stale", "origin_unreachable",
                 "origin_timeout", "origin_error")

KEYS_CACHED_MAX = 8192

_encode = msgspec.msgpack.Encoder().encode
# A pure function of the request URI, computed again for every request otherwise.
_uri_key = functools.lru_cache(maxsize=KEYS_CACHED_MAX)(uri_key)


@dataclass(frozen=True, slots=True)
class Served:
    """An origin exchange's result to send: from the store (`stored` set) or as is."""

    x_cache: str
    body: bytes
    stored: StoredResponse | None = None
    reply: Reply | None = None


Result = Served | Failure | Streamed
Candidate = tuple[str, StoredResponse, bytes]  # variant, stored response, body


class CacheProxy:
    """A shared HTTP cache in front of `origin_url`, as an ASGI app."""

    def __init__(self, origin_url: str, store: CacheStore, clock: Clock,
                 config: CacheConfig = SHARED_CACHE, *, origin_timeout_s: float = 10,
                 client: httpx.AsyncClient | None = None,
                 max_object_bytes: int = MAX_OBJECT_BYTES,
                 key_base: str | None = None, origin_tls: OriginTls | None = None) -> None:
        if not origin_url.startswith(("http://", "https://")):
            raise ConfigError(f"origin URL must be http(s)://..., got {origin_url!r}")
        # Keys are `key_base` + path and query when given (a site's keys are the same
        # on every node, whatever host name reached it), else the request's own URI.
        self.key_base = key_base
        self._store = store
        self._clock = clock
        self._config = config
        self._origin = OriginClient(origin_url, clock, timeout_s=origin_timeout_s,
                                    max_object_bytes=max_object_bytes, client=client,
                                    tls=origin_tls)
        self._in_flight: dict[tuple[object, ...], asyncio.Task[Result]] = {}
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._results = dict.fromkeys(RESULTS, 0)
        self._stale_reasons = dict.fromkeys(STALE_REASONS, 0)
        self._prepared = PreparedVariants(config)
        self._closing: set[asyncio.Future[None]] = set()

    def stats(self) -> dict[str, int]:
        return {**self._counts, "in_flight": len(self._in_flight)}

    def results(self) -> dict[str, int]:
        """Requests answered so far, by result (`RESULTS`)."""
        return dict(self._results)

    def stale_served(self) -> dict[str, int]:
        """Stale responses served so far, by reason (`STALE_REASONS`)."""
        return dict(self._stale_reasons)

    async def aclose(self) -> None:
        tasks: list[asyncio.Future[Any]] = [*self._in_flight.values(), *self._closing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._origin.aclose()

    async def __aenter__(self) -> CacheProxy:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        headers = make_headers(scope["headers"])
        query = scope["query_string"].decode("latin-1")
        target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        target += f"?{query}" if query else ""
        if self.key_base is not None:
            request_uri = self.key_base + target
        else:
            host = next((v for n, v in headers if n == "host"), "") or "localhost"
            request_uri = f"{scope['scheme']}://{host}{target}"
        key = _uri_key(request_uri)
        # "fogline.cache_bypass": the node may hold purged objects (catching up after a
        # reconnect), so the request is passed to the origin.
        if method in ("GET", "HEAD") and key is not None \
                and not scope.get("fogline.cache_bypass"):
            await self._serve_cacheable(send, method, headers, key, target)
        else:
            await self._pass(receive, send, method, headers, target, request_uri)

    async def _pass(self, receive: Receive, send: Send, method: str, headers: Headers,
                    target: str, request_uri: str) -> None:
        """Write through (RFC 9111 §4.4): forward, answer, invalidate what it changed."""
        self._counts["passed"] += 1
        self._results["pass"] += 1
        body = await _read_body(receive)
        if body is None:
            await send_json(send, 413, {"error": "request body too large",
                                         "limit_bytes": REQUEST_BODY_BYTES_MAX})
            return
        fetched = await self._origin.fetch(method, target, end_to_end(headers), body)
        if isinstance(fetched, Failure):
            self._counts["origin_errors"] += 1
            await send_json(send, fetched.status, {"error": fetched.reason}, ORIGIN_FAILED)
            return
        for key in invalidated_uris(method, fetched.status, request_uri, fetched.headers):
            self._store.delete(key)
        await send_fetched(send, method, fetched, "PASS")

    async def _serve_cacheable(self, send: Send, method: str, headers: Headers, key: str,
                               target: str) -> None:
        candidates = self._candidates(key)
        now_s = self._clock.now()
        if len(candidates) == 1:  # the usual case: try the plain hit first
            prepared, body = candidates[0]
            age_s = plain_hit_age(prepared.hit, method, headers, now_s)
            if age_s is not None:
                self._counts["hits"] += 1
                self._results["hit"] += 1
                await send_plain_hit(send, method, prepared, body, age_s)
                return
        stored = select_stored([p.stored for p, _ in candidates], headers)
        picked = next(((p.variant, p.stored, body) for p, body in candidates
                       if p.stored is stored), None)
        decision = decide(method, headers, stored, now_s, self._config)
        if picked is not None and isinstance(decision, Fresh | Stale):
            _, stored_response, body = picked
            if isinstance(decision, Fresh):
                self._counts["hits"] += 1
                self._results["hit"] += 1
                x_cache = "HIT"
            else:
                self._counts["stale"] += 1
                self._results["stale"] += 1
                x_cache = "STALE"
                if decision.revalidate:
                    self._stale_reasons["stale_while_revalidate"] += 1
                    self._revalidate_in_background(key, picked, headers, target)
                else:
                    self._stale_reasons["max_stale"] += 1
            await send_stored(send, now_s, method, headers, stored_response, body, x_cache)
            return
        if isinstance(decision, OnlyIfCachedMiss):
            self._results["only_if_cached_miss"] += 1
            await send_json(send, 504, {"error": "not cached (only-if-cached)",
                                         "reason": decision.reason})
            return
        if isinstance(decision, Validate) and picked is not None:
            result = await self._validate_collapsed(key, picked, headers, target,
                                                    decision.conditional_headers)
        else:
            assert isinstance(decision, Miss | Validate), decision
            result = await self._miss(method, key, headers, target)
        await self._send_result(send, method, headers, result, picked)

    def _candidates(self, key: str) -> list[tuple[Prepared, bytes]]:
        """The variants stored under `key`, prepared (decoded once per stored entry)."""
        candidates = []
        store, prepared = self._store, self._prepared
        for variant in store.variants(key):
            entry = store.get(key, variant)
            if entry is not None:
                candidates.append((prepared.get(entry), entry.body))
        return candidates

    # Origin exchanges -----------------------------------------------------------------

    def _start(self, flight_key: tuple[object, ...],
               make: Callable[[], Awaitable[Result]]) -> asyncio.Task[Result] | None:
        """The task of the exchange in flight under `flight_key`, started if there is
        none; None when the in-flight table is full (the caller goes alone)."""
        task = self._in_flight.get(flight_key)
        if task is not None:
            return task
        if len(self._in_flight) >= IN_FLIGHT_MAX:
            return None
        task = asyncio.ensure_future(make())
        self._in_flight[flight_key] = task
        task.add_done_callback(lambda _: self._in_flight.pop(flight_key, None))
        task.add_done_callback(_retrieve)
        return task

    async def _collapsed(self, flight_key: tuple[object, ...], headers: Headers,
                         make: Callable[[], Awaitable[Result]]) -> Result:
        joined = flight_key in self._in_flight
        task = self._start(flight_key, make)
        if task is None:
            return await make()
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not joined:  # nobody else may read a stream only the leader can consume
                task.add_done_callback(self._close_streamed)
            raise
        if not joined:
            return result
        self._counts["collapsed"] += 1
        if isinstance(result, Failure) or (
                isinstance(result, Served) and result.stored is not None
                and vary_matches(result.stored, headers)):
            return result
        return await make()  # not shareable: this waiter asks the origin itself

    async def _miss(self, method: str, key: str, headers: Headers, target: str) -> Result:
        if method == "HEAD":  # HEAD is answered from a stored GET, never stored itself
            return _as_result(await self._origin.fetch(
                "HEAD", target, without(end_to_end(headers), CLIENT_CONDITIONALS)))
        return await self._collapsed(("GET", key), headers,
                                     lambda: self._fetch_and_store(key, headers, target))

    async def _fetch_and_store(self, key: str, headers: Headers, target: str) -> Result:
        forwarded = without(end_to_end(headers), CLIENT_CONDITIONALS)
        return self._store_reply(key, headers, await self._origin.fetch("GET", target,
                                                                        forwarded))

    def _store_reply(self, key: str, headers: Headers, fetched: Fetched) -> Result:
        if not isinstance(fetched, Reply):
            return fetched
        if fetched.status in ERROR_STATUSES:
            return Failure(fetched.status, f"origin answered {fetched.status}", fetched)
        ok, _ = storable("GET", fetched.status, headers, fetched.headers, self._config)
        if not ok:
            return Served("MISS", fetched.body, reply=fetched)
        stored = to_stored(headers, fetched.status, fetched.headers, fetched.request_time_s,
                           fetched.response_time_s, len(fetched.body), self._config)
        variant = vary_key(stored.headers, headers)
        if variant is None or not self._put(key, variant, stored, fetched.body):
            return Served("MISS", fetched.body, reply=fetched)
        return Served("MISS", fetched.body, stored=stored)

    def _put(self, key: str, variant: str, stored: StoredResponse, body: bytes) -> bool:
        entry = Entry(key, variant, _encode(stored), body, cache_tags(stored.headers),
                      self._clock.now())
        try:
            self._store.put(entry)
        except ConfigError:  # larger than the store takes: served, not stored
            return False
        return True

    async def _validate_collapsed(self, key: str, picked: Candidate, headers: Headers,
                                  target: str, conditional: Headers) -> Result:
        return await self._collapsed(
            ("VALIDATE", key, picked[0], conditional), headers,
            lambda: self._validate(key, picked, headers, target, conditional))

    async def _validate(self, key: str, picked: Candidate, headers: Headers, target: str,
                        conditional: Headers) -> Result:
        """A conditional request for `picked` (RFC 9111 §4.3.1); a 304 freshens it."""
        variant, stored, body = picked
        forwarded = (*without(end_to_end(headers), CLIENT_CONDITIONALS), *conditional)
        fetched = await self._origin.fetch("GET", target, forwarded)
        if not (isinstance(fetched, Reply) and fetched.status == 304):
            return self._store_reply(key, headers, fetched)
        if not select_for_update([stored], fetched.headers):
            # §4.3.4: the 304 is for none of what we hold; ask for the whole response.
            return await self._fetch_and_store(key, headers, target)
        updated = update_stored_from_304(stored, fetched.headers, fetched.request_time_s,
                                         fetched.response_time_s, self._config)
        self._put(key, variant, updated, body)
        self._counts["revalidations"] += 1
        return Served("REVALIDATED", body, stored=updated)

    def _revalidate_in_background(self, key: str, picked: Candidate, headers: Headers,
                                  target: str) -> None:
        """RFC 5861 §3: at most one revalidation per stored variant at a time."""
        validators = conditional_headers([picked[1]])
        task = self._start(("VALIDATE", key, picked[0], validators),
                           lambda: self._validate(key, picked, headers, target, validators))
        if task is not None:
            task.add_done_callback(self._close_streamed)

    def _close_streamed(self, task: asyncio.Task[Result]) -> None:
        """Close the origin stream of an exchange nobody will send (tracked until done)."""
        if not task.cancelled() and task.exception() is None:
            result = task.result()
            if isinstance(result, Streamed):
                closing = asyncio.ensure_future(result.aclose())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    # Responses ------------------------------------------------------------------------

    async def _send_result(self, send: Send, method: str, headers: Headers, result: Result,
                           picked: Candidate | None) -> None:
        if isinstance(result, Served):
            if result.x_cache == "MISS":
                self._counts["misses"] += 1
                self._results["miss"] += 1
            else:
                self._results["revalidated"] += 1
            if result.stored is not None:
                await send_stored(send, self._clock.now(), method, headers, result.stored,
                                  result.body, result.x_cache)
            else:
                assert result.reply is not None
                await send_fetched(send, method, result.reply, result.x_cache)
            return
        if isinstance(result, Streamed):
            self._counts["misses"] += 1
            self._results["miss"] += 1
            await send_fetched(send, method, result, "MISS")
            return
        self._counts["origin_errors"] += 1
        if picked is not None and on_error(picked[1], self._clock.now(), headers,
                                           self._config):
            self._counts["stale_if_error"] += 1
            self._results["stale_if_error"] += 1
            self._stale_reasons[_failure_reason(result)] += 1
            await send_stored(send, self._clock.now(), method, headers, picked[1],
                              picked[2], "STALE-IF-ERROR")
            return
        self._results["error"] += 1
        if result.reply is not None:
            await send_fetched(send, method, result.reply, "MISS")
        else:
            await send_json(send, result.status, {"error": result.reason}, ORIGIN_FAILED)


def _as_result(fetched: Fetched) -> Result:
    if isinstance(fetched, Reply):
        if fetched.status in ERROR_STATUSES:
            return Failure(fetched.status, f"origin answered {fetched.status}", fetched)
        return Served("MISS", fetched.body, reply=fetched)
    return fetched


# On the cache's own answer when the origin failed: the node is fine, its origin is not
# (fogline.client then tries another node without marking this one down).
ORIGIN_FAILED = (("x-cache", "ERROR"),)


def _failure_reason(failure: Failure) -> str:
    if failure.reply is not None:
        return "origin_error"
    return "origin_timeout" if failure.status == 504 else "origin_unreachable"


def _retrieve(task: asyncio.Task[Result]) -> None:
    """Mark a finished exchange's exception as seen: whoever awaits it sees it anyway,
    and a background revalidation's failure only means the stale response stays."""
    if not task.cancelled():
        task.exception()


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > REQUEST_BODY_BYTES_MAX:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
