"""The data-sync benchmarks (`merge`, `propagation`) run end to end in a tiny mode.

Speed goals live in the benchmarks' own `met`, never here (machines are noisy): these
check the result shape and that the numbers are plausible.
"""

from __future__ import annotations

import pytest

from fogline.bench import merge, propagation
from tests.benchcheck import assert_result_shape


@pytest.mark.timeout(120)
def test_merge_small_run_merges_every_op_like_the_core_and_times_the_peer() -> None:
    result = merge.run(ops=3000, rounds=1)
    assert_result_shape(result, "merge", "higher")
    conditions = result["conditions"]
    assert result["figure"] > 0 and result["peer_figure"] > 0
    assert conditions["map_puts"] == 3000
    assert conditions["ops"] == 3000 + conditions["counter_ops"] > 3000
    # The timed SQL merge makes the same decisions as the in-memory CRDT core.
    assert conditions["hub_replica_matches_in_memory_core"] is True
    assert conditions["hub_changed_ops"] == conditions["in_memory_changed_ops"] > 0
    assert 0 < conditions["hub_conflicts"] < conditions["map_puts"]
    assert conditions["in_memory_apply_ops_per_s"] > 0
    assert conditions["pycrdt_updates"] > 0 and conditions["pycrdt_hub_keys"] > 0
    assert conditions["postgresql_ops_per_s"] is None or conditions["postgresql_ops_per_s"] > 0


@pytest.mark.timeout(120)
def test_propagation_small_run_is_never_faster_than_the_emulated_rtt() -> None:
    rtt_ms = 20.0
    result = propagation.run(writes=10, rtt_ms=rtt_ms, sparse=2)
    assert_result_shape(result, "propagation", "lower")
    conditions = result["conditions"]
    assert result["peer_figure"] == rtt_ms
    assert conditions["writes"] == 10 and conditions["writes_lost"] == 0
    assert conditions["sparse_writes"] == 2 and conditions["sparse_lost"] == 0
    assert result["samples"] == 10
    # Physics: each write crossed both emulated links.
    assert result["figure"] >= rtt_ms
    assert conditions["min_ms"] >= rtt_ms - 1  # the WAN releases on a 1 ms grid
    assert conditions["p50_ms"] <= conditions["p90_ms"] <= conditions["p99_ms"]
    segments = conditions["segments_p50_ms"]
    assert segments["a_to_hub_nats (floor R/2)"] >= rtt_ms / 2 - 1
    assert segments["hub_nats_to_b_watch (floor R/2)"] >= rtt_ms / 2 - 1
    assert conditions["hub_merge_worker_pulls"]["fetches"] > 0
