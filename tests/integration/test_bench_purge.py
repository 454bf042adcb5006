"""The purge benchmark runs end to end on a small hollow fleet behind the WAN emulator.

A real hub process, hollow nodes running the node's real `NodePurges`, emulator links
in their own processes. Speed is the benchmark's own `met`, never asserted here: this
checks the result's shape and that every node applied every purge, including the
nodes that were away for one and caught up on their return.
"""

from __future__ import annotations

import pytest

from fogline.bench import BENCHMARKS, purge
from tests.benchcheck import assert_result_shape

NODES = 20
ROUNDS = 2
OFFLINE = 4


@pytest.mark.timeout(90)
def test_purge_bench_reaches_every_hollow_node_and_the_returning_ones() -> None:
    assert "purge" in BENCHMARKS
    result = purge.run(nodes=NODES, rounds=ROUNDS, offline=OFFLINE)
    assert_result_shape(result, "purge", "lower")
    assert result["samples"] == NODES * ROUNDS
    conditions = result["conditions"]
    assert conditions["every_node_applied_every_purge"] is True
    for row in conditions["per_round"]:
        assert row["targets"] == row["acks"] == row["removed"] == NODES
        assert row["still_cached"] == 0
    # Nodes are spread over every link, and the one-way latency is taken off each.
    assert set(conditions["by_link"]) == set(purge.LINKS)
    assert sum(link["n"] for link in conditions["by_link"].values()) == NODES * ROUNDS
    assert 0 < result["figure"] < 10_000
    assert conditions["latency_ms"]["p99"] == result["figure"]
    # The probes saw every counted purge, straight and through every link.
    assert conditions["hub_part_ms"]["n"] == ROUNDS
    assert {link: row["n"] for link, row in conditions["emulator_added_ms"].items()} == \
        dict.fromkeys(purge.LINKS, ROUNDS)
    away = conditions["offline_catch_up"]
    assert away["nodes"] == away["missed_while_away"] == away["applied_after_return"] \
        == OFFLINE
    # A reconnect takes a few one-way trips over the node's link: never less than one.
    assert all(node["ms"] > node["one_way_ms"] for node in away["per_node"])
