"""The `mqtt-choice` benchmark runs end to end on tiny counts and reports every candidate.

No speed is asserted (machines here are noisy): each broker x client pair either
measured a positive rate with no QoS1 loss, or says why it could not, as a string.
"""

from __future__ import annotations

import pytest

from fogline.bench import mqtt_choice

KEYS = {"name", "figure", "unit", "peer", "peer_figure", "ratio", "better", "goal", "met",
        "conditions", "samples"}


@pytest.mark.timeout(240)
def test_mqtt_choice_tiny_run_reports_every_pair() -> None:
    result = mqtt_choice.run(quick=True, count=300, latency_s=0.2, reps=1)
    assert set(result) == KEYS
    assert result["name"] == "mqtt-choice" and result["better"] == "higher"
    assert isinstance(result["met"], bool)
    conditions = result["conditions"]
    assert conditions["cores"] >= 1 and conditions["payload_bytes"] == 100
    table = conditions["results"]
    pairs = {f"{b}+{c}" for b in mqtt_choice.BROKERS for c in mqtt_choice.CLIENTS}
    assert set(table) == pairs
    for pair, row in table.items():
        if "error" in row:
            assert isinstance(row["error"], str) and row["error"], pair
            continue
        for kind in ("qos0", "qos1"):
            cell = row[kind]
            if "error" in cell:
                assert isinstance(cell["error"], str) and cell["error"], (pair, kind)
                continue
            assert cell["rate"] > 0, (pair, kind)
        if "error" not in row["qos1"] and not pair.startswith("mosquitto+"):
            # Embedded candidates must not lose QoS1; the system Mosquitto may, with
            # its default queue limits, and that loss is what the benchmark reports.
            assert row["qos1"]["lost"] == 0, pair
    for name, info in conditions["brokers"].items():
        assert "error" in info or info["port"] > 0, name
    for name, cell in conditions["slow_subscriber_qos1"]["by_broker"].items():
        assert "error" in cell or cell["unique"] > 0, name
    if result["figure"] > 0:
        assert conditions["best_embedded"]["broker"] in mqtt_choice.EMBEDDED
