"""The routing core: idempotency, freshness, table decoding, scoring, failover order."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fogline.clock import ManualClock
from fogline.core.routing import (
    Route,
    RouteApp,
    RouteLoad,
    Router,
    RouteSite,
    RoutingPolicy,
    check_rtt_report,
    decode_table,
    is_fresh,
    is_idempotent,
    may_serve,
    may_try_next,
    merge_rtt,
    node_failed,
    serves,
)
from fogline.errors import ConfigError


def route(node_id: str, **fields: object) -> Route:
    return msgspec.convert({"node_id": node_id, "endpoint": f"http://{node_id}:1",
                            "serving": True, "health": "ready", **fields}, Route)


def router(*routes: Route, **policy: object) -> tuple[Router, ManualClock]:
    clock = ManualClock()
    r = Router(clock, RoutingPolicy(**policy))  # type: ignore[arg-type]
    r.set_routes(routes)
    return r, clock


def order(r: Router) -> list[str]:
    return [x.node_id for x in r.ranked()]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE",
                                    "get", "put"])
def test_safe_and_idempotent_methods_may_be_resent(method: str) -> None:
    assert is_idempotent(method)


@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT", "PROPFIND"])
def test_other_methods_are_not_idempotent(method: str) -> None:
    assert not is_idempotent(method)


def test_post_and_patch_with_an_idempotency_key_may_be_resent() -> None:
    assert is_idempotent("POST", [("Idempotency-Key", "abc")])
    assert is_idempotent("patch", [("idempotency-key", "k1")])
    assert not is_idempotent("POST", [("Idempotency-Key", "  ")])
    assert not is_idempotent("CONNECT", [("Idempotency-Key", "abc")])


@given(st.booleans(), st.booleans())
def test_a_request_goes_on_only_if_sending_it_again_is_harmless(idempotent: bool,
                                                                 sent: bool) -> None:
    assert may_try_next(idempotent, sent) == (idempotent or not sent)


def test_freshness_is_a_small_multiple_of_the_interval() -> None:
    assert is_fresh(100.0, 1.0, 101.4)
    assert not is_fresh(100.0, 1.0, 101.6)
    assert not is_fresh(None, 1.0, 100.0)


def test_a_table_decodes_and_a_bad_one_is_refused() -> None:
    table = decode_table({"generated_at": 1.0, "heartbeat_interval_s": 1.0, "routes": [
        {"node_id": "n1", "endpoint": "http://x", "serving": True, "future_field": 1,
         "load": {"cpu_percent": 5, "http_inflight": 2, "http_rps": 1.5}}]})
    assert table.routes[0].load == RouteLoad(5.0, 2, 1.5)
    with pytest.raises(ConfigError, match="not a routing table"):
        decode_table({"routes": "nope"})


def test_serves_needs_serving_an_endpoint_a_running_app_or_the_site() -> None:
    running = route("a", apps=[{"name": "shop", "state": "running"}],
                    sites=[{"name": "catalog"}])
    assert serves(running) and serves(running, app="shop") and serves(running, site="catalog")
    assert not serves(running, app="other") and not serves(running, site="other")
    failed = route("b", apps=[RouteApp("shop", 1, "failed")])
    assert not serves(failed, app="shop")
    assert not serves(route("c", serving=False))
    assert not serves(route("d", endpoint=""))
    assert RouteSite("x").hosts == ()


def test_the_lowest_rtt_wins_and_unmeasured_nodes_rank_last() -> None:
    r, _ = router(route("a"), route("b"), route("c", hub_rtt_ms=1.0))
    r.observe_rtt("a", 40.0)
    r.observe_rtt("b", 10.0)
    assert order(r) == ["b", "a", "c"]


def test_rtt_is_smoothed_and_a_slowdown_moves_the_choice() -> None:
    r, _ = router(route("a"), route("b"))
    r.observe_rtt("a", 10.0)
    r.observe_rtt("b", 30.0)
    r.mark_ok("a")
    r.observe_rtt("a", 100.0)  # one slow sample: 46 ms smoothed, beaten by 30
    assert r.rtt_ms("a") == pytest.approx(46.0)
    assert order(r)[0] == "b"


def test_the_current_node_is_kept_within_the_margin() -> None:
    r, _ = router(route("a"), route("b"))
    r.observe_rtt("a", 10.5)
    r.observe_rtt("b", 10.0)
    r.mark_ok("a")
    assert order(r) == ["a", "b"]  # 0.5 ms better is noise
    r.observe_rtt("a", 40.0)
    assert order(r) == ["b", "a"]


def test_a_node_the_hub_lost_stays_a_candidate_ranked_as_unseen() -> None:
    lost = route("lost", serving=False, health="offline", sites=[{"name": "catalog"}])
    assert not serves(lost) and may_serve(lost) and may_serve(lost, site="catalog")
    assert not may_serve(lost, site="other")
    assert not may_serve(route("gone", serving=False, health="quarantined"))
    assert not may_serve(route("no-endpoint", serving=False, health="offline", endpoint=""))
    # Local (5 ms) but unseen still beats a healthy node 100 ms away; not one 20 ms away.
    r, _ = router(lost, route("far"), route("near"))
    for node, rtt in (("lost", 5.0), ("far", 100.0), ("near", 20.0)):
        r.observe_rtt(node, rtt)
    assert r.score("lost") == pytest.approx(55.0)
    assert order(r) == ["near", "lost", "far"]


def test_load_and_degraded_health_are_penalties() -> None:
    r, _ = router(route("busy", load={"cpu_percent": 100.0}), route("idle"),
                  route("sick", health="degraded"))
    for node in ("busy", "idle", "sick"):
        r.observe_rtt(node, 10.0)
    assert r.score("busy") == pytest.approx(110.0)
    assert r.score("sick") == pytest.approx(60.0)
    assert order(r) == ["idle", "sick", "busy"]
    r2, _ = router(route("a", load={"cpu_percent": 50.0, "http_inflight": 20}))
    r2.observe_rtt("a", 10.0)
    assert r2.score("a") == pytest.approx(20.0)  # below the CPU knee; 20 x 0.5 ms


def test_a_failed_node_is_down_until_cooldown_and_a_probe_answers() -> None:
    r, clock = router(route("a"), route("b"), down_cooldown_s=5.0)
    r.observe_rtt("a", 5.0)
    r.observe_rtt("b", 50.0)
    r.mark_ok("a")
    r.mark_down("a")
    assert r.current is None
    assert order(r) == ["b", "a"]  # down nodes last, as a last resort
    clock.advance(6.0)
    assert order(r) == ["b", "a"]  # cooldown over, but nothing answered yet
    r.observe_rtt("a", 5.0)
    assert order(r) == ["a", "b"]


def test_without_probes_the_cooldown_alone_brings_a_node_back() -> None:
    r, clock = router(route("a"), route("b"), down_cooldown_s=2.0, confirm_after_down=False)
    r.observe_rtt("a", 5.0)
    r.observe_rtt("b", 50.0)
    r.mark_down("a")
    assert order(r) == ["b", "a"]
    clock.advance(2.0)
    assert order(r) == ["a", "b"]


def test_a_refresh_keeps_what_was_measured_and_forgets_departed_nodes() -> None:
    r, _ = router(route("a"), route("b"))
    r.observe_rtt("a", 5.0)
    r.mark_down("a")
    r.set_routes([route("a", load={"cpu_percent": 1.0}), route("c")])
    assert r.rtt_ms("a") == 5.0 and not r.is_up("a")
    assert r.node_ids == ["a", "c"] and r.route("b") is None


def test_the_plan_is_bounded_by_attempts_max() -> None:
    r, _ = router(*(route(f"n{i}") for i in range(6)), attempts_max=3)
    assert len(r.plan()) == 3
    assert router()[0].plan() == []


@pytest.mark.parametrize("bad", [{"rtt_sample_weight": 0}, {"cpu_knee_percent": 100},
                                 {"down_cooldown_s": -1}, {"attempts_max": 0},
                                 {"unknown_rtt_ms": float("nan")}])
def test_a_bad_policy_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        RoutingPolicy(**bad)  # type: ignore[arg-type]


# No deadline: a busy CI machine must not fail a property for being slow.
@settings(deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abcde"), st.floats(0, 500)), max_size=40),
       st.sets(st.sampled_from("abcde")))
def test_ranking_is_a_permutation_with_up_nodes_first(samples: list[tuple[str, float]],
                                                       down: set[str]) -> None:
    r, _ = router(*(route(n) for n in "abcde"))
    for node, rtt in samples:
        r.observe_rtt(node, rtt)
    for node in down:
        r.mark_down(node)
    ranked = order(r)
    assert sorted(ranked) == list("abcde")
    up = [n for n in ranked if r.is_up(n)]
    assert ranked[:len(up)] == up and set(up) == set("abcde") - down
    assert [r.score(n) for n in up] == sorted(r.score(n) for n in up)


# The hub's table (pure) and the gateway's header rule -------------------------------

def node_row(node_id: str, **fields: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": node_id, "region": "eu", "tier": "near", "endpoint": f"http://{node_id}:1",
        "status": "ready", "last_seen_s": 99.5, "interval_s": 1.0,
        "load": {"cpu_percent": 12.0, "hub_rtt_ms": 3.5, "http_inflight": 2,
                 "http_rps": 4.5, "memory_percent": 40.0},
        "apps": [{"name": "shop", "version": "1", "state": "running", "revision": 3}]}
    row.update(fields)
    return row


def test_the_hub_table_says_which_nodes_serve() -> None:
    from fogline.hub.routes import route_table
    from fogline.protocol import SiteSetting

    rows = [node_row("a"), node_row("stale", last_seen_s=98.0),
            node_row("sick", status="quarantined"), node_row("gone", status="revoked"),
            node_row("old", load={}, apps=[], endpoint=""),
            node_row("failed", apps=[{"name": "shop", "version": "1", "state": "failed"}])]
    sites = {"a": (SiteSetting("catalog", "http://o", path_prefixes=("/c",)),)}
    table = route_table(rows, sites, 100.0, 5.0)
    routes = {r.node_id: r for r in table.routes}
    assert set(routes) == {"a", "stale", "sick", "old", "failed"}  # revoked: left out
    assert {n for n, r in routes.items() if r.serving} == {"a", "failed"}
    a = routes["a"]
    assert a.load == RouteLoad(12.0, 2, 4.5) and a.hub_rtt_ms == 3.5
    assert a.apps == (RouteApp("shop", 3, "running"),)
    assert a.sites == (RouteSite("catalog", (), ("/c",)),)
    assert routes["old"].hub_rtt_ms is None and routes["old"].load == RouteLoad()
    assert table.heartbeat_interval_s == 5.0 and table.generated_at == 100.0

    shop = route_table(rows, sites, 100.0, 5.0, app="shop")
    assert {r.node_id: r.serving for r in shop.routes}["failed"] is False
    assert "old" not in {r.node_id for r in shop.routes}
    assert [r.node_id for r in route_table(rows, sites, 100.0, 5.0, site="catalog").routes] \
        == ["a"]
    # The JSON keeps the shape others build on.
    encoded = msgspec.to_builtins(table)
    assert set(encoded) == {"generated_at", "heartbeat_interval_s", "routes"}
    assert list(encoded["routes"][0]) == [
        "node_id", "region", "tier", "endpoint", "health", "serving", "load", "hub_rtt_ms",
        "apps", "sites", "last_seen_s", "interval_s", "user_rtt_ms"]


def test_the_gateway_drops_hop_by_hop_headers_and_those_connection_names() -> None:
    from fogline.gateway import end_to_end

    kept = end_to_end([("Host", "x"), ("Connection", "keep-alive, X-Private"),
                       ("Keep-Alive", "5"), ("X-Private", "1"), ("TE", "trailers"),
                       ("Transfer-Encoding", "chunked"), ("Accept", "*/*")])
    assert kept == [("Host", "x"), ("Accept", "*/*")]


async def test_the_client_refuses_bad_arguments() -> None:
    from fogline.client import Client

    with pytest.raises(ConfigError, match="one of them"):
        Client()
    with pytest.raises(ConfigError, match="one of them"):
        Client("http://hub", token="t", routes=[])
    with pytest.raises(ConfigError, match="admin token"):
        Client("http://hub")
    with pytest.raises(ConfigError, match="not both"):
        Client(routes=[], app="a", site="b")
    with pytest.raises(ConfigError, match="probe_interval_s"):
        Client(routes=[], probe_interval_s=0)
    with pytest.raises(ConfigError, match="invalid route"):
        Client(routes=[{"endpoint": "http://x"}])
    with pytest.raises(ConfigError, match="not started"):
        await Client(routes=[{"node_id": "a", "endpoint": "http://x"}]).get("/")


def test_a_user_rtt_report_is_checked_and_averaged() -> None:
    assert check_rtt_report("eu-west/isp:1", {"nd-a": 4, "nd-b": 0.5}) == (
        "eu-west/isp:1", {"nd-a": 4.0, "nd-b": 0.5})
    for location, rtts in [("", {"a": 1}), ("-x", {"a": 1}), ("x" * 65, {"a": 1}),
                           ("ok", {}), ("ok", {"": 1}), ("ok", {"a": float("nan")}),
                           ("ok", {"a": 60_001}), ("ok", {"a": False}), ("ok", [("a", 1)])]:
        with pytest.raises(ConfigError):
            check_rtt_report(location, rtts)
    assert merge_rtt(None, 10.0) == 10.0
    assert merge_rtt(10.0, 20.0) == pytest.approx(13.0)


def test_a_5xx_marks_a_node_down_unless_its_site_cache_answered() -> None:
    assert node_failed(502, from_site_cache=False) and node_failed(500, False)
    assert not node_failed(502, from_site_cache=True)  # X-Cache: ERROR, the origin failed
    assert not node_failed(404, False) and not node_failed(200, False)
