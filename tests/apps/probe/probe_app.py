"""Test app: every ctx API, plus routes that crash, hang, block, leak and raise."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fogline import App, Response

app = App("probe")
_leak: list[bytes] = []


@app.route("GET", "/hello")
async def hello(req, ctx) -> dict[str, Any]:
    return {"hello": "world"}


@app.route("POST", "/echo")
async def echo(req, ctx) -> Any:
    return {"got": req.json(), "query": dict(req.query),
            "agent": req.headers.get("user-agent", "")}


@app.route("GET", "/sync")
def sync_route(req, ctx) -> dict[str, Any]:
    return {"sync": True, "value": ctx.collection("kv").get("k")}


@app.route("GET", "/info")
async def info(req, ctx) -> dict[str, Any]:
    node = ctx.node
    return {"node": {"id": node.id, "region": node.region, "tier": node.tier,
                     "labels": dict(node.labels)},
            "config": dict(ctx.config), "now": ctx.now(), "pid": os.getpid()}


@app.route("PUT", "/kv/{key}")
async def put(req, ctx) -> Response:
    await ctx.collection("kv").put(req.path_params["key"], req.json())
    return Response(204)


@app.route("GET", "/kv/{key}")
async def get(req, ctx) -> Any:
    value = ctx.collection("kv").get(req.path_params["key"])
    return Response.json({"error": "no such key"}, 404) if value is None else {"value": value}


@app.route("POST", "/kv/{key}/incr")
async def update(req, ctx) -> Any:
    return {"value": await ctx.collection("kv").update(req.path_params["key"],
                                                          lambda old: (old or 0) + 1)}


@app.route("POST", "/hits")
async def hit(req, ctx) -> Any:
    await ctx.collection("hits").incr(2)
    await ctx.collection("hits").decr(1)
    return {"hits": ctx.collection("hits").value()}


@app.route("POST", "/tags/{tag}")
async def tag(req, ctx) -> Any:
    tags = ctx.collection("tags")
    await tags.add(req.path_params["tag"])
    return {"contains": tags.contains(req.path_params["tag"]), "tags": sorted(tags.value())}


@app.route("POST", "/emit")
async def emit(req, ctx) -> Any:
    await ctx.emit("events", req.json())
    return {"emitted": True}


@app.route("POST", "/undeclared")
async def undeclared(req, ctx) -> Any:
    await ctx.emit("nope", {})


@app.route("POST", "/publish/{device}")
async def publish(req, ctx) -> Any:
    await ctx.publish(f"probe/{req.path_params['device']}/cmd", req.json(), qos=1)
    return {"published": True}


@app.on_topic("probe/+/in", codec="json")
async def device_in(msg, ctx) -> None:
    device = msg.topic.split("/")[1]
    await ctx.collection("kv").put(f"device:{device}", msg.payload)
    await ctx.publish(f"probe/{device}/out", {"echo": msg.payload}, qos=1)


@app.every("200ms")
async def tick(ctx) -> None:
    await ctx.collection("hits").incr(1000)


@app.route("GET", "/boom")
async def boom(req, ctx) -> Any:
    raise RuntimeError("boom on purpose")


@app.route("GET", "/slow")
async def slow(req, ctx) -> Any:
    await asyncio.sleep(float(req.query.get("s", "5")))
    return {"slept": True}


@app.route("GET", "/block")
async def block(req, ctx) -> Any:
    time.sleep(float(req.query.get("s", "60")))  # blocks the worker's event loop
    return {"blocked": True}


@app.route("GET", "/crash")
async def crash(req, ctx) -> Any:
    os._exit(7)


@app.route("GET", "/leak")
async def leak(req, ctx) -> Any:
    _leak.append(os.urandom(1) * (48 * 1024 * 1024))
    return {"held_mb": 48 * len(_leak)}
