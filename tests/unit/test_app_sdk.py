"""The App SDK: decoration-time validation, route and topic matching, codecs, return
values and schedules (fogline.app, fogline.core.approutes)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fogline.app
from fogline.app import (
    App,
    Message,
    MethodNotAllowed,
    Request,
    Response,
    decode_message,
    decode_payload,
    to_response,
    topic_matches,
)
from fogline.core.approutes import Schedule, parse_interval
from fogline.errors import ConfigError, ProtocolError


async def handler(req: Any, ctx: Any) -> None:
    return None


def test_public_names_are_pinned() -> None:
    assert sorted(fogline.app.__all__) == fogline.app.__all__
    assert fogline.app.__all__ == [
        "App", "AppLogger", "CollectionHandle", "Context", "Message",
        "MethodNotAllowed", "NodeInfo", "Request", "Response", "RouteHandler", "RouteMatch",
        "ScheduleHandler", "TopicHandler", "decode_message", "decode_payload",
        "to_response", "topic_matches",
    ]
    for name in fogline.app.__all__:
        assert hasattr(fogline.app, name)


# App names ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["factory", "a", "edge-2", "x" * 63])
def test_app_accepts_dns_like_names(name: str) -> None:
    assert App(name).name == name


@pytest.mark.parametrize("name", ["", "Factory", "my_app", "-lead", "trail-", "x" * 64,
                                  "a.b", "ü"])
def test_app_rejects_bad_names(name: str) -> None:
    with pytest.raises(ConfigError, match="app name"):
        App(name)


def test_app_rejects_non_string_name() -> None:
    with pytest.raises(ConfigError, match="app name"):
        App(42)  # type: ignore[arg-type]


# Route declarations -------------------------------------------------------------------

def test_route_rejects_unknown_method() -> None:
    with pytest.raises(ConfigError, match="HTTP method 'FETCH'"):
        App("a").route("FETCH", "/x")


def test_route_method_is_case_insensitive() -> None:
    app = App("a")
    app.route("post", "/x")(handler)
    assert app.routes[0].method == "POST"


@pytest.mark.parametrize(("path", "reason"), [
    ("machines", "starting with '/'"),
    ("/machines/", "must not end with '/'"),
    ("/a//b", "empty segment"),
    ("/a/{m", "whole {name}"),
    ("/a/x{m}", "whole {name}"),
    ("/a/{1m}", "whole {name}"),
    ("/a/{m}/{m}", "repeats the parameter"),
    ("/a/{rest:path}/b", "must be the last"),
    ("/a b", "not allowed in a URL path"),
    ("/a?x=1", "not allowed in a URL path"),
    ("/" + "a" * 1100, "longer than"),
])
def test_route_rejects_bad_path_template(path: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        App("a").route("GET", path)


def test_route_rejects_duplicate() -> None:
    app = App("a")
    app.route("GET", "/machines/{machine}")(handler)
    with pytest.raises(ConfigError, match="duplicate route GET"):
        app.route("GET", "/machines/{id}")(handler)


def test_route_rejects_other_parameter_names_for_the_same_path() -> None:
    app = App("a")
    app.route("GET", "/machines/{machine}")(handler)
    with pytest.raises(ConfigError, match="must name its parameters"):
        app.route("PUT", "/machines/{id}")(handler)


def test_route_rejects_non_callable() -> None:
    with pytest.raises(ConfigError, match="callable"):
        App("a").route("GET", "/x")(42)  # type: ignore[type-var]


def test_sync_and_async_handlers_are_told_apart() -> None:
    app = App("a")

    @app.route("GET", "/sync")
    def sync_route(req: Request, ctx: Any) -> str:
        return "ok"

    app.route("GET", "/async")(handler)
    assert [(r.path, r.is_async) for r in app.routes] == [("/sync", False), ("/async", True)]
    assert sync_route(Request("GET", "/sync"), None) == "ok"  # the decorator returns fn


# Route matching -----------------------------------------------------------------------

def routed_app() -> App:
    app = App("a")
    for method, path in [("GET", "/"), ("GET", "/machines"), ("POST", "/machines"),
                         ("GET", "/machines/{machine}"), ("DELETE", "/machines/{machine}"),
                         ("GET", "/machines/all"), ("GET", "/files/{rest:path}")]:
        app.route(method, path)(handler)
    return app


def test_match_returns_handler_and_path_params() -> None:
    found = routed_app().match_route("GET", "/machines/m%201")
    assert found is not None and not isinstance(found, MethodNotAllowed)
    route, params = found
    assert (route.method, route.path, params) == ("GET", "/machines/{machine}",
                                                  {"machine": "m 1"})


def test_literal_segment_wins_over_parameter_whatever_the_order() -> None:
    found = routed_app().match_route("GET", "/machines/all")
    assert found is not None and not isinstance(found, MethodNotAllowed)
    assert found.handler.path == "/machines/all" and found.path_params == {}


def test_root_and_rest_parameter() -> None:
    app = routed_app()
    root = app.match_route("GET", "/")
    rest = app.match_route("GET", "/files/a/b%2Fc.txt")
    assert root is not None and not isinstance(root, MethodNotAllowed)
    assert rest is not None and not isinstance(rest, MethodNotAllowed)
    assert root.handler.path == "/" and rest.path_params == {"rest": "a/b/c.txt"}


@pytest.mark.parametrize("path", ["/nope", "/machines/", "/machines/m1/x", "/files",
                                  "/files/", "", "machines"])
def test_unknown_path_is_404(path: str) -> None:
    assert routed_app().match_route("GET", path) is None


def test_known_path_with_other_method_is_405_with_allowed_methods() -> None:
    app = routed_app()
    assert app.match_route("PUT", "/machines") == MethodNotAllowed(("GET", "HEAD", "POST"))
    # /machines/all is GET only, but /machines/{machine} allows DELETE too.
    assert app.match_route("PATCH", "/machines/all") == MethodNotAllowed(
        ("DELETE", "GET", "HEAD"))


def test_head_falls_back_to_get_and_method_case_is_ignored() -> None:
    app = routed_app()
    head = app.match_route("HEAD", "/machines")
    lower = app.match_route("get", "/machines")
    assert head is not None and not isinstance(head, MethodNotAllowed)
    assert lower is not None and not isinstance(lower, MethodNotAllowed)
    assert head.handler.method == lower.handler.method == "GET"


# Topic declarations and matching ----------------------------------------------------

@pytest.mark.parametrize(("pattern", "reason"), [
    ("", "non-empty"),
    ("a/#/b", "'#' must be the whole last level"),
    ("a/b#", "'#' must be the whole last level"),
    ("a+/b", "'+' must be a whole level"),
    ("a/+b", "'+' must be a whole level"),
    ("a/\x00", "NUL"),
    ("a" * 70_000, "longer than"),
])
def test_on_topic_rejects_bad_patterns(pattern: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        App("a").on_topic(pattern)


def test_on_topic_rejects_unknown_codec() -> None:
    with pytest.raises(ConfigError, match="codec 'xml'"):
        App("a").on_topic("a/b", codec="xml")


@pytest.mark.parametrize("qos", [-1, 3, True])
def test_on_topic_rejects_bad_qos(qos: int) -> None:
    with pytest.raises(ConfigError, match="qos"):
        App("a").on_topic("a/b", qos=qos)


@pytest.mark.parametrize(("pattern", "topic", "expected"), [
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "anything/at/all", True),
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("#", "$SYS/broker", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("factory/+/vibration", "factory/m1/vibration", True),
    ("factory/+/vibration", "factory/m1/temperature", False),
    ("Factory/+", "factory/m1", False),
    ("a/b", "a/+", False),
])
def test_topic_matches_mqtt_examples(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def reference_match(pattern: str, topic: str) -> bool:
    """MQTT matching as one regular expression, to check the level walker against."""
    if topic.startswith("$") and pattern[:1] in ("+", "#"):
        return False
    if pattern == "#":
        return True
    body = pattern[:-2] if pattern.endswith("/#") else pattern
    regex = "/".join("[^/]*" if level == "+" else re.escape(level)
                     for level in body.split("/"))
    if pattern.endswith("/#"):
        regex += "(/.*)?"
    return re.fullmatch(regex, topic, re.DOTALL) is not None


levels = st.lists(st.sampled_from(["a", "b", "", "$x", "c1"]), min_size=1, max_size=5)


@given(levels, levels, st.booleans())
def test_topic_matches_agrees_with_reference(pattern_levels: list[str],
                                             topic_levels: list[str], hash_tail: bool) -> None:
    pattern_levels = ["+" if lv == "b" else lv for lv in pattern_levels]
    pattern = "/".join(pattern_levels + (["#"] if hash_tail else []))
    topic = "/".join(topic_levels)
    assert topic_matches(pattern, topic) is reference_match(pattern, topic)


@given(levels, st.data())
def test_a_topic_matches_itself_and_its_generalisations(topic_levels: list[str],
                                                        data: st.DataObject) -> None:
    topic = "/".join(topic_levels)
    assert topic_matches(topic, topic)
    cut = data.draw(st.integers(0, len(topic_levels)))
    starts_dollar = topic.startswith("$")
    plus = ["+" if i == 0 or data.draw(st.booleans()) else lv
            for i, lv in enumerate(topic_levels)]
    assert topic_matches("/".join(plus), topic) is not starts_dollar
    hashed = "/".join([*topic_levels[:cut], "#"])
    assert topic_matches(hashed, topic) is not (starts_dollar and cut == 0)


def test_handlers_for_topic_in_registration_order() -> None:
    app = App("a")
    app.on_topic("factory/#")(handler)
    app.on_topic("factory/+/vibration", codec="msgpack", qos=2)(handler)
    app.on_topic("other/+")(handler)
    assert [h.pattern for h in app.handlers_for_topic("factory/m1/vibration")] == [
        "factory/#", "factory/+/vibration"]
    assert app.handlers_for_topic("nothing") == ()
    app.on_topic("nothing")(handler)  # registering later invalidates the cache
    assert [h.pattern for h in app.handlers_for_topic("nothing")] == ["nothing"]
    assert app.subscriptions() == {"factory/#": 1, "factory/+/vibration": 2,
                                   "other/+": 1, "nothing": 1}


# Codecs -------------------------------------------------------------------------------

@pytest.mark.parametrize(("codec", "raw", "expected"), [
    ("json", b'{"machine": "m1", "samples": [0.5, 1]}', {"machine": "m1",
                                                         "samples": [0.5, 1]}),
    ("msgpack", b"\x82\xa1a\x01\xa1b\x92\x01\x02", {"a": 1, "b": [1, 2]}),
    ("raw", b"\x00\xff", b"\x00\xff"),
])
def test_decode_payload_per_codec(codec: str, raw: bytes, expected: Any) -> None:
    assert decode_payload(codec, raw) == expected


@pytest.mark.parametrize(("codec", "raw"), [
    ("json", b"{not json"), ("json", b""), ("json", b'{"a": 1} trailing'),
    ("msgpack", b"\xc1"), ("msgpack", b"\x92\x01"),
])
def test_decode_payload_rejects_malformed(codec: str, raw: bytes) -> None:
    with pytest.raises(ProtocolError, match=f"not valid {codec}"):
        decode_payload(codec, raw)


def test_decode_payload_rejects_oversize() -> None:
    with pytest.raises(ProtocolError, match="exceeds 4"):
        decode_payload("raw", b"12345", bytes_max=4)


def test_decode_message_names_the_topic() -> None:
    app = App("a")
    app.on_topic("f/+/v")(handler)
    topic_handler = app.handlers_for_topic("f/m1/v")[0]
    message = decode_message(topic_handler, "f/m1/v", b"[1,2]", 12.5, qos=1)
    assert message == Message("f/m1/v", [1, 2], b"[1,2]", 12.5, 1)
    with pytest.raises(ProtocolError, match="topic 'f/m1/v'"):
        decode_message(topic_handler, "f/m1/v", b"[1,", 12.5)


def test_request_json() -> None:
    assert Request("POST", "/x", body=b'{"a": 1}').json() == {"a": 1}
    with pytest.raises(ProtocolError, match="not valid JSON"):
        Request("POST", "/x", body=b"{").json()


# Return values ------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "status", "body", "media_type"), [
    ({"a": 1}, 200, b'{"a":1}', "application/json"),
    ([1, "x"], 200, b'[1,"x"]', "application/json"),
    ("héllo", 200, "héllo".encode(), "text/plain; charset=utf-8"),
    (b"\x00\x01", 200, b"\x00\x01", "application/octet-stream"),
    (bytearray(b"ab"), 200, b"ab", "application/octet-stream"),
    (None, 204, b"", "text/plain; charset=utf-8"),
])
def test_to_response_normalises_plain_values(value: Any, status: int, body: bytes,
                                             media_type: str) -> None:
    response = to_response(value)
    assert (response.status, response.body, response.media_type) == (status, body,
                                                                      media_type)


def test_to_response_keeps_a_response() -> None:
    response = Response.json({"error": "nope"}, status=404, headers={"x-a": "1"})
    assert to_response(response) is response
    assert dict(response.headers) == {"x-a": "1"}


@pytest.mark.parametrize("value", [42, 1.5, True, {1, 2}, object()])
def test_to_response_rejects_other_values(value: Any) -> None:
    with pytest.raises(ConfigError, match="return a dict, list, str, bytes, None"):
        to_response(value)


def test_to_response_rejects_unencodable_json() -> None:
    with pytest.raises(ConfigError, match="cannot be encoded as JSON"):
        to_response({"a": object()})


@pytest.mark.parametrize("status", [99, 600, True, "200"])
def test_response_rejects_bad_status(status: Any) -> None:
    with pytest.raises(ConfigError, match="status"):
        Response(status)


def test_response_rejects_non_bytes_body() -> None:
    with pytest.raises(ConfigError, match="body must be bytes"):
        Response(200, "text")  # type: ignore[arg-type]


def test_request_and_response_are_immutable() -> None:
    request = Request("GET", "/x", headers={"a": "1"})
    with pytest.raises(TypeError):
        request.headers["a"] = "2"  # type: ignore[index]
    with pytest.raises(AttributeError):
        request.path = "/y"  # type: ignore[misc]


# Schedules ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("10s", 10.0), ("500ms", 0.5), ("5m", 300.0), ("1h30m", 5400.0), ("1d", 86400.0),
    ("2.5s", 2.5), (3, 3.0), (0.25, 0.25),
])
def test_parse_interval(text: str | float, seconds: float) -> None:
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("interval", ["0s", "abc", "", "10", "10 s", "-1s", "s", "5ms",
                                      "31d", 0, -1, True, None, float("nan")])
def test_every_rejects_bad_intervals(interval: Any) -> None:
    with pytest.raises(ConfigError, match="interval"):
        App("a").every(interval)


def test_every_records_interval_and_kind() -> None:
    app = App("a")

    @app.every("10s")
    def sync_flush(ctx: Any) -> None:
        return None

    assert [(s.interval_s, s.is_async) for s in app.schedules] == [(10.0, False)]


def test_schedule_ticks_on_its_grid() -> None:
    schedule = Schedule(10.0, start_s=100.0)
    assert schedule.next_due(100.0) == 110.0
    assert not schedule.on_tick(109.9)
    assert schedule.on_tick(110.0)
    assert not schedule.on_tick(110.0)  # one run per due time
    assert schedule.on_tick(121.0)  # a late wake-up keeps the grid
    assert schedule.next_due(121.0) == 130.0


def test_schedule_runs_once_after_a_pause() -> None:
    schedule = Schedule(10.0, start_s=0.0)
    runs = [now for now in (10.0, 95.0, 95.5, 99.9) if schedule.on_tick(now)]
    assert runs == [10.0, 95.0]  # 20..90 passed during the pause: one catch-up run
    assert schedule.missed_total == 7
    assert schedule.next_due(95.5) == 100.0
    assert schedule.next_due(150.0) == 150.0  # overdue: due now, not 5 times


def test_schedule_from_handler_uses_its_interval() -> None:
    app = App("a")
    app.every("1m")(handler)
    schedule = app.schedules[0].schedule(start_s=5.0)
    assert schedule.next_due(5.0) == 65.0


def test_schedule_rejects_bad_interval() -> None:
    with pytest.raises(ConfigError, match="interval"):
        Schedule(0.0, start_s=0.0)
