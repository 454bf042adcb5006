"""Parsing for the edge cache: the header fields, dates, keys and ranges a cache reads.

Pure functions with no IO and no clock; `fogline.core.cachepolicy` builds the caching
rules on top of them. Parsers never raise on what a peer sends: malformed input is
mapped to the reading the cited RFC prescribes (usually "ignore" or "treat as stale").

- `Headers`: a tuple of (lowercase name, value) pairs, in received order.
- `parse_cache_control` (RFC 9111 §5.2) and `parse_targeted_field` (RFC 9213 §2.2,
  a Structured Fields Dictionary, RFC 8941 §3.2).
- `delta_seconds` (RFC 9111 §1.2.2), `parse_http_date` / `format_http_date`
  (RFC 9110 §5.6.7).
- `normalize_key` (RFC 9110 §4.2.3, RFC 3986 §6.2.2), `cache_tags`, `satisfy_range`
  (RFC 9110 §14.1.2, §14.2).
"""

from __future__ import annotations

import calendar
import email.utils
import re
from collections.abc import Collection, Iterable
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit

Headers = tuple[tuple[str, str], ...]
Directives = dict[str, str | None]

# RFC 9111 §1.2.2: the greatest delta-seconds a cache must represent.
DELTA_SECONDS_MAX = 2**31
# Limits on what a peer can make us parse (TigerStyle: a limit on everything).
FIELD_CHARS_MAX = 16 * 1024
TAGS_MAX = 256
TAG_CHARS_MAX = 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def make_headers(pairs: Iterable[tuple[str | bytes, str | bytes]]) -> Headers:
    """`Headers` from raw pairs (ASGI bytes or str): names lowercased, latin-1 decoded."""
    out = []
    for name, value in pairs:
        n = name.decode("latin-1") if isinstance(name, bytes) else name
        v = value.decode("latin-1") if isinstance(value, bytes) else value
        out.append((n.strip().lower(), v.strip()))
    return tuple(out)


def get_all(headers: Headers, name: str) -> list[str]:
    """Every field line value for `name`, in order."""
    return [v for n, v in headers if n == name]


def get_first(headers: Headers, name: str) -> str | None:
    """The first field line of a singleton field (Date, Expires, Last-Modified, ETag).

    RFC 9111 §4.2.1: with more than one value "the first occurrence should be used".
    """
    for n, v in headers:
        if n == name:
            return v
    return None


def get_combined(headers: Headers, name: str) -> str | None:
    """All field lines of a list field joined with ", " (RFC 9110 §5.3), or None."""
    values = get_all(headers, name)
    return ", ".join(values) if values else None


def without(headers: Headers, names: Collection[str]) -> Headers:
    """`headers` minus the fields named (lowercase) in `names`."""
    return tuple((n, v) for n, v in headers if n not in names)


def parse_list(value: str | None) -> list[str]:
    """The members of a comma-separated list of tokens (RFC 9110 §5.6.1), lowercased.

    Empty members are dropped, as the list syntax requires of recipients.
    """
    if not value:
        return []
    return [m.strip().lower() for m in value.split(",") if m.strip()]


def _split_outside_quotes(value: str) -> list[str]:
    """Split on commas that are not inside a quoted-string (RFC 9110 §5.6.4)."""
    members, start, in_quotes, escaped = [], 0, False, False
    for i, char in enumerate(value):
        if escaped:
            escaped = False
        elif in_quotes and char == "\\":
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == "," and not in_quotes:
            members.append(value[start:i])
            start = i + 1
    members.append(value[start:])
    return members


def _unquote(value: str) -> str:
    """The content of a quoted-string with its quoted-pairs resolved (RFC 9110 §5.6.4)."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def parse_cache_control(value: str | None) -> Directives:
    """Cache-Control directives (RFC 9111 §5.2): lowercase name -> argument or None.

    Names are case-insensitive; arguments may be tokens or quoted-strings, and both forms
    are accepted for every directive (§5.2: "SHOULD accept both forms"). When a directive
    appears twice the first occurrence wins (§4.2.1). A member that is not `token [= arg]`
    keeps its leading token, so a garbled `no-store` still forbids storing; a member with
    no leading token is ignored. Never raises.
    """
    directives: Directives = {}
    if not value:
        return directives
    for member in _split_outside_quotes(value[:FIELD_CHARS_MAX]):
        member = member.strip()
        match = _TOKEN.match(member)
        if match is None:
            continue
        name = match.group(0).lower()
        rest = member[match.end():].lstrip()
        argument = _unquote(rest[1:].strip()) if rest.startswith("=") else None
        directives.setdefault(name, argument)
    return directives


def delta_seconds(argument: str | None) -> int | None:
    """A delta-seconds argument (RFC 9111 §1.2.2), or None when it is invalid.

    Values too large for 31 bits are capped at 2**31, as §1.2.2 requires. A negative,
    fractional or missing value is invalid; callers treat invalid freshness information
    as stale (§4.2.1).
    """
    if argument is None or not argument.isascii() or not argument.isdigit():
        return None
    digits = argument.lstrip("0") or "0"
    if len(digits) > 10:  # int() on thousands of digits is slow; the cap applies anyway
        return DELTA_SECONDS_MAX
    return min(int(digits), DELTA_SECONDS_MAX)


# RFC 8941 §3.2: a Dictionary, members `key[=bare-item]` with optional parameters.
_SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_SF_ITEM = re.compile(
    r'(?P<string>"(?:[^"\\]|\\["\\])*")'
    r"|(?P<number>-?\d{1,15}(?:\.\d{1,3})?)"
    r"|(?P<boolean>\?[01])"
    r"|(?P<token>[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*)"
)
_SF_SEPARATOR = re.compile(r"[ \t]*(,[ \t]*)?")
_SF_PARAMETERS = re.compile(r'(?:;\s*[a-z*][a-z0-9_\-.*]*(?:=(?:"(?:[^"\\]|\\.)*"|[^;,\s]+))?)*')


def parse_targeted_field(value: str | None) -> Directives | None:
    """A targeted cache-control field such as CDN-Cache-Control (RFC 9213 §2.2).

    The field is a Structured Fields Dictionary; members map to directives as §2.2
    describes: a bare key or `?1` is a directive without argument, `?0` is absent, an
    Integer / Token / String is the argument. Returns None when the field is absent,
    empty or fails to parse: §2.2 says such a field SHOULD be ignored (the cache falls
    back to Cache-Control). Decimals are kept as text, so `max-age=1.5` is invalid
    delta-seconds and therefore stale, like in Cache-Control.
    """
    if value is None or not value.strip() or len(value) > FIELD_CHARS_MAX:
        return None
    directives: Directives = {}
    position, text = 0, value.strip()
    while True:
        key = _SF_KEY.match(text, position)
        if key is None:
            return None
        position = key.end()
        argument: str | None = None
        present = True
        if text.startswith("=", position):
            item = _SF_ITEM.match(text, position + 1)
            if item is None:
                return None
            position = item.end()
            if item.group("boolean") is not None:
                present = item.group("boolean") == "?1"
            elif item.group("string") is not None:
                argument = _unquote(item.group("string"))
            else:
                argument = item.group(0)
        parameters = _SF_PARAMETERS.match(text, position)
        position = parameters.end() if parameters else position
        # RFC 8941 §4.2.2: a repeated key overwrites the earlier value.
        if present:
            directives[key.group(0)] = argument
        else:
            directives.pop(key.group(0), None)
        separator = _SF_SEPARATOR.match(text, position)
        assert separator is not None  # the pattern matches the empty string
        if separator.end() == len(text):
            if separator.group(1):
                return None  # a trailing comma is a parse error (RFC 8941 §4.2.2)
            break
        if not separator.group(1):
            return None
        position = separator.end()
    return directives


_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
    start=1)}
_IMF_FIXDATE = re.compile(
    r"[a-z]{3}, (\d{2}) ([a-z]{3}) (\d{4}) (\d{2}):(\d{2}):(\d{2}) gmt", re.IGNORECASE)
_RFC850_DATE = re.compile(
    r"[a-z]{6,9}, (\d{2})-([a-z]{3})-(\d{2}) (\d{2}):(\d{2}):(\d{2}) gmt", re.IGNORECASE)
_ASCTIME_DATE = re.compile(
    r"[a-z]{3} ([a-z]{3}) ([ \d]\d) (\d{2}):(\d{2}):(\d{2}) (\d{4})", re.IGNORECASE)


def parse_http_date(value: str | None, reference_s: float | None = None) -> float | None:
    """An HTTP-date in any of the three formats of RFC 9110 §5.6.7, as epoch seconds.

    Returns None for anything else. A two-digit rfc850 year that would lie more than 50
    years after `reference_s` (default: the year 2000) is read as the most recent past
    year with those digits, as §5.6.7 requires.
    """
    if value is None:
        return None
    text = value.strip()
    if match := _IMF_FIXDATE.fullmatch(text):
        day, month, year, hour, minute, second = match.groups()
    elif match := _RFC850_DATE.fullmatch(text):
        day, month, two_digits, hour, minute, second = match.groups()
        reference_year = 2000 if reference_s is None else _year(reference_s)
        candidate = reference_year - reference_year % 100 + int(two_digits)
        year = str(candidate - 100 if candidate > reference_year + 50 else candidate)
    elif match := _ASCTIME_DATE.fullmatch(text):
        month, day, hour, minute, second, year = match.groups()
    else:
        return None
    month_number = _MONTHS.get(month.lower())
    if month_number is None:
        return None
    try:
        moment = datetime(int(year), month_number, int(day), int(hour), int(minute),
                          min(int(second), 59), tzinfo=UTC)  # a leap second reads as :59
    except ValueError:
        return None
    return float(calendar.timegm(moment.timetuple()))


def _year(epoch_s: float) -> int:
    return datetime.fromtimestamp(max(0.0, min(epoch_s, 253402300799.0)), UTC).year


def format_http_date(epoch_s: float) -> str:
    """An IMF-fixdate (RFC 9110 §5.6.7), the only format a sender may generate."""
    return email.utils.formatdate(max(0.0, min(epoch_s, 253402300799.0)), usegmt=True)


_DEFAULT_PORTS = {"http": "80", "https": "443"}
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normalize_percent(text: str) -> str:
    """Decode percent-encoded unreserved characters and uppercase the other triplets.

    RFC 3986 §6.2.2.1 and §6.2.2.2; RFC 9110 §4.2.3 lists both as equivalences.
    """
    def fix(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return _PERCENT.sub(fix, text)


def normalize_key(scheme: str, host: str, path: str, query: str = "") -> str:
    """The cache key of a target URI, normalised as RFC 9110 §4.2.3 allows.

    Lowercases scheme and host, drops a default or empty port, reads an empty path as
    "/", and normalises percent-encoding (unreserved characters decoded, hex digits
    uppercased). Query parameters keep their order (an origin may depend on it) and an
    empty query is dropped, since an ASGI server cannot tell `/a?` from `/a`. Dot
    segments are left alone: the origin receives the path as sent and might route
    `/a/../b` differently from `/b`.
    """
    scheme = scheme.lower()
    host = host.lower()
    if host.endswith("]") or ":" not in host:
        authority = host
    else:
        name, _, port = host.rpartition(":")
        authority = name if port in ("", _DEFAULT_PORTS.get(scheme)) else f"{name}:{port}"
    key = f"{scheme}://{authority}{_normalize_percent(path) or '/'}"
    return f"{key}?{_normalize_percent(query)}" if query else key


def uri_key(uri: str) -> str | None:
    """`normalize_key` of an absolute http(s) URI (userinfo dropped), None if it is not one."""
    try:
        parts = urlsplit(uri)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return None
    if parts.scheme.lower() not in _DEFAULT_PORTS or not host:
        return None
    return normalize_key(parts.scheme, host, parts.path, parts.query)


def origin_of(key: str) -> str:
    """The origin (scheme://host[:port]) part of a key made by `normalize_key`."""
    scheme, _, rest = key.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


def cache_tags(headers: Headers) -> frozenset[str]:
    """The purge tags of a response: `Cache-Tag` (comma-separated, as Cloudflare) and
    `Surrogate-Key` (space-separated, as Fastly), every field line of both.

    Tags keep their case. At most `TAGS_MAX` tags of at most `TAG_CHARS_MAX` characters
    are kept; longer ones are dropped, so one response cannot bloat the tag index.
    """
    tags: list[str] = []
    for value in get_all(headers, "cache-tag"):
        tags.extend(value.split(","))
    for value in get_all(headers, "surrogate-key"):
        tags.extend(value.split())
    kept = [t.strip() for t in tags if t.strip() and len(t.strip()) <= TAG_CHARS_MAX]
    return frozenset(kept[:TAGS_MAX])


RangeResult = tuple[int, int] | None | Literal["unsatisfiable"]
_BYTE_RANGE = re.compile(r"(\d*)-(\d*)")


def satisfy_range(range_header: str | None, body_length: int) -> RangeResult:
    """The single byte range a `Range` field asks of a complete stored response.

    Returns `(first, last)` inclusive for a 206, `"unsatisfiable"` for a 416, or None to
    ignore the field and serve the whole 200. Follows RFC 9110 §14.1.2 (first-last,
    first-, -suffix; last clamped to the length; a suffix longer than the body is the
    whole body) and §14.2 (other units and invalid specifiers are ignored; a zero-length
    representation may ignore Range). Requests for more than one range are declined with
    None: a 200 is always a correct answer (§14.2 "MAY ignore"), and it spares us
    multipart/byteranges and the many-small-ranges denial of service of §17.15.
    """
    if range_header is None or body_length <= 0 or len(range_header) > 1024:
        return None
    unit, _, specifier = range_header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    members = [m.strip() for m in specifier.split(",") if m.strip()]
    if len(members) != 1:
        return None
    match = _BYTE_RANGE.fullmatch(members[0])
    if match is None or match.group(0) == "-":
        return None
    first_text, last_text = match.groups()
    if not first_text:  # suffix-range
        suffix_length = _position(last_text)
        if suffix_length == 0:
            return "unsatisfiable"
        return max(0, body_length - suffix_length), body_length - 1
    first = _position(first_text)
    if last_text and _position(last_text) < first:
        return None  # an invalid int-range: the whole specifier is invalid
    if first >= body_length:
        return "unsatisfiable"
    last = body_length - 1 if not last_text else min(_position(last_text), body_length - 1)
    return first, last


def _position(digits: str) -> int:
    """A byte position; anything past 18 digits is larger than any body we store."""
    return int(digits) if len(digits) <= 18 else 10**18


_ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"')


def parse_etags(value: str) -> list[str]:
    """The entity tags of an If-None-Match / If-Match list (RFC 9110 §8.8.3, §13.1.2).

    Tags may contain commas, so they are matched, not split. A list with no quoted tag
    at all (a broken sender) is read as comma-separated raw values.
    """
    tags = _ENTITY_TAG.findall(value)
    return tags if tags else [m.strip() for m in value.split(",") if m.strip()]


def is_weak(tag: str) -> bool:
    """Whether an entity tag carries the weak indicator `W/` (RFC 9110 §8.8.3)."""
    return tag.strip().startswith("W/")


def weak_match(a: str, b: str | None) -> bool:
    """Weak comparison of entity tags: opaque tags equal, weakness ignored (§8.8.3.2)."""
    if b is None:
        return False
    return a.strip().removeprefix("W/") == b.strip().removeprefix("W/")
