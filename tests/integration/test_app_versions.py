"""Deployed app revisions on a node: a new one starts beside the one serving and takes
over with no request refused, one that cannot start changes nothing, and each reports
its revision and the traffic it served.

The app workers and the HTTP server are real (the node's own `NodeApps` behind an
`AppFront` on uvicorn), driven by a real HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from fogline.clock import SystemClock
from fogline.errors import ConfigError
from fogline.node.apps.front import AppFront
from fogline.node.apps.manager import ActivationFailed, NodeApps
from fogline.node.collections import NodeCollections
from fogline.node.outbox import Outbox
from fogline.transport.http_server import serve_http

APPS = Path(__file__).resolve().parent.parent / "apps"
NODE = {"id": "nd-versions", "region": "lab", "tier": "near", "labels": {}}

MANIFEST = """\
apiVersion: fogline/v1
kind: App
metadata:
  name: greeter
  version: {version}.0.0
spec:
  entrypoint: steady_app:app
  limits: {{timeout: {timeout}, workers: {workers}}}
"""

CODE = '''\
import asyncio

from fogline import App, Response

{prelude}
app = App("greeter")
VERSION = {version!r}


@app.route("GET", "/version")
async def version(req, ctx):
    return {{"version": VERSION}}


@app.route("GET", "/slow")
async def slow(req, ctx):
    await asyncio.sleep(float(req.query.get("s", "0.2")))
    return {{"version": VERSION}}


@app.route("GET", "/fail")
async def fail(req, ctx):
    return Response.json({{"error": "on purpose"}}, 500)
'''


def bundle(root: Path, version: str, *, prelude: str = "", timeout: str = "2s",
           workers: int = 2) -> Path:
    """A copy of tests/apps/steady turned into `greeter` at `version`.0.0."""
    directory = root / f"greeter-{version}"
    shutil.copytree(APPS / "steady", directory)
    (directory / "fogline.yaml").write_text(
        MANIFEST.format(version=version, timeout=timeout, workers=workers))
    (directory / "steady_app.py").write_text(CODE.format(version=version, prelude=prelude))
    return directory


async def _not_found(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"no such app"})


@dataclass
class Node:
    apps: NodeApps
    client: httpx.AsyncClient
    root: Path

    def status(self, name: str) -> Any:
        return next(s for s in self.apps.statuses() if s.name == name)


def _app_processes() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


@contextlib.asynccontextmanager
async def open_node(root: Path, *local: Path) -> AsyncIterator[Node]:
    """NodeApps (with these local apps) behind an AppFront on a real HTTP server; no app
    process is left once it closes."""
    clock = SystemClock()
    collections = NodeCollections(root / "state.db", NODE["id"], clock)
    outbox = Outbox(root / "outbox.db", clock)
    apps = NodeApps(local, clock)
    try:
        await apps.start(collections, outbox, NODE, None, root / "envs")
        await apps.wait_running(20)
        front = AppFront(_not_found, lambda: apps.supervisors)
        async with serve_http(front, "127.0.0.1", 0) as port, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            yield Node(apps, client, root)
    finally:
        await apps.stop()
        outbox.close()
        collections.close()
    assert _app_processes() == []


async def test_a_new_revision_takes_over_with_no_failed_request(tmp_path: Path) -> None:
    async with open_node(tmp_path) as node:  # no local apps: only what is deployed
        first = await node.apps.activate(bundle(tmp_path, "1"), 1, timeout_s=20)
        assert (first.revision, first.version, first.state) == (1, "1.0.0", "running")
        old = node.apps.supervisors["greeter"]

        seen: list[list[tuple[int, str]]] = [[] for _ in range(4)]
        stopping = asyncio.Event()

        async def client_loop(record: list[tuple[int, str]]) -> None:
            while not stopping.is_set():
                response = await node.client.get("/greeter/version")
                record.append((response.status_code,
                               response.json().get("version", "") if response.is_success
                               else response.text))

        loops = [asyncio.create_task(client_loop(record)) for record in seen]
        await asyncio.sleep(0.3)
        # In flight on revision 1 when revision 2 takes over: it must finish there.
        in_flight = asyncio.create_task(node.client.get("/greeter/slow", params={"s": "1.0"}))
        await asyncio.sleep(0.1)
        second_bundle = bundle(tmp_path, "2")
        second = await node.apps.activate(second_bundle, 2, timeout_s=20)
        await asyncio.sleep(0.3)
        stopping.set()
        await asyncio.gather(*loops)

        slow = await in_flight
        assert (slow.status_code, slow.json()) == (200, {"version": "1"})
        answers = [answer for record in seen for answer in record]
        failed = [answer for answer in answers if answer[0] != 200]
        assert failed == [], f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
        for record in seen:  # each client switched once, from 1 to 2, and never back
            versions = [version for _, version in record]
            assert versions == sorted(versions) and {"1", "2"} <= set(versions), versions
        assert (second.revision, second.version, second.state) == (2, "2.0.0", "running")
        assert node.status("greeter").revision == 2
        assert node.apps.deployed() == {"greeter": 2}
        assert old.state == "stopped" and old.in_flight() == 0
        assert all(w is None or w.process.returncode is not None for w in old.workers)
        assert len(_app_processes()) == 2  # revision 2's two workers only
        # Activating the revision already serving changes nothing.
        current = node.apps.supervisors["greeter"]
        again = await node.apps.activate(second_bundle, 2)
        assert node.apps.supervisors["greeter"] is current and again.revision == 2


async def test_a_revision_that_does_not_start_leaves_the_old_one_serving(
        tmp_path: Path) -> None:
    async with open_node(tmp_path) as node:
        await node.apps.activate(bundle(tmp_path, "2"), 2, timeout_s=20)
        serving = node.apps.supervisors["greeter"]
        broken = bundle(tmp_path, "3", prelude='raise RuntimeError("v3 cannot start")')
        started = time.monotonic()
        with pytest.raises(ActivationFailed, match="v3 cannot start") as failure:
            await node.apps.activate(broken, 3, timeout_s=20)
        assert "revision 3" in str(failure.value)
        assert time.monotonic() - started < 10  # the first failed load says enough
        assert node.apps.supervisors["greeter"] is serving
        assert node.status("greeter").revision == 2
        assert node.apps.deployed() == {"greeter": 2}
        response = await node.client.get("/greeter/version")
        assert (response.status_code, response.json()) == (200, {"version": "2"})
        assert len(_app_processes()) == 2  # nothing of revision 3 left running

        invalid = bundle(tmp_path, "4")
        (invalid / "fogline.yaml").write_text("apiVersion: fogline/v1\nkind: App\n")
        with pytest.raises(ActivationFailed, match="revision 4"):
            await node.apps.activate(invalid, 4)
        assert node.status("greeter").revision == 2


async def test_remove_stops_a_deployed_app_and_local_apps_are_not_the_hubs(
        tmp_path: Path) -> None:
    async with open_node(tmp_path, APPS / "steady") as node:
        await node.apps.activate(bundle(tmp_path, "1", workers=1), 1, timeout_s=20)
        assert node.apps.deployed() == {"greeter": 1}
        assert {s.name: s.revision for s in node.apps.statuses()} == {"steady": 0,
                                                                      "greeter": 1}

        with pytest.raises(ActivationFailed, match="locally"):
            await node.apps.activate(APPS / "steady", 7)
        with pytest.raises(ConfigError, match="locally"):
            await node.apps.remove("steady")
        assert (await node.client.get("/steady/ping")).status_code == 200

        await node.apps.remove("greeter")
        await node.apps.remove("greeter")  # already gone: nothing to do
        assert node.apps.deployed() == {}
        assert [s.name for s in node.apps.statuses()] == ["steady"]
        assert (await node.client.get("/greeter/version")).status_code == 404
        assert len(_app_processes()) == 1  # the local app's worker


async def test_the_window_counts_requests_errors_latency_and_worker_counters(
        tmp_path: Path) -> None:
    async with open_node(tmp_path) as node:
        await node.apps.activate(bundle(tmp_path, "1", timeout="300ms", workers=1), 1,
                                 timeout_s=20)
        assert node.status("greeter").window.requests == 0
        for _ in range(30):
            assert (await node.client.get("/greeter/version")).status_code == 200
        for _ in range(3):
            assert (await node.client.get("/greeter/fail")).status_code == 500
        timed_out = await node.client.get("/greeter/slow", params={"s": "2"})
        assert timed_out.status_code == 504  # the worker's own timeout

        window = node.status("greeter").window
        assert window is not None and window.seconds == 10.0
        assert (window.requests, window.errors) == (34, 4)
        # The slowest of 34 is the p99: the one stopped at the 300 ms timeout.
        assert 300.0 <= window.p99_ms < 1000.0

        deadline = time.monotonic() + 5
        while node.status("greeter").window.metrics.get("timeouts", 0) < 1:
            assert time.monotonic() < deadline, node.status("greeter").window
            await asyncio.sleep(0.1)
        assert node.status("greeter").window.metrics["handler_errors"] == 0
