"""The hit fast path (fogline.core.cachehit) agrees with the full rules it shortcuts.

Whenever `plain_hit_age` answers, `decide` says Fresh with the same age, the request is
neither a conditional to answer 304 nor a range, and the Age field is the same; and
for a plain request on a plain stored response it answers whenever `decide` is Fresh.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fogline.core.cachecontrol import format_http_date
from fogline.core.cachehit import PLAIN_BLOCKERS, age_value, plain_hit_age, prepare
from fogline.core.cachepolicy import (
    CDN_CACHE,
    SHARED_CACHE,
    CacheConfig,
    Fresh,
    StoredResponse,
    age_header,
    decide,
    not_modified,
    range_to_serve,
)

T0 = 1_700_000_000.0

DIRECTIVES = ["max-age=60", "s-maxage=30", "max-age=0", "no-cache", 'no-cache="x"',
              "must-revalidate", "stale-while-revalidate=30", "public", "no-store",
              "max-age=abc", "proxy-revalidate", "stale-if-error=60"]
REQUEST_FIELDS = [("user-agent", "wrk"), ("accept", "*/*"), ("accept-encoding", "gzip"),
                  ("cache-control", "no-cache"), ("cache-control", "max-age=5"),
                  ("pragma", "no-cache"), ("if-none-match", '"v1"'),
                  ("if-modified-since", format_http_date(T0)), ("range", "bytes=0-3"),
                  ("if-range", '"v1"'), ("cache-control", "only-if-cached")]


@st.composite
def stored_responses(draw: st.DrawFn) -> StoredResponse:
    headers: list[tuple[str, str]] = []
    chosen = draw(st.lists(st.sampled_from(DIRECTIVES), max_size=3, unique=True))
    if chosen:
        headers.append(("cache-control", ", ".join(chosen)))
    response_time_s = T0 + draw(st.floats(0, 100))
    request_time_s = response_time_s - draw(st.floats(0, 5))
    if draw(st.booleans()):
        headers.append(("date", format_http_date(response_time_s - draw(st.integers(-5, 90)))))
    if draw(st.booleans()):
        headers.append(("age", str(draw(st.integers(0, 90)))))
    if draw(st.booleans()):
        headers.append(("expires", format_http_date(response_time_s + draw(
            st.integers(-60, 120)))))
    if draw(st.booleans()):
        headers.append(("last-modified", format_http_date(T0 - 3600)))
    if draw(st.booleans()):
        headers.append(("etag", '"v1"'))
    vary_values: tuple[tuple[str, str | None], ...] = ()
    if draw(st.booleans()):
        headers.append(("vary", "accept-encoding"))
        vary_values = (("accept-encoding", draw(st.sampled_from([None, "gzip"]))),)
    if draw(st.booleans()):
        headers.append(("cdn-cache-control", "max-age=10"))
    status = draw(st.sampled_from([200, 200, 200, 203, 301, 404, 500]))
    return StoredResponse(status, tuple(headers), request_time_s, response_time_s,
                          vary_values, body_length=100)


@settings(max_examples=400, deadline=None)
@given(stored_responses(), st.lists(st.sampled_from(REQUEST_FIELDS), max_size=3),
       st.sampled_from(["GET", "HEAD", "POST"]), st.floats(-10, 400),
       st.sampled_from([SHARED_CACHE, CDN_CACHE, CacheConfig(shared=False)]))
def test_a_plain_hit_is_what_the_full_rules_decide(
        stored: StoredResponse, fields: list[tuple[str, str]], method: str, after_s: float,
        config: CacheConfig) -> None:
    request = tuple(fields)
    now_s = stored.response_time_s + after_s
    prepared = prepare(stored, config)
    age_s = plain_hit_age(prepared, method, request, now_s)
    decision = decide(method, request, stored, now_s, config)
    if age_s is not None:
        assert decision == Fresh(age_s)
        assert not not_modified(method, request, stored)
        assert range_to_serve(method, request, stored) is None
        assert age_value(age_s) == age_header(stored, now_s)
    plain_request = not any(name in PLAIN_BLOCKERS for name, _ in request)
    if isinstance(decision, Fresh) and plain_request and prepared.plain:
        assert age_s == decision.age_s


def test_a_request_with_any_blocking_field_takes_the_full_path() -> None:
    stored = StoredResponse(200, (("cache-control", "max-age=60"),), T0, T0)
    prepared = prepare(stored)
    assert plain_hit_age(prepared, "GET", (("user-agent", "x"),), T0 + 1) == 1.0
    for name, value in REQUEST_FIELDS:
        if name in PLAIN_BLOCKERS:
            assert plain_hit_age(prepared, "GET", ((name, value),), T0 + 1) is None
    assert plain_hit_age(prepared, "GET", (), T0 + 61) is None  # stale: full rules
    assert plain_hit_age(prepared, "POST", (), T0 + 1) is None
    varied = prepare(StoredResponse(200, (("cache-control", "max-age=60"),
                                          ("vary", "accept")), T0, T0, (("accept", None),)))
    assert not varied.plain and plain_hit_age(varied, "GET", (), T0 + 1) is None
