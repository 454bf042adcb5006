"""A hub and real node processes: enrollment, heartbeats, offline detection, restart.

Runs against the embedded SQLite store and against PostgreSQL with the same code.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.fleet import run_hub, stop, wait_for

HEARTBEAT_S = 1.0


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_args(request: pytest.FixtureRequest) -> list[str]:
    args = ["--heartbeat-interval", f"{HEARTBEAT_S}s"]
    if request.param == "postgresql":
        args += ["--db", request.getfixturevalue("postgres_url")]
    return args


def test_nodes_enroll_go_offline_when_killed_and_return_with_same_id(
        tmp_path: Path, hub_args: list[str]) -> None:
    with run_hub(tmp_path / "hub", *hub_args) as hub:
        token = hub.create_token(uses=3, region="eu-west", labels={"site": "plant-1"})
        names = ["edge-a", "edge-b", "edge-c"]
        processes = {name: hub.start_node(tmp_path / name, name, token) for name in names}

        def all_ready() -> dict[str, dict] | None:
            nodes = hub.nodes_by_name()
            ok = len(nodes) == 3 and all(n["status"] == "ready" for n in nodes.values())
            return nodes if ok else None

        nodes = wait_for(all_ready, 30, "three ready nodes")
        for node in nodes.values():
            assert node["region"] == "eu-west"
            assert node["labels"] == {"site": "plant-1"}
            assert node["capabilities"]["cores"] >= 1
            assert node["capabilities"]["memory_bytes"] > 0
            assert node["capabilities"]["arch"]
            assert node["id"].startswith("nd-")
        victim = nodes["edge-b"]

        killed_at = time.monotonic()
        processes["edge-b"].send_signal(signal.SIGKILL)
        processes["edge-b"].wait()
        wait_for(lambda: hub.nodes_by_name()["edge-b"]["status"] == "offline",
                 3 * HEARTBEAT_S + 1.0 + 0.5, "edge-b offline")
        detection_s = time.monotonic() - killed_at
        assert detection_s <= 3 * HEARTBEAT_S + 1.0 + 0.5
        # The other nodes are unaffected.
        others = hub.nodes_by_name()
        assert others["edge-a"]["status"] == "ready"
        assert others["edge-c"]["status"] == "ready"

        tokens_before = hub.api("GET", "/v1/tokens")
        hub.start_node(tmp_path / "edge-b", "edge-b")  # no token: must not re-enroll
        wait_for(lambda: hub.nodes_by_name()["edge-b"]["status"] == "ready", 15,
                 "edge-b ready again")
        after = hub.nodes_by_name()
        assert after["edge-b"]["id"] == victim["id"]
        assert len(after) == 3
        assert hub.api("GET", "/v1/tokens") == tokens_before
        enrolled = [e for e in hub.api("GET", "/v1/events") if e["kind"] == "node.enrolled"]
        assert len(enrolled) == 3
        transitions = [(e["detail"]["from"], e["detail"]["to"])
                       for e in hub.api("GET", "/v1/events")
                       if e["kind"] == "node.status" and e["subject"] == victim["id"]]
        assert ("ready", "offline") in transitions and ("offline", "ready") in transitions


def test_node_renews_credentials_before_expiry_without_going_offline(tmp_path: Path) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "0.5s", "--cert-ttl", "4s") as hub:
        token = hub.create_token()
        hub.start_node(tmp_path / "n1", "n1", token)
        wait_for(lambda: hub.nodes_by_name().get("n1", {}).get("status") == "ready", 20,
                 "n1 ready")
        first_expiry = hub.nodes_by_name()["n1"]["cert_expires_s"]
        # Three certificate lifetimes: without renewal the server would cut the link.
        time.sleep(12)
        node = hub.nodes_by_name()["n1"]
        assert node["status"] == "ready"
        assert node["cert_expires_s"] > first_expiry + 6
        assert time.time() - node["last_seen_s"] < 2
        events = hub.api("GET", "/v1/events")
        assert sum(e["kind"] == "node.renewed" for e in events) >= 3
        assert not [e for e in events if e["kind"] == "node.status"
                    and e["detail"]["to"] == "offline" and e["detail"]["from"] == "ready"]


def test_hub_stops_its_nats_server_on_sigterm_and_on_sigkill(tmp_path: Path) -> None:
    import psutil

    for sig in (signal.SIGTERM, signal.SIGKILL):
        with run_hub(tmp_path / f"hub-{sig}") as hub:
            children = psutil.Process(hub.process.pid).children(recursive=True)
            servers = [c for c in children if "nats-server" in c.name()]
            assert len(servers) == 1
            stop(hub.process, sig)
            wait_for(lambda s=servers[0]: not s.is_running() or s.status() == "zombie", 10,
                     "nats-server to exit")


def test_hub_uses_an_external_nats_server_configured_by_nats_config(tmp_path: Path) -> None:
    import subprocess

    from fogline.transport.nats_server import free_port, nats_server_binary
    from tests.fleet import FOGLINE

    port = free_port()
    data = tmp_path / "hub"
    config = subprocess.run(
        [*FOGLINE, "hub", "nats-config", "--data", str(data), "--host", "127.0.0.1",
         "--port", str(port), "--store-dir", str(tmp_path / "nats-store")],
        capture_output=True, text=True, check=True).stdout
    assert "operator:" in config and "resolver_preload" in config
    (tmp_path / "nats.conf").write_text(config)
    server = subprocess.Popen([str(nats_server_binary()), "-c", str(tmp_path / "nats.conf")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"nats://127.0.0.1:{port}"
        with run_hub(data, "--nats", url, "--heartbeat-interval", "1s") as hub:
            hub.start_node(tmp_path / "n1", "n1", hub.create_token())
            wait_for(lambda: hub.nodes_by_name().get("n1", {}).get("status") == "ready", 30,
                     "n1 ready through the external server")
            assert not (data / "nats" / "nats-server.conf").exists()  # nothing embedded
    finally:
        stop(server)
