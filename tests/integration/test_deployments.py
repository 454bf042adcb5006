"""Deployments end to end: a real hub, real node processes, signed bundles over NATS.

Canary then promotion, a bad version rolled back by itself, a node offline during the
rollout catching up after it returns, zero failed requests while a node switches
versions, and bundles refused at the hub and at the node.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import yaml

from fogline.bundle import create_key, pack, sign
from fogline.deploy_client import apply_request, read_documents
from fogline.protocol import (
    ARTIFACT_BUCKET,
    DESIRED_BUCKET,
    DesiredApp,
    DesiredState,
    PublisherKey,
    desired_notify_subject,
    encode,
)
from tests.fleet import FOGLINE, HubProcess, run_hub, stop, wait_for

APP_CODE = '''
import random

from fogline import App, Response

app = App("shop")


@app.route("GET", "/version")
async def version(req, ctx):
    if random.random() < ctx.config.get("error_ratio", 0.0):
        return Response(status=500, body=b"injected failure")
    return {"version": ctx.config["version"]}
'''

ROLLOUT = {"steps": [1, "100%"], "bake": "2s", "progress_deadline": "40s",
           "gates": {"error_rate": 0.05, "min_requests": 10}}


def write_app(root: Path, version: str, error_ratio: float = 0.0,
              **deploy: Any) -> Path:
    directory = root / f"shop-{version}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "shop_app.py").write_text(APP_CODE)
    manifest = {"apiVersion": "fogline/v1", "kind": "App",
                "metadata": {"name": "shop", "version": version},
                "spec": {"entrypoint": "shop_app:app",
                         "config": {"version": version, "error_ratio": error_ratio},
                         "rollout": ROLLOUT, **deploy}}
    (directory / "fogline.yaml").write_text(yaml.safe_dump(manifest))
    return directory


def apply(hub: HubProcess, directory: Path, key: Path) -> dict[str, Any]:
    [doc] = read_documents(directory)
    return hub.api("POST", "/v1/apply", json=apply_request(doc, key, "test"))  # type: ignore[no-any-return]


def deployment(hub: HubProcess) -> dict[str, Any]:
    return hub.api("GET", "/v1/deployments/shop")  # type: ignore[no-any-return]


def running(hub: HubProcess) -> dict[str, int]:
    return {n["node_id"]: n["running"] for n in deployment(hub)["nodes"]}


def endpoint(hub: HubProcess, name: str) -> str:
    return str(hub.nodes_by_name()[name]["endpoint"])


def served_version(url: str) -> str | None:
    try:
        response = httpx.get(f"{url}/shop/version", timeout=2)
    except httpx.HTTPError:
        return None
    return response.json()["version"] if response.status_code == 200 else None


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "publisher.key"
    create_key(path)
    return path


def register(hub: HubProcess, key: Path) -> None:
    line = key.with_suffix(".pub").read_text().split()
    hub.api("POST", "/v1/keys", json={"key_id": line[0], "public_key": line[1]})


def start_nodes(hub: HubProcess, root: Path, names: list[str]) -> None:
    token = hub.create_token(uses=len(names), region="eu")
    for name in names:
        hub.start_node(root / name, name, token, "--heartbeat-interval", "1s")
    wait_for(lambda: all(n in hub.nodes_by_name() and hub.nodes_by_name()[n]["status"]
                         == "ready" for n in names), 40, "nodes ready")


class Traffic:
    """Requests to one node's app in a thread; counts outcomes by status."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.results: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set():
                try:
                    response = client.get(f"{self.url}/shop/version")
                    body = response.json().get("version", "") \
                        if response.status_code == 200 else response.text[:80]
                    self.results.append((time.monotonic(), response.status_code, body))
                except httpx.HTTPError as exc:
                    self.results.append((time.monotonic(), 0, repr(exc)))
                time.sleep(0.01)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_canary_promotion_then_bad_version_rolls_back(tmp_path: Path, key: Path) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        register(hub, key)
        start_nodes(hub, tmp_path, ["n1", "n2", "n3"])
        assert apply(hub, write_app(tmp_path, "1.0"), key)["result"] == "created"
        wait_for(lambda: set(running(hub).values()) == {1}, 60, "v1 on every node")
        urls = [endpoint(hub, n) for n in ("n1", "n2", "n3")]
        assert {served_version(u) for u in urls} == {"1.0"}
        # Same content again: nothing changes.
        assert apply(hub, write_app(tmp_path, "1.0"), key)["result"] == "unchanged"

        # v2: one canary first, the others only after the bake.
        with Traffic(urls[0]) as traffic:
            assert apply(hub, write_app(tmp_path, "2.0"), key)["revision"] == 2
            wait_for(lambda: sorted(running(hub).values()) == [1, 1, 2], 30, "canary")
            canary_seen = time.monotonic()
            wait_for(lambda: set(running(hub).values()) == {2}, 60, "v2 everywhere")
            assert time.monotonic() - canary_seen >= 1.0  # the bake held the others
            time.sleep(0.5)
        wait_for(lambda: deployment(hub)["rollout"]["phase"] == "complete", 20,
                 "the last step baked")
        failed = [r for r in traffic.results if r[1] != 200]
        assert not failed, failed[:5]  # a healthy version switch loses nothing
        served = [r[2] for r in traffic.results]
        assert served[0] == "1.0" and served[-1] == "2.0"

        # v3 fails 50% of requests: the gate trips and the fleet returns to v2.
        stop_load = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=5) as client:
                while not stop_load.is_set():
                    for url in urls:
                        with contextlib.suppress(httpx.HTTPError):
                            client.get(f"{url}/shop/version")
                    time.sleep(0.01)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            apply(hub, write_app(tmp_path, "3.0", error_ratio=0.5), key)
            wait_for(lambda: 3 in running(hub).values(), 30, "v3 canary")
            wait_for(lambda: deployment(hub)["rollout"]["phase"] == "rolled_back", 30,
                     "automatic rollback")
            breach_s = deployment(hub)["rollout"]["ended_s"]
            wait_for(lambda: set(running(hub).values()) == {2}, 15, "fleet back on v2")
            assert time.time() - breach_s < 10 + 2  # back within 10 s of the decision
        finally:
            stop_load.set()
            loader.join(10)
        view = deployment(hub)
        assert "error rate" in view["rollout"]["reason"]
        events = hub.api("GET", "/v1/events?limit=100")
        kinds = [e["kind"] for e in events]
        assert "rollout.rolled_back" in kinds and "deployment.applied" in kinds
        rolled = next(e for e in events if e["kind"] == "rollout.rolled_back")
        assert rolled["actor"] == "rollout-controller"
        assert "error rate" in rolled["detail"]["reason"]


def test_offline_node_is_held_back_then_catches_up(tmp_path: Path, key: Path) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        register(hub, key)
        start_nodes(hub, tmp_path, ["a", "b", "c"])
        apply(hub, write_app(tmp_path, "1.0"), key)
        wait_for(lambda: set(running(hub).values()) == {1}, 60, "v1 everywhere")
        away = hub.nodes[2]
        stop(away)
        wait_for(lambda: hub.nodes_by_name()["c"]["status"] == "offline", 30, "c offline")
        apply(hub, write_app(tmp_path, "2.0"), key)
        wait_for(lambda: deployment(hub)["rollout"]["phase"] == "complete", 60,
                 "rollout completes without c")
        node_c = hub.nodes_by_name()["c"]["id"]
        assert running(hub)[node_c] == 1
        hub.nodes.remove(away)
        hub.start_node(tmp_path / "c", "c", None, "--heartbeat-interval", "1s")
        wait_for(lambda: running(hub)[node_c] == 2, 60, "c catches up to v2")
        assert served_version(endpoint(hub, "c")) == "2.0"


def test_pins_placement_and_undo(tmp_path: Path, key: Path) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        register(hub, key)
        start_nodes(hub, tmp_path, ["p1", "p2"])
        ids = {name: row["id"] for name, row in hub.nodes_by_name().items()}
        apply(hub, write_app(tmp_path, "1.0"), key)
        wait_for(lambda: set(running(hub).values()) == {1}, 60, "v1 everywhere")
        pins = [{"nodes": [ids["p1"]], "version": "1.0"}]
        too_big = {"requires": {"memory_mb": 10_000_000}}
        apply(hub, write_app(tmp_path, "2.0", pins=pins), key)
        wait_for(lambda: running(hub) == {ids["p1"]: 1, ids["p2"]: 2}, 60, "p2 on v2 only")
        # Placement that no node satisfies is reported, not silently skipped.
        result = apply(hub, write_app(tmp_path, "2.0", pins=pins, placement=too_big), key)
        assert result["result"] == "configured" and result["revision"] == 2
        view = wait_for(lambda: (v := deployment(hub))["unsatisfied"] and v, 20, "unplaced")
        assert "needs 10000000 MB of memory" in view["unsatisfied"][ids["p2"]]
        apply(hub, write_app(tmp_path, "2.0", pins=pins), key)
        # undo of a finished rollout: every unpinned node back to v1 at once.
        hub.api("POST", "/v1/deployments/shop/rollout/undo", json={"reason": "by hand"})
        wait_for(lambda: set(running(hub).values()) == {1}, 30, "undo to v1")
        undo = next(e for e in hub.api("GET", "/v1/events") if e["kind"] == "rollout.undo")
        assert undo["detail"]["reason"] == "by hand"
        subprocess.run([*FOGLINE, "delete", "-f", str(tmp_path / "shop-2.0"), "--data",
                        str(hub.data)], check=True, capture_output=True)
        wait_for(lambda: all(served_version(endpoint(hub, n)) is None
                             for n in ("p1", "p2")), 30, "app removed")


def test_bundles_refused_at_the_hub(tmp_path: Path, key: Path) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        directory = write_app(tmp_path, "1.0")
        [doc] = read_documents(directory)
        body = apply_request(doc, key, "")
        with hub.client() as client:
            unknown = client.post("/v1/apply", json=body)
            assert unknown.status_code == 422 and unknown.json()["code"] == "unknown-key"
            register(hub, key)
            tampered = dict(body, bundle=base64.b64encode(b"x" + base64.b64decode(
                body["bundle"])).decode())
            assert client.post("/v1/apply", json=tampered).json()["code"] == "digest-mismatch"
            unsigned = dict(body, signature="", key_id="")
            assert client.post("/v1/apply", json=unsigned).json()["code"] == "unsigned"
            relabelled = dict(body, manifest={**body["manifest"], "metadata": {
                "name": "shop", "version": "9.9"}})
            assert client.post("/v1/apply", json=relabelled).json()["code"] == "bad-signature"
            bad_manifest = dict(body, manifest={**body["manifest"], "kind": "Nope"})
            assert client.post("/v1/apply", json=bad_manifest).status_code == 409
            client.post("/v1/collections", json={"name": "carts", "type": "counter",
                                                 "scope": "global"})
            clash = write_app(tmp_path / "clash", "1.0", collections=[
                {"name": "carts", "type": "map", "scope": "region"}])
            [doc3] = read_documents(clash)
            refused = client.post("/v1/apply", json=apply_request(doc3, key, ""))
            assert refused.status_code == 409 and "carts" in refused.text
            assert client.get("/v1/deployments").json() == []
            assert client.post("/v1/apply", json=body).status_code == 200
            other = write_app(tmp_path / "other", "1.0", error_ratio=0.1)
            [doc2] = read_documents(other)
            same_version = client.post("/v1/apply", json=apply_request(doc2, key, ""))
            assert same_version.status_code == 409 and "bump" in same_version.text

            # Publisher keys: a key id that is not the key's, an unknown key to revoke,
            # and a revoked key (refused for new bundles and for registering again).
            key_id, public = key.with_suffix(".pub").read_text().split()
            wrong = client.post("/v1/keys", json={"key_id": "0" * 16, "public_key": public})
            assert wrong.status_code == 409 and "does not belong" in wrong.text
            assert client.post("/v1/keys/nope/revoke", json={}).status_code == 404
            assert client.post(f"/v1/keys/{key_id}/revoke",
                               json={"reason": "leaked"}).status_code == 200
            again = client.post("/v1/keys", json={"key_id": key_id, "public_key": public})
            assert again.status_code == 409 and "revoked" in again.text
            v2 = write_app(tmp_path / "v2", "2.0")
            [doc4] = read_documents(v2)
            revoked = client.post("/v1/apply", json=apply_request(doc4, key, ""))
            assert revoked.json()["code"] == "unknown-key"
            kinds = [e["kind"] for e in client.get("/v1/events").json()]
            assert "key.revoked" in kinds and "key.registered" in kinds


def test_node_refuses_a_bundle_the_hub_was_made_to_serve(tmp_path: Path, key: Path) -> None:
    """A compromised desired state (a bundle signed by a key the node does not trust)
    is refused by the node, which keeps running its version and says why."""
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        register(hub, key)
        start_nodes(hub, tmp_path, ["r1"])
        apply(hub, write_app(tmp_path, "1.0"), key)
        wait_for(lambda: set(running(hub).values()) == {1}, 60, "v1")
        node_id = hub.nodes_by_name()["r1"]["id"]
        url = endpoint(hub, "r1")
        rogue = tmp_path / "rogue.key"
        rogue_key = create_key(rogue)
        from fogline.bundle import load_key

        private, _ = load_key(rogue)
        bundle = pack(write_app(tmp_path / "evil", "6.6"))
        app = DesiredApp("shop", 66, "6.6", bundle.digest, len(bundle.data),
                         rogue_key.key_id, sign(private, "shop", "6.6", bundle.digest))
        trusted = hub.api("GET", "/v1/keys")

        async def inject() -> None:
            nc = await nats.connect((hub.data / "nats.url").read_text().strip(),
                                    user_credentials=str(hub.data / "nats" / "hub.creds"))
            js = nc.jetstream()
            objects = await js.object_store(ARTIFACT_BUCKET)
            await objects.put(bundle.digest.replace(":", "-"), bundle.data)
            kv = await js.key_value(DESIRED_BUCKET)
            state = DesiredState(node_id, 0, (app,), tuple(
                PublisherKey(k["key_id"], k["public_key"]) for k in trusted))
            generation = await kv.put(node_id, encode(state))
            await nc.publish(desired_notify_subject(node_id), encode(
                DesiredState(node_id, generation, state.apps, state.keys)))
            await nc.drain()

        asyncio.run(inject())
        refusals = wait_for(lambda: hub.api("GET", f"/v1/nodes/{node_id}")["refusals"],
                            30, "refusal reported")
        assert refusals[0]["code"] == "unknown-key" and refusals[0]["revision"] == 66
        assert served_version(url) == "1.0"
