"""The demo's simulated machines: vibration sensors publishing over MQTT.

Each machine belongs to one regional node and publishes a batch of samples (as real
sensors do: sampling at a few hundred Hz, sending a message every few hundred ms) to
`factory/<machine>/vibration` on that node's embedded broker, QoS1. The same batch also
goes to the cloud node's broker through the region's WAN link: that is the cloud-only
deployment the edge is compared with, and it gives the cloud node the same machines'
state to serve. A cloud copy is skipped (and counted) while that link is down or still
busy with earlier copies; the edge copy is always sent, the local broker is on site.

One machine per node has flaky firmware: now and then it also sends its edge node a
truncated copy of a batch, so the app's `malformed` counter shows rejection at work (the
batch itself arrives whole, on both nodes).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import zlib
from dataclasses import dataclass, field

from fogline.errors import FoglineError
from fogline.transport.mqtt_link import MqttLink

CLOUD_COPIES_PENDING_MAX = 4  # per machine: unacknowledged copies on the way to the cloud
PUBLISH_TIMEOUT_S = 5.0
MALFORMED_EVERY_BATCHES = 50  # the flaky sensor: one truncated message in this many


@dataclass
class Counters:
    acked: int = 0  # PUBACK received
    failed: int = 0  # publish raised: not acknowledged in time, or the link stopped
    skipped: int = 0  # not sent: the broker unreachable or the copies still pending
    malformed_sent: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Machine:
    name: str
    node: str
    region: str
    seed: int
    flaky: bool = False
    batches: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self.base = self._rng.uniform(0.2, 0.6)
        self.frequency_hz = self._rng.uniform(20.0, 60.0)

    @property
    def topic(self) -> str:
        return f"factory/{self.name}/vibration"

    def batch(self, samples: int, rate_hz: float, at_s: float) -> bytes:
        """One message: `samples` readings taken at `rate_hz` up to `at_s`."""
        self.batches += 1
        rng, start_s = self._rng, at_s - samples / rate_hz
        values = [round(self.base + 0.3 * math.sin(2 * math.pi * self.frequency_hz
                                                    * (start_s + i / rate_hz))
                        + rng.gauss(0.0, 0.05), 4) for i in range(samples)]
        return json.dumps({"machine": self.name, "samples": values}).encode()


@dataclass
class NodeDevices:
    """The machines of one regional node and the brokers they publish to."""

    node: str
    region: str
    edge_mqtt_url: str
    cloud_mqtt_url: str | None
    machines: list[Machine]
    edge: Counters = field(default_factory=Counters)
    cloud: Counters = field(default_factory=Counters)


class DeviceFleet:
    def __init__(self, nodes: list[NodeDevices], samples_per_batch: int,
                 batch_interval_s: float) -> None:
        self.nodes = nodes
        self.samples_per_batch = samples_per_batch
        self.batch_interval_s = batch_interval_s
        self.running = False

    async def run(self) -> None:
        """Publish until cancelled; every link is stopped on the way out."""
        links: list[MqttLink] = []
        try:
            async with asyncio.TaskGroup() as group:
                for node in self.nodes:
                    for machine in node.machines:
                        edge = self._link(node.edge_mqtt_url, f"dev-{machine.name}", links)
                        cloud = None if node.cloud_mqtt_url is None else self._link(
                            node.cloud_mqtt_url, f"dev-{machine.name}-cloud", links)
                        group.create_task(self._machine(node, machine, edge, cloud, group))
                self.running = True
        finally:
            self.running = False
            await asyncio.gather(*(link.stop() for link in links), return_exceptions=True)

    @staticmethod
    def _link(url: str, client_id: str, links: list[MqttLink]) -> MqttLink:
        async def ignore(_topic: str, _payload: bytes, _qos: int) -> None:
            return None

        link = MqttLink(url, client_id, ignore, clean_session=True,
                        publish_timeout_s=PUBLISH_TIMEOUT_S, stop_grace_s=0)
        links.append(link)
        return link

    async def _machine(self, node: NodeDevices, machine: Machine, edge: MqttLink,
                       cloud: MqttLink | None, group: asyncio.TaskGroup) -> None:
        await edge.start({})
        cloud_started = None if cloud is None else group.create_task(cloud.start({}))
        pending: set[asyncio.Task[None]] = set()
        rate_hz = self.samples_per_batch / self.batch_interval_s
        loop = asyncio.get_running_loop()
        next_s = loop.time()
        while True:
            payload = machine.batch(self.samples_per_batch, rate_hz, time.time())
            await self._publish(edge, machine.topic, payload, node.edge)
            if machine.flaky and machine.batches % MALFORMED_EVERY_BATCHES == 0:
                await self._publish(edge, machine.topic, payload[: len(payload) // 2],
                                    node.edge, malformed=True)
            if cloud is not None:
                ready = cloud_started is not None and cloud_started.done() and cloud.connected
                if not ready or len(pending) >= CLOUD_COPIES_PENDING_MAX:
                    node.cloud.skipped += 1
                else:
                    task = group.create_task(
                        self._publish(cloud, machine.topic, payload, node.cloud))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            next_s += self.batch_interval_s
            await asyncio.sleep(max(0.0, next_s - loop.time()))

    @staticmethod
    async def _publish(link: MqttLink, topic: str, payload: bytes, counters: Counters,
                       malformed: bool = False) -> None:
        try:
            await link.publish(topic, payload, qos=1)
        except FoglineError:
            counters.failed += 1
            return
        if malformed:
            counters.malformed_sent += 1
        else:
            counters.acked += 1


def machines_for(node: str, region: str, count: int) -> list[Machine]:
    """`count` machines named `<node>-m<i>`; the first one is the flaky sensor."""
    return [Machine(f"{node}-m{i}", node, region, seed=zlib.crc32(f"{node}-{i}".encode()),
                    flaky=i == 1) for i in range(1, count + 1)]

