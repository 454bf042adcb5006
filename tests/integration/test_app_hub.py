"""What the hub does for apps on nodes: collections nodes declare, app status in
heartbeats, and the store column that carries it onto an existing hub database.

A real hub process and real NATS; the node side is a connection with the node's own
credentials (so its permissions are the real ones), speaking the wire protocol.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry

from fogline.clock import ManualClock
from fogline.core.crdt import MapOp
from fogline.core.hlc import Hlc
from fogline.core.sync import (
    CollectionDef,
    DeclareResult,
    StateBatch,
    declare_subject,
    decode_sync,
    encode_sync,
    state_subject,
)
from fogline.errors import ConfigError, RetryableError
from fogline.hub.heartbeats import HeartbeatMetrics, HeartbeatProcessor
from fogline.hub.store import HubStore, nodes
from fogline.node.collections import NodeCollections
from fogline.node.declare import declare_collections
from fogline.protocol import AppStatus, Heartbeat, encode, heartbeat_subject
from tests.fleet import FOGLINE, HubProcess, connect_as, enrolled_node, run_hub, wait_for


def nats_url(hub: HubProcess) -> str:
    return (hub.data / "nats.url").read_text().strip()


def collections(hub: HubProcess) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["type"], c["scope"]) for c in hub.api("GET", "/v1/collections")}


def fogline_get(hub: HubProcess, *args: str) -> str:
    # Wide columns: rich would otherwise wrap cells at 80 in a pipe.
    return subprocess.run([*FOGLINE, "get", *args, "--data", str(hub.data)], check=True,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "250"}).stdout


# Declared collections ------------------------------------------------------------

async def test_node_declares_collections_and_refused_ones_change_nothing(
        tmp_path: Path, hub_db_args: list[str]) -> None:
    with run_hub(tmp_path / "hub", *hub_db_args) as hub:
        files, node_id = enrolled_node(hub, tmp_path / "n1", "n1")
        nc = await connect_as(files, node_id, nats_url(hub))
        try:
            orders = CollectionDef("orders", "map", "node")
            counts = CollectionDef("counts", "counter", "region")
            result = await declare_collections(nc, node_id, [orders, counts])
            assert result == DeclareResult(created=["orders", "counts"])
            assert collections(hub) == {"orders": ("map", "node"),
                                        "counts": ("counter", "region")}
            created = [e for e in hub.api("GET", "/v1/events")
                       if e["kind"] == "collection.created"]
            assert {(e["subject"], e["actor"]) for e in created} == {
                ("orders", f"node:{node_id}"), ("counts", f"node:{node_id}")}

            again = await declare_collections(nc, node_id, [counts, orders])
            assert again == DeclareResult(existing=["counts", "orders"])

            # A conflicting definition is refused and changes nothing.
            before = collections(hub)
            refused = await declare_collections(nc, node_id, [CollectionDef("orders",
                                                                            "counter", "node")])
            assert refused == DeclareResult(errors=[
                "collection 'orders' exists as map/node, not counter/node; type and scope "
                "cannot change"])
            assert collections(hub) == before
            invalid = await declare_collections(nc, node_id, [CollectionDef("No!", "map",
                                                                            "node")])
            assert "invalid collection name 'No!'" in invalid.errors[0]
            for garbage in (b"\x00garbage", encode_sync(StateBatch(node_id, 1, 1, [])),
                            msgspec.msgpack.encode({"type": "decl",
                                                    "defs": [["x", "tree", "node"]]})):
                reply = await nc.request(declare_subject(node_id), garbage, timeout=5)
                answer = decode_sync(reply.data)
                assert isinstance(answer, DeclareResult) and answer.errors, garbage
                assert not answer.created
            assert collections(hub) == before
            # Beside a refused one, the node's other definitions still go ahead.
            mixed = await declare_collections(nc, node_id, [
                CollectionDef("orders", "set", "global"), CollectionDef("fresh", "set",
                                                                        "global")])
            assert mixed.created == ["fresh"] and len(mixed.errors) == 1
            assert collections(hub) == {**before, "fresh": ("set", "global")}

            # What the declaration is for: the hub now keeps this node's ops.
            value = msgspec.msgpack.encode("widget")
            op = MapOp("o-1", Hlc(int(time.time() * 1000), 0, node_id), value)
            await nc.jetstream().publish(state_subject(node_id), encode_sync(
                StateBatch(node_id, 1, 1, [("orders", op)])))
            wait_for(lambda: hub.api("GET", "/v1/collections/orders")["replicas"].get(
                f"node.{node_id}") == {"o-1": "widget"}, 10, "the op merged at the hub")

            # A subject the node may not publish on gets no answer: retryable.
            with pytest.raises(RetryableError):
                await declare_collections(nc, "nd-someone-else", [orders], timeout_s=0.5)
        finally:
            await nc.close()


# App status in heartbeats --------------------------------------------------------

async def send_heartbeat(nc: nats.NATS, node_id: str, seq: int,
                         apps: tuple[AppStatus, ...]) -> None:
    await nc.publish(heartbeat_subject(node_id), encode(Heartbeat(
        node_id=node_id, seq=seq, sent_at_s=time.time(), interval_s=1.0, version="test",
        apps=apps)))
    await nc.flush()


def reported_apps(hub: HubProcess, node_id: str) -> list[dict[str, Any]]:
    return list(hub.api("GET", f"/v1/nodes/{node_id}")["apps"])


async def test_heartbeat_apps_reach_api_cli_and_events(
        tmp_path: Path, hub_db_args: list[str]) -> None:
    with run_hub(tmp_path / "hub", *hub_db_args) as hub:
        files, node_id = enrolled_node(hub, tmp_path / "n1", "n1")
        nc = await connect_as(files, node_id, nats_url(hub))
        try:
            assert reported_apps(hub, node_id) == []  # enrolled, nothing reported yet
            now = time.time()
            factory = AppStatus("factory", "1.2.0", "running", since_s=now)
            await send_heartbeat(nc, node_id, 1, (factory,))
            wait_for(lambda: reported_apps(hub, node_id) == [msgspec.to_builtins(factory)],
                     10, "apps in /v1/nodes")

            failed = AppStatus("factory", "1.2.0", "failed", restarts=3,
                               reason="crashed: exit code 1 (3 times in 60 s)", since_s=now)
            vision = AppStatus("vision", "0.3.0", "starting", since_s=now)
            await send_heartbeat(nc, node_id, 2, (failed, vision))
            wait_for(lambda: reported_apps(hub, node_id)[0]["state"] == "failed", 10,
                     "the failure reported")
            assert {n["name"]: n for n in hub.api("GET", "/v1/nodes")}["n1"]["apps"] == [
                msgspec.to_builtins(failed), msgspec.to_builtins(vision)]

            rows = json.loads(fogline_get(hub, "apps", "-o", "json"))
            assert [(r["node"], r["app"], r["version"], r["state"], r["restarts"],
                     r["reason"]) for r in rows] == [
                ("n1", "factory", "1.2.0", "failed", 3,
                 "crashed: exit code 1 (3 times in 60 s)"),
                ("n1", "vision", "0.3.0", "starting", 0, "")]
            assert [r["app"] for r in hub.api("GET", "/v1/apps", params={
                "state": "failed"})] == ["factory"]
            table = fogline_get(hub, "apps")
            assert "crashed: exit code 1 (3 times in 60 s)" in table and "vision" in table
            nodes_table = fogline_get(hub, "nodes")
            assert "factory:failed(3),vision:starting" in nodes_table
            listed = json.loads(fogline_get(hub, "nodes", "-o", "json"))
            assert listed[0]["apps"][0]["state"] == "failed"

            # Recovery is an event too; ordinary churn (starting -> running) is not.
            await send_heartbeat(nc, node_id, 3, (
                AppStatus("factory", "1.2.0", "running", restarts=3, since_s=now),
                AppStatus("vision", "0.3.0", "running", since_s=now)))
            wait_for(lambda: reported_apps(hub, node_id)[0]["state"] == "running", 10,
                     "the recovery reported")
            events = [e for e in reversed(hub.api("GET", "/v1/events"))
                      if e["kind"] == "app.state"]
            assert [(e["subject"], e["detail"]["app"], e["detail"]["from"], e["detail"]["to"])
                    for e in events] == [(node_id, "factory", "running", "failed"),
                                         (node_id, "factory", "failed", "running")]
            assert events[0]["detail"]["reason"] == "crashed: exit code 1 (3 times in 60 s)"
            assert events[0]["detail"]["restarts"] == 3
            assert hub.api("GET", "/v1/apps", params={"state": "failed"}) == []
        finally:
            await nc.close()


# The store -----------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'hub.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_an_existing_hub_database_gains_the_new_columns(db_url: str) -> None:
    store = HubStore(db_url)
    with store.engine.begin() as conn:
        conn.execute(nodes.insert().values(
            id="nd-old", name="old", region="", zone="", tier="near", labels={},
            capabilities={}, version="", endpoint="", status="ready", status_since_s=0.0,
            status_reason="", interval_s=1.0, failing_streak=0, returns_s=[], load={},
            failing_checks=[], heartbeat_seq=0, enrolled_at_s=0.0, token_id="t",
            key_fingerprint="k", nats_public_key="U", cert_expires_s=0.0))
        # The database as a hub from before app status (and clean marks) left it.
        conn.execute(sa.text("ALTER TABLE fl_nodes DROP COLUMN apps"))
        conn.execute(sa.text("ALTER TABLE fl_nodes DROP COLUMN sync_clean_ms"))
    store.close()

    store = HubStore(db_url)
    try:
        (row,) = store.list_nodes()
        assert row["apps"] == [] and row["sync_clean_ms"] == 0
        HubStore(db_url).close()  # a second start finds nothing to add
        clock = ManualClock()
        processor = HeartbeatProcessor(store, clock, HeartbeatMetrics(CollectorRegistry()))
        processor.receive(heartbeat_subject("nd-old"), encode(Heartbeat(
            node_id="nd-old", seq=1, sent_at_s=0.0, interval_s=1.0, version="x",
            apps=(AppStatus("a", "1", "failed", 1, "oom"),))))
        processor.flush()
        assert store.list_apps()[0]["state"] == "failed"
        health, apps = store.observed_by_node(["nd-old"])["nd-old"]
        assert health.status == "ready" and apps[0].reason == "oom"
        assert [e["kind"] for e in store.list_events()] == ["app.state"]
    finally:
        store.close()


# The node's local definitions ----------------------------------------------------

async def test_define_local_adds_unknown_collections_and_refuses_changes(
        tmp_path: Path) -> None:
    store = NodeCollections(tmp_path / "state.db", "nd-a", ManualClock())
    try:
        await store.define_local([CollectionDef("orders", "map", "node")])
        await store.collection("orders").put("o-1", {"qty": 2})  # writable at once
        # The hub's definition arriving later changes nothing.
        await store.merge_remote([], [CollectionDef("orders", "map", "node")])
        await store.define_local([CollectionDef("orders", "map", "node")])
        assert store.collection("orders").get("o-1") == {"qty": 2}

        with pytest.raises(ConfigError, match="'orders' is defined on this node as map/node"):
            await store.define_local([CollectionDef("hits", "counter", "region"),
                                      CollectionDef("orders", "map", "global")])
        with pytest.raises(ConfigError, match="invalid collection name"):
            await store.define_local([CollectionDef("Bad!", "map", "node")])
        assert store.definitions() == [CollectionDef("orders", "map", "node")]  # no "hits"
    finally:
        store.close()
