"""Benchmarks: each measures fogline beside a peer in the same run (see BENCHMARKS.md).

Every benchmark module exposes `run(quick: bool) -> dict` returning one result object:
name, figure, unit, peer, peer_figure, ratio, better, goal, met, conditions, samples.
"""

from __future__ import annotations

import importlib
from typing import Any

BENCHMARKS: dict[str, tuple[str, str]] = {
    "cache-hit": ("fogline.bench.cache_hit", "10 KB cached object, hit path, vs Varnish"),
    "cold-start": ("fogline.bench.cold_start", "app worker start to first response"),
    "desired-propagation": ("fogline.bench.desired_propagation",
                            "new desired revision to every connected hollow node"),
    "drain": ("fogline.bench.drain", "backlog drain to the hub after a partition"),
    "edge-vs-cloud": ("fogline.bench.edge_vs_cloud", "demo app p99: regional node vs cloud node"),
    "failover": ("fogline.bench.failover", "node death to the first success elsewhere"),
    "front-choice": ("fogline.bench.front_choice", "app front to worker: msgpack vs HTTP vs fd"),
    "merge": ("fogline.bench.merge", "hub CRDT merge rate vs pycrdt"),
    "mqtt-choice": ("fogline.bench.mqtt_choice",
                    "embedded MQTT broker and client candidates vs Mosquitto"),
    "outbox-enqueue": ("fogline.bench.outbox_enqueue", "durable emit rate vs raw SQLite"),
    "propagation": ("fogline.bench.propagation", "edge -> hub -> edge under emulated RTT"),
    "purge": ("fogline.bench.purge", "fleet cache purge to 1,000 hollow nodes over a WAN"),
    "rollout": ("fogline.bench.rollout", "canary rollout and automatic rollback, hollow nodes"),
    "heartbeats": ("fogline.bench.heartbeats", "hub heartbeat processing, simulated nodes"),
    "http-route": ("fogline.bench.http_route", "trivial JSON app route on one core vs workerd"),
    "mqtt-flow": ("fogline.bench.mqtt_flow", "MQTT in -> app handler -> MQTT out vs Node-RED"),
    "node-http": ("fogline.bench.node_http", "node endpoint: uvicorn vs granian, one core"),
    "node-rss": ("fogline.bench.node_rss", "idle node agent RSS"),
    "wan-accuracy": ("fogline.bench.wan_accuracy", "WAN emulator added RTT vs configured"),
}


def run(name: str, quick: bool = False) -> dict[str, Any]:
    module_name, _ = BENCHMARKS[name]
    module = importlib.import_module(module_name)
    result: dict[str, Any] = module.run(quick=quick)
    return result


def result(*, name: str, figure: float, unit: str, peer: str, peer_figure: float | None,
           better: str, goal: str, met: bool, conditions: dict[str, Any],
           samples: int) -> dict[str, Any]:
    """One benchmark result in the shared shape; ratio is ours over the peer's in the
    direction `better` names (above 1 means fogline does better)."""
    ratio = None
    if peer_figure:
        ratio = figure / peer_figure if better == "higher" else peer_figure / figure
    return {"name": name, "figure": figure, "unit": unit, "peer": peer,
            "peer_figure": peer_figure, "ratio": ratio, "better": better, "goal": goal,
            "met": met, "conditions": conditions, "samples": samples}
