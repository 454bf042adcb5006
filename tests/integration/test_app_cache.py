"""ctx.cache and ctx.fetch on a real node: two real apps, a real origin over HTTP.

The hub, the node and the app workers are real processes; the origin is an HTTP server
in a thread of this test, counting every request it gets. Both apps run the same code
(written into the test's directory) under two names, to show that their keys are
apart while fetched responses are shared node-wide.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from fogline.node.apps.cache_rules import FETCH_RESPONSE_BYTES_MAX
from tests.fleet import HubProcess, run_hub, wait_for

APP_SOURCE = '''
import asyncio

from fogline import App, Response

app = App("{name}")


@app.route("PUT", "/c/{{key}}")
async def put(req, ctx):
    spec = req.json()
    await ctx.cache.put(req.path_params["key"], spec["value"], ttl=spec["ttl"],
                        tags=spec.get("tags", ()))
    return Response(204)


@app.route("PUT", "/raw/{{key}}")
async def put_raw(req, ctx):
    await ctx.cache.put(req.path_params["key"], req.body, ttl=60)
    return Response(204)


@app.route("GET", "/c/{{key}}")
async def get(req, ctx):
    value = await ctx.cache.get(req.path_params["key"])
    if isinstance(value, bytes):
        return {{"bytes": value.hex(), "type": "bytes"}}
    return {{"value": value, "type": type(value).__name__}}


@app.route("DELETE", "/c/{{key}}")
async def delete(req, ctx):
    return {{"deleted": await ctx.cache.delete(req.path_params["key"])}}


@app.route("GET", "/fetch")
async def fetch(req, ctx):
    n = int(req.query.get("n", "1"))
    got = await asyncio.gather(*(ctx.fetch(req.query["url"]) for _ in range(n)))
    return [{{"status": r.status, "text": r.text, "x_cache": r.x_cache, "hit": r.hit,
              "etag": r.headers.get("etag")}} for r in got]


CASES = {{
    "no-ttl": lambda ctx, url: ctx.cache.put("k", 1),
    "ttl-zero": lambda ctx, url: ctx.cache.put("k", 1, ttl=0),
    "ttl-too-long": lambda ctx, url: ctx.cache.put("k", 1, ttl=31 * 86400),
    "ttl-bool": lambda ctx, url: ctx.cache.put("k", 1, ttl=True),
    "key-empty": lambda ctx, url: ctx.cache.put("", 1, ttl=1),
    "key-long": lambda ctx, url: ctx.cache.get("k" * 1025),
    "key-control": lambda ctx, url: ctx.cache.delete("a\\nb"),
    "key-type": lambda ctx, url: ctx.cache.get(42),
    "tags-str": lambda ctx, url: ctx.cache.put("k", 1, ttl=1, tags="prices"),
    "tags-many": lambda ctx, url: ctx.cache.put("k", 1, ttl=1,
                                                tags=[f"t{{i}}" for i in range(33)]),
    "tag-space": lambda ctx, url: ctx.cache.put("k", 1, ttl=1, tags=["a b"]),
    "value-none": lambda ctx, url: ctx.cache.put("k", None, ttl=1),
    "value-large": lambda ctx, url: ctx.cache.put("k", b"x" * (1024 * 1024 + 1), ttl=1),
    "value-object": lambda ctx, url: ctx.cache.put("k", object(), ttl=1),
    "node-ttl": lambda ctx, url: ctx._rpc("cache.put", ["k", b"\\xa1v", 0, []]),
    "node-malformed": lambda ctx, url: ctx._rpc("cache.get", []),
    "fetch-scheme": lambda ctx, url: ctx.fetch("ftp://example.com/x"),
    "fetch-credentials": lambda ctx, url: ctx.fetch("http://u:p@example.com/"),
    "fetch-method": lambda ctx, url: ctx.fetch(url, method="TRACE"),
    "fetch-get-body": lambda ctx, url: ctx.fetch(url, body=b"x"),
    "fetch-host": lambda ctx, url: ctx.fetch(url, headers={{"Host": "other"}}),
    "node-fetch-scheme": lambda ctx, url: ctx._rpc("fetch", ["file:///etc/passwd", "GET",
                                                            [], b""]),
    "fetch-too-large": lambda ctx, url: ctx.fetch(url + "/big"),
    "fetch-unreachable": lambda ctx, url: ctx.fetch("http://127.0.0.1:1/"),
}}


@app.route("GET", "/reject/{{case}}")
async def reject(req, ctx):
    try:
        await CASES[req.path_params["case"]](ctx, req.query.get("origin", ""))
    except Exception as exc:
        return {{"error": type(exc).__name__, "message": str(exc)}}
    return {{"error": None}}
'''

MANIFEST = """apiVersion: fogline/v1
kind: App
metadata: {{name: {name}, version: 1.0.0}}
spec:
  entrypoint: cache_app:app
  limits: {{timeout: 10s, memory_mb: 160}}
"""

BIG_BYTES = FETCH_RESPONSE_BYTES_MAX + 1


class Origin(ThreadingHTTPServer):
    """The origin: counts requests per path; /slow answers after 0.3 s."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OriginHandler)
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, path: str) -> int:
        with self.lock:
            return self.counts.get(path, 0)


class _OriginHandler(BaseHTTPRequestHandler):
    server: Origin

    def do_GET(self) -> None:
        with self.server.lock:
            n = self.server.counts[self.path] = self.server.counts.get(self.path, 0) + 1
        if self.path == "/slow":
            time.sleep(0.3)
        if self.path == "/etag" and self.headers.get("if-none-match") == '"v1"':
            self._answer(304, b"", etag='"v1"', cache_control="no-cache")
        elif self.path == "/etag":
            self._answer(200, f"etag {n}".encode(), etag='"v1"', cache_control="no-cache")
        elif self.path == "/big":
            self._answer(200, b"x" * BIG_BYTES, cache_control="max-age=60")
        else:
            self._answer(200, f"{self.path} {n}".encode(), cache_control="max-age=60")

    def _answer(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        if status != 304:
            self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Node:
    def __init__(self, data: Path, hub: HubProcess) -> None:
        self.data = data
        self.hub = hub

    @property
    def endpoint(self) -> str:
        return (self.data / "endpoint").read_text().strip()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.endpoint + path, timeout=30, **kwargs)

    def running(self) -> bool:
        if not (self.data / "endpoint").exists():
            return False
        token = (self.data / "local.token").read_text().strip()
        try:
            apps = httpx.get(self.endpoint + "/local/apps", timeout=5,
                             headers={"Authorization": f"Bearer {token}"}).json()
        except httpx.HTTPError:
            return False
        return {a["state"] for a in apps} == {"running"} and len(apps) == 2


def _write_app(directory: Path, name: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "cache_app.py").write_text(APP_SOURCE.format(name=name))
    (directory / "fogline.yaml").write_text(MANIFEST.format(name=name))
    return directory


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    server = Origin()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("app-cache")
    apps = [_write_app(root / "apps" / name, name) for name in ("shop", "blog")]
    with run_hub(root / "hub", "--heartbeat-interval", "1s") as hub:
        yield _start(hub, root / "edge", apps)


def _start(hub: HubProcess, data: Path, apps: list[Path]) -> Node:
    args = [arg for app in apps for arg in ("--app", str(app))]
    hub.start_node(data, data.name, hub.create_token(region="eu"), *args)
    node = Node(data, hub)
    wait_for(node.running, 60, "the node's apps to run")
    return node


# ctx.cache ------------------------------------------------------------------------------

def test_values_round_trip_with_their_type(node: Node) -> None:
    for key, value in [("d", {"a": [1, None]}), ("s", "text"), ("i", 7), ("l", [1, "x"])]:
        assert node.request("PUT", f"/shop/c/{key}",
                            json={"value": value, "ttl": 60}).status_code == 204
        assert node.request("GET", f"/shop/c/{key}").json() == {
            "value": value, "type": type(value).__name__}
    assert node.request("PUT", "/shop/raw/b", content=b"\x00\xff").status_code == 204
    assert node.request("GET", "/shop/c/b").json() == {"bytes": "00ff", "type": "bytes"}
    assert node.request("GET", "/shop/c/never").json() == {"value": None, "type": "NoneType"}


def test_entries_expire_after_their_ttl(node: Node) -> None:
    node.request("PUT", "/shop/c/short", json={"value": "soon gone", "ttl": 0.5})
    node.request("PUT", "/shop/c/long", json={"value": "stays", "ttl": 60})
    assert node.request("GET", "/shop/c/short").json()["value"] == "soon gone"
    time.sleep(0.7)
    assert node.request("GET", "/shop/c/short").json()["value"] is None
    assert node.request("GET", "/shop/c/long").json()["value"] == "stays"


def test_apps_never_see_each_others_keys(node: Node) -> None:
    node.request("PUT", "/shop/c/same", json={"value": "shop's", "ttl": 60, "tags": ["t"]})
    assert node.request("GET", "/blog/c/same").json()["value"] is None
    node.request("PUT", "/blog/c/same", json={"value": "blog's", "ttl": 60})
    assert node.request("GET", "/shop/c/same").json()["value"] == "shop's"
    assert node.request("DELETE", "/blog/c/same").json() == {"deleted": True}
    assert node.request("DELETE", "/blog/c/same").json() == {"deleted": False}
    assert node.request("GET", "/shop/c/same").json()["value"] == "shop's"


def test_entries_are_stored_under_the_documented_key_with_their_tags(node: Node) -> None:
    """What a fleet purge acts on: `app://<app>/<key>` and the tags, in DATA/cache."""
    node.request("PUT", "/blog/c/tagged", json={"value": 1, "ttl": 60,
                                                "tags": ["prices", "sku-1"]})

    def stored() -> list[tuple[str, str]]:
        uri = f"file:{node.data / 'cache' / '_apps.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            return conn.execute("SELECT tag, key FROM tags WHERE key LIKE 'app://blog/%' "
                                "ORDER BY tag").fetchall()

    assert wait_for(stored, 10, "the entry's disk write") == [
        ("prices", "app://blog/tagged"), ("sku-1", "app://blog/tagged")]


def test_a_fleet_purge_by_tag_clears_app_entries_with_that_tag(node: Node) -> None:
    node.request("PUT", "/shop/c/promo-1", json={"value": "10% off", "ttl": 60,
                                                 "tags": ["promo"]})
    node.request("PUT", "/blog/c/promo-2", json={"value": "post", "ttl": 60,
                                                 "tags": ["promo"]})
    node.request("PUT", "/shop/c/plain", json={"value": "kept", "ttl": 60})
    node.hub.api("POST", "/v1/purges", json={"kind": "tag", "values": ["promo"]})
    wait_for(lambda: node.request("GET", "/shop/c/promo-1").json()["value"] is None, 10,
             "the purge at the node")
    assert node.request("GET", "/blog/c/promo-2").json()["value"] is None
    assert node.request("GET", "/shop/c/plain").json()["value"] == "kept"


@pytest.mark.parametrize(("case", "error", "message"), [
    ("no-ttl", "ConfigError", "needs a TTL"),
    ("ttl-zero", "ConfigError", "must be > 0"),
    ("ttl-too-long", "ConfigError", "at most 2592000 s"),
    ("ttl-bool", "ConfigError", "number of seconds"),
    ("key-empty", "ConfigError", "must not be empty"),
    ("key-long", "ConfigError", "more than 1024"),
    ("key-control", "ConfigError", "control character"),
    ("key-type", "ConfigError", "must be a str"),
    ("tags-str", "ConfigError", "must be a list"),
    ("tags-many", "ConfigError", "more than 32"),
    ("tag-space", "ConfigError", "without commas or spaces"),
    ("value-none", "ConfigError", "cannot cache None"),
    ("value-large", "ConfigError", "exceeds 1048576"),
    ("value-object", "ConfigError", "cannot be encoded"),
    # A worker that skips its own checks meets the node's.
    ("node-ttl", "ConfigError", "must be > 0"),
    ("node-malformed", "ConfigError", "malformed 'cache.get' request"),
    ("fetch-scheme", "ConfigError", "http:// or https://"),
    ("fetch-credentials", "ConfigError", "must not carry credentials"),
    ("fetch-method", "ConfigError", "fetch method must be one of"),
    ("fetch-get-body", "ConfigError", "carries no body"),
    ("fetch-host", "ConfigError", "Host header comes from the fetch URL"),
    ("node-fetch-scheme", "ConfigError", "http:// or https://"),
    ("fetch-too-large", "ConfigError", f"larger than {FETCH_RESPONSE_BYTES_MAX} bytes"),
    ("fetch-unreachable", "RetryableError", "origin unreachable"),
])
def test_each_bad_call_gets_a_clear_error(node: Node, origin: Origin, case: str, error: str,
                                          message: str) -> None:
    got = node.request("GET", f"/shop/reject/{case}", params={"origin": origin.url}).json()
    assert got["error"] == error and message in got["message"], got
    assert node.request("GET", "/shop/c/k").json()["value"] is None  # nothing stored


# ctx.fetch ------------------------------------------------------------------------------

def _fetch(node: Node, app: str, url: str, n: int = 1) -> list[dict[str, Any]]:
    response = node.request("GET", f"/{app}/fetch", params={"url": url, "n": n})
    assert response.status_code == 200, response.text
    return list(response.json())


def test_fetch_misses_then_hits_across_apps(node: Node, origin: Origin) -> None:
    url = origin.url + "/fresh"
    first, = _fetch(node, "shop", url)
    assert (first["status"], first["text"], first["x_cache"], first["hit"]) \
        == (200, "/fresh 1", "MISS", False)
    again, = _fetch(node, "shop", url)
    assert (again["text"], again["x_cache"], again["hit"]) == ("/fresh 1", "HIT", True)
    other, = _fetch(node, "blog", url)  # one node-wide cache for fetched responses
    assert (other["text"], other["x_cache"]) == ("/fresh 1", "HIT")
    assert origin.count("/fresh") == 1
    metrics = httpx.get(node.endpoint + "/metrics", timeout=10).text
    found = re.search(r'^fogline_app_cache_calls_total\{app="blog",call="fetch",'
                      r'result="hit"\} (\S+)$', metrics, re.M)
    assert found is not None and float(found.group(1)) >= 1


def test_fetch_revalidates_with_a_304(node: Node, origin: Origin) -> None:
    url = origin.url + "/etag"
    first, = _fetch(node, "shop", url)
    second, = _fetch(node, "shop", url)
    assert (first["text"], first["x_cache"], first["etag"]) == ("etag 1", "MISS", '"v1"')
    assert (second["text"], second["x_cache"], second["hit"]) == ("etag 1", "REVALIDATED",
                                                                  True)
    assert origin.count("/etag") == 2  # the second was a conditional request


def test_concurrent_fetches_make_one_origin_request(node: Node, origin: Origin) -> None:
    replies = _fetch(node, "blog", origin.url + "/slow", n=10)
    assert [r["text"] for r in replies] == ["/slow 1"] * 10
    assert origin.count("/slow") == 1
