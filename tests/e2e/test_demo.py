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
# Long enough for v3 (applied at t=70 s) to be rolled back; see demo_rollouts.
DURATION_S = 85
ROLLBACK_S_MAX = 10.0


def processes_using(path: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(path) in cmdline:
            found.append(process)
    return found


def test_headless_demo_shows_partition_rollouts_and_rollback(tmp_path: Path) -> None:
    data, summary_path = tmp_path / "demo", tmp_path / "demo.json"
    result = subprocess.run(
        [*FOGLINE, "demo", "--headless", "--duration", str(DURATION_S), "--data", str(data),
         "--json", str(summary_path)], capture_output=True, text=True, timeout=200)
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
    check_app_story(summary["apps"], nodes, summary["rollouts"], summary["cache"]["kill"])
    check_cache_story(summary["cache"], summary["timeline"])
    check_rollouts(summary["rollouts"], summary["timeline"], summary["apps"], set(every_node))
    assert processes_using(data) == []


def check_app_story(apps: dict[str, Any], nodes: dict[str, dict[str, Any]],
                    rollouts: dict[str, Any], kill: dict[str, Any]) -> None:
    """The factory app on every node: edge vs cloud latency, devices, the partition."""
    regions = {r["region"]: r for r in apps["regions"]}
    assert set(regions) == {"us-east", "eu-west", "ap-south"}
    failed_under_v3 = rollouts["v3"]["user_requests"]["by_path"]
    for region in regions.values():
        edge, cloud = region["edge"], region["cloud"]
        assert edge["warmed_up"] and cloud["warmed_up"], region
        # Never failed, even cut off, but for v3's canary (its injected 500s) and while
        # the cache story's killed node was down (these users call it directly).
        assert edge["ok"] > 100, region
        v3_failed = failed_under_v3[f"{region['region']}/edge"]["failed"]
        if region["region"] == kill["region"]:
            down = kill["factory_edge_users"]["failed"]
            assert down > 0 and v3_failed <= edge["failed"] <= v3_failed + down, region
        else:
            assert edge["failed"] == v3_failed, region
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
        # Every malformed message was rejected, but the last second of a version replaced
        # may be missing from the counters (one malformed message per 10 s at most).
        sent = row["device_batches"]["malformed_sent"]
        assert sent > 0 and sent - row["versions_replaced"] <= row["malformed"] <= sent, row
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


def check_cache_story(cache: dict[str, Any], timeline: list[dict[str, Any]]) -> None:
    """The catalog cached at every regional node, shoppers routed by fogline.client: hits
    near, misses as far as the origin; a purge applied everywhere in well under a second
    with no old price served after it; a killed node's shoppers served elsewhere within
    a heartbeat interval, none failing, and back on it once it restarted."""
    assert cache["hit_ratio"] > 0.5, cache
    for region, row in cache["regions"].items():
        assert row["ok"] > 500 and row["failed"] == 0, (region, row)
        assert row["x_cache"].get("HIT", 0) > row["x_cache"].get("MISS", 0), (region, row)
        assert row["hit_p50_ms"] < row["origin_p50_ms"], (region, row)
        assert row["served_by"].get(f"{region}-1", 0) > row["ok"] / 2, (region, row)
    purge = cache["purge"]
    assert purge["applied"] == purge["targets"] == 4, purge
    assert purge["latency_ms"]["max"] < 1000, purge
    assert purge["stale_after_purge"] == [], purge
    events = [e["event"] for e in timeline]
    assert events.index("purge") < events.index("purge applied") < events.index("node killed")
    kill = cache["kill"]
    assert kill["node"] == "ap-south-1" and kill["failed_requests"] == 0, kill
    assert kill["served_elsewhere"] is not None, kill
    assert kill["served_elsewhere"]["after_s"] <= HEARTBEAT_S, kill
    assert kill["back_on_it_after_s"] is not None, kill


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


def check_rollouts(rollouts: dict[str, Any], timeline: list[dict[str, Any]],
                   apps: dict[str, Any], names: set[str]) -> None:
    """v1 reached every node through the hub before devices and users started; v2 went to
    a canary first, then the rest; v3's error rate tripped the gate and the fleet went
    back to v2 by itself, soon."""
    v1, v2, v3 = rollouts["v1"], rollouts["v2"], rollouts["v3"]
    assert (v1["revision"], v1["phase"], v1["from_revision"]) == (1, "complete", 0), v1
    assert set(v1["nodes_got_it"]) == names, v1
    traffic_t = next(e["t_s"] for e in timeline if e["event"] == "app traffic")
    assert v1["all_nodes_on_it_t_s"] is not None and v1["all_nodes_on_it_t_s"] <= traffic_t

    assert (v2["revision"], v2["phase"], v2["from_revision"]) == (2, "complete", 1), v2
    canary, rest = v2["steps"]
    assert len(canary["nodes"]) == 1 and set(canary["nodes"]) | set(rest["nodes"]) == names
    assert canary["converged_t_s"] <= canary["ended_t_s"] <= rest["started_t_s"], v2
    assert v2["canary_user_paths"], "v2's canary serves no users"
    assert v2["user_requests"]["failed"] == 0, v2  # versions switch with no failed request

    assert (v3["revision"], v3["phase"], v3["from_revision"]) == (3, "rolled_back", 2), v3
    assert v3["applied_t_s"] >= v2["ended_t_s"]
    assert "error rate" in v3["reason"], v3
    assert len(v3["steps"]) == 1 and len(v3["nodes_got_it"]) == 1, v3  # only the canary
    assert v3["canary_user_paths"], "v3's canary serves no users"
    assert v3["fleet_back_t_s"] is not None, v3
    assert 0 <= v3["rollback_s"] <= ROLLBACK_S_MAX, v3
    # The users saw v3's failures, and only on the paths to its canary.
    failed = v3["user_requests"]["by_path"]
    assert v3["user_requests"]["failed"] > 0, v3
    assert all(counts["failed"] == 0 for key, counts in failed.items()
               if key not in v3["canary_user_paths"]), v3
    assert all(row["revision"] == 2 and row["state"] == "running" for row in apps["nodes"])
