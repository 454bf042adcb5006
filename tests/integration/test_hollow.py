"""Deployments across a fleet of hollow nodes against a real hub process.

Hollow nodes (fogline.sim.hollow) run the node's real enrollment, NATS link, heartbeats
and deployment loop; only app execution is faked, so a version can be made to answer
errors. One scenario, phase by phase: desired state reaches every node; a stepped
rollout completes while a node is offline (neither counted nor waited for), which
converges when it returns; a bad version rolls back by itself within 10 s of the breach
becoming visible; a pinned node never changes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fogline.bench.rollout import Deployer, breach_visible_s, write_app
from fogline.sim.hollow import HollowFleet, Traffic
from tests.fleet import run_hub

NODES = 30
HEARTBEAT_S = 1.0
APP = "hollow-probe"
ROLLBACK_GOAL_S = 10.0


def spec(pinned: str) -> dict[str, object]:
    return {"rollout": {"steps": ["10%", "50%", "100%"], "bake": "1s",
                        "gates": {"error_rate": 0.05, "min_requests": 20}},
            "pins": [{"nodes": [pinned], "version": "1.0.0"}]}


@pytest.mark.timeout(120)
async def test_rollout_offline_node_pin_and_automatic_rollback(tmp_path: Path) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", f"{HEARTBEAT_S:g}s") as hub:
        deployer = Deployer(hub.url, hub.token, tmp_path)
        fleet = HollowFleet.enroll(hub.url, hub.token, NODES, tmp_path / "hollow")
        try:
            async with fleet.running(connect_timeout_s=30):
                await _scenario(fleet, deployer, tmp_path / "apps")
        finally:
            deployer.close()


async def _scenario(fleet: HollowFleet, deployer: Deployer, apps: Path) -> None:
    by_id = sorted(fleet.nodes, key=lambda n: n.node_id)
    # Cohorts fill in node id order: the pin takes the first, and the node taken away
    # is the last, so it would be among the last to get v2 anyway.
    pinned, away = by_id[0], by_id[-1]
    eligible = by_id[1:]
    fleet.by_version["3.0.0"] = Traffic(error_rate=0.2)

    # v1, a first revision: everywhere at once; the pinned node gets it too.
    _, first = await deployer.apply(write_app(apps, "1.0.0", spec(pinned.node_id)))
    await fleet.wait(lambda: fleet.on_revision(APP, first), 20, "v1 on every node")
    assert all((APP, first) in n.revision_received_at for n in fleet.nodes)
    assert all(n.deployments.generation > 0 for n in fleet.nodes)
    await deployer.wait_phase(fleet, first, ["complete"], 10)

    # v2 in steps; one node drops off the hub as it starts.
    _, second = await deployer.apply(write_app(apps, "2.0.0", spec(pinned.node_id)))
    away.take_offline()
    view = await deployer.wait_phase(fleet, second, ["complete", "rolled_back", "paused"], 40)
    assert view["rollout"]["phase"] == "complete", view["rollout"]
    assert [s["index"] for s in view["rollout"]["steps"]] == [0, 1, 2]
    present = [n for n in eligible if n is not away]
    assert fleet.on_revision(APP, second, present)
    assert away.apps.deployed() == {APP: first}  # not counted, not waited for
    rows = {row["node_id"]: row for row in view["nodes"]}
    assert rows[away.node_id]["online"] is False
    assert rows[pinned.node_id]["pinned"] is True

    away.bring_online()
    await fleet.wait(lambda: fleet.on_revision(APP, second, [away]), 20,
                     "the returning node on v2")

    # v3 answers 20% errors: the first step breaches the gate and everything it reached
    # goes back to v2 by itself.
    v3_applied_s, third = await deployer.apply(write_app(apps, "3.0.0", spec(pinned.node_id)))
    view = await deployer.wait_phase(fleet, third, ["rolled_back", "complete", "paused"], 40)
    assert view["rollout"]["phase"] == "rolled_back", view["rollout"]
    assert "error rate" in view["rollout"]["reason"]
    await fleet.wait(lambda: fleet.on_revision(APP, second, eligible), 20, "v2 again")
    got_v3 = [n for n in eligible if n.apps.activated_at(APP, third) is not None]
    assert got_v3 and len(got_v3) < len(eligible)
    visible_s = breach_visible_s(got_v3, APP, third, 0.05, 20)
    assert visible_s is not None and visible_s >= v3_applied_s
    back_s = max(n.apps.activated_at(APP, second, after_s=n.apps.activated_at(APP, third) or 0.0)
                 or float("inf") for n in got_v3)
    assert back_s - visible_s <= ROLLBACK_GOAL_S

    # The pinned node ran v1 throughout; every node reports what it acts on.
    assert [(app, revision) for _, app, revision in pinned.apps.activations] == [(APP, first)]
    await asyncio.sleep(HEARTBEAT_S * 1.5)
    view = await deployer.deployment()
    running = {row["node_id"]: row["running"] for row in view["nodes"]}
    assert running == {n.node_id: (first if n is pinned else second) for n in fleet.nodes}
