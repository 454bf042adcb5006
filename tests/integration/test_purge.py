"""Fleet-wide cache purges end to end: a real hub, real nodes, a real origin, real NATS.

A purge issued at the hub reaches every node and is reported per node; a node cut off
from the hub keeps serving from its cache (stale where the response allows it when the
origin is gone too), and once it is back it applies every purge it missed before it
serves from its cache again.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.fleet import HubProcess, ThreadedWan, run_hub, serve_in_thread, wait_for
from tests.integration.test_deploy_cli import fogline
from tests.integration.test_sites import site
from tests.integration.test_sync import host_port


class Origin:
    """A catalog origin: every item carries the tag of its shelf; `version` changes
    what it serves, `failing` makes it answer 503."""

    def __init__(self) -> None:
        self.version = 1
        self.failing = False
        self.asked: list[str] = []

    async def page(self, request: Request) -> PlainTextResponse:
        path = request.url.path
        self.asked.append(path)
        if self.failing:
            return PlainTextResponse("down", status_code=503)
        shelf = path.strip("/").split("/")[-1].split("-")[0]
        # /catalog/short/...: fresh for a second, then usable stale if the origin fails
        control = "max-age=1, stale-if-error=600" if "/short/" in path else "max-age=600"
        return PlainTextResponse(f"v{self.version} {path}", headers={
            "Cache-Control": control, "Cache-Tag": f"shelf-{shelf}"})


@contextlib.contextmanager
def run_origin(origin: Origin) -> Iterator[tuple[str, int]]:
    with serve_in_thread(Starlette(routes=[Route("/{path:path}", origin.page)])) as port:
        yield "127.0.0.1", port


def start_node(hub: HubProcess, root: Path, wan: ThreadedWan, name: str,
               region: str) -> None:
    """A node whose NATS link to the hub runs through the WAN emulator (`<name>/hub`)."""
    port = wan.add_link(f"{name}/hub", host_port((hub.data / "nats.url").read_text().strip()))
    hub.start_node(root / name, name, hub.create_token(region=region),
                   "--nats", f"nats://127.0.0.1:{port}", "--heartbeat-interval", "1s")


def endpoint(hub: HubProcess, name: str) -> str:
    return str(hub.nodes_by_name()[name]["endpoint"])


def get(url: str) -> tuple[str, str]:
    response = httpx.get(url, timeout=5)
    return response.headers.get("x-cache", ""), response.text


def warm(url: str) -> None:
    wait_for(lambda: get(url)[0] == "HIT", 20, f"{url} cached")


@pytest.fixture
def fleet(tmp_path: Path, wan: ThreadedWan) -> Iterator[tuple[HubProcess, Origin, dict[str, str]]]:
    origin = Origin()
    with run_origin(origin) as origin_addr, \
            run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        start_node(hub, tmp_path, wan, "p1", "eu")
        start_node(hub, tmp_path, wan, "p2", "us")
        wait_for(lambda: {"p1", "p2"} <= {n for n, r in hub.nodes_by_name().items()
                                          if r["status"] == "ready"}, 40, "nodes ready")
        # The origin is reached through the emulator too, so it can be cut off.
        origin_port = wan.add_link("origin", origin_addr)
        catalog = site(tmp_path / "sites" / "catalog.yaml", "catalog", {
            "origin": f"http://127.0.0.1:{origin_port}", "path_prefixes": ["/catalog"]})
        fogline(hub.data, tmp_path / "home", "apply", "-f", str(catalog))
        nodes = {name: endpoint(hub, name) for name in ("p1", "p2")}
        for url in nodes.values():
            wait_for(lambda u=url: httpx.get(f"{u}/catalog/probe").status_code == 200, 20,
                     "the site at the node")
        try:
            yield hub, origin, nodes
        finally:  # close the emulator's connections before the origin's loop goes
            wan.partition("origin")
            time.sleep(0.3)


def test_purges_reach_every_node_and_are_reported(
        fleet: tuple[HubProcess, Origin, dict[str, str]], tmp_path: Path) -> None:
    hub, origin, nodes = fleet
    home = tmp_path / "home"
    items = ["/catalog/shoes-1", "/catalog/shoes-2", "/catalog/hats-1", "/catalog/bags-1"]
    for node in nodes.values():
        for item in items:
            warm(node + item)

    out = fogline(hub.data, home, "cache", "purge", "--tag", "shelf-shoes", "--reason", "sale")
    assert "issued to 2 nodes" in out and "applied on 2 of 2 nodes" in out
    origin.version = 2
    for node in nodes.values():
        assert get(node + "/catalog/shoes-1") == ("MISS", "v2 /catalog/shoes-1")
        assert get(node + "/catalog/shoes-2")[0] == "MISS"
        assert get(node + "/catalog/hats-1") == ("HIT", "v1 /catalog/hats-1")

    # By URL (a full URL counts by its path and query) and by prefix.
    fogline(hub.data, home, "cache", "purge", "--url", "https://shop.example/catalog/hats-1")
    fogline(hub.data, home, "cache", "purge", "--prefix", "/catalog/bags")
    for node in nodes.values():
        assert get(node + "/catalog/hats-1")[0] == "MISS"
        assert get(node + "/catalog/bags-1")[0] == "MISS"

    # A region's purge reaches that region only; the others count it and move on.
    for node in nodes.values():
        warm(node + "/catalog/hats-1")
    fogline(hub.data, home, "cache", "purge", "--tag", "shelf-hats", "--region", "us")
    assert get(nodes["p1"] + "/catalog/hats-1")[0] == "HIT"
    assert get(nodes["p2"] + "/catalog/hats-1")[0] == "MISS"

    purges = json.loads(fogline(hub.data, home, "get", "purges", "-o", "json"))
    assert [p["seq"] for p in purges] == [4, 3, 2, 1]
    first = purges[-1]
    assert (first["kind"], first["values"], first["reason"]) == ("tag", ["shelf-shoes"], "sale")
    assert (first["targets"], first["applied"], first["pending"]) == (2, 2, 0)
    assert first["latency_ms"]["acks"] == 2 and first["latency_ms"]["max"] < 2000
    assert purges[0]["targets"] == 1 and purges[0]["region"] == "us"
    detail = json.loads(fogline(hub.data, home, "get", "purges", "1", "-o", "json"))
    by_node = {n["node"]: n for n in detail["nodes"]}
    assert by_node["p1"]["applied"] and by_node["p1"]["removed"] == 2
    table = fogline(hub.data, home, "get", "purges")
    assert "shelf-shoes" in table and "2/2" in table
    events = json.loads(fogline(hub.data, home, "get", "events", "-o", "json"))
    purge_events = [e for e in events if e["kind"] == "cache.purge"]
    assert len(purge_events) == 4 and purge_events[-1]["detail"]["reason"] == "sale"
    assert purge_events[-1]["actor"].startswith("admin (")


BAD_PURGES: list[tuple[dict[str, Any], str]] = [
    ({"kind": "all", "values": ["x"]}, "purge kind must be one of"),
    ({"kind": "tag", "values": []}, "needs at least one value"),
    ({"kind": "tag", "values": ["a,b"]}, "no spaces or commas"),
    ({"kind": "url", "values": ["ftp://x/y"]}, "give a path starting with /"),
    ({"kind": "prefix", "values": ["/"]}, "would empty the cache"),
    ({"kind": "tag", "values": ["a"], "region": "Not A Region"}, "invalid region"),
    ({"kind": "tag", "values": ["a"], "site": "../etc"}, "invalid site name"),
    ({"kind": "tag", "values": ["x"] * 65}, "values"),
]


def test_bad_purges_are_refused_and_change_nothing(
        fleet: tuple[HubProcess, Origin, dict[str, str]], tmp_path: Path) -> None:
    hub, _, nodes = fleet
    warm(nodes["p1"] + "/catalog/shoes-1")
    with hub.client() as client:
        for body, message in BAD_PURGES:
            response = client.post("/v1/purges", json=body)
            assert response.status_code == 422, (body, response.text)
            assert message in response.text, (body, response.text)
    out = fogline(hub.data, tmp_path / "home", "cache", "purge", "--tag", "a", "--url", "/b",
                  ok=False)
    assert "give one of --tag, --url or --prefix" in out
    assert hub.api("GET", "/v1/purges") == []
    assert get(nodes["p1"] + "/catalog/shoes-1")[0] == "HIT"


def test_a_partitioned_node_serves_stale_then_applies_missed_purges_before_serving(
        fleet: tuple[HubProcess, Origin, dict[str, str]], wan: ThreadedWan,
        tmp_path: Path) -> None:
    hub, origin, nodes = fleet
    home = tmp_path / "home"
    p1 = nodes["p1"]
    warm(p1 + "/catalog/shoes-1")
    warm(p1 + "/catalog/short/news-1")

    # Cut p1 off from the hub and from the origin: it keeps answering from its cache,
    # stale where the response allows it (stale-if-error), and says so.
    wan.partition("p1/hub")
    wan.partition("origin")
    wait_for(lambda: get(p1 + "/catalog/short/news-1")[0] == "STALE-IF-ERROR", 10,
             "stale served during the partition")
    assert get(p1 + "/catalog/short/news-1")[1] == "v1 /catalog/short/news-1"
    metrics = httpx.get(f"{p1}/metrics").text
    assert any(line.startswith("fogline_cache_stale_served_total{")
               and 'site="catalog"' in line and 'reason="origin_unreachable"' in line
               and float(line.rsplit(" ", 1)[1]) > 0 for line in metrics.splitlines()), metrics

    # Purged while p1 cannot hear it: pending there, applied at p2.
    origin.version = 2
    fogline(hub.data, home, "cache", "purge", "--tag", "shelf-shoes", "--wait", "2")
    status = hub.api("GET", "/v1/purges/1")
    assert {n["node"]: n["applied"] for n in status["nodes"]} == {"p1": False, "p2": True}
    # The origin is back, the hub is not: p1 cannot know, and its copy is fresh.
    wan.heal("origin")
    assert get(p1 + "/catalog/shoes-1") == ("HIT", "v1 /catalog/shoes-1")

    # The hub is back: p1 applies the purge before it serves that object from its cache
    # again (it bypasses the cache until it has caught up), so once anything new was
    # served, nothing purged ever comes back.
    wan.heal("p1/hub")
    seen: list[tuple[str, str]] = []

    def caught_up() -> bool:
        seen.append(get(p1 + "/catalog/shoes-1"))
        return hub.api("GET", "/v1/purges/1")["applied"] == 2

    wait_for(caught_up, 20, "p1 to apply the missed purge")
    assert get(p1 + "/catalog/shoes-1")[1] == "v2 /catalog/shoes-1"
    first_new = next((i for i, (_, body) in enumerate(seen) if body.startswith("v2")),
                     len(seen))
    assert all(body.startswith("v2") for _, body in seen[first_new:]), seen
