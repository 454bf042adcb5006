"""`kind: Site` end to end: a real hub, a real node and a real origin behind its cache."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fogline.sim.wan import WanEmulator, WanLink
from fogline.transport.http_server import serve_http
from tests.fleet import run_hub, wait_for
from tests.integration.test_deploy_cli import fogline
from tests.integration.test_deployments import start_nodes
from tests.tlscerts import self_signed


@dataclass
class Origin:
    """A running origin: its URL, the paths it was asked for, and its WAN link."""

    url: str
    asked: list[str]
    loop: asyncio.AbstractEventLoop
    link: WanLink | None = None

    def partition(self) -> None:
        """Cut the link to the origin (connections reset, new ones refused)."""
        assert self.link is not None
        self.loop.call_soon_threadsafe(self.link.partition, "reset")


@contextlib.contextmanager
def run_origin() -> Iterator[tuple[str, list[str]]]:
    """An origin on its own loop in a thread: (URL, paths it was asked for)."""
    with open_origin() as origin:
        yield origin.url, origin.asked


@contextlib.contextmanager
def open_origin(tls: tuple[Path, Path] | None = None, max_age_s: int = 60,
                wan: bool = False) -> Iterator[Origin]:
    """An origin on its own loop in a thread; https with `tls` = (certificate, key);
    with `wan`, reached through a WAN emulator link that `partition()` cuts."""
    asked: list[str] = []

    async def page(request: Request) -> PlainTextResponse:
        asked.append(request.url.path)
        return PlainTextResponse(f"origin {request.url.path}",
                                 headers={"Cache-Control": f"max-age={max_age_s}"})

    app = Starlette(routes=[Route("/{path:path}", page)])
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ports: list[int] = []
    links: list[WanLink] = []
    ready = threading.Event()

    async def serve() -> None:
        cert, key = tls or (None, None)
        async with serve_http(app, "127.0.0.1", 0, tls_cert=cert, tls_key=key) as port, \
                WanEmulator() as emulator:
            if wan:
                links.append(emulator.add_link("origin", ("127.0.0.1", port)))
            ports.append(links[0].port if links else port)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "origin did not start"
        yield Origin(f"{'https' if tls else 'http'}://127.0.0.1:{ports[0]}", asked, loop,
                     links[0] if links else None)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def site(path: Path, name: str, spec: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"apiVersion": "fogline/v1", "kind": "Site",
                                    "metadata": {"name": name}, "spec": spec}))
    return path


def test_a_site_is_cached_at_its_nodes_and_withdrawn(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with run_origin() as (origin, asked), \
            run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        data = hub.data
        start_nodes(hub, tmp_path, ["s1"])
        node = hub.nodes_by_name()["s1"]["endpoint"]
        elsewhere = site(tmp_path / "sites" / "elsewhere.yaml", "elsewhere", {
            "origin": origin, "path_prefixes": ["/elsewhere"],
            "placement": {"selector": {"regions": ["mars"]}}})
        assert "site/elsewhere created" in fogline(data, home, "apply", "-f", str(elsewhere))
        catalog = site(tmp_path / "sites" / "catalog.yaml", "catalog", {
            "origin": origin, "hosts": ["catalog.example.com"], "path_prefixes": ["/catalog"],
            "cache": {"memory_mb": 4, "disk_mb": 8, "stale_if_error": "5m"}})
        assert "site/catalog created" in fogline(data, home, "apply", "-f", str(catalog))
        assert "site/catalog unchanged" in fogline(data, home, "apply", "-f", str(catalog))

        wait_for(lambda: httpx.get(f"{node}/catalog/probe").status_code == 200, 20,
                 "the site at the node")
        first = httpx.get(f"{node}/catalog/item")
        second = httpx.get(f"{node}/catalog/item")
        assert first.text == "origin /catalog/item"  # the path goes to the origin as is
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert asked.count("/catalog/item") == 1
        by_host = httpx.get(f"{node}/any/thing", headers={"Host": "catalog.example.com:80"})
        assert by_host.status_code == 200 and by_host.text == "origin /any/thing"
        # Placed on no node: not served (the node's own 404).
        assert httpx.get(f"{node}/elsewhere/x").status_code == 404
        assert httpx.get(f"{node}/healthz").status_code == 200

        sites = json.loads(fogline(data, home, "get", "sites", "-o", "json"))
        assert sorted(sites) == ["catalog", "elsewhere"]
        assert sites["catalog"]["cache"]["stale_if_error"] == "5m"
        assert "catalog.example.com" in fogline(data, home, "get", "sites")
        bad = site(tmp_path / "bad" / "bad.yaml", "bad", {"origin": origin,
                                                          "path_prefixes": ["/local"]})
        assert "spec.path_prefixes" in fogline(data, home, "apply", "-f", str(bad), ok=False)

        assert "site/catalog deleted" in fogline(data, home, "delete", "-f", str(catalog),
                                                 "--reason", "moved")
        wait_for(lambda: httpx.get(f"{node}/catalog/item").status_code == 404, 20,
                 "the site withdrawn")
        assert (tmp_path / "s1" / "cache" / "catalog.db").exists()
        events = json.loads(fogline(data, home, "get", "events", "-o", "json"))
        kinds = {e["kind"]: e for e in events if e["kind"].startswith("site.")}
        assert {"site.created", "site.deleted"} <= set(kinds)
        assert kinds["site.deleted"]["detail"]["reason"] == "moved"
        assert kinds["site.created"]["actor"].startswith("admin (")


def scrape(node: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The node's /metrics: (sample name, sorted labels) -> value."""
    text = httpx.get(f"{node}/metrics").text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def cache_sample(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
                 **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def test_an_https_site_is_cached_and_its_metrics_show_hits_and_an_origin_outage(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    cert, key = self_signed(tmp_path / "pki", "origin.test")
    # The origin outlives the node (no connection of the node's left to it on exit).
    with open_origin(tls=(cert, key), max_age_s=3, wan=True) as origin, \
            run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        data = hub.data
        start_nodes(hub, tmp_path, ["m1"])
        node = hub.nodes_by_name()["m1"]["endpoint"]
        secure = site(tmp_path / "sites" / "secure.yaml", "secure", {
            "origin": origin.url, "path_prefixes": ["/secure"],
            "cache": {"memory_mb": 4, "disk_mb": 8, "stale_if_error": "5m"},
            "tls": {"ca_file": str(cert), "server_name": "origin.test"}})
        untrusted = site(tmp_path / "sites" / "untrusted.yaml", "untrusted", {
            "origin": origin.url, "path_prefixes": ["/untrusted"]})
        assert "site/secure created" in fogline(data, home, "apply", "-f", str(secure))
        assert "site/untrusted created" in fogline(data, home, "apply", "-f", str(untrusted))
        wait_for(lambda: httpx.get(f"{node}/secure/probe").status_code == 200, 20,
                 "the https site at the node")
        first, second = httpx.get(f"{node}/secure/item"), httpx.get(f"{node}/secure/item")
        fetched_at = time.monotonic()
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert first.text == "origin /secure/item"
        # The origin's certificate is trusted only through the site's ca_file.
        wait_for(lambda: httpx.get(f"{node}/untrusted/x").status_code == 502, 20,
                 "the untrusted site at the node")
        refused = httpx.get(f"{node}/untrusted/x")
        assert "origin TLS certificate rejected" in refused.json()["error"]
        assert not any(path.startswith("/untrusted") for path in origin.asked)

        # A partition from the origin: the stale copy is served and says so.
        origin.partition()
        time.sleep(max(0.0, fetched_at + 4.2 - time.monotonic()))  # max-age=3, Date +1 s
        stale = httpx.get(f"{node}/secure/item")
        assert (stale.status_code, stale.text) == (200, "origin /secure/item")
        assert stale.headers["x-cache"] == "STALE-IF-ERROR"
        metrics = scrape(node)

        def value(name: str, **labels: str) -> float | None:
            return cache_sample(metrics, name, **labels)

        requests = "fogline_cache_requests_total"
        assert value(requests, site="secure", result="hit") == 1
        assert value(requests, site="secure", result="miss") == 2  # probe and item
        assert value(requests, site="secure", result="stale_if_error") == 1
        assert (value(requests, site="untrusted", result="error") or 0) >= 2
        stale_served = "fogline_cache_stale_served_total"
        assert value(stale_served, site="secure", reason="origin_unreachable") == 1
        assert value(stale_served, site="secure", reason="stale_while_revalidate") == 0
        assert value("fogline_cache_origin_errors_total", site="secure") == 1
        assert value("fogline_cache_objects", site="secure", tier="memory") == 2
        assert (value("fogline_cache_bytes", site="secure", tier="memory") or 0) > 0
        assert value("fogline_cache_objects", site="untrusted", tier="memory") == 0
