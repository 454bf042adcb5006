"""The edge cache's hit fast path: a stored response prepared once, then plain hits.

A hit through the full rules runs `select_stored`, `decide`, `not_modified`,
`range_to_serve` and `age_header`, and each parses the stored fields again (Date twice
over, Cache-Control, Age, Vary): most of the cost of a hit. `prepare` computes what
depends on the stored response alone once, with those same `cachepolicy` functions.
`plain_hit_age` then answers the common request, a GET or HEAD carrying none of the
fields those functions read (`PLAIN_BLOCKERS`) for the only variant stored, which has
no Vary and no `no-cache`: it returns the Age (§4.2.3) when `decide` would say
`Fresh`, and None for anything else, which then takes the full path. For such a
request `not_modified` is False and `range_to_serve` None, so a plain hit is the whole
stored response. tests/unit/test_cachehit.py checks the agreement with `decide`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fogline.core.cachecontrol import DELTA_SECONDS_MAX, Headers, get_combined
from fogline.core.cachepolicy import (
    SHARED_CACHE,
    CacheConfig,
    StoredResponse,
    current_age,
    freshness_lifetime,
    response_directives,
)

# Request fields that `decide` (Cache-Control, Pragma), `not_modified` and
# `range_to_serve` read: a request with any of them takes the full path.
PLAIN_BLOCKERS = frozenset({"cache-control", "pragma", "if-none-match", "if-modified-since",
                            "if-range", "range"})


@dataclass(frozen=True, slots=True)
class PreparedStored:
    """A stored response with its request-independent figures computed once."""

    stored: StoredResponse
    plain: bool            # no Vary and no no-cache: plain hits may skip `decide`
    initial_age_s: float   # the age at response time (corrected_initial_age, §4.2.3)
    lifetime_s: float      # freshness lifetime (§4.2.1)


def prepare(stored: StoredResponse, config: CacheConfig = SHARED_CACHE) -> PreparedStored:
    directives, _ = response_directives(stored.headers, config)
    plain = "no-cache" not in directives and get_combined(stored.headers, "vary") is None
    return PreparedStored(
        stored, plain,
        initial_age_s=current_age(stored, stored.response_time_s),
        lifetime_s=freshness_lifetime(stored.status, stored.headers,
                                      stored.response_time_s, config))


def plain_hit_age(prepared: PreparedStored, method: str, request_headers: Headers,
                  now_s: float) -> float | None:
    """The age of `prepared` at `now_s` when the request is a plain fresh hit on it (the
    only variant stored for the key), else None: use the full rules."""
    if not prepared.plain or method not in ("GET", "HEAD"):
        return None
    for name, _ in request_headers:
        if name in PLAIN_BLOCKERS:
            return None
    # current_age(stored, now_s): the initial age plus the resident time.
    age_s = prepared.initial_age_s + max(0.0, now_s - prepared.stored.response_time_s)
    return age_s if prepared.lifetime_s > age_s else None


def age_value(age_s: float) -> str:
    """The Age field for `age_s`, as `cachepolicy.age_header` writes it."""
    return str(min(int(age_s), DELTA_SECONDS_MAX))
