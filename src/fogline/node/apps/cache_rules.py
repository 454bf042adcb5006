"""What `ctx.cache` and `ctx.fetch` accept, checked the same way on both sides.

Pure functions, no IO: the worker checks first so a handler gets its `ConfigError`
without a round trip, and the node (`fogline.node.app_cache`) checks again, since it
owns the cache and must not trust a worker.

Keys. App entries live in the node-wide app cache store under `app://<app>/<key>`
(`store_key`): app names are DNS labels, so `app://<app>/` is a prefix no other app's
keys share, and a purge by prefix of `app://<app>/` clears one app (or
`app://<app>/user:` one family of its keys). Fetched responses live in the same store
under their normalised URL (`http://...`, `https://...`), as the edge cache keys them,
so the two never meet. Tags are not namespaced: a fleet purge of tag `prices` clears
the entries of every app (and every fetched response) carrying it.

Values are encoded with msgpack (as collections encode theirs), so bytes come back as
bytes, str as str, and JSON-like values (None inside a structure, bool, int, float,
list, dict) as themselves; tuples come back as lists. A value of None is refused: `get`
answers None for a miss. The entry's metadata is its expiry (`EntryMeta`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec

from fogline.errors import ConfigError, ProtocolError

KEY_BYTES_MAX = 1024
TAGS_MAX = 32
TAG_CHARS_MAX = 128
VALUE_BYTES_MAX = 1024 * 1024       # encoded; one RPC frame carries it
TTL_S_MAX = 30 * 24 * 3600.0        # 30 days

URL_CHARS_MAX = 8 * 1024
FETCH_HEADERS_MAX = 64
FETCH_HEADER_BYTES_MAX = 16 * 1024  # names and values together
FETCH_REQUEST_BYTES_MAX = 1024 * 1024
FETCH_RESPONSE_BYTES_MAX = 8 * 1024 * 1024
FETCH_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

APP_KEY_SCHEME = "app://"

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Visible ASCII without the comma: a tag can also be named in a Cache-Tag header.
_TAG = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VISIBLE_ASCII = "".join(chr(i) for i in range(0x21, 0x7f))

_encoder = msgspec.msgpack.Encoder()


# ctx.cache ------------------------------------------------------------------------------

def store_key(app: str, key: str) -> str:
    """The store key of an app's cache key (see the module docstring)."""
    return f"{APP_KEY_SCHEME}{app}/{key}"


def app_prefix(app: str) -> str:
    """The store-key prefix of every entry of `app`: purge it to clear the app's cache."""
    return f"{APP_KEY_SCHEME}{app}/"


def check_key(key: object) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"cache key must be a str, got {type(key).__name__}")
    if not key:
        raise ConfigError("cache key must not be empty")
    if _CONTROL.search(key):
        raise ConfigError(f"cache key {key[:80]!r} contains a control character")
    try:
        n_bytes = len(key.encode())
    except UnicodeEncodeError as exc:
        raise ConfigError(f"cache key is not valid Unicode: {exc}") from exc
    if n_bytes > KEY_BYTES_MAX:
        raise ConfigError(f"cache key has {n_bytes} bytes, more than {KEY_BYTES_MAX}")
    return key


def check_tags(tags: object) -> frozenset[str]:
    """A collection of tags (a lone str is refused: `tags="a"` would mean tags a)."""
    if isinstance(tags, str | bytes) or not isinstance(tags, Iterable):
        raise ConfigError(f"cache tags must be a list, tuple or set of str, got "
                          f"{type(tags).__name__}")
    found = list(tags)
    if len(found) > TAGS_MAX:
        raise ConfigError(f"{len(found)} cache tags, more than {TAGS_MAX}")
    for tag in found:
        if not isinstance(tag, str):
            raise ConfigError(f"cache tag must be a str, got {type(tag).__name__}")
        if not 0 < len(tag) <= TAG_CHARS_MAX or not _TAG.fullmatch(tag):
            raise ConfigError(f"cache tag {tag[:80]!r} must be 1-{TAG_CHARS_MAX} visible "
                              "ASCII characters without commas or spaces")
    return frozenset(found)


def check_ttl(ttl: object) -> float:
    if ttl is None:
        raise ConfigError("a cache entry needs a TTL: put(key, value, ttl=seconds)")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
        raise ConfigError(f"cache TTL must be a number of seconds, got {ttl!r}")
    if not 0 < ttl <= TTL_S_MAX:
        raise ConfigError(f"cache TTL must be > 0 and at most {TTL_S_MAX:.0f} s (30 days), "
                          f"got {ttl}")
    return float(ttl)


def check_encoded(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise ConfigError(f"an encoded cache value must be bytes, got {type(value).__name__}")
    if len(value) > VALUE_BYTES_MAX:
        raise ConfigError(f"cache value of {len(value)} bytes (encoded) exceeds "
                          f"{VALUE_BYTES_MAX}")
    return value


def encode_value(value: Any) -> bytes:
    if value is None:
        raise ConfigError("cannot cache None: get() answers None for a missing key")
    try:
        data = _encoder.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ConfigError(f"cache value cannot be encoded: {exc}") from exc
    return check_encoded(data)


def decode_value(data: bytes) -> Any:
    try:
        return msgspec.msgpack.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"cached value does not decode: {exc}") from exc


class EntryMeta(msgspec.Struct, array_like=True, frozen=True):
    """An app cache entry's metadata in the store."""

    expires_at_s: float


_meta_decoder = msgspec.msgpack.Decoder(EntryMeta)


def encode_meta(meta: EntryMeta) -> bytes:
    return _encoder.encode(meta)


def decode_meta(data: bytes) -> EntryMeta | None:
    """None for metadata that is not an app entry's (never served)."""
    try:
        return _meta_decoder.decode(data)
    except msgspec.DecodeError:
        return None


def is_live(meta: EntryMeta | None, now_s: float) -> bool:
    return meta is not None and now_s < meta.expires_at_s


# ctx.fetch ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FetchRequest:
    """A checked fetch: `origin` is scheme://host[:port], `target` path and query."""

    method: str
    scheme: str
    netloc: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @property
    def url(self) -> str:
        return self.origin + self.target


def check_fetch(url: object, method: object = "GET", headers: object = None,
                body: object = None) -> FetchRequest:
    """ConfigError for anything `ctx.fetch` does not send; else the request to send."""
    if not isinstance(method, str) or method.upper() not in FETCH_METHODS:
        raise ConfigError(f"fetch method must be one of {', '.join(sorted(FETCH_METHODS))}, "
                          f"got {method!r}")
    method = method.upper()
    scheme, netloc, target = _check_url(url)
    fields = _check_headers(headers)
    if body is None:
        data = b""
    elif isinstance(body, str):
        data = body.encode()
    elif isinstance(body, bytes | bytearray | memoryview):
        data = bytes(body)
    else:
        raise ConfigError(f"fetch body must be bytes or str, got {type(body).__name__}")
    if data and method in ("GET", "HEAD"):
        raise ConfigError(f"a {method} request carries no body")
    if len(data) > FETCH_REQUEST_BYTES_MAX:
        raise ConfigError(f"fetch body of {len(data)} bytes exceeds {FETCH_REQUEST_BYTES_MAX}")
    return FetchRequest(method, scheme, netloc, target, fields, data)


def _check_url(url: object) -> tuple[str, str, str]:
    if not isinstance(url, str):
        raise ConfigError(f"fetch URL must be a str, got {type(url).__name__}")
    if len(url) > URL_CHARS_MAX:
        raise ConfigError(f"fetch URL has {len(url)} characters, more than {URL_CHARS_MAX}")
    if _CONTROL.search(url) or " " in url:
        raise ConfigError(f"fetch URL {url[:200]!r} contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port out of range or not a number
    except ValueError as exc:
        raise ConfigError(f"fetch URL {url[:200]!r} is malformed: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(f"fetch URL must be http:// or https://, got {url[:200]!r}")
    if not parts.hostname:
        raise ConfigError(f"fetch URL {url[:200]!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("fetch URL must not carry credentials; send them in a header "
                          "(Authorization)")
    if not parts.netloc.isascii():
        raise ConfigError(f"fetch URL host {parts.netloc!r} must be ASCII (use its IDNA "
                          "xn-- form)")
    netloc = parts.netloc.lower()
    if port == 0:
        raise ConfigError(f"fetch URL {url[:200]!r} has port 0")
    # Non-ASCII in path or query is sent percent-encoded, as browsers and httpx do.
    path = quote(parts.path, safe=_VISIBLE_ASCII) or "/"
    query = quote(parts.query, safe=_VISIBLE_ASCII)
    return scheme, netloc, f"{path}?{query}" if query else path


def _check_headers(headers: object) -> tuple[tuple[str, str], ...]:
    if headers is None:
        return ()
    if isinstance(headers, Mapping):
        pairs: Iterable[Any] = headers.items()
    elif isinstance(headers, list | tuple):
        pairs = headers
    else:
        raise ConfigError(f"fetch headers must be a dict or a list of (name, value) pairs, "
                          f"got {type(headers).__name__}")
    fields = []
    size = 0
    for pair in pairs:
        if len(fields) == FETCH_HEADERS_MAX:
            raise ConfigError(f"more than {FETCH_HEADERS_MAX} fetch headers")
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ConfigError(f"fetch header must be a (name, value) pair, got {pair!r}")
        name, value = pair
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ConfigError(f"fetch header name {name!r} is not an HTTP token")
        if not isinstance(value, str) or _CONTROL.search(value.replace("\t", " ")):
            raise ConfigError(f"fetch header {name!r} must have a str value without "
                              "control characters")
        if not value.isascii() and not _latin1(value):
            raise ConfigError(f"fetch header {name!r} has characters outside Latin-1")
        if name.lower() == "host":
            raise ConfigError("the Host header comes from the fetch URL")
        fields.append((name.lower(), value.strip()))
        size += len(name) + len(value)
    if size > FETCH_HEADER_BYTES_MAX:
        raise ConfigError(f"fetch headers have {size} bytes, more than "
                          f"{FETCH_HEADER_BYTES_MAX}")
    return tuple(fields)


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True
