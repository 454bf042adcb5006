"""The HTTP caching rules of the node's shared edge cache, sans-IO.

RFC 9111 (HTTP Caching) for a shared cache, RFC 5861 (stale-while-revalidate,
stale-if-error) and RFC 9213 (CDN-Cache-Control). Plain functions over header tuples and
a frozen `StoredResponse`, with the time passed in as `now_s`: the reverse proxy only
does the IO (DESIGN.md §3 rule 4). Parsing lives in `fogline.core.cachecontrol`.

The reverse proxy uses them like this:

- request: `invalidated_uris` after an unsafe method; else `select_stored` among the
  variants under the key, then `decide`: `Fresh` / `Stale` serve the stored response
  (with `age_header`, and `not_modified` / `range_to_serve` for conditional and range
  requests), `Validate` forwards with its conditional headers, `Miss` forwards as is,
  `OnlyIfCachedMiss` answers 504.
- response: `storable`, then `to_stored`; a 304 goes through `select_for_update` and
  `update_stored_from_304`; a failed origin (no answer, or a status in
  `ERROR_STATUSES`) asks `on_error` whether the stored response may be served.

At about 600 lines, half of them docstrings citing sections, this is longer than the
~400 STYLE.md aims for: the rules cross-reference each other (freshness feeds `decide`,
`on_error` and the 304 update; storage stripping feeds the update), and the parsing
that could move out already lives in `cachecontrol`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import urljoin

from fogline.core.cachecontrol import (
    DELTA_SECONDS_MAX,
    Directives,
    Headers,
    RangeResult,
    delta_seconds,
    format_http_date,
    get_all,
    get_combined,
    get_first,
    is_weak,
    origin_of,
    parse_cache_control,
    parse_etags,
    parse_http_date,
    parse_list,
    parse_targeted_field,
    satisfy_range,
    uri_key,
    weak_match,
    without,
)

# RFC 9110 §15.1: status codes that are heuristically cacheable.
HEURISTICALLY_CACHEABLE = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# RFC 9111 §5.2.2.3: the status codes whose caching rules this module conforms to. 206
# is absent because partial responses are never stored here.
UNDERSTOOD_STATUSES = HEURISTICALLY_CACHEABLE - {206} | {302, 303, 307}
# RFC 9110 §9.2.1: safe methods never invalidate (RFC 9111 §4.4).
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# RFC 5861 §4: an "error" is what would give the client a 500, 502, 503 or 504.
ERROR_STATUSES = frozenset({500, 502, 503, 504})
# RFC 9110 §7.6.1 hop-by-hop fields and RFC 9111 §3.1 proxy-specific fields: never stored.
NOT_STORED = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authentication-info", "proxy-authorization",
})
# RFC 9111 §3.2: fields a 304 never updates, because the stored bytes depend on them.
NOT_UPDATED = NOT_STORED | {"content-length", "content-range", "content-encoding"}
# RFC 9110 §15.4.5: the fields a 304 carries that a 200 would have carried.
NOT_MODIFIED_FIELDS = ("cache-control", "content-location", "date", "etag", "expires", "vary")


@dataclass(frozen=True)
class CacheConfig:
    """How this cache reads responses.

    `targeted_fields` is the RFC 9213 §2.1 target list, most specific first, e.g.
    `("fogline-cache-control", "cdn-cache-control")`; empty means plain RFC 9111.
    `stale_if_error_s` is a site rule: how long past freshness a response may be served
    when the origin fails, even without `stale-if-error` (RFC 9111 §4.2.4 allows stale
    serving "in accordance with an out-of-band contract").
    """

    shared: bool = True
    targeted_fields: tuple[str, ...] = ()
    heuristic_fraction: float = 0.1
    heuristic_max_s: float = 86400.0
    stale_if_error_s: float = 0.0


SHARED_CACHE = CacheConfig()
CDN_CACHE = CacheConfig(targeted_fields=("cdn-cache-control",))


@dataclass(frozen=True)
class StoredResponse:
    """A response as stored: its header fields and the times of the exchange.

    `vary_values` holds the original request's normalised values of the fields its
    Vary names (None for an absent field), as §4.1 compares them on reuse.
    """

    status: int
    headers: Headers
    request_time_s: float
    response_time_s: float
    vary_values: tuple[tuple[str, str | None], ...] = ()
    body_length: int = 0

    def __post_init__(self) -> None:
        # Every lookup here compares lowercase names; `make_headers` produces them.
        assert all(name == name.lower() for name, _ in self.headers), self.headers


@dataclass(frozen=True)
class Miss:
    """Forward the request unchanged; the response may then be stored."""

    reason: str


@dataclass(frozen=True)
class Fresh:
    """Serve the stored response as is (RFC 9111 §4.2)."""

    age_s: float


@dataclass(frozen=True)
class Stale:
    """Serve the stale stored response; revalidate in the background when asked."""

    age_s: float
    reason: str
    revalidate: bool


@dataclass(frozen=True)
class Validate:
    """Forward with these conditional fields in place of the client's (§4.3.1)."""

    conditional_headers: Headers
    reason: str


@dataclass(frozen=True)
class OnlyIfCachedMiss:
    """Answer 504: the client sent only-if-cached and nothing usable is stored."""

    reason: str


Decision = Miss | Fresh | Stale | Validate | OnlyIfCachedMiss


def response_directives(headers: Headers, config: CacheConfig = SHARED_CACHE
                        ) -> tuple[Directives, bool]:
    """The directives that govern a response, and whether they came from a targeted field.

    RFC 9213 §2.1: the first field of the target list with a valid value wins and then
    Cache-Control and Expires are ignored; otherwise Cache-Control applies (§5.2).
    """
    for name in config.targeted_fields:
        directives = parse_targeted_field(get_combined(headers, name))
        if directives is not None:
            return directives, True
    return parse_cache_control(get_combined(headers, "cache-control")), False


def request_directives(headers: Headers) -> Directives:
    """Request directives (§5.2.1), with `Pragma: no-cache` read as `no-cache` when the
    request has no Cache-Control field (§5.4)."""
    value = get_combined(headers, "cache-control")
    if value is None and "no-cache" in parse_list(get_combined(headers, "pragma")):
        return {"no-cache": None}
    return parse_cache_control(value)


def _qualified(argument: str | None) -> list[str]:
    """The field names of `no-cache="..."` / `private="..."` (§5.2.2.4, §5.2.2.7)."""
    return parse_list(argument)


def storable(method: str, status: int, request_headers: Headers, response_headers: Headers,
             config: CacheConfig = SHARED_CACHE) -> tuple[bool, str]:
    """May this response be stored (RFC 9111 §3)? Returns (verdict, reason).

    Only GET responses are stored (HEAD is served from a stored GET; responses to POST
    are never reused here). 206 and 304 are never stored: partial content is not
    assembled, and a 304 only updates (§4.3.4). `Vary: *` is not stored since it can
    never be reused without validation (§4.1).
    """
    if method != "GET":
        return False, f"responses to {method} are not stored"
    if not 200 <= status <= 599:
        return False, "status is not final (§3)"
    if status in (206, 304):
        return False, f"{status} is not stored (§3: status not understood for storage)"
    if "no-store" in request_directives(request_headers):
        return False, "request no-store (§5.2.1.5)"
    directives, targeted = response_directives(response_headers, config)
    must_understand = "must-understand" in directives
    if must_understand and status not in UNDERSTOOD_STATUSES:
        return False, "must-understand with a status not understood (§5.2.2.3)"
    if "no-store" in directives and not must_understand:
        return False, "response no-store (§5.2.2.5)"
    if config.shared and "private" in directives and not _qualified(directives["private"]):
        return False, "private in a shared cache (§5.2.2.7)"
    if (config.shared and get_first(request_headers, "authorization") is not None
            and not {"public", "s-maxage", "must-revalidate"} & directives.keys()):
        return False, "Authorization without public, s-maxage or must-revalidate (§3.5)"
    if "*" in parse_list(get_combined(response_headers, "vary")):
        return False, "Vary: * never matches (§4.1)"
    allowed = (
        "public" in directives
        or "max-age" in directives
        or (config.shared and "s-maxage" in directives)
        or (not config.shared and "private" in directives)
        or (not targeted and get_first(response_headers, "expires") is not None)
        or status in HEURISTICALLY_CACHEABLE
    )
    if not allowed:
        return False, f"{status} needs explicit freshness or public (§3)"
    return True, "storable"


def to_stored(request_headers: Headers, status: int, response_headers: Headers,
              request_time_s: float, response_time_s: float, body_length: int,
              config: CacheConfig = SHARED_CACHE) -> StoredResponse:
    """The `StoredResponse` for a storable response (check `storable` first).

    Drops what §3.1 forbids storing (hop-by-hop fields and those Connection lists,
    proxy-specific fields, fields named by `no-cache="..."` and, in a shared cache,
    `private="..."`), adds a Date when the origin sent none (RFC 9110 §6.6.1), and
    records the request values of the fields Vary names (§4.1).
    """
    headers = _strip_for_storage(response_headers, config)
    if get_first(headers, "date") is None:
        headers = (*headers, ("date", format_http_date(response_time_s)))
    names = parse_list(get_combined(headers, "vary"))
    vary_values = tuple((name, _normalized_field(request_headers, name)) for name in names)
    return StoredResponse(status, headers, request_time_s, response_time_s, vary_values,
                          body_length)


def _strip_for_storage(headers: Headers, config: CacheConfig) -> Headers:
    excluded = set(NOT_STORED) | set(parse_list(get_combined(headers, "connection")))
    directives, _ = response_directives(headers, config)
    excluded.update(_qualified(directives.get("no-cache")))
    if config.shared:
        excluded.update(_qualified(directives.get("private")))
    return without(headers, excluded)


def freshness_lifetime(status: int, headers: Headers, response_time_s: float,
                       config: CacheConfig = SHARED_CACHE) -> float:
    """The freshness lifetime in seconds (RFC 9111 §4.2.1, heuristics §4.2.2).

    In order: s-maxage (shared cache only), max-age, Expires minus Date (Date defaults
    to `response_time_s`; an invalid Expires is in the past, §5.3), read from the
    RFC 9213 targeted field instead of Cache-Control when the config names one and the
    response has it (Expires is then ignored). An invalid delta-seconds gives 0: invalid
    freshness information is stale (§4.2.1). Without explicit freshness, a heuristically
    cacheable status or `public` gets `heuristic_fraction` of the time since
    Last-Modified, at most `heuristic_max_s`; anything else 0.
    """
    directives, targeted = response_directives(headers, config)
    for name in ("s-maxage", "max-age") if config.shared else ("max-age",):
        if name in directives:
            return float(delta_seconds(directives[name]) or 0)
    date_s = parse_http_date(get_first(headers, "date"), response_time_s)
    date_s = response_time_s if date_s is None else date_s
    expires = get_first(headers, "expires")
    if expires is not None and not targeted:
        expires_s = parse_http_date(expires, response_time_s)
        return 0.0 if expires_s is None else min(max(0.0, expires_s - date_s),
                                                 float(DELTA_SECONDS_MAX))
    if status not in HEURISTICALLY_CACHEABLE and "public" not in directives:
        return 0.0
    last_modified_s = parse_http_date(get_first(headers, "last-modified"), response_time_s)
    if last_modified_s is None or last_modified_s > date_s:
        return 0.0
    return min(config.heuristic_fraction * (date_s - last_modified_s), config.heuristic_max_s)


def current_age(stored: StoredResponse, now_s: float) -> float:
    """The age of a stored response at `now_s` (RFC 9111 §4.2.3), never negative.

    apparent_age from Date, corrected_age_value from the Age field plus the response
    delay, the larger of the two, plus the resident time. A clock that ran backwards
    (response before request, `now_s` before the response) contributes 0, not less.
    """
    apparent_age = max(0.0, stored.response_time_s - _date_s(stored))
    response_delay = max(0.0, stored.response_time_s - stored.request_time_s)
    corrected_age_value = _age_value(stored.headers) + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    resident_time = max(0.0, now_s - stored.response_time_s)
    return corrected_initial_age + resident_time


def _age_value(headers: Headers) -> int:
    """The Age field (§5.1): the first member of the first line; invalid is ignored."""
    value = get_first(headers, "age")
    if value is None:
        return 0
    return delta_seconds(value.split(",")[0].strip()) or 0


def age_header(stored: StoredResponse, now_s: float) -> str:
    """The Age value to send with a stored response (§4, §5.1): whole seconds, capped at
    2**31 (§1.2.2)."""
    return str(min(int(current_age(stored, now_s)), DELTA_SECONDS_MAX))


def _stale_forbidden(directives: Directives, config: CacheConfig) -> str | None:
    """Why a stale response may not be served at all (§4.2.4), or None."""
    if "no-cache" in directives and not _qualified(directives["no-cache"]):
        return "no-cache (§5.2.2.4)"
    if "must-revalidate" in directives:
        return "must-revalidate (§5.2.2.2)"
    if config.shared and "proxy-revalidate" in directives:
        return "proxy-revalidate (§5.2.2.8)"
    if config.shared and "s-maxage" in directives:
        return "s-maxage implies proxy-revalidate (§5.2.2.10)"
    return None


def decide(method: str, request_headers: Headers, stored: StoredResponse | None,
           now_s: float, config: CacheConfig = SHARED_CACHE) -> Decision:
    """What to do with a request, given the stored response selected for it (§4).

    Fresh responses are served unless the response says no-cache (§5.2.2.4) or the
    request says no-cache, max-age or min-fresh that it fails (§5.2.1). A stale one is
    served only where nothing forbids it (`_stale_forbidden`, §4.2.4) and either
    stale-while-revalidate covers it (RFC 5861 §3; revalidate in the background) or the
    request's max-stale does (§5.2.1.2). Otherwise `Validate`; and with only-if-cached
    (§5.2.1.7) anything that would go to the origin becomes `OnlyIfCachedMiss`.
    """
    request = request_directives(request_headers)
    if method not in ("GET", "HEAD"):
        return Miss(f"{method} is written through (§4)")
    decision = _decide_stored(request, request_headers, stored, now_s, config)
    if "only-if-cached" in request and isinstance(decision, Miss | Validate):
        return OnlyIfCachedMiss(f"only-if-cached (§5.2.1.7): {decision.reason}")
    return decision


def _decide_stored(request: Directives, request_headers: Headers,
                   stored: StoredResponse | None, now_s: float,
                   config: CacheConfig) -> Decision:
    if stored is None:
        return Miss("not stored")
    if not vary_matches(stored, request_headers):
        return Miss("Vary does not match (§4.1)")
    directives, _ = response_directives(stored.headers, config)
    age_s = current_age(stored, now_s)
    lifetime_s = freshness_lifetime(stored.status, stored.headers, stored.response_time_s,
                                    config)
    conditional = conditional_headers([stored])
    if "no-cache" in directives and not _qualified(directives["no-cache"]):
        return Validate(conditional, "response no-cache (§5.2.2.4)")
    if "no-cache" in request:
        return Validate(conditional, "request no-cache (§5.2.1.4)")
    if "max-age" in request and age_s > (delta_seconds(request["max-age"]) or 0):
        return Validate(conditional, "older than the request's max-age (§5.2.1.1)")
    if "min-fresh" in request and (
            lifetime_s - age_s < (delta_seconds(request["min-fresh"]) or 0)):
        return Validate(conditional, "not fresh for the request's min-fresh (§5.2.1.3)")
    if lifetime_s > age_s:
        return Fresh(age_s)
    forbidden = _stale_forbidden(directives, config)
    if forbidden is not None:
        return Validate(conditional, f"stale and {forbidden} forbids serving stale")
    staleness_s = age_s - lifetime_s
    window_s = delta_seconds(directives.get("stale-while-revalidate"))
    if window_s is not None and staleness_s <= window_s:
        return Stale(age_s, "stale-while-revalidate (RFC 5861 §3)", revalidate=True)
    if "max-stale" in request:
        limit_s = delta_seconds(request["max-stale"])
        if request["max-stale"] is None or (limit_s is not None and staleness_s <= limit_s):
            return Stale(age_s, "request max-stale (§5.2.1.2)", revalidate=False)
    return Validate(conditional, "stale (§4.2)")


def on_error(stored: StoredResponse, now_s: float, request_headers: Headers = (),
             config: CacheConfig = SHARED_CACHE) -> bool:
    """May `stored` answer a request whose origin exchange failed (no answer, or a status
    in `ERROR_STATUSES`)?

    A fresh response may (§4.3.3 "act as if the server failed to respond"), unless it
    says no-cache. A stale one may if nothing forbids stale serving (§4.2.4) and its
    staleness is within the response's or the request's stale-if-error (RFC 5861 §4) or
    the site rule `config.stale_if_error_s`.
    """
    directives, _ = response_directives(stored.headers, config)
    if "no-cache" in directives and not _qualified(directives["no-cache"]):
        return False
    age_s = current_age(stored, now_s)
    lifetime_s = freshness_lifetime(stored.status, stored.headers, stored.response_time_s,
                                    config)
    if lifetime_s > age_s:
        return True
    if _stale_forbidden(directives, config) is not None:
        return False
    allowed_s = [config.stale_if_error_s]
    for source in (directives, request_directives(request_headers)):
        window_s = delta_seconds(source.get("stale-if-error"))
        if window_s is not None:
            allowed_s.append(float(window_s))
    return age_s - lifetime_s <= max(allowed_s) and max(allowed_s) > 0


_WHITESPACE = re.compile(r"[ \t]+")
_COMMA = re.compile(r"[ \t]*,[ \t]*")


def _normalized_field(headers: Headers, name: str) -> str | None:
    """A request field as §4.1 compares it: lines combined, whitespace normalised."""
    values = get_all(headers, name)
    if not values:
        return None
    return _WHITESPACE.sub(" ", _COMMA.sub(", ", ", ".join(values))).strip()


def vary_key(response_headers: Headers, request_headers: Headers) -> str | None:
    """The secondary key of a variant: the request's normalised values of the fields the
    response's Vary names, sorted by name (§4.1). None for `Vary: *`; "" without Vary.

    A present-but-empty field (`name=`) differs from an absent one (`name`).
    """
    names = sorted(set(parse_list(get_combined(response_headers, "vary"))))
    if "*" in names:
        return None
    parts = []
    for name in names:
        value = _normalized_field(request_headers, name)
        parts.append(name if value is None else f"{name}={value}")
    return "\n".join(parts)


def vary_matches(stored: StoredResponse, request_headers: Headers) -> bool:
    """Do the request's fields nominated by the stored Vary match the original request's
    (§4.1)? `Vary: *` never matches; a field absent in one matches only absent in the
    other; a Vary naming a field that was not recorded (changed by a 304) does not match.
    """
    recorded = dict(stored.vary_values)
    for name in parse_list(get_combined(stored.headers, "vary")):
        if name == "*" or name not in recorded:
            return False
        if recorded[name] != _normalized_field(request_headers, name):
            return False
    return True


def _date_s(stored: StoredResponse) -> float:
    date_s = parse_http_date(get_first(stored.headers, "date"), stored.response_time_s)
    return stored.response_time_s if date_s is None else date_s


def select_stored(candidates: Sequence[StoredResponse], request_headers: Headers
                  ) -> StoredResponse | None:
    """Of the responses stored for a key, the one to use: Vary matches and, of several,
    the most recent by Date (§4, §4.1)."""
    matching = [s for s in candidates if vary_matches(s, request_headers)]
    return max(matching, key=_date_s, default=None)


def conditional_headers(stored: Sequence[StoredResponse]) -> Headers:
    """The fields of a validation request (§4.3.1): If-None-Match with the entity tags of
    all the responses being validated; If-Modified-Since with Last-Modified when only one
    response is validated and it has one."""
    tags = [tag for s in stored if (tag := get_first(s.headers, "etag")) is not None]
    fields: list[tuple[str, str]] = []
    if tags:
        fields.append(("if-none-match", ", ".join(tags)))
    last_modified = get_first(stored[0].headers, "last-modified") if len(stored) == 1 else None
    if last_modified is not None:
        fields.append(("if-modified-since", last_modified))
    return tuple(fields)


def _strong_validators(headers: Headers) -> tuple[str | None, float | None]:
    """The strong entity tag and strong Last-Modified of a response (RFC 9110 §8.8.1).

    Last-Modified is strong when at least 60 s before the response's Date (§8.8.2.2).
    """
    tag = get_first(headers, "etag")
    last_modified_s = parse_http_date(get_first(headers, "last-modified"))
    date_s = parse_http_date(get_first(headers, "date"))
    strong_date = (last_modified_s is not None and date_s is not None
                   and last_modified_s <= date_s - 60)
    return (tag if tag is not None and not is_weak(tag) else None,
            last_modified_s if strong_date else None)


def select_for_update(candidates: Sequence[StoredResponse], response_304_headers: Headers
                      ) -> list[int]:
    """Which stored responses a 304 freshens (§4.3.4), as indices into `candidates` (the
    responses that could have answered the request, fresh or not).

    Strong validators in the 304 select every candidate with one of them, and none if no
    candidate has one; otherwise weak validators select the most recent matching
    candidate; a 304 without validators selects the single candidate if it has none.
    """
    tag, last_modified_s = _strong_validators(response_304_headers)
    if tag is not None or last_modified_s is not None:
        return [i for i, s in enumerate(candidates)
                if (tag is not None and _strong_validators(s.headers)[0] == tag)
                or (last_modified_s is not None and last_modified_s == parse_http_date(
                    get_first(s.headers, "last-modified")))]
    weak_tag = get_first(response_304_headers, "etag")
    weak_date_s = parse_http_date(get_first(response_304_headers, "last-modified"))
    if weak_tag is not None or weak_date_s is not None:
        matching = [i for i, s in enumerate(candidates)
                    if (weak_tag is not None
                        and weak_match(weak_tag, get_first(s.headers, "etag")))
                    or (weak_date_s is not None and weak_date_s == parse_http_date(
                        get_first(s.headers, "last-modified")))]
        return [max(matching, key=lambda i: candidates[i].response_time_s)] if matching else []
    if len(candidates) == 1 and not {"etag", "last-modified"} & {
            n for n, _ in candidates[0].headers}:
        return [0]
    return []


def update_stored_from_304(stored: StoredResponse, response_304_headers: Headers,
                           request_time_s: float, response_time_s: float,
                           config: CacheConfig = SHARED_CACHE) -> StoredResponse:
    """`stored` freshened by a 304 (§4.3.4 applying §3.2).

    Each field of the 304 replaces the stored lines of that name, except the fields
    never stored (§3.1) and those the stored content depends on (Content-Length,
    Content-Range, Content-Encoding: §3.2). The exchange times become the validation's,
    so the stored Age and Date are the 304's (a Date is added if it has none), not stale
    leftovers that would inflate `current_age`.
    """
    connection = set(parse_list(get_combined(response_304_headers, "connection")))
    incoming = without(response_304_headers, NOT_UPDATED | connection)
    names = {n for n, _ in incoming} | {"age"}
    headers = (*without(stored.headers, names), *incoming)
    if get_first(incoming, "date") is None:
        headers = (*without(headers, {"date"}), ("date", format_http_date(response_time_s)))
    return replace(stored, headers=_strip_for_storage(headers, config),
                   request_time_s=request_time_s, response_time_s=response_time_s)


def not_modified(method: str, request_headers: Headers, stored: StoredResponse) -> bool:
    """Should the cache answer the client's own conditional GET/HEAD with 304 (§4.3.2)?

    If-None-Match is evaluated with the weak comparison (RFC 9110 §13.1.2) and, when
    present, If-Modified-Since is ignored (§13.1.3); If-Modified-Since compares with
    Last-Modified, else Date, else the time the response was received (RFC 9111 §4.3.2).
    Send `not_modified_headers(stored)` with the 304.
    """
    if method not in ("GET", "HEAD"):
        return False
    if_none_match = get_combined(request_headers, "if-none-match")
    if if_none_match is not None:
        if if_none_match.strip() == "*":
            return True
        tag = get_first(stored.headers, "etag")
        return tag is not None and any(weak_match(t, tag) for t in parse_etags(if_none_match))
    since_s = parse_http_date(get_first(request_headers, "if-modified-since"))
    if since_s is None:
        return False
    modified_s = parse_http_date(get_first(stored.headers, "last-modified"))
    return (_date_s(stored) if modified_s is None else modified_s) <= since_s


def range_to_serve(method: str, request_headers: Headers, stored: StoredResponse
                   ) -> RangeResult:
    """The byte range to serve from a complete stored response, as `satisfy_range`
    returns it, after RFC 9110 §14.2 (Range applies to GET only) and §13.1.5 (If-Range).

    If-Range with an entity tag needs a strong match with the stored ETag; with a date,
    an exact match with a strong Last-Modified (at least 60 s before Date, §8.8.2.2).
    When it fails, the whole 200 is served (None).
    """
    if method != "GET":
        return None
    if_range = get_first(request_headers, "if-range")
    if if_range is not None:
        if_range = if_range.strip()
        tag, last_modified_s = _strong_validators(stored.headers)
        if if_range.startswith(('"', "W/")):
            matched = tag is not None and not is_weak(if_range) and if_range == tag.strip()
        else:
            date_s = parse_http_date(if_range)
            matched = date_s is not None and date_s == last_modified_s
        if not matched:
            return None
    return satisfy_range(get_first(request_headers, "range"), stored.body_length)


def not_modified_headers(stored: StoredResponse) -> Headers:
    """The stored fields a 304 from the cache carries (RFC 9110 §15.4.5)."""
    return tuple((n, v) for n, v in stored.headers if n in NOT_MODIFIED_FIELDS)


def invalidated_uris(method: str, status: int, request_uri: str, response_headers: Headers
                     ) -> list[str]:
    """The keys to invalidate after a response to `request_uri` (RFC 9111 §4.4).

    An unsafe method (or one of unknown safety; methods are case-sensitive, RFC 9110
    §9.1, so `get` is unknown) answered with a 2xx or 3xx invalidates
    the target URI and the Location and Content-Location URIs (relative ones resolved
    against the target), the latter two only when they share the target's origin.
    Returns `normalize_key` keys, target first, without duplicates.
    """
    if method in SAFE_METHODS or not 200 <= status < 400:
        return []
    target = uri_key(request_uri)
    if target is None:
        return []
    keys = [target]
    for name in ("location", "content-location"):
        value = get_first(response_headers, name)
        if value is None:
            continue
        try:
            key = uri_key(urljoin(request_uri, value.strip()))
        except ValueError:
            continue
        if key is not None and origin_of(key) == origin_of(target) and key not in keys:
            keys.append(key)
    return keys
