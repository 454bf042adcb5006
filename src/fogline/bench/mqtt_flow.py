"""Benchmark `mqtt-flow`: MQTT in -> handler -> MQTT out, fogline vs Node-RED.

The same flow on both, through the same Mosquitto: a device message
`{"v": i, "t": ...}` on `bench/d<k>/in` (QoS1, 100 devices) is answered with
`{"v": 2*i}` on `bench/d<k>/out` (QoS1). fogline: a node with `--mqtt` pointing at
Mosquitto and an app whose topic handler publishes the answer, node and worker pinned
to core 0. Peer: Node-RED (npm) with mqtt in -> function -> mqtt out, on core 0. The
rounds, the generator (gmqtt on core 1, at most 900 messages in flight) and the
generator's own ceiling are `bench.compare.compare_mqtt_flow`. Goal: >= 30k msg/s on the
core and >= 3x Node-RED, nothing lost.

The broker is a private Mosquitto with the configuration docs/mqtt.md recommends
(`MOSQUITTO_QOS1_SAFE`), not the system's at :1883: with Mosquitto's defaults (20 QoS1
messages in flight per client, 1,000 queued) a subscriber that acks after its handler,
as fogline's apps do, is capped at 20 messages per handler round trip, and a burst
beyond the queue is dropped silently (measured: up to 922 lost per round).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fogline.bench.compare import compare_mqtt_flow
from fogline.bench.http_route import fogline_node
from fogline.bench.mqtt_choice import MOSQUITTO_QOS1_SAFE
from fogline.bench.peers import (
    PeerProcess,
    run_coroutine,
    stop,
    wait_flow,
)
from fogline.transport.nats_server import die_with_parent, free_port, wait_for_port

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


@contextlib.contextmanager
def private_mosquitto() -> Iterator[str]:
    """A Mosquitto of our own on a free port with docs/mqtt.md's QoS1-safe lines."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fogline-bench-mosquitto-") as tmp:
        config = Path(tmp) / "mosquitto.conf"
        config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                          f"{MOSQUITTO_QOS1_SAFE}persistence_location {tmp}/\n")
        with open(Path(tmp) / "mosquitto.log", "wb") as log:
            process = subprocess.Popen([exe, "-c", str(config)], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT,
                                       preexec_fn=die_with_parent)
        try:
            run_coroutine(wait_for_port("127.0.0.1", port, None, 10.0, "mosquitto"))
            yield f"mqtt://127.0.0.1:{port}"
        finally:
            stop(process)


def run(quick: bool = False) -> dict[str, Any]:
    with private_mosquitto() as broker:
        outcome = compare_mqtt_flow(fogline_flow, quick=quick, broker_url=broker)
    outcome["conditions"]["broker_config"] = MOSQUITTO_QOS1_SAFE.strip().splitlines()
    return outcome


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
