"""The edge cache's HTTP caching rules (fogline.core.cachepolicy, fogline.core.cachecontrol).

One test (or parametrized group) per requirement, named after the RFC section it checks:
RFC 9111 (HTTP Caching), RFC 9110 (HTTP Semantics), RFC 5861 (stale-*), RFC 9213
(CDN-Cache-Control). Time is passed in; nothing here sleeps or opens a socket.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fogline.core.cachecontrol import (
    DELTA_SECONDS_MAX,
    Headers,
    cache_tags,
    delta_seconds,
    format_http_date,
    get_combined,
    make_headers,
    normalize_key,
    parse_cache_control,
    parse_http_date,
    parse_targeted_field,
    satisfy_range,
)
from fogline.core.cachepolicy import (
    CDN_CACHE,
    SHARED_CACHE,
    CacheConfig,
    Fresh,
    Miss,
    OnlyIfCachedMiss,
    Stale,
    StoredResponse,
    Validate,
    age_header,
    conditional_headers,
    current_age,
    decide,
    freshness_lifetime,
    invalidated_uris,
    not_modified,
    not_modified_headers,
    on_error,
    range_to_serve,
    select_for_update,
    select_stored,
    storable,
    to_stored,
    update_stored_from_304,
    vary_key,
    vary_matches,
)

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
PRIVATE_CACHE = CacheConfig(shared=False)


def h(*pairs: tuple[str, str]) -> Headers:
    return make_headers(pairs)


def date(offset_s: float = 0.0) -> str:
    return format_http_date(T0 + offset_s)


def store(*pairs: tuple[str, str], status: int = 200, request: Headers = (),
          request_time_s: float = T0, response_time_s: float = T0,
          config: CacheConfig = SHARED_CACHE) -> StoredResponse:
    """A stored response received at T0 with a Date of T0 unless the pairs give one."""
    headers = h(*pairs)
    if not any(n == "date" for n, _ in headers):
        headers = (*headers, ("date", date()))
    return to_stored(request, status, headers, request_time_s, response_time_s, 100, config)


def ok(method: str = "GET", status: int = 200, request: Headers = (),
       response: Headers = (), config: CacheConfig = SHARED_CACHE) -> bool:
    return storable(method, status, request, response, config)[0]


# ---------------------------------------------------------------- parsing (§5.2, §1.2.2)

def test_rfc9111_5_2_directive_names_are_case_insensitive_and_arguments_may_be_quoted() -> None:
    parsed = parse_cache_control('Max-Age="60", NO-STORE, s-maxage=30')
    assert parsed == {"max-age": "60", "no-store": None, "s-maxage": "30"}


def test_rfc9111_5_2_quoted_arguments_may_contain_commas() -> None:
    parsed = parse_cache_control('no-cache="set-cookie, x-token", private, max-age=5')
    assert parsed == {"no-cache": "set-cookie, x-token", "private": None, "max-age": "5"}


def test_rfc9111_4_2_1_the_first_of_duplicate_directives_is_used() -> None:
    assert parse_cache_control("max-age=10, max-age=99")["max-age"] == "10"
    headers = h(("cache-control", "max-age=10"), ("cache-control", "max-age=99"))
    assert freshness_lifetime(200, headers, T0) == 10


def test_rfc9110_5_3_field_lines_are_combined_with_commas() -> None:
    headers = h(("Cache-Control", "public"), ("cache-control", "max-age=7"))
    assert get_combined(headers, "cache-control") == "public, max-age=7"
    assert parse_cache_control(get_combined(headers, "cache-control")) == {
        "public": None, "max-age": "7"}


def test_rfc9111_5_2_garbled_members_keep_their_directive_name() -> None:
    # A cache errs on the safe side: "no-store junk" still forbids storing.
    assert "no-store" in parse_cache_control("no-store junk, =x, , ")
    assert parse_cache_control(None) == {} and parse_cache_control("") == {}


@pytest.mark.parametrize(("argument", "expected"), [
    ("0", 0), ("60", 60), ("007", 7), ("2147483648", 2**31), ("99999999999999999999", 2**31),
    ("9" * 5000, 2**31), ("-1", None), ("1.5", None), ("", None), (None, None),
    ("abc", None), ("٣", None),
])
def test_rfc9111_1_2_2_delta_seconds(argument: str | None, expected: int | None) -> None:
    assert delta_seconds(argument) == expected


@given(st.text(max_size=300))
def test_rfc9111_5_2_parsing_never_raises_on_arbitrary_strings(value: str) -> None:
    directives = parse_cache_control(value)
    assert all(name == name.lower() for name in directives)
    parse_targeted_field(value)
    parse_http_date(value)
    satisfy_range(value, 100)


@pytest.mark.parametrize("value", [
    "Sun, 06 Nov 1994 08:49:37 GMT",   # IMF-fixdate
    "Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850
    "Sun Nov  6 08:49:37 1994",        # obsolete asctime
])
def test_rfc9110_5_6_7_all_three_date_formats_are_accepted(value: str) -> None:
    assert parse_http_date(value) == 784111777.0


def test_rfc9110_5_6_7_two_digit_years_are_never_more_than_50_years_ahead() -> None:
    reference_s = parse_http_date("Sun, 06 Nov 2022 00:00:00 GMT")
    assert parse_http_date("Sunday, 06-Nov-72 08:49:37 GMT", reference_s) == parse_http_date(
        "Sun, 06 Nov 2072 08:49:37 GMT")
    assert parse_http_date("Sunday, 06-Nov-73 08:49:37 GMT", reference_s) == parse_http_date(
        "Sun, 06 Nov 1973 08:49:37 GMT")


@pytest.mark.parametrize("value", ["0", "-1", "tomorrow", "Sun, 32 Nov 1994 08:49:37 GMT",
                                   "Sun, 06 Foo 1994 08:49:37 GMT", ""])
def test_rfc9110_5_6_7_invalid_dates_are_none(value: str) -> None:
    assert parse_http_date(value) is None


def test_rfc9110_5_6_7_generated_dates_are_imf_fixdate() -> None:
    assert format_http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"


# ---------------------------------------------------------------- storing (§3)

@pytest.mark.parametrize("status", sorted({200, 203, 204, 300, 301, 308, 404, 405, 410, 414,
                                           501}))
def test_rfc9111_3_heuristically_cacheable_statuses_are_storable_by_default(status: int) -> None:
    assert ok(status=status)


@pytest.mark.parametrize("status", [201, 302, 303, 307, 400, 403, 500, 503])
def test_rfc9111_3_other_statuses_need_explicit_freshness(status: int) -> None:
    assert not ok(status=status)
    assert ok(status=status, response=h(("cache-control", "max-age=60")))
    assert ok(status=status, response=h(("expires", date(60))))
    assert ok(status=status, response=h(("cache-control", "s-maxage=60")))
    assert ok(status=status, response=h(("cache-control", "public")))


def test_rfc9111_3_private_cache_stores_private_and_ignores_s_maxage() -> None:
    assert ok(status=302, response=h(("cache-control", "private")), config=PRIVATE_CACHE)
    assert not ok(status=302, response=h(("cache-control", "s-maxage=60")),
                  config=PRIVATE_CACHE)


@pytest.mark.parametrize("method", ["POST", "PUT", "HEAD", "DELETE", "OPTIONS"])
def test_rfc9111_3_only_responses_to_get_are_stored(method: str) -> None:
    assert not ok(method, response=h(("cache-control", "max-age=60")))


@pytest.mark.parametrize("status", [100, 103, 206, 304])
def test_rfc9111_3_non_final_partial_and_304_responses_are_not_stored(status: int) -> None:
    assert not ok(status=status, response=h(("cache-control", "max-age=60")))


def test_rfc9111_5_2_2_5_response_no_store() -> None:
    verdict, reason = storable("GET", 200, (), h(("cache-control", "max-age=60, no-store")))
    assert not verdict and "no-store" in reason


def test_rfc9111_5_2_1_5_request_no_store() -> None:
    assert not ok(request=h(("cache-control", "no-store")),
                  response=h(("cache-control", "max-age=60")))


def test_rfc9111_5_2_2_7_private_is_not_stored_by_a_shared_cache() -> None:
    response = h(("cache-control", "private, max-age=60"))
    assert not ok(response=response)
    assert ok(response=response, config=PRIVATE_CACHE)


@pytest.mark.parametrize(("cache_control", "expected"), [
    ("", False), ("max-age=60", False), ("public", True), ("s-maxage=60", True),
    ("must-revalidate, max-age=60", True),
])
def test_rfc9111_3_5_authorization_needs_explicit_permission(cache_control: str,
                                                             expected: bool) -> None:
    request = h(("authorization", "Bearer t"))
    response = h(("cache-control", cache_control)) if cache_control else ()
    assert ok(request=request, response=response) is expected
    assert ok(request=request, response=response, config=PRIVATE_CACHE)


def test_rfc9111_5_2_2_3_must_understand_overrides_no_store_for_understood_statuses() -> None:
    response = h(("cache-control", "must-understand, no-store, max-age=60"))
    assert ok(status=200, response=response)
    assert not ok(status=299, response=response)  # an unknown status is not stored at all


def test_rfc9111_4_1_vary_star_responses_are_not_stored() -> None:
    assert not ok(response=h(("vary", "accept, *"), ("cache-control", "max-age=60")))


def test_rfc9111_3_1_hop_by_hop_connection_and_proxy_fields_are_not_stored() -> None:
    stored = store(("connection", "close, x-hop"), ("x-hop", "1"), ("keep-alive", "5"),
                   ("proxy-authenticate", "Basic"), ("transfer-encoding", "chunked"),
                   ("x-app", "kept"), ("cache-control", "max-age=60"))
    names = {n for n, _ in stored.headers}
    assert names == {"x-app", "cache-control", "date"}


def test_rfc9111_5_2_2_4_qualified_no_cache_strips_fields_and_allows_reuse() -> None:
    stored = store(("cache-control", 'no-cache="set-cookie", max-age=60'),
                   ("set-cookie", "id=1"), ("x-app", "kept"))
    assert {n for n, _ in stored.headers} == {"cache-control", "x-app", "date"}
    assert decide("GET", (), stored, T0 + 1) == Fresh(1.0)


def test_rfc9111_5_2_2_7_qualified_private_strips_fields_in_a_shared_cache_only() -> None:
    pairs = (("cache-control", 'private="x-user, set-cookie", max-age=60'),
             ("x-user", "alice"), ("set-cookie", "id=1"))
    assert ok(response=h(*pairs))
    assert {n for n, _ in store(*pairs).headers} == {"cache-control", "date"}
    kept = store(*pairs, config=PRIVATE_CACHE)
    assert {"x-user", "set-cookie"} <= {n for n, _ in kept.headers}


def test_rfc9110_6_6_1_a_date_is_added_to_a_stored_response_without_one() -> None:
    stored = to_stored((), 200, h(("cache-control", "max-age=60")), T0 - 1, T0, 0)
    assert ("date", date()) in stored.headers


# ---------------------------------------------------------------- freshness (§4.2.1, §4.2.2)

def test_rfc9111_4_2_1_s_maxage_beats_max_age_in_a_shared_cache() -> None:
    headers = h(("cache-control", "max-age=60, s-maxage=600"), ("date", date()))
    assert freshness_lifetime(200, headers, T0) == 600
    assert freshness_lifetime(200, headers, T0, PRIVATE_CACHE) == 60


def test_rfc9111_5_3_max_age_and_s_maxage_override_expires() -> None:
    expires = ("expires", date(3600))
    assert freshness_lifetime(200, h(("cache-control", "max-age=5"), expires), T0) == 5
    assert freshness_lifetime(200, h(("cache-control", "s-maxage=7"), expires), T0) == 7


def test_rfc9111_4_2_1_expires_minus_date() -> None:
    assert freshness_lifetime(200, h(("date", date()), ("expires", date(300))), T0) == 300
    # Without Date, the time the response was received stands in for it.
    assert freshness_lifetime(200, h(("expires", date(300))), T0 + 100) == 200
    assert freshness_lifetime(200, h(("date", date()), ("expires", date(-300))), T0) == 0


@pytest.mark.parametrize("expires", ["0", "-1", "yesterday", ""])
def test_rfc9111_5_3_an_invalid_expires_is_already_expired(expires: str) -> None:
    headers = h(("date", date()), ("expires", expires), ("last-modified", date(-86400)))
    assert freshness_lifetime(200, headers, T0) == 0


@pytest.mark.parametrize("max_age", ["abc", "-5", "1.5", ""])
def test_rfc9111_4_2_1_invalid_freshness_information_is_stale(max_age: str) -> None:
    headers = h(("cache-control", f"max-age={max_age}"), ("expires", date(600)),
                ("last-modified", date(-86400)))
    assert freshness_lifetime(200, headers, T0) == 0


def test_rfc9111_4_2_2_heuristic_freshness_from_last_modified() -> None:
    headers = h(("date", date()), ("last-modified", date(-1000)))
    assert freshness_lifetime(200, headers, T0) == pytest.approx(100)
    assert freshness_lifetime(200, h(("date", date()), ("last-modified", date(-10**7))),
                              T0) == 86400
    config = CacheConfig(heuristic_fraction=0.5, heuristic_max_s=300)
    assert freshness_lifetime(200, headers, T0, config) == 300
    assert freshness_lifetime(200, h(("date", date())), T0) == 0  # no Last-Modified


def test_rfc9111_4_2_2_heuristics_only_for_cacheable_statuses_without_explicit_freshness() -> None:
    last_modified = ("last-modified", date(-1000))
    assert freshness_lifetime(302, h(("date", date()), last_modified), T0) == 0
    assert freshness_lifetime(302, h(("date", date()), last_modified,
                                     ("cache-control", "public")), T0) == pytest.approx(100)
    assert freshness_lifetime(200, h(("date", date()), last_modified,
                                     ("cache-control", "max-age=0")), T0) == 0


@given(st.integers(0, 2**31), st.integers(0, 2**31))
def test_rfc9111_4_2_1_freshness_is_monotonic_in_max_age(a: int, b: int) -> None:
    low, high = sorted((a, b))
    lifetime = [freshness_lifetime(200, h(("cache-control", f"max-age={v}")), T0)
                for v in (low, high)]
    assert 0 <= lifetime[0] <= lifetime[1]


def test_rfc9213_cdn_cache_control_precedence() -> None:
    headers = h(("cache-control", "max-age=10, s-maxage=20"), ("cdn-cache-control", "max-age=600"),
                ("expires", date(5)), ("date", date()))
    assert freshness_lifetime(200, headers, T0, CDN_CACHE) == 600
    assert freshness_lifetime(200, headers, T0, SHARED_CACHE) == 20


def test_rfc9213_2_1_targeted_field_replaces_cache_control_and_expires_entirely() -> None:
    # Expires is ignored once a targeted field applies: heuristics apply instead.
    headers = h(("cdn-cache-control", "public"), ("expires", date(600)), ("date", date()),
                ("last-modified", date(-1000)))
    assert freshness_lifetime(200, headers, T0, CDN_CACHE) == pytest.approx(100)
    # no-store in the targeted field wins over Cache-Control's public, and vice versa.
    blocked = h(("cache-control", "public, max-age=60"), ("cdn-cache-control", "no-store"))
    assert not ok(response=blocked, config=CDN_CACHE) and ok(response=blocked)
    allowed = h(("cache-control", "no-store"), ("cdn-cache-control", "max-age=60"))
    assert ok(response=allowed, config=CDN_CACHE) and not ok(response=allowed)


def test_rfc9213_2_1_target_list_order_picks_the_first_valid_field() -> None:
    config = CacheConfig(targeted_fields=("fogline-cache-control", "cdn-cache-control"))
    both = h(("cdn-cache-control", "max-age=60"), ("fogline-cache-control", "max-age=5"))
    assert freshness_lifetime(200, both, T0, config) == 5
    invalid_first = h(("fogline-cache-control", "max-age=5,"), ("cdn-cache-control", "max-age=60"))
    assert freshness_lifetime(200, invalid_first, T0, config) == 60


@pytest.mark.parametrize("value", ["", "Max-Age=60", "max-age=60,", "max-age=6x0", "(a b)"])
def test_rfc9213_2_2_invalid_targeted_fields_fall_back_to_cache_control(value: str) -> None:
    headers = h(("cache-control", "max-age=30"), ("cdn-cache-control", value))
    assert freshness_lifetime(200, headers, T0, CDN_CACHE) == 30


def test_rfc9213_2_2_structured_field_values_map_to_directives() -> None:
    assert parse_targeted_field('max-age=60, no-cache="set-cookie", private=?0, public=?1, '
                                'x-ext;p=1') == {"max-age": "60", "no-cache": "set-cookie",
                                                 "public": None, "x-ext": None}
    assert freshness_lifetime(200, h(("cdn-cache-control", "max-age=1.5")), T0, CDN_CACHE) == 0


# ---------------------------------------------------------------- age (§4.2.3, §5.1)

def test_rfc9111_4_2_3_age_calculation() -> None:
    # Requested at T0 - 2, received at T0 with Age: 10 and a Date 3 s before receipt.
    stored = store(("date", date(-3)), ("age", "10"), request_time_s=T0 - 2,
                   response_time_s=T0)
    # apparent_age = 3, corrected_age_value = 10 + 2, resident_time = 5.
    assert current_age(stored, T0 + 5) == pytest.approx(17)


def test_rfc9111_4_2_3_apparent_age_wins_over_a_smaller_age_field() -> None:
    stored = store(("date", date(-30)), ("age", "1"))
    assert current_age(stored, T0) == 30
    assert current_age(store(("date", date(+30))), T0) == 0  # a Date in the future


@pytest.mark.parametrize(("age", "expected"), [("5", 5), ("5, 9", 5), ("abc", 0), ("-3", 0),
                                               ("", 0)])
def test_rfc9111_5_1_age_field_first_member_used_invalid_ignored(age: str, expected: int) -> None:
    assert current_age(store(("age", age)), T0) == expected


def test_rfc9111_5_1_age_header_is_whole_seconds_capped_at_2_31() -> None:
    assert age_header(store(), T0 + 1.9) == "1"
    assert age_header(store(("age", "2147483647")), T0 + 10) == "2147483648"


@given(st.floats(-1e9, 1e9), st.floats(-1e9, 1e9), st.floats(-1e9, 1e9),
       st.one_of(st.none(), st.text(max_size=12)), st.one_of(st.none(), st.text(max_size=30)))
def test_rfc9111_4_2_3_age_is_never_negative_and_never_decreases(
        request_s: float, response_s: float, now_s: float, age: str | None,
        date_value: str | None) -> None:
    pairs = [("age", age)] if age is not None else []
    if date_value is not None:
        pairs.append(("date", date_value))
    stored = StoredResponse(200, h(*pairs), T0 + request_s, T0 + response_s)
    assert current_age(stored, T0 + now_s) >= 0
    assert current_age(stored, T0 + now_s + 1) >= current_age(stored, T0 + now_s)


# ---------------------------------------------------------------- reuse (§4, §5.2)

def test_rfc9111_4_a_miss_when_nothing_is_stored() -> None:
    assert isinstance(decide("GET", (), None, T0), Miss)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "FOO"])
def test_rfc9111_4_unsafe_methods_are_written_through(method: str) -> None:
    assert isinstance(decide(method, (), store(("cache-control", "max-age=60")), T0), Miss)


def test_rfc9111_4_2_a_fresh_response_is_served_with_its_age() -> None:
    stored = store(("cache-control", "max-age=60"))
    assert decide("GET", (), stored, T0 + 59) == Fresh(59.0)
    assert decide("HEAD", (), stored, T0 + 59) == Fresh(59.0)  # HEAD from a stored GET
    assert isinstance(decide("GET", (), stored, T0 + 60), Validate)  # fresh means age < lifetime


def test_rfc9111_4_3_1_validation_sends_the_stored_validators() -> None:
    stored = store(("cache-control", "max-age=60"), ("etag", '"v1"'),
                   ("last-modified", date(-100)))
    decision = decide("GET", (), stored, T0 + 61)
    assert isinstance(decision, Validate)
    assert decision.conditional_headers == (("if-none-match", '"v1"'),
                                            ("if-modified-since", date(-100)))
    other = store(("etag", 'W/"v2"'), ("last-modified", date(-5)))
    assert conditional_headers([stored, other]) == (("if-none-match", '"v1", W/"v2"'),)
    assert conditional_headers([store()]) == ()


def test_rfc9111_5_2_2_4_response_no_cache_always_validates() -> None:
    stored = store(("cache-control", "no-cache, max-age=600"), ("etag", '"a"'))
    decision = decide("GET", (), stored, T0 + 1)
    assert isinstance(decision, Validate) and "no-cache" in decision.reason


def test_rfc9111_5_2_1_4_request_no_cache_validates() -> None:
    stored = store(("cache-control", "max-age=600"))
    assert isinstance(decide("GET", h(("cache-control", "no-cache")), stored, T0 + 1), Validate)


def test_rfc9111_5_4_pragma_no_cache_counts_only_without_cache_control() -> None:
    stored = store(("cache-control", "max-age=600"))
    assert isinstance(decide("GET", h(("pragma", "no-cache")), stored, T0 + 1), Validate)
    request = h(("pragma", "no-cache"), ("cache-control", "max-stale"))
    assert isinstance(decide("GET", request, stored, T0 + 1), Fresh)


def test_rfc9111_5_2_1_1_request_max_age() -> None:
    stored = store(("cache-control", "max-age=600"))
    assert isinstance(decide("GET", h(("cache-control", "max-age=10")), stored, T0 + 5), Fresh)
    assert isinstance(decide("GET", h(("cache-control", "max-age=10")), stored, T0 + 11),
                      Validate)
    assert isinstance(decide("GET", h(("cache-control", "max-age=0")), stored, T0 + 1), Validate)


def test_rfc9111_5_2_1_3_request_min_fresh() -> None:
    stored = store(("cache-control", "max-age=100"))
    assert isinstance(decide("GET", h(("cache-control", "min-fresh=30")), stored, T0 + 70), Fresh)
    assert isinstance(decide("GET", h(("cache-control", "min-fresh=30")), stored, T0 + 71),
                      Validate)


def test_rfc9111_5_2_1_2_request_max_stale() -> None:
    stored = store(("cache-control", "max-age=100"))
    bounded = h(("cache-control", "max-stale=50"))
    assert decide("GET", bounded, stored, T0 + 150) == Stale(
        150.0, "request max-stale (§5.2.1.2)", revalidate=False)
    assert isinstance(decide("GET", bounded, stored, T0 + 151), Validate)
    assert isinstance(decide("GET", h(("cache-control", "max-stale")), stored, T0 + 10**6),
                      Stale)


def test_rfc9111_5_2_1_7_only_if_cached_answers_504_instead_of_contacting_the_origin() -> None:
    request = h(("cache-control", "only-if-cached"))
    assert isinstance(decide("GET", request, None, T0), OnlyIfCachedMiss)
    stored = store(("cache-control", "max-age=60"))
    assert isinstance(decide("GET", request, stored, T0 + 1), Fresh)
    assert isinstance(decide("GET", request, stored, T0 + 61), OnlyIfCachedMiss)
    stale_ok = h(("cache-control", "only-if-cached, max-stale"))
    assert isinstance(decide("GET", stale_ok, stored, T0 + 61), Stale)


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "s-maxage=60",
                                       "no-cache"])
def test_rfc9111_4_2_4_directives_that_forbid_serving_stale(directive: str) -> None:
    stored = store(("cache-control", f"max-age=60, {directive}, stale-while-revalidate=600"))
    request = h(("cache-control", "max-stale"))
    assert isinstance(decide("GET", request, stored, T0 + 100), Validate)
    assert isinstance(decide("GET", (), stored, T0 + 100), Validate)


def test_rfc9111_5_2_2_8_proxy_revalidate_binds_shared_caches_only() -> None:
    stored = store(("cache-control", "max-age=60, proxy-revalidate"), config=PRIVATE_CACHE)
    request = h(("cache-control", "max-stale"))
    assert isinstance(decide("GET", request, stored, T0 + 100, PRIVATE_CACHE), Stale)
    assert isinstance(decide("GET", request, stored, T0 + 100, SHARED_CACHE), Validate)


def test_rfc9111_5_2_2_10_s_maxage_implies_proxy_revalidate() -> None:
    stored = store(("cache-control", "s-maxage=60, stale-while-revalidate=600"))
    assert isinstance(decide("GET", (), stored, T0 + 61), Validate)
    assert not on_error(store(("cache-control", "s-maxage=60, stale-if-error=600")), T0 + 61)


def test_rfc5861_3_stale_while_revalidate_window() -> None:
    stored = store(("cache-control", "max-age=60, stale-while-revalidate=30"))
    assert isinstance(decide("GET", (), stored, T0 + 59), Fresh)
    assert decide("GET", (), stored, T0 + 90) == Stale(
        90.0, "stale-while-revalidate (RFC 5861 §3)", revalidate=True)
    assert isinstance(decide("GET", (), stored, T0 + 91), Validate)
    # The client's own constraints still apply inside the window.
    assert isinstance(decide("GET", h(("cache-control", "no-cache")), stored, T0 + 70), Validate)


def test_rfc5861_3_stale_while_revalidate_from_the_cdn_field() -> None:
    stored = store(("cdn-cache-control", "max-age=60, stale-while-revalidate=30"),
                   ("cache-control", "no-store"), config=CDN_CACHE)
    assert isinstance(decide("GET", (), stored, T0 + 80, CDN_CACHE), Stale)


# ---------------------------------------------------------------- errors (RFC 5861 §4)

def test_rfc5861_4_stale_if_error_window() -> None:
    stored = store(("cache-control", "max-age=60, stale-if-error=300"))
    assert on_error(stored, T0 + 360)
    assert not on_error(stored, T0 + 361)
    assert not on_error(store(("cache-control", "max-age=60")), T0 + 61)


def test_rfc5861_4_stale_if_error_as_a_request_directive() -> None:
    stored = store(("cache-control", "max-age=60"))
    assert on_error(stored, T0 + 100, h(("cache-control", "stale-if-error=60")))
    assert not on_error(stored, T0 + 200, h(("cache-control", "stale-if-error=60")))


@pytest.mark.parametrize("directive", ["must-revalidate", "proxy-revalidate", "no-cache"])
def test_rfc9111_4_2_4_stale_if_error_is_forbidden_by_revalidation_directives(
        directive: str) -> None:
    stored = store(("cache-control", f"max-age=60, {directive}, stale-if-error=600"))
    assert not on_error(stored, T0 + 100)
    assert not on_error(stored, T0 + 100, config=CacheConfig(stale_if_error_s=600))


def test_rfc9111_4_3_3_a_fresh_response_may_answer_when_validation_fails() -> None:
    assert on_error(store(("cache-control", "max-age=60")), T0 + 10)
    assert not on_error(store(("cache-control", "max-age=60, no-cache")), T0 + 10)


def test_rfc9111_4_2_4_a_site_rule_allows_stale_on_error() -> None:
    stored = store(("cache-control", "max-age=60"))
    config = CacheConfig(stale_if_error_s=3600)
    assert on_error(stored, T0 + 3660, config=config)
    assert not on_error(stored, T0 + 3661, config=config)


# ---------------------------------------------------------------- Vary (§4.1)

def test_rfc9111_4_1_vary_matches_after_combining_lines_and_whitespace() -> None:
    stored = store(("vary", "Accept-Encoding, accept-language"), ("cache-control", "max-age=60"),
                   request=h(("accept-encoding", "gzip,  br"), ("accept-language", "en")))
    same = h(("accept-encoding", "gzip"), ("accept-encoding", "br"), ("accept-language", " en"))
    assert vary_matches(stored, same)
    assert isinstance(decide("GET", same, stored, T0 + 1), Fresh)
    other = h(("accept-encoding", "gzip"), ("accept-language", "en"))
    assert not vary_matches(stored, other)
    assert isinstance(decide("GET", other, stored, T0 + 1), Miss)


def test_rfc9111_4_1_an_absent_field_matches_only_an_absent_field() -> None:
    stored = store(("vary", "accept-language"), request=())
    assert vary_matches(stored, h(("accept", "x")))
    assert not vary_matches(stored, h(("accept-language", "")))
    assert not vary_matches(store(("vary", "accept-language"),
                                  request=h(("accept-language", "en"))), ())


def test_rfc9111_4_1_vary_star_never_matches() -> None:
    stored = StoredResponse(200, h(("vary", "*"), ("date", date())), T0, T0)
    assert not vary_matches(stored, ())
    assert vary_key(stored.headers, ()) is None


def test_rfc9111_4_1_vary_key_names_the_variant() -> None:
    response = h(("vary", "Accept-Language, accept-encoding"))
    key = vary_key(response, h(("accept-encoding", "gzip ,br"), ("accept-language", "en")))
    assert key == "accept-encoding=gzip, br\naccept-language=en"
    assert vary_key(response, ()) == "accept-encoding\naccept-language"
    assert vary_key((), h(("accept", "x"))) == ""


def test_rfc9111_4_1_the_most_recent_matching_variant_is_selected() -> None:
    older = store(("vary", "accept"), ("date", date(-10)), request=h(("accept", "a")))
    newer = store(("vary", "accept"), ("date", date()), request=h(("accept", "a")))
    other = store(("vary", "accept"), ("date", date(10)), request=h(("accept", "b")))
    assert select_stored([older, newer, other], h(("accept", "a"))) is newer
    assert select_stored([older, other], h(("accept", "c"))) is None


# ---------------------------------------------------------------- validation (§4.3)

def test_rfc9111_4_3_4_a_304_updates_stored_fields_except_content_length() -> None:
    stored = store(("cache-control", "max-age=60"), ("etag", '"v1"'), ("content-length", "100"),
                   ("x-old", "kept"), ("age", "50"))
    response = h(("cache-control", "max-age=120"), ("etag", '"v1"'), ("content-length", "0"),
                 ("x-new", "added"), ("date", date(100)), ("connection", "close"))
    updated = update_stored_from_304(stored, response, T0 + 99, T0 + 100)
    fields = dict(updated.headers)
    assert fields["cache-control"] == "max-age=120" and fields["x-new"] == "added"
    assert fields["content-length"] == "100" and fields["x-old"] == "kept"
    assert "connection" not in fields and "age" not in fields
    assert fields["date"] == date(100) and updated.body_length == stored.body_length


def test_rfc9111_4_3_4_a_304_freshens_the_stored_response() -> None:
    stored = store(("cache-control", "max-age=60"), ("etag", '"v1"'))
    assert isinstance(decide("GET", (), stored, T0 + 100), Validate)
    updated = update_stored_from_304(stored, h(("etag", '"v1"')), T0 + 100, T0 + 101)
    assert ("date", date(101)) in updated.headers  # a Date stands in for the 304's missing one
    assert decide("GET", (), updated, T0 + 111) == Fresh(11.0)


def test_rfc9111_4_3_4_strong_validators_select_every_matching_response() -> None:
    a = store(("etag", '"a"'))
    b = store(("etag", '"b"'))
    a_again = store(("etag", '"a"'), response_time_s=T0 + 5)
    assert select_for_update([a, b, a_again], h(("etag", '"a"'))) == [0, 2]
    assert select_for_update([b], h(("etag", '"a"'))) == []
    last_modified = ("last-modified", date(-3600))
    old = store(last_modified)
    assert select_for_update([old, b], h(last_modified, ("date", date()))) == [0]


def test_rfc9111_4_3_4_weak_validators_select_the_most_recent_match() -> None:
    first = store(("etag", 'W/"a"'))
    second = store(("etag", 'W/"a"'), response_time_s=T0 + 5)
    assert select_for_update([first, second, store(("etag", 'W/"b"'))],
                             h(("etag", 'W/"a"'))) == [1]


def test_rfc9111_4_3_4_a_304_without_validators_updates_a_lone_response_without_any() -> None:
    assert select_for_update([store()], ()) == [0]
    assert select_for_update([store(), store()], ()) == []
    assert select_for_update([store(("etag", '"a"'))], ()) == []


def test_rfc9111_4_3_2_the_cache_answers_conditional_requests_itself() -> None:
    stored = store(("etag", 'W/"v1"'), ("last-modified", date(-100)))
    assert not_modified("GET", h(("if-none-match", '"x", "v1"')), stored)  # weak comparison
    assert not_modified("HEAD", h(("if-none-match", "*")), stored)
    assert not not_modified("GET", h(("if-none-match", '"x"'),
                                     ("if-modified-since", date())), stored)  # INM wins
    assert not_modified("GET", h(("if-modified-since", date(-100))), stored)
    assert not not_modified("GET", h(("if-modified-since", date(-101))), stored)
    assert not not_modified("GET", h(("if-modified-since", "garbage")), stored)
    assert not not_modified("POST", h(("if-none-match", "*")), stored)
    # Without Last-Modified, Date stands in (§4.3.2).
    assert not_modified("GET", h(("if-modified-since", date())), store())


def test_rfc9110_15_4_5_a_304_carries_the_fields_a_200_would_have() -> None:
    stored = store(("etag", '"v"'), ("cache-control", "max-age=5"), ("vary", "accept"),
                   ("content-type", "text/html"))
    assert {n for n, _ in not_modified_headers(stored)} == {"etag", "cache-control", "vary",
                                                            "date"}


# ---------------------------------------------------------------- invalidation (§4.4)

def test_rfc9111_4_4_unsafe_methods_invalidate() -> None:
    uri = "https://Shop.example:443/cart?id=1"
    response = h(("location", "/orders/7"), ("content-location", "https://shop.example/c"))
    assert invalidated_uris("POST", 201, uri, response) == [
        "https://shop.example/cart?id=1", "https://shop.example/orders/7",
        "https://shop.example/c"]
    assert invalidated_uris("DELETE", 204, uri, ()) == ["https://shop.example/cart?id=1"]
    assert invalidated_uris("BREW", 302, uri, ()) == ["https://shop.example/cart?id=1"]


def test_rfc9111_4_4_safe_methods_and_errors_do_not_invalidate() -> None:
    uri = "https://shop.example/cart"
    assert invalidated_uris("GET", 200, uri, ()) == []
    assert invalidated_uris("HEAD", 200, uri, ()) == []
    assert invalidated_uris("POST", 404, uri, ()) == []
    assert invalidated_uris("PUT", 500, uri, ()) == []


def test_rfc9111_4_4_other_origins_are_never_invalidated() -> None:
    uri = "https://shop.example/cart"
    response = h(("location", "https://victim.example/"),
                 ("content-location", "http://shop.example/cart"))  # another scheme
    assert invalidated_uris("POST", 200, uri, response) == ["https://shop.example/cart"]


@given(st.text(max_size=60), st.text(max_size=60), st.integers(100, 599))
def test_rfc9111_4_4_invalidation_never_raises_on_arbitrary_locations(
        location: str, content_location: str, status: int) -> None:
    response = (("location", location), ("content-location", content_location))
    keys = invalidated_uris("POST", status, "https://shop.example/cart", response)
    assert all(key.startswith("https://shop.example/") for key in keys)


def test_rfc9110_9_1_methods_are_case_sensitive_so_lowercase_get_invalidates() -> None:
    assert invalidated_uris("get", 200, "http://a/x", ()) == ["http://a/x"]


# ---------------------------------------------------------------- keys, tags, ranges

@pytest.mark.parametrize(("parts", "key"), [
    (("HTTP", "Example.COM", "/a", ""), "http://example.com/a"),
    (("http", "example.com:80", "", ""), "http://example.com/"),
    (("https", "example.com:443", "/", ""), "https://example.com/"),
    (("https", "example.com:", "/", ""), "https://example.com/"),
    (("https", "example.com:8443", "/", ""), "https://example.com:8443/"),
    (("http", "[::1]:80", "/", ""), "http://[::1]/"),
    (("http", "a", "/%7euser/%41%2f%2a", "q=%7e%2b"), "http://a/~user/A%2F%2A?q=~%2B"),
])
def test_rfc9110_4_2_3_keys_are_normalised(parts: tuple[str, str, str, str], key: str) -> None:
    assert normalize_key(*parts) == key


def test_rfc9110_4_2_3_query_parameter_order_is_kept() -> None:
    assert normalize_key("http", "a", "/", "b=2&a=1") != normalize_key("http", "a", "/", "a=1&b=2")


def test_cache_tags_from_cache_tag_and_surrogate_key() -> None:
    headers = h(("cache-tag", "product-1, Catalog ,,"), ("surrogate-key", "k1  k2"),
                ("cache-tag", "extra"))
    assert cache_tags(headers) == {"product-1", "Catalog", "k1", "k2", "extra"}
    flood = h(("cache-tag", ",".join(f"t{i}" for i in range(1000))), ("surrogate-key", "x" * 2000))
    assert len(cache_tags(flood)) == 256


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=0-99", (0, 99)),
    ("bytes=100-", (100, 999)),
    ("bytes=900-5000", (900, 999)),
    ("bytes=-100", (900, 999)),
    ("bytes=-5000", (0, 999)),
    ("Bytes = 0-0", (0, 0)),
    ("bytes=1000-", "unsatisfiable"),
    ("bytes=-0", "unsatisfiable"),
    ("bytes=99999999999999999999999-", "unsatisfiable"),
])
def test_rfc9110_14_1_2_single_byte_ranges(header: str, expected: object) -> None:
    assert satisfy_range(header, 1000) == expected


@pytest.mark.parametrize("header", [
    None, "bytes=0-1,5-6", "items=0-1", "bytes=5-1", "bytes=-", "bytes=a-b", "bytes", "",
])
def test_rfc9110_14_2_ranges_not_served_are_ignored_for_a_full_200(header: str | None) -> None:
    assert satisfy_range(header, 1000) is None


def test_rfc9110_14_2_a_zero_length_representation_ignores_range() -> None:
    assert satisfy_range("bytes=0-0", 0) is None


def test_rfc9110_14_2_range_applies_to_get_only() -> None:
    stored = store()  # body_length 100
    assert range_to_serve("GET", h(("range", "bytes=0-9")), stored) == (0, 9)
    assert range_to_serve("HEAD", h(("range", "bytes=0-9")), stored) is None


def test_rfc9110_13_1_5_if_range_needs_a_strong_match() -> None:
    stored = store(("etag", '"v1"'), ("last-modified", date(-3600)))
    wanted = ("range", "bytes=0-9")
    assert range_to_serve("GET", h(wanted, ("if-range", '"v1"')), stored) == (0, 9)
    assert range_to_serve("GET", h(wanted, ("if-range", '"v0"')), stored) is None
    assert range_to_serve("GET", h(wanted, ("if-range", 'W/"v1"')), stored) is None
    assert range_to_serve("GET", h(wanted, ("if-range", date(-3600))), stored) == (0, 9)
    assert range_to_serve("GET", h(wanted, ("if-range", date(-3599))), stored) is None
    weak_date = store(("last-modified", date(-30)))  # under 60 s before Date: weak
    assert range_to_serve("GET", h(wanted, ("if-range", date(-30))), weak_date) is None
    assert range_to_serve("GET", h(wanted, ("if-range", '"v1"')), store(("etag", 'W/"v1"'))
                          ) is None


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(1, 10**6))
def test_rfc9110_14_1_2_a_served_range_lies_inside_the_body(first: int, last: int,
                                                            length: int) -> None:
    for header in (f"bytes={first}-{last}", f"bytes={first}-", f"bytes=-{last}"):
        result = satisfy_range(header, length)
        if isinstance(result, tuple):
            assert 0 <= result[0] <= result[1] < length


def test_delta_seconds_max_is_2_31() -> None:
    assert DELTA_SECONDS_MAX == 2**31
