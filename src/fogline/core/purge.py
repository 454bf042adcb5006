"""Fleet-wide cache purges: what a purge may say, and the order a node applies them in.

A purge removes cached objects on the nodes by tag, URL or prefix. The hub numbers
purges 1, 2, 3, ... (one sequence for the whole fleet, regional ones included) and
sends each to every node at once. A node applies them strictly in that order and
remembers the last one applied, so it can tell when it missed some (a gap, or a
reconnect) and ask the hub for them before serving from its cache again.

URLs and prefixes name paths on the node's front (`/catalog/items/1`); a full URL is
accepted and only its path and query count, since every node serves a site under its
own host name. They are normalised as cache keys are (`normalize_key`), so a purge
matches whatever spelling the cached request used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from fogline.core.cachecontrol import TAG_CHARS_MAX, normalize_key
from fogline.errors import ConfigError
from fogline.protocol import PURGE_VALUES_MAX, Purge

PurgeKind = Literal["tag", "url", "prefix"]
KINDS: tuple[PurgeKind, ...] = ("tag", "url", "prefix")
URL_CHARS_MAX = 4096
REASON_CHARS_MAX = 500
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_SITE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# Tags arrive comma-separated (Cache-Tag) or space-separated (Surrogate-Key), so a
# tag holding either could never have been stored.
_TAG_FORBIDDEN = re.compile(r"[\s,]")


def target_path(value: str) -> str:
    """The normalised path and query a purge URL or prefix names."""
    if value.startswith("/"):
        path, _, query = value.partition("?")
    else:
        parts = urlsplit(value)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{value!r}: give a path starting with / or an http(s) URL")
        path, query = parts.path or "/", parts.query
    key = normalize_key("http", "node", path, query)
    return key.removeprefix("http://node")


def check_purge(kind: str, values: list[str] | tuple[str, ...], region: str = "",
                site: str = "") -> tuple[PurgeKind, tuple[str, ...]]:
    """A purge request's kind and values as nodes will apply them, or a ConfigError."""
    if kind not in KINDS:
        raise ConfigError(f"purge kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not values:
        raise ConfigError(f"a {kind} purge needs at least one value")
    if len(values) > PURGE_VALUES_MAX:
        raise ConfigError(f"at most {PURGE_VALUES_MAX} values per purge, got {len(values)}")
    if region and not _REGION.match(region):
        raise ConfigError(f"invalid region {region!r}")
    if site and not _SITE.match(site):
        raise ConfigError(f"invalid site name {site!r}")
    checked: list[str] = []
    for value in values:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{kind} purge values must be non-empty strings")
        if kind == "tag":
            if len(value) > TAG_CHARS_MAX or _TAG_FORBIDDEN.search(value):
                raise ConfigError(f"invalid tag {value[:80]!r}: at most {TAG_CHARS_MAX} "
                                  "characters, no spaces or commas")
            checked.append(value)
            continue
        if len(value) > URL_CHARS_MAX:
            raise ConfigError(f"{kind} longer than {URL_CHARS_MAX} characters")
        checked.append(target_path(value))
    if kind == "prefix" and "/" in checked:
        raise ConfigError("a prefix purge of / would empty the cache: purge by tag, or "
                          "name a narrower prefix")
    return kind, tuple(dict.fromkeys(checked))  # type: ignore[return-value]


def applies_to(purge: Purge, region: str) -> bool:
    """Whether a node in `region` acts on the purge (it counts it either way)."""
    return not purge.region or purge.region == region


@dataclass(frozen=True)
class Apply:
    purge: Purge


@dataclass(frozen=True)
class Skip:
    """Already applied (a redelivery, or delivered again by a catch-up)."""


@dataclass(frozen=True)
class CatchUp:
    """Purges are missing before this one: ask the hub for everything after `after`."""

    after: int


Step = Apply | Skip | CatchUp


def next_step(applied_seq: int, purge: Purge) -> Step:
    """What a node that applied everything up to `applied_seq` does with `purge`."""
    if purge.seq <= applied_seq:
        return Skip()
    if purge.seq == applied_seq + 1:
        return Apply(purge)
    return CatchUp(applied_seq)
