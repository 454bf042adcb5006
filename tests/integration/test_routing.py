"""Global routing end to end: a real hub, three real nodes fronting one site, a real
origin, and every client-to-node path through its own WAN emulator link.

The client (`fogline.client`) and the gateway (`fogline gateway`, a process) pick the
lowest-RTT node, move when its link slows down, and fail over when it is killed with
SIGKILL: GETs keep succeeding through another node within one heartbeat interval,
while a POST in flight to the killed node is surfaced, not sent again. The tests run
in file order on one fleet: each kill leaves one node fewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fogline.client import Client, NoRouteError, RequestFailed
from fogline.transport.http_server import serve_http
from fogline.transport.nats_server import free_port
from tests.fleet import (
    FOGLINE,
    HubProcess,
    ThreadedWan,
    run_hub,
    serve_in_thread,
    stop,
    wait_for,
)

INTERVAL_S = 1.0
NAMES = ("ra", "rb", "rc")
# One-way latency per direction of each node's link: RTTs of 10, 50 and 120 ms, far
# enough apart that a busy machine's stalls do not reorder them.
LATENCY_MS = {"ra": 5.0, "rb": 25.0, "rc": 60.0}
HOLD_S = 3.0  # how long the origin holds a POST /catalog/hold


@dataclass
class Origin:
    url: str = ""
    posts: Counter[str] = field(default_factory=Counter)
    holding: set[str] = field(default_factory=set)


@contextlib.contextmanager
def run_origin() -> Iterator[Origin]:
    """The site's origin on its own loop in a thread; it counts POSTs by id."""
    origin = Origin()

    async def item(request: Request) -> Response:
        return PlainTextResponse(f"origin {request.url.path}",
                                 headers={"Cache-Control": "no-store"})

    async def hold(request: Request) -> Response:
        key = request.query_params["id"]
        origin.posts[key] += 1
        origin.holding.add(key)
        await asyncio.sleep(HOLD_S)
        return JSONResponse({"id": key})

    app = Starlette(routes=[Route("/catalog/hold", hold, methods=["POST"]),
                            Route("/catalog/{path:path}", item)])
    with serve_in_thread(app) as port:
        origin.url = f"http://127.0.0.1:{port}"
        yield origin


@dataclass
class Fleet:
    hub: HubProcess
    origin: Origin
    wan: ThreadedWan
    processes: dict[str, subprocess.Popen[bytes]]
    ids: dict[str, str]  # name -> node id
    endpoints: dict[str, str]  # name -> node endpoint
    resolve: dict[str, str]  # node endpoint -> its link's URL
    root: Path

    def name_of(self, node_id: str | None) -> str:
        return {v: k for k, v in self.ids.items()}.get(node_id or "", "?")

    def set_latency(self, name: str, latency_ms: float) -> None:
        self.wan.call(lambda: self.wan.emulator.link(name).update(latency_ms=latency_ms))

    def kill(self, name: str) -> float:
        self.processes[name].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        self.processes[name].wait(10)
        return killed

    def routes(self, *args: str) -> dict[str, Any]:
        result = subprocess.run([*FOGLINE, "get", "routes", "--data", str(self.hub.data),
                                 *args], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "COLUMNS": "250"})
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout) if "json" in args else {"text": result.stdout}

    def client(self, **kwargs: Any) -> Client:
        return Client(self.hub.url, token=self.hub.token, site="catalog",
                      resolve=self.resolve, probe_interval_s=0.3, **kwargs)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("routing")
    wan = ThreadedWan()
    try:
        with run_origin() as origin, \
                run_hub(root / "hub", "--heartbeat-interval", f"{INTERVAL_S:g}s") as hub:
            hub.api("POST", "/v1/sites", json={"name": "catalog", "spec": {
                "origin": origin.url, "path_prefixes": ["/catalog"]}})
            token = hub.create_token(uses=len(NAMES), region="eu")
            processes = {name: hub.start_node(root / name, name, token, "--heartbeat-interval",
                                              f"{INTERVAL_S:g}s") for name in NAMES}

            def nodes() -> dict[str, dict[str, Any]] | None:
                found = hub.nodes_by_name()
                ready = all(found.get(n, {}).get("status") == "ready" for n in NAMES)
                return found if ready else None

            found = wait_for(nodes, 40, "nodes ready")
            resolve = {}
            for name in NAMES:
                endpoint = found[name]["endpoint"]
                wait_for(lambda e=endpoint: httpx.get(f"{e}/catalog/x").status_code == 200, 20,
                         f"the site at {name}")
                host, _, port = endpoint.removeprefix("http://").rpartition(":")
                link_port = wan.add_link(name, (host, int(port)), LATENCY_MS[name])
                resolve[endpoint] = f"http://127.0.0.1:{link_port}"
            yield Fleet(hub, origin, wan, processes, {n: found[n]["id"] for n in NAMES},
                        {n: found[n]["endpoint"] for n in NAMES}, resolve, root)
    finally:
        wan.close()


# Failover rules against in-process servers (no fleet needed) ------------------------

@contextlib.asynccontextmanager
async def counting_server(status: int) -> Any:
    """A server answering every request with `status`; yields (URL, methods seen)."""
    seen: list[str] = []

    async def answer(request: Request) -> Response:
        seen.append(request.method)
        return PlainTextResponse(str(status), status_code=status)

    app = Starlette(routes=[Route("/{path:path}", answer,
                                  methods=["GET", "POST", "PUT", "DELETE"])])
    async with serve_http(app, "127.0.0.1", 0) as port:
        yield f"http://127.0.0.1:{port}", seen


async def test_5xx_fails_over_only_what_may_be_sent_again() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    async with counting_server(503) as (bad, bad_seen), \
            counting_server(200) as (good, good_seen):
        # Unmeasured nodes rank by id: "a" (503), then "b" (200).
        routes = [{"node_id": "a", "endpoint": bad}, {"node_id": "b", "endpoint": good}]

        async def send(method: str, **kwargs: Any) -> httpx.Response:
            async with Client(routes=routes, probe=False) as client:
                return await client.request(method, "/x", **kwargs)

        assert (await send("GET")).status_code == 200
        assert (bad_seen, good_seen) == (["GET"], ["GET"])
        refused = await send("POST")  # the 503 is the answer: not sent again
        assert refused.status_code == 503 and refused.extensions["fogline_node_id"] == "a"
        assert good_seen == ["GET"]
        keyed = await send("POST", headers={"Idempotency-Key": "k1"})
        assert keyed.status_code == 200 and good_seen == ["GET", "POST"]

        # A connection that never opened carried nothing: even a POST goes on.
        unsent = [{"node_id": "a", "endpoint": closed}, {"node_id": "b", "endpoint": good}]
        async with Client(routes=unsent, probe=False) as client:
            moved = await client.post("/x", json={"n": 1})
            assert moved.status_code == 200 and moved.extensions["fogline_node_id"] == "b"
            assert client.stats.failovers == 1 and client.current == "b"
        async with Client(routes=[{"node_id": "a", "endpoint": closed}], probe=False) as client:
            with pytest.raises(RequestFailed) as failed:
                await client.get("/x")
            assert not failed.value.maybe_delivered
        async with Client(routes=[{"node_id": "a", "endpoint": good, "serving": False}],
                          probe=False) as client:
            with pytest.raises(NoRouteError, match="no node serves"):
                await client.get("/x")


# The table -----------------------------------------------------------------------------

def test_the_routing_table_lists_nodes_with_health_load_and_sites(fleet: Fleet) -> None:
    table = fleet.hub.api("GET", "/v1/routes")
    assert table["heartbeat_interval_s"] == INTERVAL_S
    routes = {r["node_id"]: r for r in table["routes"]}
    assert set(routes) == set(fleet.ids.values())
    first = routes[fleet.ids["ra"]]
    assert first["serving"] and first["health"] == "ready" and first["region"] == "eu"
    assert first["endpoint"].startswith("http://127.0.0.1:")
    assert set(first["load"]) == {"cpu_percent", "http_inflight", "http_rps"}
    assert first["sites"] == [{"name": "catalog", "hosts": [], "path_prefixes": ["/catalog"]}]
    assert first["hub_rtt_ms"] is None or first["hub_rtt_ms"] > 0
    assert first["last_seen_s"] <= table["generated_at"]
    assert len(fleet.hub.api("GET", "/v1/routes?site=catalog")["routes"]) == 3
    assert fleet.hub.api("GET", "/v1/routes?app=shop")["routes"] == []

    with fleet.hub.client() as client:
        both = client.get("/v1/routes", params={"app": "a", "site": "catalog"})
        assert both.status_code == 422 and "not both" in both.json()["detail"]
        bad = client.get("/v1/routes", params={"site": "Not A Site"})
        assert bad.status_code == 422 and "invalid site name" in bad.json()["detail"]
        unknown = client.get("/v1/routes", params={"site": "nowhere"})
        assert unknown.status_code == 404 and "nowhere" in unknown.json()["detail"]
    assert httpx.get(f"{fleet.hub.url}/v1/routes").status_code == 401

    exported = fleet.routes("--site", "catalog", "-o", "json")
    assert {r["node_id"] for r in exported["routes"]} == set(fleet.ids.values())
    text = fleet.routes()["text"]
    assert all(node_id in text for node_id in fleet.ids.values()) and "SERVING" in text


def test_the_node_reports_its_http_load(fleet: Fleet) -> None:
    endpoint = fleet.endpoints["ra"]
    for _ in range(30):
        httpx.get(f"{fleet.resolve[endpoint]}/catalog/load")
    metrics = httpx.get(f"{endpoint}/metrics").text
    assert "fogline_node_http_requests" in metrics and "fogline_node_http_inflight" in metrics

    def counted() -> bool:
        routes = fleet.hub.api("GET", "/v1/routes")["routes"]
        return any(r["load"]["http_rps"] > 0 for r in routes)

    wait_for(counted, 5, "a node's request rate in the table")


# The client ------------------------------------------------------------------------

async def test_the_client_picks_the_lowest_rtt_node_and_moves_when_it_slows(
        fleet: Fleet) -> None:
    async with fleet.client(report_as="lab/eu") as client:
        ranked = client.candidates()
        assert [fleet.name_of(c["node_id"]) for c in ranked] == ["ra", "rb", "rc"]
        assert ranked[0]["rtt_ms"] < ranked[1]["rtt_ms"] < ranked[2]["rtt_ms"]
        response = await client.get("/catalog/item")
        assert response.status_code == 200 and response.text == "origin /catalog/item"
        assert fleet.name_of(response.extensions["fogline_node_id"]) == "ra"
        assert fleet.name_of(client.current) == "ra"

        fleet.set_latency("ra", 100.0)  # ra's RTT goes from 10 to 200 ms
        deadline = time.monotonic() + 5
        while fleet.name_of(client.current) != "rb" and time.monotonic() < deadline:
            await client.get("/catalog/item")
            await asyncio.sleep(0.1)
        assert fleet.name_of(client.current) == "rb", client.candidates()
        assert client.stats.failures == 0

        # What the client measured is in the hub's table, by the location it reported.
        assert await client.report_rtt() == 3
    table = fleet.routes("-o", "json")["routes"]
    user = {fleet.name_of(r["node_id"]): r["user_rtt_ms"]["lab/eu"] for r in table}
    assert user["rb"] < user["rc"] and user["rb"] >= 2 * LATENCY_MS["rb"], user
    assert "lab/eu=" in fleet.routes()["text"]


def test_bad_rtt_reports_are_refused_and_change_nothing(fleet: Fleet) -> None:
    with fleet.hub.client() as http:
        for body, message in [
                ({"location": "", "rtt_ms": {"x": 1}}, "invalid location"),
                ({"location": "a b", "rtt_ms": {"x": 1}}, "invalid location"),
                ({"location": "ok", "rtt_ms": {}}, "must map node ids"),
                ({"location": "ok", "rtt_ms": {"x": -1}}, "expected 0..60000"),
                ({"location": "ok", "rtt_ms": {"x": "fast"}}, "expected 0..60000"),
                ({"location": "ok", "rtt_ms": {"x": True}}, "expected 0..60000")]:
            response = http.post("/v1/routes/rtt", json=body)
            assert response.status_code == 422 and message in response.text, response.text
        unknown = http.post("/v1/routes/rtt", json={"location": "ok",
                                                     "rtt_ms": {"nd-nobody": 5}})
        assert unknown.status_code == 202 and unknown.json()["recorded"] == 0
    table = fleet.hub.api("GET", "/v1/routes")["routes"]
    assert all("ok" not in r["user_rtt_ms"] for r in table)


async def test_a_killed_node_fails_over_within_an_interval_and_a_post_is_not_resent(
        fleet: Fleet) -> None:
    async with fleet.client() as client:
        first = await client.get("/catalog/item")
        assert fleet.name_of(first.extensions["fogline_node_id"]) == "rb"
        results: list[tuple[float, str, int | str]] = []
        stopping = asyncio.Event()

        async def traffic() -> None:
            while not stopping.is_set():
                try:
                    response = await client.get("/catalog/item")
                    results.append((time.monotonic(), response.extensions["fogline_node_id"],
                                    response.status_code))
                except Exception as exc:
                    results.append((time.monotonic(), "", repr(exc)))
                await asyncio.sleep(0.01)

        post = asyncio.create_task(client.post("/catalog/hold", params={"id": "p1"}))
        getting = asyncio.create_task(traffic())
        while "p1" not in fleet.origin.holding:  # the POST is at the origin, through rb
            await asyncio.sleep(0.01)
        killed = await asyncio.to_thread(fleet.kill, "rb")
        with pytest.raises(RequestFailed) as failed:
            await post
        assert failed.value.maybe_delivered and fleet.name_of(failed.value.node_id) == "rb"
        await asyncio.sleep(1.5)
        stopping.set()
        await getting

        assert fleet.origin.posts["p1"] == 1  # seen once, never sent again
        errors = [r for r in results if r[2] != 200]
        assert errors == []
        after = [(t, fleet.name_of(node)) for t, node, _ in results if t > killed]
        # rb may still deliver what it had sent before it died; nothing else.
        assert all(t - killed < 0.1 for t, name in after if name == "rb"), after
        elsewhere = [(t, name) for t, name in after if name != "rb"]
        assert elsewhere and all(name == "rc" for _, name in elsewhere)
        assert elsewhere[0][0] - killed < INTERVAL_S, elsewhere[0][0] - killed
        assert client.stats.failures == 1  # the POST (a probe may see the death first)

    def not_serving() -> bool:
        routes = fleet.routes("-o", "json")["routes"]
        return not next(r for r in routes if r["node_id"] == fleet.ids["rb"])["serving"]

    wait_for(not_serving, 2 * INTERVAL_S + 2, "the killed node out of the table")
    routes = fleet.hub.api("GET", "/v1/routes")
    alive = {fleet.name_of(r["node_id"]) for r in routes["routes"] if r["serving"]}
    assert alive == {"ra", "rc"}


async def test_a_restarted_node_gets_its_users_back(fleet: Fleet) -> None:
    """rb, killed above, starts again (same data, same port): the client, which failed
    over, returns to it once its probes answer. Then it is killed again, as the
    gateway's test expects."""
    port = fleet.endpoints["rb"].rpartition(":")[2]
    async with fleet.client() as client:
        first = await client.get("/catalog/item")
        assert fleet.name_of(first.extensions["fogline_node_id"]) != "rb"
        fleet.processes["rb"] = fleet.hub.start_node(
            fleet.root / "rb", "rb", None, "--heartbeat-interval", f"{INTERVAL_S:g}s",
            "--listen", f"127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        served = ""
        while served != "rb":
            assert time.monotonic() < deadline, "the client never came back to rb"
            response = await client.get("/catalog/item")
            assert response.status_code == 200
            served = fleet.name_of(response.extensions["fogline_node_id"])
            await asyncio.sleep(0.1)
    await asyncio.to_thread(fleet.kill, "rb")


# The gateway -----------------------------------------------------------------------

@contextlib.contextmanager
def run_gateway(fleet: Fleet) -> Iterator[str]:
    out = fleet.root / "gateway.out"
    args = [*FOGLINE, "gateway", "--listen", "127.0.0.1:0", "--data", str(fleet.hub.data),
            "--site", "catalog", "--probe-interval", "0.3"]
    for endpoint, url in fleet.resolve.items():
        args += ["--resolve", f"{endpoint}={url}"]
    with open(out, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        def listening() -> str | None:
            assert process.poll() is None, out.read_text()
            for line in out.read_text().splitlines():
                if line.startswith("gateway listening on "):
                    return line.removeprefix("gateway listening on ")
            return None

        yield wait_for(listening, 20, "the gateway")
    finally:
        stop(process)


def test_the_gateway_and_get_routes_refuse_bad_arguments(fleet: Fleet) -> None:
    for args, message in ((["gateway", "--site", "a", "--app", "b"], "exclude each other"),
                          (["gateway", "--resolve", "nonsense"], "ENDPOINT=URL"),
                          (["gateway", "--listen", "nope"], "HOST:PORT"),
                          (["gateway", "--probe-interval", "0"], "probe_interval_s"),
                          (["gateway", "--site", "nowhere"], "no site 'nowhere'"),
                          (["get", "routes", "--site", "a", "--app", "b"], "exclude each"),
                          (["get", "routes", "-o", "yaml"], "table or json")):
        result = subprocess.run([*FOGLINE, *args, "--data", str(fleet.hub.data)],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 2 and message in result.stdout + result.stderr


def test_the_gateway_forwards_to_the_best_node_and_fails_over(fleet: Fleet) -> None:
    with run_gateway(fleet) as url, httpx.Client(base_url=url, timeout=15) as http:
        first = http.get("/catalog/item?x=1")
        assert first.status_code == 200 and first.text == "origin /catalog/item"
        assert fleet.name_of(first.headers["x-fogline-node"]) == "rc"  # 120 ms beats 200
        put = http.put("/catalog/thing", content=b"x" * 10_000)
        assert put.status_code < 500

        posted: list[httpx.Response] = []
        poster = threading.Thread(target=lambda: posted.append(
            httpx.post(f"{url}/catalog/hold?id=p2", timeout=15)))
        poster.start()
        wait_for(lambda: "p2" in fleet.origin.holding, 10, "the POST at the origin")
        killed = fleet.kill("rc")
        served = []
        while time.monotonic() - killed < 1.5:
            response = http.get("/catalog/item")
            served.append((time.monotonic(), response.status_code,
                           response.headers.get("x-fogline-node")))
        poster.join(15)

        assert posted and posted[0].status_code == 502
        assert posted[0].json()["maybe_delivered"] is True
        assert fleet.name_of(posted[0].headers["x-fogline-node"]) == "rc"
        assert fleet.origin.posts["p2"] == 1
        assert all(status == 200 for _, status, _ in served), served
        assert {fleet.name_of(node) for _, _, node in served} == {"ra"}
        assert served[0][0] - killed < INTERVAL_S
