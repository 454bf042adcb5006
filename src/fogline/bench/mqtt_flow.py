"""Benchmark `mqtt-flow`: MQTT in -> handler -> MQTT out, fogline vs Node-RED.

The same flow on both, through the same Mosquitto (127.0.0.1:1883): a device message
`{"v": i, "t": ...}` on `bench/d<k>/in` (QoS1, 100 devices) is answered with
`{"v": 2*i}` on `bench/d<k>/out` (QoS1). fogline: a node with `--mqtt` pointing at
Mosquitto and an app whose topic handler publishes the answer, node and worker pinned
to core 0. Peer: Node-RED (npm) with mqtt in -> function -> mqtt out, on core 0. The
rounds, the generator (gmqtt on core 1, at most 900 messages in flight so Mosquitto's
default queue never drops one) and the generator's own ceiling are
`bench.peers.compare_mqtt_flow`. Goal: >= 30k msg/s on the core and >= 3x Node-RED.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from fogline.bench.http_route import fogline_node
from fogline.bench.peers import PeerProcess, compare_mqtt_flow, run_coroutine, wait_flow

MANIFEST = """apiVersion: fogline/v1
kind: App
metadata: {name: flow, version: 1.0.0}
spec:
  entrypoint: flow_app:app
"""
CODE = """from fogline import App

app = App("flow")


@app.on_topic("bench/+/in", codec="json", qos=1)
async def double(msg, ctx):
    device = msg.topic.split("/")[1]
    await ctx.publish(f"bench/{device}/out", {"v": msg.payload["v"] * 2}, qos=1)
"""


@contextlib.contextmanager
def fogline_flow(broker_url: str, in_topic: str, out_topic: str,
                 cpu: int | None) -> Iterator[PeerProcess]:
    if (in_topic, out_topic) != ("bench/+/in", "bench/+/out"):
        raise ValueError("the fogline flow app serves bench/+/in -> bench/+/out")
    with fogline_node(MANIFEST, CODE, "flow_app", "--mqtt", broker_url, cpu=cpu) as node:
        run_coroutine(wait_flow(broker_url, in_topic, out_topic, 30.0))
        node.url = broker_url
        yield node


def run(quick: bool = False) -> dict[str, Any]:
    return compare_mqtt_flow(fogline_flow, quick=quick)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
