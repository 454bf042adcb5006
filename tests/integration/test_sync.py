"""Replicated collections across real processes: partitions, hub outages, convergence."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from tests.fleet import HubProcess, LocalNode, ThreadedWan, run_hub, stop, wait_for

PARTITION_S = float(os.environ.get("FOGLINE_TEST_PARTITION_S", "30"))
HUB_DOWN_S = float(os.environ.get("FOGLINE_TEST_HUB_DOWN_S", "60"))
COLLECTIONS = {"shared": ("map", "region"), "hits": ("counter", "region"),
               "tags": ("set", "global")}


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def start_fleet(hub: HubProcess, tmp_path: Path, wan: ThreadedWan,
                names: list[str]) -> dict[str, LocalNode]:
    for name, (kind, scope) in COLLECTIONS.items():
        hub.api("POST", "/v1/collections", json={"name": name, "type": kind, "scope": scope})
    nats_upstream = host_port((hub.data / "nats.url").read_text().strip())
    nodes = {}
    for name in names:
        port = wan.add_link(f"{name}/nats", nats_upstream, latency_ms=5)
        hub.start_node(tmp_path / name, name, hub.create_token(region="eu-west"),
                       "--nats", f"nats://127.0.0.1:{port}", "--heartbeat-interval", "1s")
        nodes[name] = LocalNode(tmp_path / name)
    for node in nodes.values():
        wait_for(lambda n=node: (n.data / "endpoint").exists() and all(
            n.knows(c) for c in COLLECTIONS), 30, "node to learn the collections")
    return nodes


def hub_view(hub: HubProcess, name: str) -> Any:
    """The hub's replica for the test region, or the type's empty value if it holds
    nothing (a replica without rows has no entry)."""
    view = hub.api("GET", f"/v1/collections/{name}")
    empty = {"map": {}, "counter": 0, "set": []}[view["type"]]
    return view["replicas"].get("region.eu-west", view["replicas"].get("global", empty))


def converged(hub: HubProcess, nodes: dict[str, LocalNode]) -> bool:
    for name in COLLECTIONS:
        values = [node.value(name) for node in nodes.values()]
        at_hub = hub_view(hub, name)
        if name == "tags":
            values = [sorted(v or []) for v in values]
            at_hub = sorted(at_hub or [])
        if any(v != at_hub for v in values):
            return False
    return True


def write_round(node: LocalNode, who: str, i: int, expected: dict[str, int]) -> None:
    node.emit("telemetry", {"from": who, "i": i})
    expected[f"emitted-{who}"] = expected.get(f"emitted-{who}", 0) + 1
    node.write("shared", op="put", key=f"k{i % 7}", value=f"{who}-{i}")
    node.write("hits", op="incr", amount=i % 3 + 1)
    expected["hits"] += i % 3 + 1
    node.write("tags", op="add", value=f"{who}-{i % 5}")
    if i % 4 == 3:
        node.write("tags", op="remove", value=f"{who}-{(i - 1) % 5}")


def test_partitioned_node_keeps_writing_and_converges_after_heal(
        tmp_path: Path, wan: ThreadedWan, hub_db_args: list[str]) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s", *hub_db_args) as hub:
        nodes = start_fleet(hub, tmp_path, wan, ["a", "b"])
        expected = {"hits": 0}
        wan.partition("b/nats")
        started = time.monotonic()
        i = 0
        while time.monotonic() - started < PARTITION_S:
            for who, node in nodes.items():
                write_round(node, who, i, expected)
            i += 1
            time.sleep(0.25)
        assert nodes["b"].value("hits") < expected["hits"]  # really apart
        wan.heal("b/nats")
        healed = time.monotonic()
        wait_for(lambda: converged(hub, nodes), 10, "replicas to converge")
        convergence_s = time.monotonic() - healed
        assert convergence_s <= 2.0, f"converged only after {convergence_s:.1f}s"
        assert nodes["a"].value("hits") == expected["hits"]
        assert hub_view(hub, "hits") == expected["hits"]
        shared = nodes["a"].value("shared")
        assert set(shared) == {f"k{j}" for j in range(7)}
        # Both sides wrote the same keys without seeing each other: the writes that lost
        # are counted and listed in the change feed.
        lost = [e for e in hub.api("GET", "/v1/events", params={"limit": 5000})
                if e["kind"] == "collection.conflict" and e["subject"] == "shared"]
        assert lost and {e["detail"]["key"] for e in lost} <= set(shared)
        metrics = httpx.get(f"{hub.url}/metrics", timeout=10,
                            headers={"Authorization": f"Bearer {hub.token}"}).text
        assert 'fogline_hub_collection_conflicts_total{collection="shared"}' in metrics
        assert_every_record_once(hub, expected)


def assert_every_record_once(hub: HubProcess, expected: dict[str, int]) -> None:
    def counts() -> dict[str, int]:
        by_name = {n["id"]: n["name"] for n in hub.api("GET", "/v1/nodes")}
        rows = hub.api("GET", "/v1/streams")
        return {f"emitted-{by_name[r['node_id']]}": r["last_seq"] for r in rows
                if r["stream"] == "telemetry"}

    wanted = {k: v for k, v in expected.items() if k.startswith("emitted-")}
    wait_for(lambda: counts() == wanted, 15, "every emitted record at the hub")
    for node in hub.api("GET", "/v1/nodes"):
        records = hub.api("GET", f"/v1/nodes/{node['id']}/streams/telemetry/records",
                          params={"limit": 10_000})
        seqs = [r["seq"] for r in records]
        assert seqs == list(range(1, wanted[f"emitted-{node['name']}"] + 1))


def test_nodes_keep_accepting_writes_while_the_hub_is_down(
        tmp_path: Path, wan: ThreadedWan, hub_db_args: list[str]) -> None:
    hub_dir = tmp_path / "hub"
    api_port = _free_port()
    with run_hub(hub_dir, "--heartbeat-interval", "1s", *hub_db_args,
                 listen=f"127.0.0.1:{api_port}") as hub:
        nodes = start_fleet(hub, tmp_path, wan, ["a", "b"])
        node_processes = list(hub.nodes)
        hub.nodes.clear()  # the nodes outlive this hub process
        expected = {"hits": 0}
        for i in range(5):
            for who, node in nodes.items():
                write_round(node, who, i, expected)
    try:
        # Hub (and its NATS) are gone: every local write is still accepted.
        down = time.monotonic()
        i = 5
        while time.monotonic() - down < HUB_DOWN_S:
            for who, node in nodes.items():
                write_round(node, who, i, expected)
            i += 1
            time.sleep(0.5)
        assert all(n.value("hits") < expected["hits"] for n in nodes.values())
        with run_hub(hub_dir, "--heartbeat-interval", "1s", *hub_db_args,
                     listen=f"127.0.0.1:{api_port}") as hub:
            wait_for(lambda: converged(hub, nodes), 30, "replicas to converge after outage")
            assert hub_view(hub, "hits") == expected["hits"]
            assert nodes["b"].value("hits") == expected["hits"]
            assert_every_record_once(hub, expected)
    finally:
        for process in node_processes:
            stop(process, signal.SIGTERM)


def _free_port() -> int:
    from fogline.transport.nats_server import free_port

    return free_port()


def node_tombstones(node: LocalNode) -> int:
    import sqlite3

    with sqlite3.connect(node.data / "state.db") as conn:
        return int(conn.execute("SELECT (SELECT count(*) FROM map WHERE deleted=1) + "
                                "(SELECT count(*) FROM set_removed)").fetchone()[0])


def test_tombstones_are_kept_while_a_node_could_resurrect_and_collected_after(
        tmp_path: Path, wan: ThreadedWan, hub_db_args: list[str]) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "0.5s",
                 "--tombstone-gc-interval", "0.5s", *hub_db_args) as hub:
        nodes = start_fleet(hub, tmp_path, wan, ["a", "b"])
        a, b = nodes["a"], nodes["b"]
        a.write("shared", op="put", key="k", value="first")
        wait_for(lambda: b.value("shared") == {"k": "first"}, 10, "b to see k")
        wan.partition("b/nats")
        time.sleep(0.5)
        b.write("shared", op="put", key="k", value="stale")  # older than a's delete
        time.sleep(0.05)
        a.write("shared", op="delete", key="k")
        a.write("tags", op="add", value="x")
        a.write("tags", op="remove", value="x")
        # b cannot report a clean upload: its stale write could still come, so the
        # tombstone must stay, however many collection passes run.
        time.sleep(3)
        view = hub.api("GET", "/v1/collections/shared")
        assert view["tombstones"]["region.eu-west"] == 1
        wan.heal("b/nats")
        wait_for(lambda: converged(hub, nodes), 15, "convergence after heal")
        assert a.value("shared") == {} and b.value("shared") == {}  # the delete won
        wait_for(lambda: not any(hub.api("GET", "/v1/collections/shared")["tombstones"]
                                 .values()), 15, "hub to collect the tombstone")
        wait_for(lambda: node_tombstones(a) == 0 and node_tombstones(b) == 0, 15,
                 "nodes to collect their tombstones")
        assert a.value("shared") == {} and b.value("shared") == {}
        assert hub_view(hub, "shared") == {}
