"""What the edge cache sends: stored variants prepared once for hits, and responses.

A memory-tier hit returns the very `Entry` object stored, so its metadata bytes are the
same object hit after hit. `PreparedVariants` keeps, per (key, variant), what a hit
needs from them: the decoded `StoredResponse`, its request-independent figures
(`fogline.core.cachehit.prepare`) and the ASGI header list to send, built once. It is
checked against the entry's metadata on every use (identity, then equality), so an
entry replaced, revalidated or read back from disk is prepared again, never served
from an outdated preparation. Bounded by `PREPARED_MAX`, oldest preparation out first.

`send_plain_hit` sends a plain fresh hit (`fogline.core.cachehit.plain_hit_age`):
the prepared fields, Age, X-Cache and Content-Length, then the stored body as is.
`send_stored` sends any other stored response (answering the client's own conditional
or range request), `send_fetched` an origin's reply as it came, and `send_response`
and `send_json` whatever else the proxy answers.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from fogline.core.cachecontrol import Headers, without
from fogline.core.cachehit import PreparedStored, age_value, prepare
from fogline.core.cachepolicy import (
    SHARED_CACHE,
    CacheConfig,
    StoredResponse,
    age_header,
    not_modified,
    not_modified_headers,
    range_to_serve,
)
from fogline.node.cache_proxy_origin import Reply, Streamed
from fogline.node.cache_store import Entry

Send = Callable[[dict[str, Any]], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

PREPARED_MAX = 4096  # preparations kept, about 1 KB each for typical responses
# The stored fields a hit does not send as stored: it sends its own Age and length.
REPLACED_ON_HIT = frozenset({"age", "content-length"})

_decode = msgspec.msgpack.Decoder(StoredResponse).decode


@dataclass(frozen=True, slots=True)
class Prepared:
    """One stored variant, ready to serve."""

    metadata: bytes        # the entry's metadata this was made from
    variant: str
    hit: PreparedStored
    fields: RawHeaders     # the stored fields minus REPLACED_ON_HIT, as ASGI sends them

    @property
    def stored(self) -> StoredResponse:
        return self.hit.stored


class PreparedVariants:
    """Bounded memo of `Prepared` per (key, variant); see the module docstring."""

    def __init__(self, config: CacheConfig = SHARED_CACHE,
                 max_entries: int = PREPARED_MAX) -> None:
        self._config = config
        self._max_entries = max_entries
        self._table: dict[tuple[str, str], Prepared] = {}

    def __len__(self) -> int:
        return len(self._table)

    def get(self, entry: Entry) -> Prepared:
        slot = (entry.key, entry.variant)
        prepared = self._table.get(slot)
        if prepared is not None and (prepared.metadata is entry.metadata
                                     or prepared.metadata == entry.metadata):
            return prepared
        stored = _decode(entry.metadata)
        prepared = Prepared(entry.metadata, entry.variant, prepare(stored, self._config),
                            raw(without(stored.headers, REPLACED_ON_HIT)))
        table = self._table
        table.pop(slot, None)
        table[slot] = prepared
        if len(table) > self._max_entries:
            del table[next(iter(table))]  # the oldest preparation
        return prepared


def raw(headers: Headers) -> RawHeaders:
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]


async def send_plain_hit(send: Send, method: str, prepared: Prepared, body: bytes,
                         age_s: float) -> None:
    """The whole stored response, as `send_stored` sends it for a plain request."""
    fields = [*prepared.fields, (b"age", age_value(age_s).encode()), (b"x-cache", b"HIT"),
              (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": prepared.stored.status,
                "headers": fields})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def send_response(send: Send, status: int, headers: Headers, body: bytes,
                        length: int | None) -> None:
    """`headers` plus Content-Length `length` (None: none), then `body`."""
    fields = raw(headers)
    if length is not None:
        fields.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: Headers = ()) -> None:
    data = json.dumps(body).encode()
    await send_response(send, status, (("content-type", "application/json"), *headers),
                        data, len(data))


async def send_stored(send: Send, now_s: float, method: str, headers: Headers,
                      stored: StoredResponse, body: bytes, x_cache: str) -> None:
    """A stored response, answering the request's own conditional (304) or range
    (206, 416) when it has one."""
    extra = (("age", age_header(stored, now_s)), ("x-cache", x_cache))
    if not_modified(method, headers, stored):
        await send_response(send, 304, (*not_modified_headers(stored), *extra), b"", None)
        return
    fields = (*without(stored.headers, REPLACED_ON_HIT), *extra)
    span = range_to_serve(method, headers, stored)
    if span == "unsatisfiable":
        await send_json(send, 416, {"error": "range not satisfiable"},
                        (("content-range", f"bytes */{stored.body_length}"), *extra))
    elif span is not None:
        first, last = span
        content_range = f"bytes {first}-{last}/{stored.body_length}"
        await send_response(send, 206, (*fields, ("content-range", content_range)),
                            body[first:last + 1], None)
    else:
        await send_response(send, stored.status, fields,
                            b"" if method == "HEAD" else body, len(body))


async def send_fetched(send: Send, method: str, fetched: Reply | Streamed,
                       x_cache: str) -> None:
    """An origin's reply as it came (a `Streamed` one is streamed, then closed)."""
    fields = (*fetched.headers, ("x-cache", x_cache))
    if isinstance(fetched, Reply):
        # A reply to HEAD keeps the origin's Content-Length; anything else has its own.
        length = None if method == "HEAD" else len(fetched.body)
        await send_response(send, fetched.status, fields, fetched.body, length)
        return
    try:
        await send({"type": "http.response.start", "status": fetched.status,
                    "headers": raw(fields)})
        await send({"type": "http.response.body", "body": fetched.prefix,
                    "more_body": True})
        async for chunk in fetched.response.aiter_raw():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except httpx.HTTPError:
        pass  # the status is sent already: the client sees a short body
    finally:
        await fetched.aclose()
    await send({"type": "http.response.body", "body": b""})
