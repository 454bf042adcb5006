"""The rollout planner: steps, bake, gates, offline nodes, pins, operator commands."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fogline.core import rollout as ro
from fogline.core.rollout import AppReport, Gates, NodeView, Step, Strategy


def healthy(revision: int, requests: int = 100, errors: int = 0,
            p99_ms: float = 5.0) -> AppReport:
    return AppReport(revision=revision, state="running", requests=requests, errors=errors,
                     p99_ms=p99_ms)


def fleet(n: int, offline: frozenset[str] = frozenset()) -> list[str]:
    return [f"n{i:03d}" for i in range(n)]


def views(rollout: ro.Rollout, nodes: list[str], offline: set[str] = frozenset(),
          bad: set[str] = frozenset(), gates_report: AppReport | None = None
          ) -> list[NodeView]:
    """Every online node runs what the rollout wants of it (converged at once)."""
    result = []
    for node in nodes:
        revision = ro.revision_for(rollout, node)
        report = healthy(revision)
        if node in bad and revision == rollout.to_revision:
            report = gates_report or AppReport(revision=revision, state="failed")
        result.append(NodeView(node, node not in offline, report))
    return result


STEPPED = Strategy(steps=(Step(count=1), Step(percent=10), Step(percent=50)), bake_s=5,
                   gates=Gates(error_rate=0.05, p99_ms=100, min_requests=10))


def run(rollout: ro.Rollout, strategy: Strategy, nodes: list[str], until_s: float,
        offline: set[str] = frozenset(), start_s: float = 0.0) -> ro.Rollout:
    now = start_s
    while now <= until_s and not rollout.done:
        rollout = ro.advance(rollout, strategy, views(rollout, nodes, offline), now)
        now += 0.5
    return rollout


def test_step_sizes_round_down_but_take_at_least_one_node() -> None:
    assert Step(percent=1).size(1000) == 10
    assert Step(percent=1).size(50) == 1
    assert Step(percent=10).size(0) == 0
    assert Step(count=5).size(3) == 3
    assert Step(percent=100).size(7) == 7
    assert Strategy(steps=(Step(count=1),)).steps[-1] == ro.ALL


def test_first_revision_goes_everywhere_at_once() -> None:
    rollout = ro.start("app", 0, 1, 0.0)
    assert rollout.phase == "complete"
    assert ro.revision_for(rollout, "anything") == 1


def test_canary_then_promotion_after_each_bake() -> None:
    nodes = fleet(20)
    rollout = ro.start("app", 1, 2, 0.0)
    rollout = ro.advance(rollout, STEPPED, views(rollout, nodes), 0.0)
    assert rollout.step == 0 and len(rollout.cohort) == 1
    rollout = ro.advance(rollout, STEPPED, views(rollout, nodes), 0.0)  # canary runs it
    assert rollout.current.converged_s == 0.0
    rollout = ro.advance(rollout, STEPPED, views(rollout, nodes), 4.9)
    assert rollout.step == 0  # baking
    rollout = ro.advance(rollout, STEPPED, views(rollout, nodes), 5.0)
    assert rollout.step == 1 and len(rollout.cohort) == 2  # 10% of 20
    rollout = run(rollout, STEPPED, nodes, 60.0, start_s=5.0)
    assert rollout.phase == "complete"
    assert [r.index for r in rollout.steps] == [0, 1, 2, 3]
    assert all(ro.revision_for(rollout, n) == 2 for n in nodes)


def test_a_step_waits_until_its_nodes_run_the_new_revision() -> None:
    nodes = fleet(4)
    rollout = ro.advance(ro.start("app", 1, 2, 0.0), STEPPED, [
        NodeView(n, True, healthy(1)) for n in nodes], 0.0)
    later = ro.advance(rollout, STEPPED, [NodeView(n, True, healthy(1)) for n in nodes], 50)
    assert later.step == 0 and later.current.converged_s is None


def test_progress_deadline_fails_a_step_that_never_converges() -> None:
    nodes = fleet(4)
    stuck = [NodeView(n, True, healthy(1)) for n in nodes]
    rollout = ro.advance(ro.start("app", 1, 2, 0.0), STEPPED, stuck, 0.0)
    rollout = ro.advance(rollout, STEPPED, stuck, STEPPED.progress_deadline_s + 1)
    assert rollout.phase == "rolled_back" and "did not converge" in rollout.reason


@pytest.mark.parametrize(("report", "why"), [
    (AppReport(2, "failed"), "crash loop"),
    (AppReport(2, "running", requests=100, errors=20), "error rate 20.0%"),
    (AppReport(2, "running", requests=100, p99_ms=500), "p99 500.0 ms"),
    (AppReport(2, "running", restarts=3), "3 restarts"),
    (AppReport(1, "running", refused="bad-signature: nope"), "refused revision 2"),
    (AppReport(2, "running", metrics={"handler_errors": 4}), "handler_errors 4"),
])
def test_each_gate_rolls_back_with_its_reason(report: AppReport, why: str) -> None:
    strategy = Strategy(steps=(Step(count=1),), bake_s=5, gates=Gates(
        error_rate=0.05, p99_ms=100, restarts=2, metrics={"handler_errors": 1},
        min_requests=10))
    nodes = fleet(5)
    rollout = ro.advance(ro.start("app", 1, 2, 0.0), strategy, views(
        ro.start("app", 1, 2, 0.0), nodes), 0.0)
    canary = next(iter(rollout.cohort))
    observed = [NodeView(n, True, report if n == canary else healthy(1)) for n in nodes]
    failed = ro.advance(rollout, strategy, observed, 1.0)
    assert failed.phase == "rolled_back"
    assert why in failed.reason
    assert all(ro.revision_for(failed, n) == 1 for n in nodes)


def test_rate_gates_wait_for_enough_requests() -> None:
    strategy = Strategy(steps=(Step(count=1),), bake_s=5,
                        gates=Gates(error_rate=0.01, min_requests=50))
    nodes = fleet(3)
    rollout = ro.advance(ro.start("app", 1, 2, 0.0), strategy,
                         views(ro.start("app", 1, 2, 0.0), nodes), 0.0)
    few = [NodeView(n, True, healthy(ro.revision_for(rollout, n), requests=10, errors=5))
           for n in nodes]
    assert ro.advance(rollout, strategy, few, 1.0).phase == "progressing"


def test_pause_on_failure_holds_the_cohort() -> None:
    strategy = Strategy(steps=(Step(count=1),), on_failure="pause")
    nodes = fleet(3)
    rollout = ro.advance(ro.start("app", 1, 2, 0.0), strategy,
                         views(ro.start("app", 1, 2, 0.0), nodes), 0.0)
    paused = ro.advance(rollout, strategy, views(rollout, nodes, bad=set(nodes)), 1.0)
    assert paused.phase == "paused" and "crash loop" in paused.reason
    assert ro.advance(paused, strategy, views(paused, nodes), 100.0) == paused
    resumed = ro.resume(paused, 101.0)
    assert resumed.phase == "progressing" and resumed.current.started_s == 101.0


def test_operator_commands() -> None:
    nodes = fleet(10)
    rollout = ro.advance(ro.start("app", 1, 2, 0.0), STEPPED,
                         views(ro.start("app", 1, 2, 0.0), nodes), 0.0)
    promoted = ro.promote(rollout, STEPPED, 1.0)
    assert promoted.step == 1 and promoted.phase == "progressing"
    assert ro.pause(promoted, "why").phase == "paused"
    undone = ro.undo(promoted, "by hand", 2.0)
    assert undone.phase == "rolled_back" and all(ro.revision_for(undone, n) == 1
                                                 for n in nodes)
    assert ro.undo(undone, "again", 3.0) == undone
    back = ro.immediate("app", 2, 1, "undo", 4.0)
    assert back.phase == "complete" and ro.revision_for(back, "x") == 1


def test_offline_nodes_are_held_back_and_converge_at_the_end() -> None:
    nodes = fleet(10)
    offline = {"n000", "n001", "n002"}
    rollout = run(ro.start("app", 1, 2, 0.0), STEPPED, nodes, 100.0, offline=offline)
    assert rollout.phase == "complete"
    assert not (offline & rollout.cohort)
    assert all(ro.revision_for(rollout, n) == 2 for n in offline)


def test_pins_always_win() -> None:
    rollout = ro.start("app", 0, 3, 0.0)
    desired = ro.desired_revisions(rollout, ["a", "b"], {"c": 1})
    assert desired == {"a": 3, "b": 3, "c": 1}


# Properties ---------------------------------------------------------------------------

def fraction(step: Step, n: int) -> int:
    """The step's share of n nodes, computed independently of Step.size."""
    if step.count is not None:
        return min(step.count, n)
    assert step.percent is not None
    return min(n, max(1, math.floor(n * step.percent / 100 + 1e-9)))


steps_strategy = st.lists(
    st.one_of(st.integers(1, 50).map(lambda c: Step(count=c)),
              st.floats(0.5, 100).map(lambda p: Step(percent=round(p, 1)))),
    min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 300), steps=steps_strategy, data=st.data())
def test_a_step_never_exceeds_its_fraction(n: int, steps: list[Step],
                                            data: st.DataObject) -> None:
    strategy = Strategy(steps=tuple(steps), bake_s=1)
    nodes = fleet(n)
    offline = set(data.draw(st.lists(st.sampled_from(nodes), max_size=n // 2)))
    rollout = ro.start("app", 1, 2, 0.0)
    now = 0.0
    while not rollout.done and now < 200:
        rollout = ro.advance(rollout, strategy, views(rollout, nodes, offline), now)
        if not rollout.done:
            # A cohort never shrinks: a step smaller than an earlier one keeps that size.
            bound = max(fraction(step, n) for step in strategy.steps[:rollout.step + 1])
            assert len(rollout.cohort) <= bound
        now += 0.5
    assert rollout.phase == "complete"


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 100), data=st.data())
def test_rollback_restores_every_node_that_got_the_new_revision(
        n: int, data: st.DataObject) -> None:
    nodes = fleet(n)
    rollout = ro.start("app", 4, 5, 0.0)
    breach_at = data.draw(st.floats(0, 40))
    now = 0.0
    got_new: set[str] = set()
    while not rollout.done and now < 100:
        bad = set(nodes) if now >= breach_at else set()
        rollout = ro.advance(rollout, STEPPED, views(rollout, nodes, bad=bad), now)
        got_new |= {node for node in nodes if ro.revision_for(rollout, node) == 5}
        now += 0.5
    if rollout.phase == "rolled_back":
        assert all(ro.revision_for(rollout, node) == 4 for node in got_new | set(nodes))


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 60), data=st.data())
def test_offline_nodes_never_fail_a_gate(n: int, data: st.DataObject) -> None:
    nodes = fleet(n)
    offline = set(data.draw(st.lists(st.sampled_from(nodes), min_size=1)))
    rollout = ro.start("app", 1, 2, 0.0)
    now = 0.0
    while not rollout.done and now < 200:
        # Offline nodes report anything at all (a stale crash loop, refusals, errors).
        observed = [NodeView(v.id, v.online, v.report if v.online else AppReport(
            2, "failed", requests=1000, errors=1000, refused="stale"))
            for v in views(rollout, nodes, offline)]
        rollout = ro.advance(rollout, STEPPED, observed, now)
        now += 0.5
    assert rollout.phase == "complete", rollout.reason


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 50), data=st.data())
def test_pinned_nodes_never_change(n: int, data: st.DataObject) -> None:
    nodes = fleet(n)
    pinned = {node: 1 for node in data.draw(st.lists(st.sampled_from(nodes)))}
    eligible = [node for node in nodes if node not in pinned]
    rollout = ro.start("app", 1, 2, 0.0)
    now = 0.0
    while not rollout.done and now < 100:
        rollout = ro.advance(rollout, STEPPED, views(rollout, eligible), now)
        desired = ro.desired_revisions(rollout, eligible, pinned)
        assert all(desired[node] == 1 for node in pinned)
        now += 0.5
