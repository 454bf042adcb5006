"""Deployments on a node: real signed bundles, a real NodeApps and real worker processes.

Only the hub is replaced, by a `fetch` function that serves bundle bytes from a dict (or
raises, as a hub that is away): the node verifies, unpacks, activates, refuses and
restarts exactly as it does in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import msgspec

from fogline.bundle import create_key, load_key, pack, sign
from fogline.clock import SystemClock
from fogline.errors import RetryableError
from fogline.node.apps.manager import NodeApps
from fogline.node.collections import NodeCollections
from fogline.node.deployments import NodeDeployments
from fogline.node.http import NodeState, create_node_app
from fogline.node.outbox import Outbox
from fogline.protocol import BundleRefusal, DesiredApp, DesiredState, PublisherKey

NODE = "nd-deploy"
APP = "greeter"
MANIFEST = """apiVersion: fogline/v1
kind: App
metadata:
  name: {name}
  version: {version}
spec:
  entrypoint: greeter_app:app
"""
CODE = """from fogline import App

app = App("greeter")
{extra}

@app.route("GET", "/version")
async def version(req, ctx):
    return {{"version": "{version}"}}
"""


def write_app(root: Path, version: str, *, manifest_version: str | None = None,
              extra: str = "") -> Path:
    directory = root / f"greeter-{version}"
    directory.mkdir()
    (directory / "fogline.yaml").write_text(
        MANIFEST.format(name=APP, version=manifest_version or version))
    (directory / "greeter_app.py").write_text(CODE.format(version=version, extra=extra))
    return directory


class Publisher:
    """Packs and signs bundles, and serves their bytes to the node like the hub."""

    def __init__(self, root: Path) -> None:
        create_key(root / "keys" / "publisher")
        self.private, public = load_key(root / "keys" / "publisher")
        self.key = PublisherKey(public.key_id, public.public_key)
        self.blobs: dict[str, bytes] = {}
        self.fetched: list[str] = []

    def app(self, directory: Path, revision: int, version: str) -> DesiredApp:
        bundle = pack(directory)
        self.blobs[bundle.digest] = bundle.data
        return DesiredApp(APP, revision, version, bundle.digest, len(bundle.data),
                          self.key.key_id, sign(self.private, APP, version, bundle.digest))

    async def fetch(self, app: DesiredApp) -> bytes:
        self.fetched.append(app.digest)
        return self.blobs[app.digest]


def msgspec_replace(app: DesiredApp, **changes: object) -> DesiredApp:
    return msgspec.structs.replace(app, **changes)


def desired(generation: int, *apps: DesiredApp, keys: tuple[PublisherKey, ...]) -> DesiredState:
    return DesiredState(NODE, generation, apps, keys)


@contextlib.asynccontextmanager
async def open_node(data: Path, fetch: Callable[[DesiredApp], object]
                    ) -> AsyncIterator[tuple[NodeApps, NodeDeployments]]:
    clock = SystemClock()
    data.mkdir(exist_ok=True)
    collections = NodeCollections(data / "state.db", NODE, clock)
    outbox = Outbox(data / "outbox.db", clock)
    apps = NodeApps([], clock)
    await apps.start(collections, outbox, {"id": NODE, "region": "", "tier": "near",
                                           "labels": {}}, None, data / "apps" / "envs")
    deployments = NodeDeployments(data, NODE, apps, clock, fetch)  # type: ignore[arg-type]
    task = asyncio.create_task(deployments.run())
    try:
        yield apps, deployments
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await apps.stop()
        outbox.close()
        collections.close()


async def serving(apps: NodeApps) -> tuple[str, int]:
    """The version the greeter answers with, and the revision its status reports."""
    supervisor = apps.supervisors[APP]
    reply = await supervisor.http("GET", "/version", "", [], b"")
    assert reply.status == 200, reply.body
    return json.loads(reply.body)["version"], supervisor.status().revision


async def apply(deployments: NodeDeployments, state: DesiredState) -> None:
    assert deployments.offer(state)
    await deployments.wait_idle(30)


async def local_deployments(deployments: NodeDeployments, token: str = "secret") -> object:
    """`GET /local/deployments` of the node's HTTP app: the body, or the status if not 200."""
    app = create_node_app(NodeState(started_at_s=0.0), local_token="secret",
                          get_deployments=lambda: deployments)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://node") as client:
        response = await client.get("/local/deployments",
                                    headers={"Authorization": f"Bearer {token}"})
    return response.json() if response.status_code == 200 else response.status_code


def refusal_codes(deployments: NodeDeployments) -> list[tuple[int, str]]:
    return [(r.revision, r.code) for r in deployments.refusals()]


async def test_deploy_upgrade_rollback_refusals_and_restart(tmp_path: Path) -> None:
    hub = Publisher(tmp_path)
    keys = (hub.key,)
    v1 = hub.app(write_app(tmp_path, "1.0.0"), 1, "1.0.0")
    v2 = hub.app(write_app(tmp_path, "2.0.0"), 2, "2.0.0")
    v3_dir = write_app(tmp_path, "3.0.0")
    data = tmp_path / "node"
    changes: list[int] = []

    async with open_node(data, hub.fetch) as (apps, deployments):
        deployments.on_change = lambda: changes.append(deployments.generation)
        await apply(deployments, desired(1, v1, keys=keys))
        assert await serving(apps) == ("1.0.0", 1)
        await apply(deployments, desired(2, v2, keys=keys))
        assert await serving(apps) == ("2.0.0", 2)
        assert deployments.running() == {APP: 2} and changes

        # Back to v1's bundle as a new revision: it is kept on disk, nothing is fetched.
        fetched = list(hub.fetched)
        await apply(deployments, desired(3, msgspec_replace(v1, revision=3), keys=keys))
        assert await serving(apps) == ("1.0.0", 3)
        assert hub.fetched == fetched

        # Each bad bundle is refused with its code; v1 (revision 3) keeps serving.
        v3 = hub.app(v3_dir, 4, "3.0.0")
        hub.blobs[v3.digest] = hub.blobs[v3.digest][:-1] + bytes([hub.blobs[v3.digest][-1] ^ 1])
        stranger = PublisherKey("0123456789abcdef", hub.key.public_key)
        bad = [
            (v3, "digest-mismatch"),
            (msgspec_replace(v2, revision=5, key_id=stranger.key_id), "unknown-key"),
            (msgspec_replace(v2, revision=6, signature=v1.signature), "bad-signature"),
            (msgspec_replace(v2, revision=7, key_id="", signature=""), "unsigned"),
            (hub.app(write_app(tmp_path, "3.0.1", manifest_version="3.0.2"), 8, "3.0.1"),
             "manifest-mismatch"),
            (hub.app(write_app(tmp_path, "4.0.0", extra="raise SystemExit('no config')"),
                     9, "4.0.0"), "unhealthy"),
        ]
        for generation, (app, code) in enumerate(bad, start=4):
            await apply(deployments, desired(generation, app, keys=keys))
            assert refusal_codes(deployments) == [(app.revision, code)], code
            assert await serving(apps) == ("1.0.0", 3)
        refused = deployments.refusals()[0]
        assert "did not start" in refused.reason and "no config" in refused.reason

        # An older generation (or another node's state) changes nothing.
        assert not deployments.offer(desired(2, v2, keys=keys))
        assert not deployments.offer(DesiredState("nd-other", 99, (v2,), keys))
        assert deployments.generation == 9

        # v2 again, as revision 10: local, so no fetch; old bundles beyond three go.
        fetched = list(hub.fetched)
        await apply(deployments, desired(10, msgspec_replace(v2, revision=10), keys=keys))
        assert await serving(apps) == ("2.0.0", 10)
        assert hub.fetched == fetched and deployments.refusals() == ()
        bundles = sorted(p.name for p in (data / "apps" / "bundles").iterdir())
        assert len(bundles) == 3 and v2.digest.removeprefix("sha256:") in bundles
        assert v1.digest.removeprefix("sha256:") not in bundles

    async def hub_away(app: DesiredApp) -> bytes:
        raise RetryableError("the hub is away")

    # A restart with the hub away runs the stored desired revision from its bundle.
    async with open_node(data, hub_away) as (apps, deployments):
        assert deployments.generation == 10
        await deployments.wait_idle(30)
        assert await serving(apps) == ("2.0.0", 10)
        # A bad revision, refused: after another restart the node runs what served before.
        await apply(deployments, desired(11, msgspec_replace(v2, revision=11,
                                                             signature=""), keys=keys))
        assert refusal_codes(deployments) == [(11, "unsigned")]

    async with open_node(data, hub_away) as (apps, deployments):
        assert deployments.generation == 11
        assert deployments.refusals() == (BundleRefusal(APP, 11, "unsigned",
                                                        deployments.refusals()[0].reason),)
        await deployments.wait_idle(30)
        assert await serving(apps) == ("2.0.0", 10)
        assert await local_deployments(deployments, "nope") == 401
        assert await local_deployments(deployments) == {
            "generation": 11, "applied_generation": 11, "running": {APP: 10},
            "desired": [msgspec.to_builtins(msgspec_replace(v2, revision=11, signature=""))],
            "refusals": [msgspec.to_builtins(deployments.refusals()[0])]}
        # Removing the app needs no hub either.
        await apply(deployments, desired(12, keys=keys))
        assert APP not in apps.supervisors and deployments.running() == {}


async def test_transient_fetch_failures_are_retried_not_refused(tmp_path: Path) -> None:
    hub = Publisher(tmp_path)
    v1 = hub.app(write_app(tmp_path, "1.0.0"), 1, "1.0.0")
    failures = 2
    calls = 0

    async def flaky(app: DesiredApp) -> bytes:
        nonlocal failures, calls
        calls += 1
        if failures:
            failures -= 1
            raise TimeoutError("no answer")
        return await hub.fetch(app)

    async with open_node(tmp_path / "node", flaky) as (apps, deployments):
        await apply(deployments, desired(1, v1, keys=(hub.key,)))
        assert await serving(apps) == ("1.0.0", 1)
        assert deployments.refusals() == () and (failures, calls) == (0, 3)
