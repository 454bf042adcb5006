"""What ctx.cache and ctx.fetch accept: key mapping, value round trips, every rejection."""

from __future__ import annotations

import math
from typing import Any

import pytest

from fogline.errors import ConfigError, ProtocolError
from fogline.node.apps.cache_client import FetchResponse, fetch_response
from fogline.node.apps.cache_rules import (
    FETCH_HEADERS_MAX,
    FETCH_REQUEST_BYTES_MAX,
    KEY_BYTES_MAX,
    TAG_CHARS_MAX,
    TAGS_MAX,
    TTL_S_MAX,
    URL_CHARS_MAX,
    VALUE_BYTES_MAX,
    EntryMeta,
    app_prefix,
    check_encoded,
    check_fetch,
    check_key,
    check_tags,
    check_ttl,
    decode_meta,
    decode_value,
    encode_meta,
    encode_value,
    is_live,
    store_key,
)


def test_app_keys_live_under_a_per_app_prefix_that_no_other_app_shares() -> None:
    assert store_key("shop", "user:42") == "app://shop/user:42"
    assert store_key("shop", "user:42").startswith(app_prefix("shop"))
    assert not store_key("shop-eu", "k").startswith(app_prefix("shop"))
    assert not store_key("shop", "k").startswith(app_prefix("sho"))


@pytest.mark.parametrize("value", [b"\x00\xff raw", "text é", 42, 1.5, True, [1, "a"],
                                   {"a": {"b": [None, 2]}}, ""])
def test_values_come_back_as_the_type_they_went_in(value: Any) -> None:
    back = decode_value(encode_value(value))
    assert back == value and type(back) is type(value)


def test_a_tuple_comes_back_as_a_list() -> None:
    assert decode_value(encode_value((1, 2))) == [1, 2]


@pytest.mark.parametrize(("value", "message"), [
    (None, "cannot cache None"),
    (object(), "cannot be encoded"),
    (b"x" * (VALUE_BYTES_MAX + 1), f"exceeds {VALUE_BYTES_MAX}"),
])
def test_values_that_cannot_be_cached_are_refused(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        encode_value(value)


def test_the_node_refuses_encoded_values_that_are_not_bytes_or_too_large() -> None:
    with pytest.raises(ConfigError, match="must be bytes"):
        check_encoded("text")
    with pytest.raises(ConfigError, match="exceeds"):
        check_encoded(b"x" * (VALUE_BYTES_MAX + 1))
    with pytest.raises(ProtocolError, match="does not decode"):
        decode_value(b"\xc1")


@pytest.mark.parametrize(("key", "message"), [
    (42, "must be a str"),
    ("", "must not be empty"),
    ("a\nb", "control character"),
    ("k" * (KEY_BYTES_MAX + 1), f"more than {KEY_BYTES_MAX}"),
    ("é" * (KEY_BYTES_MAX // 2 + 1), "bytes, more than"),
    ("\ud800", "not valid Unicode"),
])
def test_bad_keys_are_refused(key: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_key(key)


def test_keys_may_be_any_printable_text_up_to_the_limit() -> None:
    for key in ("a", "user:42/profile?x=1", "clé", "k" * KEY_BYTES_MAX):
        assert check_key(key) == key


@pytest.mark.parametrize(("tags", "message"), [
    ("prices", "must be a list"),
    (42, "must be a list"),
    ([f"t{i}" for i in range(TAGS_MAX + 1)], f"more than {TAGS_MAX}"),
    ([1], "must be a str"),
    ([""], "visible ASCII"),
    (["a b"], "visible ASCII"),
    (["a,b"], "without commas"),
    (["é"], "visible ASCII"),
    (["t" * (TAG_CHARS_MAX + 1)], f"1-{TAG_CHARS_MAX}"),
])
def test_bad_tags_are_refused(tags: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_tags(tags)


def test_tags_are_a_set_of_header_tokens() -> None:
    assert check_tags(["a", "b", "a"]) == frozenset({"a", "b"})
    assert check_tags(()) == frozenset()
    assert check_tags({"product:42", "Prices_EU"}) == {"product:42", "Prices_EU"}


@pytest.mark.parametrize(("ttl", "message"), [
    (None, "needs a TTL"),
    (0, "must be > 0"),
    (-1, "must be > 0"),
    (TTL_S_MAX + 1, "at most"),
    (True, "number of seconds"),
    ("60", "number of seconds"),
    (math.nan, "number of seconds"),
    (math.inf, "number of seconds"),
])
def test_bad_ttls_are_refused(ttl: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_ttl(ttl)


def test_ttls_are_seconds_up_to_thirty_days() -> None:
    assert check_ttl(0.25) == 0.25
    assert check_ttl(TTL_S_MAX) == TTL_S_MAX


def test_an_entry_is_live_until_its_expiry() -> None:
    meta = decode_meta(encode_meta(EntryMeta(100.0)))
    assert meta == EntryMeta(100.0)
    assert is_live(meta, 99.9) and not is_live(meta, 100.0)
    assert decode_meta(b"not metadata") is None and not is_live(None, 0)


# ctx.fetch ------------------------------------------------------------------------------

def test_fetch_requests_are_normalised() -> None:
    request = check_fetch("HTTPS://API.Example.com:8443/a b?q=é#frag".replace(" ", "%20"),
                          "get", {"Accept": "application/json"})
    assert (request.method, request.origin) == ("GET", "https://api.example.com:8443")
    assert request.target == "/a%20b?q=%C3%A9"  # the fragment is never sent
    assert request.headers == (("accept", "application/json"),)
    assert check_fetch("http://h").target == "/"
    post = check_fetch("http://h/x", "POST", [("content-type", "text/plain")], "hé")
    assert post.body == "hé".encode() and post.url == "http://h/x"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"url": 42}, "must be a str"),
    ({"url": "ftp://h/x"}, "http:// or https://"),
    ({"url": "/relative"}, "http:// or https://"),
    ({"url": "http:///x"}, "has no host"),
    ({"url": "http://user:pw@h/x"}, "credentials"),
    ({"url": "http://h:99999/"}, "malformed"),
    ({"url": "http://h:0/"}, "port 0"),
    ({"url": "http://h/a b"}, "spaces or control"),
    ({"url": "http://h/\n"}, "spaces or control"),
    ({"url": "http://bücher.de/"}, "IDNA"),
    ({"url": "http://h/" + "x" * URL_CHARS_MAX}, f"more than {URL_CHARS_MAX}"),
    ({"method": "TRACE"}, "fetch method must be one of"),
    ({"method": 1}, "fetch method must be one of"),
    ({"headers": "accept: x"}, "dict or a list"),
    ({"headers": [("a",)]}, "pair"),
    ({"headers": {"bad name": "v"}}, "not an HTTP token"),
    ({"headers": {"x": "a\r\nb"}}, "control characters"),
    ({"headers": {"x": 1}}, "str value"),
    ({"headers": {"x": "☃"}}, "Latin-1"),
    ({"headers": {"Host": "other"}}, "comes from the fetch URL"),
    ({"headers": [("x", "v")] * (FETCH_HEADERS_MAX + 1)}, f"more than {FETCH_HEADERS_MAX}"),
    ({"headers": {"x": "v" * 20000}}, "bytes, more than"),
    ({"body": b"x"}, "GET request carries no body"),
    ({"method": "POST", "body": 42}, "bytes or str"),
    ({"method": "POST", "body": b"x" * (FETCH_REQUEST_BYTES_MAX + 1)}, "exceeds"),
])
def test_bad_fetches_are_refused(kwargs: dict[str, Any], message: str) -> None:
    args = {"url": "http://h/x", "method": "GET", "headers": None, "body": None, **kwargs}
    with pytest.raises(ConfigError, match=message):
        check_fetch(args["url"], args["method"], args["headers"], args["body"])


def test_a_fetch_response_reads_as_text_json_and_headers() -> None:
    response = fetch_response("http://h/x", [200, [["content-type", "application/json"],
                                                    ["set-cookie", "a=1"], ["set-cookie", "b=2"]],
                                             '{"v": "é"}'.encode(), "HIT"])
    assert isinstance(response, FetchResponse)
    assert (response.status, response.ok, response.hit) == (200, True, True)
    assert response.text == '{"v": "é"}' and response.json() == {"v": "é"}
    latin = fetch_response("http://h/x", [200, [["content-type", "text/plain; charset=latin-1"]],
                                          "é".encode("latin-1"), "REVALIDATED"])
    assert (latin.text, latin.hit) == ("é", True)
    assert response.headers["set-cookie"] == "a=1, b=2"
    assert response.raw_headers[1:] == (("set-cookie", "a=1"), ("set-cookie", "b=2"))
    miss = fetch_response("http://h/x", [502, [], b"<html>", "MISS"])
    assert (miss.ok, miss.hit, miss.text) == (False, False, "<html>")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        miss.json()
    with pytest.raises(ProtocolError, match="malformed fetch reply"):
        fetch_response("http://h/x", [200, [], "not bytes", "HIT"])
    with pytest.raises(ProtocolError, match="malformed fetch reply"):
        fetch_response("http://h/x", None)
