"""The node status rules (fogline.core.health) with an injected clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fogline.core.health import (
    HealthPolicy,
    NodeHealth,
    check_liveness,
    observe_heartbeat,
    revoke,
)

POLICY = HealthPolicy(missed_heartbeats_offline=3, failing_heartbeats_quarantine=3,
                      flap_limit=3, flap_window_s=600, quarantine_stable_s=60)
INTERVAL_S = 5.0


def new_node(now_s: float = 0.0) -> NodeHealth:
    return NodeHealth(status="offline", status_since_s=now_s, interval_s=INTERVAL_S)


def beat(h: NodeHealth, now_s: float, failing: tuple[str, ...] = ()) -> NodeHealth:
    return observe_heartbeat(h, failing, INTERVAL_S, now_s, POLICY)


def test_first_heartbeat_makes_a_node_ready() -> None:
    h = beat(new_node(), 1.0)
    assert h.status == "ready" and h.last_seen_s == 1.0 and h.status_since_s == 1.0


def test_offline_after_three_missed_heartbeats_not_before() -> None:
    h = beat(new_node(), 0.0)
    assert check_liveness(h, 3 * INTERVAL_S, POLICY).status == "ready"
    gone = check_liveness(h, 3 * INTERVAL_S + 0.01, POLICY)
    assert gone.status == "offline" and "no heartbeat" in gone.reason
    assert gone.status_since_s == 3 * INTERVAL_S + 0.01


def test_a_failing_check_degrades_then_quarantines_after_three_in_a_row() -> None:
    h = beat(new_node(), 0.0)
    h = beat(h, 5.0, ("disk",))
    assert h.status == "degraded" and "disk" in h.reason
    h = beat(h, 10.0, ("disk",))
    assert h.status == "degraded"
    h = beat(h, 15.0, ("disk",))
    assert h.status == "quarantined"


def test_quarantine_is_left_only_after_staying_healthy_long_enough() -> None:
    h = beat(new_node(), 0.0)
    for t in (5.0, 10.0, 15.0):
        h = beat(h, t, ("disk",))
    assert h.status == "quarantined"
    t = 20.0
    h = beat(h, t)
    assert h.status == "quarantined"
    while t < 20.0 + 55:
        t += INTERVAL_S
        h = beat(h, t)
        assert h.status == "quarantined"
    h = beat(h, 20.0 + 60)
    assert h.status == "ready"


def test_flapping_node_is_quarantined() -> None:
    h = new_node()
    t = 0.0
    for _ in range(POLICY.flap_limit + 1):
        h = beat(h, t)
        t += 16.0
        h = check_liveness(h, t, POLICY)
        assert h.status == "offline"
    h = beat(h, t)
    assert h.status == "quarantined" and "flapping" in h.reason


def test_returns_outside_the_flap_window_are_forgotten() -> None:
    h = new_node()
    t = 0.0
    for _ in range(10):
        h = beat(h, t)
        t += 300.0  # comes back every 5 minutes: at most 2 returns per 10-minute window
        h = check_liveness(h, t, POLICY)
    h = beat(h, t)
    assert h.status == "ready"


def test_revoked_is_final() -> None:
    h = revoke(beat(new_node(), 0.0), 1.0, "stolen")
    assert h.status == "revoked" and h.reason == "stolen"
    assert beat(h, 2.0).status == "revoked"
    assert check_liveness(h, 1e9, POLICY).status == "revoked"


events = st.lists(
    st.tuples(st.floats(min_value=0.1, max_value=40.0),
              st.one_of(st.none(), st.lists(st.sampled_from(["disk", "mem", "app"]),
                                            max_size=2).map(tuple))),
    max_size=60)


@settings(max_examples=300, deadline=None)
@given(events)
def test_status_invariants_hold_for_any_sequence(sequence: list) -> None:
    """None = a liveness sweep, a tuple = a heartbeat with those failing checks."""
    h = new_node()
    t = 0.0
    for gap_s, failing in sequence:
        t += gap_s
        before = h
        h = check_liveness(h, t, POLICY) if failing is None else beat(h, t, failing)
        assert h.status in ("ready", "degraded", "quarantined", "offline")
        if h.status != before.status:
            assert h.status_since_s == t
        if failing is not None:
            assert h.last_seen_s == t
            assert h.status != "offline"  # a heartbeat always proves liveness
            if failing and h.status == "ready":
                raise AssertionError("ready while reporting failing checks")
            if h.status == "ready":
                assert not failing
        if h.status == "offline" and before.status != "offline":
            assert before.last_seen_s is None or t - before.last_seen_s > 3 * INTERVAL_S


def test_tombstone_horizon_waits_for_every_node_and_an_empty_backlog() -> None:
    from fogline.core.tombstones import gc_horizon_ms

    assert gc_horizon_ms([5_000, 7_000], merge_backlog=0) == 5_000
    assert gc_horizon_ms([5_000, 0], merge_backlog=0) is None  # one never reported
    assert gc_horizon_ms([5_000, 7_000], merge_backlog=3) is None
    assert gc_horizon_ms([], merge_backlog=0) is None


def test_tombstone_marks_come_from_the_nodes_holding_the_replica() -> None:
    from fogline.core.tombstones import marks_in_scope

    marks = [("nd-a", "eu", 1), ("nd-b", "eu", 2), ("nd-c", "us", 3), ("nd-d", "", 4)]
    assert marks_in_scope("global", marks) == [1, 2, 3, 4]
    assert marks_in_scope("region.eu", marks) == [1, 2]
    assert marks_in_scope("region.none", marks) == [4]
    assert marks_in_scope("node.nd-c", marks) == [3]
