"""`fogline demo` end to end: the headless run's story, and nothing left running."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil

from tests.fleet import FOGLINE, wait_for

HEARTBEAT_S = 1.0


def processes_using(path: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(process)
    return found


def test_headless_demo_shows_partition_detection_and_recovery(tmp_path: Path) -> None:
    data, summary_path = tmp_path / "demo", tmp_path / "demo.json"
    result = subprocess.run(
        [*FOGLINE, "demo", "--headless", "--duration", "45", "--data", str(data),
         "--json", str(summary_path)], capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(summary_path.read_text())

    every_node = {n["name"]: n for n in summary["nodes"]}
    assert set(every_node) == {"us-east-1", "eu-west-1", "ap-south-1", "cloud-1"}
    assert every_node["cloud-1"]["tier"] == "cloud"
    assert all(n["status"] == "ready" for n in every_node.values())
    assert all(len(n["ids_seen"]) == 1 for n in every_node.values()), "a node changed id"
    assert summary["enrollments"] == 4, "a node enrolled again"
    nodes = {name: n for name, n in every_node.items() if n["tier"] != "cloud"}
    for node in nodes.values():
        # The RTT each node measures to the hub is at least the region's emulated RTT
        # (its PING may also wait behind the node's own traffic on a busy machine).
        assert node["rtt_measured_ms"] >= node["rtt_configured_ms"] - 1, node
    measured = [nodes[n]["rtt_measured_ms"] for n in ("us-east-1", "eu-west-1", "ap-south-1")]
    assert measured == sorted(measured), "measured RTTs do not follow the regions' RTTs"

    partition = summary["partition"]
    assert partition["region"] == "eu-west"
    cut = partition["nodes"]["eu-west-1"]
    rtt_s = nodes["eu-west-1"]["rtt_configured_ms"] / 1000
    assert cut["local_status_while_offline"] == "ok"
    assert 0 < cut["detection_s"] <= 3 * HEARTBEAT_S + rtt_s + 0.25, cut
    assert 0 < cut["recovery_s"] <= HEARTBEAT_S + rtt_s, cut
    timeline = [e["event"] for e in summary["timeline"]]
    assert timeline.index("partition") < timeline.index("heal")
    cut_t = next(e["t_s"] for e in summary["timeline"] if e["event"] == "partition")
    offline = [s["t_s"] for s in summary["statuses"]
               if s["t_s"] > cut_t and s["status"]["eu-west-1"] == "offline"]
    assert offline, "the view never showed eu-west offline"
    assert all(s["status"]["us-east-1"] == "ready" for s in summary["statuses"]
               if s["t_s"] > offline[0]), "the partition disturbed another region"
    data_story = summary["data"]
    assert data_story["records_lost"] == 0
    assert data_story["replicas_equal"] is True
    assert data_story["converged_after_heal_s"] is not None
    assert data_story["converged_after_heal_s"] <= 3.0
    cut_off, other = data_story["nodes"]["eu-west-1"], data_story["nodes"]["us-east-1"]
    assert cut_off["backlog_max"] > 20 > other["backlog_max"]  # grew only while cut off
    assert all(n["backlog"] == 0 and n["at_hub"] == n["emitted_acked"]
               for n in data_story["nodes"].values())
    check_app_story(summary["apps"], nodes)
    assert processes_using(data) == []


def check_app_story(apps: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> None:
    """The factory app on every node: edge vs cloud latency, devices, the partition."""
    regions = {r["region"]: r for r in apps["regions"]}
    assert set(regions) == {"us-east", "eu-west", "ap-south"}
    for region in regions.values():
        edge, cloud = region["edge"], region["cloud"]
        assert edge["warmed_up"] and cloud["warmed_up"], region
        assert edge["ok"] > 100 and edge["failed"] == 0, region  # never failed, even cut off
        assert cloud["ok"] > 100, region
        assert edge["p99_ms"] < cloud["p50_ms"], region
        # Physics: every cloud request crosses the region's WAN link both ways.
        assert cloud["p50_ms"] >= region["rtt_ms"], region
    rows = {row["node"]: row for row in apps["nodes"]}
    assert set(rows) == {*nodes, "cloud-1"}
    assert all(row["state"] == "running" and row["restarts"] == 0 for row in rows.values())
    for name in nodes:
        row = rows[name]
        assert row["messages"] > 100, row  # device messages handled on every regional node
        assert row["malformed"] == row["device_batches"]["malformed_sent"] > 0, row
        assert row["handler_errors"] == 0, row
    assert rows["cloud-1"]["messages"] > 100 and rows["cloud-1"]["malformed"] == 0
    for row in rows.values():  # summaries queued while cut off, all at the hub in the end
        assert row["summaries_emitted"] > 0, row
        assert row["summaries_backlog"] == 0, row
        assert row["summaries_at_hub"] == row["summaries_emitted"], row
    assert rows["eu-west-1"]["summaries_backlog_max"] >= 10 > rows["us-east-1"][
        "summaries_backlog_max"]

    cut = apps["partition"]
    assert cut["region"] == "eu-west" and cut["edge_requests"]["seconds"] >= 10, cut
    # Cut off from the hub (and the cloud), eu-west's edge node kept serving its users
    # and handling its devices; its users' cloud path failed meanwhile.
    assert cut["edge_requests"]["failed"] == 0 and cut["edge_requests"]["ok"] > 100, cut
    assert cut["cloud_requests"]["ok"] == 0 and cut["cloud_requests"]["failed"] > 100, cut
    assert cut["messages_during_cut"] > 100 and cut["device_batches_acked_during_cut"] > 100


def test_sigterm_stops_every_process_the_demo_started(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    demo = subprocess.Popen([*FOGLINE, "demo", "--headless", "--duration", "0", "--data",
                             str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # hub + nats-server + three nodes
        wait_for(lambda: len(processes_using(data)) >= 5 and (
            data / "nodes" / "ap-south-1" / "endpoint").exists(), 60, "demo fleet running")
        children = psutil.Process(demo.pid).children(recursive=True)
        assert any("nats-server" in c.name() for c in children)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0
        time.sleep(0.5)
        assert [p for p in children if p.is_running() and p.status() != "zombie"] == []
        assert processes_using(data) == []
    finally:
        if demo.poll() is None:
            demo.kill()
