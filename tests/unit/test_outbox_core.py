"""The sans-IO rules of durable streams: admission, budgets, planning, exactly-once."""

from __future__ import annotations

import random
from collections import deque

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fogline.core.outbox import (
    Admit,
    Backlog,
    BatchMeta,
    Block,
    DropOldest,
    StreamPolicy,
    TokenBucket,
    UpBatch,
    admit,
    check_stream_name,
    decode_batch,
    encode_batch,
    ingest_step,
    parse_up_subject,
    plan_batches,
    plan_ingest,
    up_subject,
)
from fogline.errors import ConfigError, ProtocolError

# Policy and names -----------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"priority": 1.5}, "priority"),
    ({"bandwidth_bps": 0}, "bandwidth_bps"),
    ({"bandwidth_bps": float("inf")}, "bandwidth_bps"),
    ({"quota_bytes": 0}, "quota_bytes"),
    ({"overflow": "drop-newest"}, "overflow must be one of block, drop-oldest"),
    ({"burst_bytes": -1}, "burst_bytes"),
])
def test_bad_policy_is_refused_with_a_clear_message(kwargs: dict[str, object],
                                                    fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        StreamPolicy(**kwargs)  # type: ignore[arg-type]


def test_default_policy_blocks() -> None:
    assert StreamPolicy().overflow == "block"


@pytest.mark.parametrize("name", ["", "Alerts", "a.b", "a*", ">", "x" * 65, "-a"])
def test_stream_names_must_be_subject_tokens(name: str) -> None:
    with pytest.raises(ConfigError):
        check_stream_name(name)


def test_up_subject_round_trip() -> None:
    assert parse_up_subject(up_subject("n-1", "alerts")) == ("n-1", "alerts")
    with pytest.raises(ProtocolError):
        parse_up_subject("fl.node.n-1.hb")


# Admission ------------------------------------------------------------------------


@given(used=st.integers(0, 10_000), record=st.integers(1, 1000),
       quota=st.integers(1000, 10_000), overflow=st.sampled_from(["block", "drop-oldest"]))
def test_admission_fits_or_says_what_to_do(used: int, record: int, quota: int,
                                           overflow: str) -> None:
    policy = StreamPolicy(quota_bytes=quota, overflow=overflow)  # type: ignore[arg-type]
    decision = admit(used, record, policy)
    if used + record <= quota:
        assert decision == Admit()
    elif overflow == "block":
        assert decision == Block()
    else:
        assert isinstance(decision, DropOldest)
        assert used - decision.bytes_to_free + record == quota


def test_record_larger_than_the_quota_is_refused() -> None:
    with pytest.raises(ProtocolError, match="exceeds the stream quota"):
        admit(0, 101, StreamPolicy(quota_bytes=100, overflow="drop-oldest"))


@settings(max_examples=200)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=200),
       acks=st.lists(st.booleans(), min_size=1, max_size=200),
       overflow=st.sampled_from(["block", "drop-oldest"]))
def test_admission_never_loses_a_record_silently(sizes: list[int], acks: list[bool],
                                                 overflow: str) -> None:
    """Every record ends up stored, acked, counted as dropped or refused to its caller."""
    policy = StreamPolicy(quota_bytes=1000, overflow=overflow)  # type: ignore[arg-type]
    stored: deque[int] = deque()
    used = acked = dropped = refused = 0
    for index, size in enumerate(sizes):
        if acks[index % len(acks)] and stored:
            used -= stored.popleft()
            acked += 1
        decision = admit(used, size, policy)
        if isinstance(decision, DropOldest):
            freed = 0
            while freed < decision.bytes_to_free:
                freed += stored.popleft()
                dropped += 1
            used -= freed
            decision = Admit()
        if isinstance(decision, Block):
            refused += 1
            continue
        stored.append(size)
        used += size
        assert used <= policy.quota_bytes
    assert len(stored) + acked + dropped + refused == len(sizes)
    if overflow == "block":
        assert dropped == 0


# Token bucket and planning --------------------------------------------------------


def test_token_bucket_grants_when_not_in_debt_and_says_how_long_to_wait() -> None:
    bucket = TokenBucket(rate_bps=1000, burst_bytes=1000, now_s=0.0)
    assert bucket.take(1500, 0.0) == 0.0          # a big record still goes, into debt
    assert bucket.take(10, 0.0) == pytest.approx(0.5)
    assert bucket.take(10, 0.5) == 0.0


@given(takes=st.lists(st.tuples(st.floats(0, 0.5), st.integers(1, 5000)), max_size=100),
       rate=st.floats(100, 100_000), burst=st.integers(100, 50_000))
def test_token_bucket_holds_the_long_run_rate(takes: list[tuple[float, int]], rate: float,
                                              burst: int) -> None:
    bucket = TokenBucket(rate, burst, 0.0)
    now = granted = 0.0
    for step, size in takes:
        now += step
        if bucket.take(size, now) == 0.0:
            granted += size
    assert granted <= burst + rate * now + 5000


def test_planner_serves_the_highest_priority_first_and_strictly() -> None:
    backlogs = {"bulk": Backlog(10_000, 1_000_000, 0), "alerts": Backlog(5, 500, 10),
                "logs": Backlog(100, 10_000, 5)}
    plan = plan_batches(backlogs, {}, 0.0, 256 * 1024)
    assert [b.stream for b in plan.batches] == ["alerts", "logs", "bulk"]
    backlogs["alerts"] = Backlog(100_000, 10_000_000, 10)
    plan = plan_batches(backlogs, {}, 0.0, 256 * 1024)
    assert [b.stream for b in plan.batches] == ["alerts"]   # lower priorities wait


def test_planner_skips_a_stream_over_budget_without_holding_others() -> None:
    bulk = TokenBucket(1000, 1000, 0.0)
    bulk.take(5000, 0.0)
    backlogs = {"bulk": Backlog(1000, 100_000, 10), "logs": Backlog(10, 1000, 0)}
    plan = plan_batches(backlogs, {"bulk": bulk}, 0.0, 256 * 1024)
    assert [b.stream for b in plan.batches] == ["logs"]
    plan = plan_batches({"bulk": backlogs["bulk"]}, {"bulk": bulk}, 0.0, 256 * 1024)
    assert plan.batches == () and plan.wait_s == pytest.approx(4.0)
    assert plan_batches({}, {}, 0.0, 1024) .wait_s is None


def test_planner_caps_a_budgeted_batch_at_the_burst() -> None:
    policy = StreamPolicy(bandwidth_bps=20_000)
    bucket = policy.bucket(0.0)
    assert bucket is not None
    plan = plan_batches({"bulk": Backlog(10_000, 1_000_000)}, {"bulk": bucket}, 0.0,
                        256 * 1024)
    assert plan.batches[0].bytes_max == 20_000


@settings(max_examples=50, deadline=None)
@given(rate=st.integers(1000, 50_000), record=st.integers(10, 2000),
       seed=st.integers(0, 1000))
def test_planner_respects_priority_and_budgets_over_time(rate: int, record: int,
                                                         seed: int) -> None:
    """Simulated link: alerts arrive now and then; bulk has a budget; nothing sent for a
    budgeted stream exceeds burst + rate * t + one batch, and alerts never wait behind
    bulk in a round."""
    rng = random.Random(seed)
    policy = StreamPolicy(bandwidth_bps=rate)
    buckets = {"bulk": policy.bucket(0.0)}
    backlog = {"bulk": 10_000_000, "alerts": 0}
    sent = {"bulk": 0, "alerts": 0}
    now = 0.0
    batch_max = 64 * 1024
    while now < 10.0:
        if rng.random() < 0.3:
            backlog["alerts"] += record
        backlogs = {name: Backlog(n // record + (n % record > 0), n, 10 if name == "alerts"
                                  else 0) for name, n in backlog.items() if n}
        plan = plan_batches(backlogs, buckets, now, batch_max)  # type: ignore[arg-type]
        streams = [b.stream for b in plan.batches]
        if backlog["alerts"]:
            assert streams and streams[0] == "alerts"
        for planned in plan.batches:
            size = min(backlog[planned.stream], max(record, planned.bytes_max))
            if planned.stream in buckets:
                assert buckets[planned.stream].take(size, now) == 0.0  # type: ignore[union-attr]
            backlog[planned.stream] -= size
            sent[planned.stream] += size
        now += 0.05
        assert sent["bulk"] <= max(4096, rate) + rate * now + batch_max


# Wire batch -----------------------------------------------------------------------


def _batch(first_seq: int = 1, n: int = 3, **extra: object) -> UpBatch:
    records = [msgspec.Raw(msgspec.msgpack.encode({"i": i})) for i in range(n)]
    fields = {"stream": "alerts", "first_seq": first_seq, "gap_before": 0,
              "dropped_total": 0, "emitted_at_s": [1.0] * n, "records": records, **extra}
    return UpBatch(**fields)  # type: ignore[arg-type]


def test_batch_round_trip_keeps_records_byte_exact() -> None:
    batch = _batch(first_seq=7, gap_before=2, dropped_total=5)
    decoded = decode_batch(encode_batch(batch))
    assert decoded.last_seq == 9 and decoded.gap_before == 2
    assert [msgspec.msgpack.decode(r) for r in decoded.records] == [{"i": 0}, {"i": 1},
                                                                    {"i": 2}]


@pytest.mark.parametrize("data", [
    b"\x00garbage",
    msgspec.msgpack.encode({"type": "up", "stream": "a"}),
    msgspec.msgpack.encode(_batch(v=99)),
    msgspec.msgpack.encode(_batch(emitted_at_s=[1.0])),
    msgspec.msgpack.encode(_batch(first_seq=0)),
    b"\x00" * (2 << 20),
])
def test_bad_batches_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_batch(data)


# Exactly-once ingest --------------------------------------------------------------


def test_ingest_step_cases() -> None:
    assert ingest_step(10, 1, 10, 0).action == "duplicate"
    assert ingest_step(10, 11, 5, 0) == ingest_step(10, 11, 5, 0)
    step = ingest_step(10, 8, 5, 0)
    assert (step.action, step.skip, step.last_seq) == ("apply", 3, 12)
    assert ingest_step(10, 16, 5, 0).action == "later"        # 11..15 not here yet
    step = ingest_step(10, 16, 5, 5)                           # 11..15 were dropped
    assert (step.action, step.dropped, step.last_seq) == ("apply", 5, 20)
    step = ingest_step(10, 16, 5, 2, give_up=True)
    assert (step.action, step.dropped, step.lost) == ("apply", 2, 3)


@st.composite
def node_history(draw: st.DrawFn) -> tuple[list[int], list[BatchMeta]]:
    """Seqs 1..n with some dropped (never the newest), cut into batches as a node
    would, plus re-batched copies after a simulated crash (same first, another end)."""
    n = draw(st.integers(1, 120))
    dropped = draw(st.sets(st.integers(1, n - 1), max_size=n // 2)) if n > 1 else set()
    surviving = [seq for seq in range(1, n + 1) if seq not in dropped]
    batches: list[BatchMeta] = []
    prev = 0
    index = 0
    while index < len(surviving):
        first = surviving[index]
        run_end = index
        while run_end + 1 < len(surviving) and surviving[run_end + 1] == surviving[run_end] + 1:
            run_end += 1
        count = draw(st.integers(1, run_end - index + 1))
        gap = first - prev - 1
        batches.append(BatchMeta(first, count, gap))
        if draw(st.booleans()):  # a crash re-read the same head with another size
            batches.append(BatchMeta(first, draw(st.integers(1, run_end - index + 1)), gap))
        prev = surviving[index + count - 1]
        index += count
    return surviving, batches


@settings(max_examples=300, deadline=None)
@given(history=node_history(), seed=st.integers(0, 10_000))
def test_ingest_is_exactly_once_and_in_order_under_duplicates_and_reordering(
        history: tuple[list[int], list[BatchMeta]], seed: int) -> None:
    surviving, batches = history
    rng = random.Random(seed)
    deliveries = batches + [rng.choice(batches) for _ in range(rng.randint(0, len(batches)))]
    rng.shuffle(deliveries)
    pending = deque(deliveries)
    last_seq = 0
    applied: list[int] = []
    dropped = 0
    for _ in range(10_000):
        if not pending:
            break
        fetch = [pending.popleft() for _ in range(min(len(pending), rng.randint(1, 4)))]
        steps, new_last = plan_ingest(last_seq, fetch)
        # One fetch is one transaction: its batches take effect together, in seq order.
        for meta, step in sorted(zip(fetch, steps, strict=True),
                                 key=lambda pair: pair[0].first_seq):
            if step.action == "later":
                pending.append(meta)   # JetStream redelivers it after the nak delay
            elif step.action == "apply":
                applied += range(meta.first_seq + step.skip, meta.first_seq + meta.count)
                dropped += step.dropped
                assert step.lost == 0
        last_seq = new_last
    assert not pending
    assert applied == surviving                      # each once, ascending
    assert dropped == surviving[-1] - len(surviving)  # every gap is a reported drop


def test_a_batch_that_never_arrives_is_given_up_as_lost_not_silently() -> None:
    steps, last = plan_ingest(0, [BatchMeta(11, 5, 0, give_up=True)])
    assert (steps[0].action, steps[0].lost, last) == ("apply", 10, 15)
