"""The CRDT laws as properties: merge is commutative, associative and idempotent, the
set is add-wins, LWW follows the HLC, counters add up, and the HLC only moves forward.

Ops come from simulated histories (three replicas writing with their own clocks and
syncing now and then), so removes carry only observed tags and `prev` is what the writer
really saw, as in production.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fogline.clock import ManualClock
from fogline.core.crdt import (
    CollectionState,
    CollectionType,
    CounterOp,
    MapOp,
    Op,
    SetAddOp,
    SetRemoveOp,
    merge_counter,
    merge_map,
)
from fogline.core.hlc import MAX_DRIFT_MS, Hlc, HybridLogicalClock

NODES = ("a", "b", "c")
KINDS: tuple[CollectionType, ...] = ("map", "counter", "set")
START_S = 1_700_000_000.0
# The merge laws are the heart of convergence: worth more examples than the default 100.
LAW_EXAMPLES = 300


class SteppingClock:
    """A wall clock that can be set anywhere, backwards included (NTP steps).
    `ManualClock` refuses to go back, so the HLC's defence needs this one."""

    def __init__(self, now_s: float = START_S) -> None:
        self.now_s = now_s

    def now(self) -> float:
        return self.now_s

    def monotonic(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError("tests set this clock by hand")


# Histories ------------------------------------------------------------------------------

@dataclass
class Replica:
    node: str
    clock: ManualClock
    hlc: HybridLogicalClock
    state: CollectionState
    seen: dict[Op, None] = field(default_factory=dict)  # insertion-ordered set


@dataclass
class History:
    kind: CollectionType
    ops: list[Op]
    amounts: list[int]


write = st.tuples(st.just("write"), st.sampled_from(NODES), st.integers(0, 2),
                  st.integers(-3, 5), st.integers(0, 30))
# A sync copies every op one replica has seen (by index in NODES) to another.
sync = st.tuples(st.just("sync"), st.sampled_from(NODES), st.integers(0, len(NODES) - 1),
                 st.just(0), st.just(0))
actions = st.lists(st.one_of(write, write, sync), min_size=6, max_size=30)


def local_op(replica: Replica, slot: int, number: int) -> tuple[Op, int]:
    """One user write on a replica: `slot` picks a key or element, `number` the value."""
    state, hlc = replica.state, replica.hlc
    if state.kind == "map":
        return state.put(hlc, f"k{slot}", None if number < 0 else b"v%d" % number), 0
    if state.kind == "counter":
        amount = number or 1
        return state.increment(replica.node, amount), amount
    elem = b"e%d" % slot
    if number <= 1 and state.adds.get(elem):
        return state.remove(elem), 0
    return state.add(hlc, elem), 0


def receive(replica: Replica, op: Op) -> None:
    replica.state.apply(op)
    replica.seen[op] = None
    if isinstance(op, MapOp):
        replica.hlc.observe(op.ts)
    elif isinstance(op, SetAddOp):
        replica.hlc.observe(op.tag)


def run_history(kind: CollectionType, steps: list[tuple[str, str, int, int, int]]) -> History:
    replicas = {}
    for index, node in enumerate(NODES):
        clock = ManualClock(START_S + index * 0.003)  # slightly skewed wall clocks
        replicas[node] = Replica(node, clock, HybridLogicalClock(node, clock),
                                 CollectionState(kind))
    ops: list[Op] = []
    amounts: list[int] = []
    for action, node, arg, number, tick_ms in steps:
        replica = replicas[node]
        if action == "sync":
            source = replicas[NODES[arg]]
            for op in list(source.seen):
                if op not in replica.seen:
                    receive(replica, op)
            continue
        replica.clock.advance(tick_ms / 1000)
        op, amount = local_op(replica, arg, number)
        receive(replica, op)
        ops.append(op)
        amounts.append(amount)
    return History(kind, ops, amounts)


kinds = st.sampled_from(KINDS)


@st.composite
def histories(draw: st.DrawFn, kind: st.SearchStrategy[CollectionType] = kinds) -> History:
    return run_history(draw(kind), draw(actions))


def fold(kind: CollectionType, ops: list[Op]) -> CollectionState:
    state = CollectionState(kind)
    for op in ops:
        state.apply(op)
    return state


def internal(state: CollectionState) -> tuple[object, ...]:
    """The replicated state; `conflicts` is a local observation count."""
    return state.entries, state.counts, state.adds, state.removed


def join(a: CollectionState, b: CollectionState) -> CollectionState:
    """The state-level merge, from the merge functions (sets join field by field:
    `removed` does not say which element a tag was, so it cannot travel as ops)."""
    out = CollectionState(a.kind)
    for key in a.entries.keys() | b.entries.keys():
        right = b.entries.get(key)
        out.entries[key] = a.entries[key] if right is None else merge_map(
            a.entries.get(key), right).winner
    for node in a.counts.keys() | b.counts.keys():
        p, n = b.counts.get(node, (0, 0))
        out.counts[node] = merge_counter(a.counts.get(node), CounterOp(node, p, n))
    out.removed = a.removed | b.removed
    for elem in a.adds.keys() | b.adds.keys():
        out.adds[elem] = (a.adds.get(elem, set()) | b.adds.get(elem, set())) - out.removed
    return out


# Merge laws -------------------------------------------------------------------------------

@given(histories(), st.data())
@settings(max_examples=LAW_EXAMPLES)
def test_merge_is_commutative(history: History, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(history.ops))
    ordered, reordered = fold(history.kind, history.ops), fold(history.kind, shuffled)
    assert reordered.value() == ordered.value()
    assert internal(reordered) == internal(ordered)


@given(histories(), st.data())
@settings(max_examples=LAW_EXAMPLES)
def test_merge_is_associative(history: History, data: st.DataObject) -> None:
    owners = data.draw(st.lists(st.integers(0, 2), min_size=len(history.ops),
                                max_size=len(history.ops)))
    a, b, c = (fold(history.kind, [op for op, owner in zip(history.ops, owners, strict=True)
                                   if owner == part]) for part in range(3))
    left, right = join(join(a, b), c), join(a, join(b, c))
    assert internal(left) == internal(right)
    assert left.value() == right.value() == fold(history.kind, history.ops).value()
    assert internal(left) == internal(fold(history.kind, history.ops))


@given(histories(), st.data())
@settings(max_examples=LAW_EXAMPLES)
def test_merge_is_idempotent(history: History, data: st.DataObject) -> None:
    state = fold(history.kind, history.ops)
    before = copy.deepcopy(internal(state))
    for op in data.draw(st.permutations(history.ops)):
        assert not state.apply(op), f"redelivered {op} changed the state"
    assert internal(state) == before


# Type semantics ---------------------------------------------------------------------------

@given(histories(st.just("map")))
def test_lww_keeps_the_highest_hlc_and_timestamps_never_tie(history: History) -> None:
    ops = [op for op in history.ops if isinstance(op, MapOp)]
    assert len({op.ts for op in ops}) == len(ops)
    latest: dict[str, MapOp] = {}
    for op in ops:
        if op.key not in latest or op.ts > latest[op.key].ts:
            latest[op.key] = op
    assert fold("map", history.ops).entries == latest


@given(histories(st.just("counter")))
def test_counter_is_increments_minus_decrements(history: History) -> None:
    assert fold("counter", history.ops).value() == sum(history.amounts)


@given(histories(st.just("set")))
@settings(max_examples=LAW_EXAMPLES)
def test_set_holds_elements_with_an_unremoved_add(history: History) -> None:
    removed = {tag for op in history.ops if isinstance(op, SetRemoveOp) for tag in op.tags}
    expected = {op.elem for op in history.ops
                if isinstance(op, SetAddOp) and op.tag not in removed}
    assert fold("set", history.ops).value() == expected


@given(st.permutations(range(3)))
def test_add_wins_over_a_concurrent_remove(order: list[int]) -> None:
    clock = ManualClock()
    a = HybridLogicalClock("a", clock)
    replica_a, replica_b = CollectionState("set"), CollectionState("set")
    first = replica_a.add(a, b"x")
    replica_a.apply(first)
    replica_b.apply(first)
    remove = replica_b.remove(b"x")  # b saw only the first add
    clock.advance(0.001)
    again = replica_a.add(a, b"x")  # concurrent with the remove
    ops: list[Op] = [first, remove, again]
    assert fold("set", [ops[i] for i in order]).value() == {b"x"}
    assert fold("set", [first, remove]).value() == set()


@given(st.integers(0, 50), st.integers(0, 50))
def test_conflict_only_when_a_concurrent_write_is_discarded(skew_a_ms: int,
                                                             skew_b_ms: int) -> None:
    clock_a = ManualClock(START_S + skew_a_ms / 1000)
    clock_b = ManualClock(START_S + skew_b_ms / 1000)
    a, b = HybridLogicalClock("a", clock_a), HybridLogicalClock("b", clock_b)
    first = CollectionState("map").put(a, "k", b"1")
    # Sequential: b saw `first` before overwriting it, whatever the order of arrival.
    seen = CollectionState("map")
    seen.apply(first)
    b.observe(first.ts)
    overwrite = seen.put(b, "k", b"2")
    assert overwrite.prev == first.ts and overwrite.ts > first.ts
    assert not merge_map(first, overwrite).conflict
    assert not merge_map(overwrite, first).conflict
    # Concurrent: c never saw `first`; whichever wins, the other was discarded.
    c = HybridLogicalClock("c", clock_b)
    blind = CollectionState("map").put(c, "k", b"3")
    for current, incoming in ((first, blind), (blind, first)):
        merged = merge_map(current, incoming)
        assert merged.conflict
        assert merged.winner.ts == max(first.ts, blind.ts)


def test_a_redelivered_write_never_counts_another_conflict() -> None:
    clock = ManualClock()
    older = CollectionState("map").put(HybridLogicalClock("a", clock), "k", b"1")
    clock.advance(0.001)
    newer = CollectionState("map").put(HybridLogicalClock("b", clock), "k", b"2")
    state = fold("map", [newer, older])
    counted = state.conflicts
    assert not state.apply(older)  # at-least-once delivery: the same op again
    assert state.conflicts == counted


# Hybrid logical clock -----------------------------------------------------------------------

clock_moves = st.lists(st.one_of(
    st.tuples(st.just("now"), st.integers(-5_000, 5_000)),
    st.tuples(st.just("observe"), st.integers(-120_000, 120_000))), max_size=40)


@given(clock_moves)
def test_hlc_is_strictly_monotonic_even_when_the_wall_clock_goes_back(
        moves: list[tuple[str, int]]) -> None:
    clock = SteppingClock()
    hlc = HybridLogicalClock("a", clock)
    issued: list[Hlc] = []
    must_pass: Hlc | None = None
    for kind, delta_ms in moves:
        if kind == "now":
            clock.now_s += delta_ms / 1000
            stamp = hlc.now()
            assert not issued or stamp > issued[-1]
            assert must_pass is None or stamp > must_pass
            assert stamp.node == "a"
            issued.append(stamp)
            continue
        remote = Hlc(int(clock.now_s * 1000) + delta_ms, 3, "b")
        hlc.observe(remote)
        if delta_ms <= MAX_DRIFT_MS and (must_pass is None or remote > must_pass):
            must_pass = remote


@given(st.integers(-MAX_DRIFT_MS, MAX_DRIFT_MS), st.integers(0, 100))
def test_observe_keeps_the_local_clock_ahead_of_a_remote(offset_ms: int, counter: int) -> None:
    clock = SteppingClock()
    hlc = HybridLogicalClock("a", clock)
    remote = Hlc(int(clock.now_s * 1000) + offset_ms, counter, "b")
    hlc.observe(remote)
    assert hlc.now() > remote


@given(st.integers(1, 10 * MAX_DRIFT_MS))
def test_observe_ignores_a_remote_beyond_max_drift(beyond_ms: int) -> None:
    clock = SteppingClock()
    hlc = HybridLogicalClock("a", clock)
    wall_ms = int(clock.now_s * 1000)
    remote = Hlc(wall_ms + MAX_DRIFT_MS + beyond_ms, 0, "b")
    hlc.observe(remote)
    stamp = hlc.now()
    assert stamp < remote and stamp.wall_ms == wall_ms


@given(st.lists(st.integers(0, 3), max_size=30))
@settings(max_examples=50)
def test_timestamps_of_two_nodes_never_tie(steps_ms: list[int]) -> None:
    clock = ManualClock()
    a, b = HybridLogicalClock("a", clock), HybridLogicalClock("b", clock)
    stamps: list[Hlc] = []
    for step_ms in steps_ms:
        clock.advance(step_ms / 1000)
        stamps += [a.now(), b.now()]
    assert len(set(stamps)) == len(stamps)
    assert sorted(stamps) == sorted(stamps, key=lambda h: (h.wall_ms, h.counter, h.node))


def test_manual_clock_refuses_to_go_back() -> None:
    with pytest.raises(ValueError):
        ManualClock().advance(-0.001)


def test_a_restarted_node_resumes_after_its_persisted_timestamp() -> None:
    """The node persists `hlc.last` and sets it back at start. `observe` is no substitute:
    its drift guard is for remote clocks and drops our own mark after a big step back."""
    clock = SteppingClock()
    persisted = HybridLogicalClock("a", clock, max_drift_ms=1_000).now()
    clock.now_s -= 5  # NTP stepped back while the node was down
    observed = HybridLogicalClock("a", clock, max_drift_ms=1_000)
    observed.observe(persisted)
    assert observed.now() < persisted
    restored = HybridLogicalClock("a", clock, max_drift_ms=1_000)
    restored.last = persisted
    assert restored.now() > persisted
