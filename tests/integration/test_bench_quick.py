"""The benchmarks run end to end and report the shared result shape.

Speed goals live in the benchmarks' own `met`, never in tests (machines here are
noisy), so these only check that a small run works and its numbers are plausible.
"""

from __future__ import annotations

import pytest

from fogline.bench import heartbeats, node_rss, rollout
from tests.benchcheck import assert_result_shape


@pytest.mark.timeout(120)
def test_node_rss_quick_reports_a_plausible_rss() -> None:
    result = node_rss.run(quick=True)
    assert_result_shape(result, "node-rss", "lower")
    assert 5 < result["figure"] < 500
    conditions = result["conditions"]
    assert conditions["still_ready_after_idle"] is True
    assert 1 < conditions["floor_python_asyncio_rss_mb"] < result["figure"]


@pytest.mark.timeout(120)
def test_heartbeats_with_a_few_nodes_makes_them_ready_and_counts_heartbeats() -> None:
    result = heartbeats.run(nodes=20, window_s=2.0)
    assert_result_shape(result, "heartbeats", "higher")
    conditions = result["conditions"]
    assert conditions["nodes"] == 20
    assert conditions["nodes_ready"] == 20 and conditions["all_ready"] is True
    assert conditions["connections_closed_early"] == 0
    # The hub's own counter advanced by every heartbeat sent in the capacity phase.
    assert conditions["capacity_sent"] > 0
    assert conditions["capacity_processed"] == conditions["capacity_sent"]
    assert conditions["steady_heartbeats_per_s"] > 0
    assert result["figure"] > 0
    assert conditions["hub_rss_mb"] is not None and 5 < conditions["hub_rss_mb"] < 2000


@pytest.mark.timeout(180)
def test_cold_start_quick_times_real_workers_and_reads_the_idle_node() -> None:
    from fogline.bench import cold_start

    result = cold_start.run(quick=True)
    assert_result_shape(result, "cold-start", "lower")
    conditions = result["conditions"]
    # A worker is a Python process: slower than a bare interpreter, never instant.
    assert result["peer_figure"] < result["figure"] < 10_000
    assert conditions["worker_ready_ms_p50"] <= conditions["first_response_ms"]["p50"]
    memory = conditions["idle_node_with_one_app_rss_mb"]
    assert memory["agent"] > 5 and memory["worker"] > 5 and memory["broker"] > 1
    assert memory["total"] == pytest.approx(memory["agent"] + memory["worker"]
                                            + memory["broker"], abs=0.2)


@pytest.mark.timeout(180)
def test_rollout_benchmarks_run_on_a_small_hollow_fleet() -> None:
    result = rollout.run(quick=True, nodes=20)
    assert_result_shape(result, "rollout", "lower")
    assert 0 < result["figure"] < 120
    assert 0 < result["conditions"]["rollback_s"] < 60
    propagation = rollout.run_propagation(quick=True, nodes=20)
    assert_result_shape(propagation, "desired-propagation", "lower")
    assert 0 < propagation["figure"] < 30
