"""`kind: Site` end to end: a real hub, a real node and a real origin behind its cache."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fogline.transport.http_server import serve_http
from tests.fleet import run_hub, wait_for
from tests.integration.test_deploy_cli import fogline
from tests.integration.test_deployments import start_nodes


@contextlib.contextmanager
def run_origin() -> Iterator[tuple[str, list[str]]]:
    """An origin on its own loop in a thread: (URL, paths it was asked for)."""
    asked: list[str] = []

    async def page(request: Request) -> PlainTextResponse:
        asked.append(request.url.path)
        return PlainTextResponse(f"origin {request.url.path}",
                                 headers={"Cache-Control": "max-age=60"})

    app = Starlette(routes=[Route("/{path:path}", page)])
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ports: list[int] = []
    ready = threading.Event()

    async def serve() -> None:
        async with serve_http(app, "127.0.0.1", 0) as port:
            ports.append(port)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert ready.wait(10), "origin did not start"
        yield f"http://127.0.0.1:{ports[0]}", asked
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
