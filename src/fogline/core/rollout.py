"""The rollout state machine: a deployment moves from one revision to the next in
health-gated steps, and back by itself when a gate is breached.

Each step names how many of the eligible nodes run the new revision (a count, or a
percentage rounded down but at least one node); a cohort never shrinks, so a step
smaller than an earlier one keeps the earlier size. The step's *cohort* fills with online
nodes only: a node that is offline is held back, never counted as failed and never
waited for, and converges to whichever revision the rollout ends on when it returns.
Once every online cohort node reports the new revision running, the step bakes for
`bake_s`; gates are checked all the while, over the new revision's reports alone; a
step whose cohort has not converged within `progress_deadline_s` fails as well. A
breach either rolls the whole fleet back to the previous revision or pauses, as the
strategy says, with the reason recorded.

Pure functions over frozen values with the time passed in: the hub's controller, the
property tests and the benchmark's hollow fleet drive the same code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["progressing", "paused", "complete", "rolled_back"]
OnFailure = Literal["rollback", "pause"]


@dataclass(frozen=True)
class Step:
    """`count` nodes, or `percent` of the eligible ones (exactly one is set)."""

    count: int | None = None
    percent: float | None = None

    def size(self, eligible: int) -> int:
        if eligible <= 0:
            return 0
        if self.count is not None:
            return min(self.count, eligible)
        assert self.percent is not None
        return min(eligible, max(1, math.floor(eligible * self.percent / 100 + 1e-9)))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


ALL = Step(percent=100)


@dataclass(frozen=True)
class Gates:
    """Limits the new revision must stay within. Rate and latency gates judge a step
    only once its cohort served `min_requests` in the reporting window: a handful of
    requests says nothing about a 1% error rate."""

    error_rate: float | None = None
    p99_ms: float | None = None
    restarts: int | None = None
    # App counter name (timeouts, handler_errors, malformed, ...) -> most allowed in
    # the window, summed over the cohort.
    metrics: Mapping[str, float] = field(default_factory=dict)
    min_requests: int = 20


@dataclass(frozen=True)
class Strategy:
    steps: tuple[Step, ...] = (ALL,)
    bake_s: float = 30.0
    gates: Gates = Gates()
    on_failure: OnFailure = "rollback"
    progress_deadline_s: float = 120.0

    def __post_init__(self) -> None:
        # The last step always takes every eligible node.
        if not self.steps or self.steps[-1] != ALL:
            object.__setattr__(self, "steps", (*self.steps, ALL))


@dataclass(frozen=True)
class AppReport:
    """What a node's latest heartbeat says about the app."""

    revision: int
    state: str
    restarts: int = 0
    requests: int = 0
    errors: int = 0
    p99_ms: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)
    # The node refused this revision's bundle (signature, digest, ...): why.
    refused: str = ""


@dataclass(frozen=True)
class NodeView:
    id: str
    online: bool
    report: AppReport | None = None


@dataclass(frozen=True)
class StepRecord:
    index: int
    started_s: float
    converged_s: float | None = None
    ended_s: float | None = None


@dataclass(frozen=True)
class Rollout:
    app: str
    from_revision: int
    to_revision: int
    started_s: float
    phase: Phase = "progressing"
    step: int = 0
    cohort: frozenset[str] = frozenset()
    reason: str = ""
    ended_s: float | None = None
    steps: tuple[StepRecord, ...] = ()

    @property
    def current(self) -> StepRecord:
        return self.steps[-1]

    @property
    def done(self) -> bool:
        return self.phase in ("complete", "rolled_back")


def start(app: str, from_revision: int, to_revision: int, now_s: float) -> Rollout:
    """A rollout to `to_revision`; a first revision (nothing to fall back to) takes
    every node at once."""
    rollout = Rollout(app, from_revision, to_revision, now_s, steps=(StepRecord(0, now_s),))
    if from_revision == 0:
        return _finish(rollout, "complete", "first revision", now_s)
    return rollout


def revision_for(rollout: Rollout, node_id: str) -> int:
    """The revision `node_id` should run (0: none) while unpinned and eligible."""
    if rollout.phase == "complete":
        return rollout.to_revision
    if rollout.phase == "rolled_back":
        return rollout.from_revision
    return rollout.to_revision if node_id in rollout.cohort else rollout.from_revision


def desired_revisions(rollout: Rollout, eligible: Iterable[str],
                      pins: Mapping[str, int]) -> dict[str, int]:
    """Node -> revision for every eligible or pinned node; pins always win."""
    desired = {node: revision_for(rollout, node) for node in eligible}
    desired.update(pins)
    return desired


def breach(rollout: Rollout, gates: Gates, nodes: Sequence[NodeView]) -> str:
    """Why the new revision fails its gates on the online cohort; "" if it does not.
    Offline nodes are never judged: their last report may be stale."""
    reports = [(n.id, n.report) for n in nodes
               if n.online and n.id in rollout.cohort and n.report is not None]
    for node, report in reports:
        if report.refused:
            return f"{node} refused revision {rollout.to_revision}: {report.refused}"
    fresh = [(node, r) for node, r in reports if r.revision == rollout.to_revision]
    for node, report in fresh:
        if report.state == "failed":
            return f"{node}: app failed (crash loop)"
        if gates.restarts is not None and report.restarts > gates.restarts:
            return f"{node}: {report.restarts} restarts > {gates.restarts}"
    requests = sum(r.requests for _, r in fresh)
    if requests >= gates.min_requests and requests > 0:
        errors = sum(r.errors for _, r in fresh)
        if gates.error_rate is not None and errors / requests > gates.error_rate:
            return (f"error rate {errors / requests:.1%} > {gates.error_rate:.1%} "
                    f"({errors} of {requests} requests)")
        if gates.p99_ms is not None:
            node, worst = max(((node, r) for node, r in fresh if r.requests),
                              key=lambda item: item[1].p99_ms)
            if worst.p99_ms > gates.p99_ms:
                return f"{node}: p99 {worst.p99_ms:.1f} ms > {gates.p99_ms:g} ms"
    for name, limit in gates.metrics.items():
        total = sum(r.metrics.get(name, 0.0) for _, r in fresh)
        if total > limit:
            return f"{name} {total:g} > {limit:g}"
    return ""


def _converged(rollout: Rollout, nodes: Sequence[NodeView]) -> bool:
    for node in nodes:
        if node.online and node.id in rollout.cohort:
            report = node.report
            if report is None or report.revision != rollout.to_revision \
                    or report.state != "running":
                return False
    return True


def _fill(rollout: Rollout, strategy: Strategy, nodes: Sequence[NodeView]) -> Rollout:
    """Add online nodes to the cohort up to the step's size (offline ones wait)."""
    eligible = {n.id for n in nodes}
    cohort = set(rollout.cohort & eligible)
    target = strategy.steps[rollout.step].size(len(eligible))
    for node in sorted(nodes, key=lambda n: n.id):
        if len(cohort) >= target:
            break
        if node.online and node.id not in cohort:
            cohort.add(node.id)
    if cohort == rollout.cohort:
        return rollout
    return dataclasses.replace(rollout, cohort=frozenset(cohort))


def _steps(rollout: Rollout, *records: StepRecord) -> tuple[StepRecord, ...]:
    """The step records with the current one replaced by `records`."""
    return (*rollout.steps[:-1], *records)


def _finish(rollout: Rollout, phase: Phase, reason: str, now_s: float) -> Rollout:
    ended = dataclasses.replace(rollout.current, ended_s=now_s)
    return dataclasses.replace(rollout, phase=phase, reason=reason, ended_s=now_s,
                               steps=_steps(rollout, ended))


def _next_step(rollout: Rollout, strategy: Strategy, now_s: float) -> Rollout:
    ended = dataclasses.replace(rollout.current, ended_s=now_s)
    if rollout.step + 1 >= len(strategy.steps):
        return dataclasses.replace(rollout, phase="complete", ended_s=now_s,
                                   steps=_steps(rollout, ended))
    return dataclasses.replace(rollout, step=rollout.step + 1, steps=_steps(
        rollout, ended, StepRecord(rollout.step + 1, now_s)))


def fail(rollout: Rollout, strategy: Strategy, reason: str, now_s: float) -> Rollout:
    if strategy.on_failure == "pause":
        return dataclasses.replace(rollout, phase="paused", reason=reason)
    return _finish(rollout, "rolled_back", reason, now_s)


def advance(rollout: Rollout, strategy: Strategy, nodes: Sequence[NodeView],
            now_s: float) -> Rollout:
    """The rollout after looking at the eligible (unpinned) nodes at `now_s`."""
    while rollout.phase == "progressing":
        rollout = _fill(rollout, strategy, nodes)
        reason = breach(rollout, strategy.gates, nodes)
        if reason:
            return fail(rollout, strategy, reason, now_s)
        record = rollout.current
        if not _converged(rollout, nodes):
            if now_s - record.started_s > strategy.progress_deadline_s:
                return fail(rollout, strategy, f"step {rollout.step + 1} did not converge "
                            f"within {strategy.progress_deadline_s:g}s", now_s)
            return rollout
        if record.converged_s is None:
            record = dataclasses.replace(record, converged_s=now_s)
            rollout = dataclasses.replace(rollout, steps=_steps(rollout, record))
        if now_s - record.converged_s < strategy.bake_s:  # type: ignore[operator]
            return rollout
        rollout = _next_step(rollout, strategy, now_s)
    return rollout


# Commands an operator gives -----------------------------------------------------------

def pause(rollout: Rollout, reason: str) -> Rollout:
    if rollout.phase != "progressing":
        return rollout
    return dataclasses.replace(rollout, phase="paused", reason=reason)


def resume(rollout: Rollout, now_s: float) -> Rollout:
    """Continue a paused rollout; its step starts over (its deadline and bake anew)."""
    if rollout.phase != "paused":
        return rollout
    record = StepRecord(rollout.step, now_s)
    return dataclasses.replace(rollout, phase="progressing", reason="",
                               steps=_steps(rollout, record))


def promote(rollout: Rollout, strategy: Strategy, now_s: float) -> Rollout:
    """Skip the rest of the current step's bake: go to the next step now."""
    if rollout.done:
        return rollout
    promoted = _next_step(rollout, strategy, now_s)
    phase = "complete" if promoted.phase == "complete" else "progressing"
    return dataclasses.replace(promoted, phase=phase, reason="")


def undo(rollout: Rollout, reason: str, now_s: float) -> Rollout:
    """Put every node back on the previous revision now."""
    if rollout.done:
        return rollout
    return _finish(rollout, "rolled_back", reason, now_s)


def immediate(app: str, from_revision: int, to_revision: int, reason: str,
              now_s: float) -> Rollout:
    """Every node to `to_revision` at once (an undo of a finished rollout)."""
    rollout = Rollout(app, from_revision, to_revision, now_s, steps=(StepRecord(0, now_s),))
    return _finish(rollout, "complete", reason, now_s)
