"""The deployment CLI against a real hub and node: keys, apply, get, rollout, delete."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fleet import FOGLINE, run_hub, wait_for
from tests.integration.test_deployments import deployment, running, start_nodes, write_app


def fogline(hub_data: Path, home: Path, *args: str, ok: bool = True) -> str:
    """Run the CLI against the hub in `hub_data` (keys create needs no hub)."""
    local = list(args[:2]) == ["keys", "create"]
    result = subprocess.run([*FOGLINE, *args, *([] if local else ["--data", str(hub_data)])],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "FOGLINE_HOME": str(home), "COLUMNS": "200"})
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode == 2, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_cli_applies_steers_and_deletes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        data = hub.data
        assert "written to" in fogline(data, home, "keys", "create")
        assert "created" in fogline(data, home, "keys", "register",
                                    str(home / "publisher.pub"), "--name", "ci")
        keys: list[dict[str, Any]] = json.loads(fogline(data, home, "keys", "list", "-o",
                                                        "json"))
        assert keys[0]["name"] == "ci" and keys[0]["revoked_at_s"] is None
        start_nodes(hub, tmp_path, ["c1", "c2"])

        v1 = write_app(tmp_path, "1.0")
        assert "app/shop created (revision 1)" in fogline(data, home, "apply", "-f", str(v1))
        assert "app/shop unchanged (revision 1)" in fogline(data, home, "apply", "-f",
                                                            str(v1))
        wait_for(lambda: set(running(hub).values()) == {1}, 60, "v1")
        table = fogline(data, home, "get", "deployments")
        assert "shop" in table and "complete" in table

        # A bad manifest is refused before anything is sent.
        broken = write_app(tmp_path / "broken", "2.0")
        (broken / "fogline.yaml").write_text((broken / "fogline.yaml").read_text()
                                             .replace("entrypoint", "entrypiont"))
        out = fogline(data, home, "apply", "-f", str(tmp_path), ok=False)
        assert "entrypiont" in out
        assert deployment(hub)["revision"] == 1

        slow = {"steps": [1, "100%"], "bake": "60s"}
        v2 = write_app(tmp_path / "slow", "2.0", rollout=slow)
        assert "configured (revision 2)" in fogline(data, home, "apply", "-f", str(v2),
                                                    "--reason", "new pricing")
        wait_for(lambda: sorted(running(hub).values()) == [1, 2], 30, "canary")
        status = fogline(data, home, "rollout", "status", "shop")
        assert "revision 1 → 2" in status and "step 1: 1" in status
        assert "paused" in fogline(data, home, "rollout", "pause", "shop", "--reason",
                                   "looking")
        assert "cannot pause" in fogline(data, home, "rollout", "pause", "shop", ok=False)
        assert "progressing" in fogline(data, home, "rollout", "resume", "shop")
        fogline(data, home, "rollout", "promote", "shop")
        wait_for(lambda: set(running(hub).values()) == {2}, 30, "promoted to all")
        rollouts = json.loads(fogline(data, home, "get", "rollouts", "-o", "json"))
        assert rollouts[0]["to_revision"] == 2
        events = json.loads(fogline(data, home, "get", "events", "-o", "json"))
        applied = [e for e in events if e["kind"] == "deployment.applied"]
        assert applied[0]["detail"]["reason"] == "new pricing"
        assert applied[0]["actor"].startswith("admin (")
        assert {"rollout.pause", "rollout.resume", "rollout.promote"} <= {
            e["kind"] for e in events}

        # A Stream manifest sets the stream's policy on every node.
        stream = tmp_path / "streams" / "telemetry.yaml"
        stream.parent.mkdir()
        stream.write_text(yaml.safe_dump({
            "apiVersion": "fogline/v1", "kind": "Stream", "metadata": {"name": "telemetry"},
            "spec": {"priority": 7, "bandwidth_bps": 2000, "overflow": "drop-oldest"}}))
        assert "stream/telemetry created" in fogline(data, home, "apply", "-f", str(stream))
        assert "stream/telemetry unchanged" in fogline(data, home, "apply", "-f", str(stream))
        c1 = hub.nodes_by_name()["c1"]["endpoint"]
        local = {"Authorization": "Bearer "
                 + (tmp_path / "c1" / "local.token").read_text().strip()}

        def telemetry() -> dict[str, Any]:
            policies = httpx.get(f"{c1}/local/stream-policies", headers=local).json()
            return policies.get("telemetry", {})  # type: ignore[no-any-return]

        wait_for(lambda: telemetry().get("source") == "fleet", 20, "policy at the node")
        assert telemetry()["bandwidth_bps"] == 2000 and telemetry()["priority"] == 7
        bad = stream.with_name("bad.yaml")
        bad.write_text(stream.read_text().replace("drop-oldest", "explode"))
        assert "overflow" in fogline(data, home, "apply", "-f", str(bad), ok=False)
        bad.unlink()
        assert "stream/telemetry deleted" in fogline(data, home, "delete", "-f", str(stream))
        wait_for(lambda: telemetry().get("source") != "fleet", 20, "policy withdrawn")

        assert "app/shop deleted" in fogline(data, home, "delete", "-f", str(v2))
        wait_for(lambda: hub.api("GET", "/v1/deployments") == [], 10, "deleted")
        assert "no deployment" in fogline(data, home, "rollout", "status", "shop", ok=False)
