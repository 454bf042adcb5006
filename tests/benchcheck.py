"""The shape every `fogline bench` result must have (BENCHMARKS.md)."""

from __future__ import annotations

from typing import Any

KEYS = {"name", "figure", "unit", "peer", "peer_figure", "ratio", "better", "goal", "met",
        "conditions", "samples"}


def assert_result_shape(result: dict[str, Any], name: str, better: str) -> None:
    assert set(result) == KEYS
    assert result["name"] == name
    assert result["better"] == better
    assert isinstance(result["met"], bool)
    assert isinstance(result["conditions"], dict)
    assert result["conditions"]["cores"] >= 1
    assert result["samples"] > 0
    assert result["ratio"] is not None and result["ratio"] > 0
