"""MQTT transport against real brokers: the embedded nats-server and the Mosquitto at
127.0.0.1:1883 (shared, so every test uses its own topics and client ids)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
from gmqtt import Client as GmqttClient
from gmqtt.mqtt.constants import MQTTv311

from fogline.errors import ConfigError, RetryableError
from fogline.transport import mqtt_link
from fogline.transport.mqtt_broker import open_mqtt_broker, parse_listen
from fogline.transport.mqtt_link import MqttLink, parse_mqtt_url
from fogline.transport.nats_server import die_with_parent, free_port
from tests.conftest import require_service

pytestmark = pytest.mark.timeout(60)
MOSQUITTO_URL = "mqtt://127.0.0.1:1883"
ACK_WAIT_S = 1.0  # the embedded broker's redelivery delay in these tests
DELIVERY_TIMEOUT_S = 5.0


class Inbox:
    """An on_message that records what arrived."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, bytes, int]] = asyncio.Queue()

    async def __call__(self, topic: str, payload: bytes, qos: int) -> None:
        self.queue.put_nowait((topic, payload, qos))

    async def next(self, timeout_s: float = DELIVERY_TIMEOUT_S) -> tuple[str, bytes, int]:
        return await asyncio.wait_for(self.queue.get(), timeout_s)


def unique() -> str:
    return uuid.uuid4().hex[:10]


@contextlib.asynccontextmanager
async def started(link: MqttLink, subscriptions: dict[str, int]) -> AsyncIterator[MqttLink]:
    try:
        await asyncio.wait_for(link.start(subscriptions), DELIVERY_TIMEOUT_S)
        yield link
    finally:
        await link.stop()


async def forget_session(url: str, client_id: str) -> None:
    """A clean-session connect drops the broker's persistent session for client_id."""
    async with started(MqttLink(url, client_id, Inbox(), clean_session=True), {}):
        pass


async def wait_until(condition: object, timeout_s: float = DELIVERY_TIMEOUT_S) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
async def no_task_left_behind() -> AsyncIterator[None]:
    """Fails a test whose links or brokers leave a task running (STYLE.md 7)."""
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    with contextlib.suppress(TimeoutError):
        await wait_until(lambda: not (asyncio.all_tasks() - before - {current}), 1.0)
    assert not asyncio.all_tasks() - before - {current}


@pytest.fixture(params=["embedded", "mosquitto"])
async def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "mosquitto":
        require_service("Mosquitto", "127.0.0.1", 1883)
        yield MOSQUITTO_URL
        return
    async with open_mqtt_broker(tmp_path / "mqtt", ack_wait_s=ACK_WAIT_S) as broker:
        yield broker.url


# -- embedded broker -----------------------------------------------------------------------


async def test_embedded_broker_serves_gmqtt_keeps_its_port_and_stops(tmp_path: Path) -> None:
    work_dir = tmp_path / "mqtt"
    async with open_mqtt_broker(work_dir) as broker:
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        pid, port = broker.process.pid, broker.port
        process = psutil.Process(pid)
        connections = getattr(process, "net_connections", None) or process.connections  # <6
        listening = {conn.laddr for conn in connections("tcp")
                     if conn.status == psutil.CONN_LISTEN}
        # Only the MQTT port is for devices; the NATS client port stays on loopback.
        assert len(listening) == 2 and {addr.ip for addr in listening} == {"127.0.0.1"}
        assert (work_dir / "port").read_text().strip() == str(port)

        received: asyncio.Queue[bytes] = asyncio.Queue()
        client = GmqttClient(f"fl-{unique()}")
        client.on_message = lambda _c, _t, payload, _q, _p: received.put_nowait(payload)
        await client.connect(broker.host, broker.port, version=MQTTv311)
        client.subscribe("fl/raw", qos=1)
        await asyncio.sleep(0.2)
        client.publish("fl/raw", b"hello", qos=1)
        assert await asyncio.wait_for(received.get(), DELIVERY_TIMEOUT_S) == b"hello"
        await client.disconnect()
    assert broker.process.returncode is not None
    assert not psutil.pid_exists(pid)

    async with open_mqtt_broker(work_dir) as again:
        assert again.port == port
    with socket.create_server(("127.0.0.1", port)):  # someone else took it meanwhile
        async with open_mqtt_broker(work_dir) as moved:
            assert moved.port != port
            assert (work_dir / "port").read_text().strip() == str(moved.port)


@pytest.mark.parametrize("listen", ["127.0.0.1", "127.0.0.1:x", ":1883", "h:70000", ""])
def test_broker_listen_rejections(listen: str) -> None:
    with pytest.raises(ConfigError, match="listen address"):
        parse_listen(listen)


async def test_broker_restart_keeps_acknowledged_qos1_and_links_reconnect(
        tmp_path: Path) -> None:
    """kill -9 of the broker loses no acknowledged QoS1; connected links reconnect by
    themselves, keep their subscriptions, and a publish made while it is down completes
    once it is back."""
    work_dir, tag = tmp_path / "mqtt", unique()
    stored, live = f"fl/{tag}/stored", f"fl/{tag}/live"
    offline_inbox, live_inbox = Inbox(), Inbox()
    async with open_mqtt_broker(work_dir, ack_wait_s=ACK_WAIT_S) as broker:
        # An offline persistent session: QoS1 for it waits in JetStream.
        async with started(MqttLink(broker.url, f"fl-{tag}-off", offline_inbox), {stored: 1}):
            pass
        watcher = MqttLink(broker.url, f"fl-{tag}-live", live_inbox)
        quick = MqttLink(broker.url, f"fl-{tag}-quick", Inbox(), publish_timeout_s=0.3)
        patient = MqttLink(broker.url, f"fl-{tag}-patient", Inbox(), publish_timeout_s=20)
        for link, subscriptions in ((watcher, {live: 1}), (quick, {}), (patient, {})):
            await asyncio.wait_for(link.start(subscriptions), DELIVERY_TIMEOUT_S)
        for i in range(20):
            await quick.publish(stored, b"%d" % i, qos=1)
        broker.process.kill()
        await broker.process.wait()
    try:
        await wait_until(lambda: not (quick.connected or patient.connected))
        with pytest.raises(RetryableError, match="not connected after"):
            await quick.publish(stored, b"never", qos=1)
        pending = asyncio.create_task(patient.publish(stored, b"after", qos=1))
        async with open_mqtt_broker(work_dir, ack_wait_s=ACK_WAIT_S) as broker:
            await pending
            async with started(MqttLink(broker.url, f"fl-{tag}-off", offline_inbox),
                               {stored: 1}):
                payloads = {(await offline_inbox.next())[1] for _ in range(21)}
                assert payloads == {b"%d" % i for i in range(20)} | {b"after"}
            await wait_until(lambda: watcher.connected and quick.connected)
            await quick.publish(live, b"still subscribed", qos=1)
            assert await live_inbox.next() == (live, b"still subscribed", 1)
    finally:
        for link in (watcher, quick, patient):
            await link.stop()


async def test_link_resubscribes_when_the_broker_lost_its_session(tmp_path: Path) -> None:
    tag = unique()
    topic, port = f"fl/{tag}/t", free_port()
    inbox = Inbox()
    link = MqttLink(f"mqtt://127.0.0.1:{port}", f"fl-{tag}-sub", inbox)
    try:
        async with open_mqtt_broker(tmp_path / "first", f"127.0.0.1:{port}"):
            await asyncio.wait_for(link.start({topic: 1}), DELIVERY_TIMEOUT_S)
        # Same port, empty state: the reconnect finds no session and subscribes again.
        async with open_mqtt_broker(tmp_path / "second", f"127.0.0.1:{port}") as broker, \
                started(MqttLink(broker.url, f"fl-{tag}-pub", Inbox()), {}) as publisher:
            await wait_until(lambda: link.connected)
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                while inbox.queue.empty():  # until the new SUBSCRIBE has been processed
                    await publisher.publish(topic, b"again", qos=1)
                    await asyncio.sleep(0.05)
            assert await inbox.next() == (topic, b"again", 1)
    finally:
        await link.stop()


async def test_start_retries_until_the_broker_is_up_and_stop_ends_it(tmp_path: Path) -> None:
    tag = unique()
    port = free_port()
    link = MqttLink(f"mqtt://127.0.0.1:{port}", f"fl-{tag}-early", Inbox())
    starting = asyncio.create_task(link.start({f"fl/{tag}": 1}))
    await asyncio.sleep(0.5)  # a few refused attempts
    assert not starting.done() and not link.connected
    async with open_mqtt_broker(tmp_path / "mqtt", f"127.0.0.1:{port}"):
        await asyncio.wait_for(starting, DELIVERY_TIMEOUT_S)
        assert link.connected
        await link.stop()
        assert not link.connected
    never = MqttLink(f"mqtt://127.0.0.1:{free_port()}", f"fl-{tag}-never", Inbox())
    starting = asyncio.create_task(never.start({}))
    await asyncio.sleep(0.3)
    await never.stop()
    await asyncio.wait_for(starting, 1.0)  # returns, without a connection
    assert not never.connected
    with pytest.raises(RetryableError, match="stopped"):
        await never.publish("fl/x", b"", qos=1)


async def test_qos0_beyond_the_inbox_limit_is_dropped_and_counted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_link, "INBOX_QOS0_MAX", 5)
    tag = unique()
    release, handled = asyncio.Event(), []

    async def slow(_topic: str, payload: bytes, _qos: int) -> None:
        await release.wait()
        handled.append(payload)

    async with open_mqtt_broker(tmp_path / "mqtt") as broker, \
            started(MqttLink(broker.url, f"fl-{tag}-sub", slow, max_in_flight=1),
                    {f"fl/{tag}": 0}) as subscriber, \
            started(MqttLink(broker.url, f"fl-{tag}-pub", Inbox()), {}) as publisher:
        for i in range(20):
            await publisher.publish(f"fl/{tag}", b"%d" % i, qos=0)
        await wait_until(lambda: subscriber.dropped_qos0 + 6 >= 20)
        release.set()
        await wait_until(lambda: len(handled) + subscriber.dropped_qos0 == 20)
        assert 5 <= len(handled) <= 6


# -- MqttLink through both brokers ---------------------------------------------------------


async def test_link_subscribes_receives_and_awaits_qos1(broker_url: str) -> None:
    tag = unique()
    inbox = Inbox()
    subscriber = MqttLink(broker_url, f"fl-{tag}-sub", inbox)
    publisher = MqttLink(broker_url, f"fl-{tag}-pub", Inbox())
    try:
        async with started(subscriber, {f"fl/{tag}/+": 1}), started(publisher, {}):
            assert subscriber.connected and publisher.connected
            await publisher.publish(f"fl/{tag}/a", b"one", qos=1)
            await publisher.publish(f"fl/{tag}/b", b"two", qos=0)
            await publisher.publish(f"fl/{tag}/c/deeper", b"not matched", qos=1)
            got = {await inbox.next(), await inbox.next()}
            assert got == {(f"fl/{tag}/a", b"one", 1), (f"fl/{tag}/b", b"two", 0)}
            # Many concurrent QoS1 publishes: each returns only on its own PUBACK.
            await asyncio.gather(*(publisher.publish(f"fl/{tag}/n", b"%d" % i, qos=1)
                                   for i in range(300)))
            payloads = sorted([int((await inbox.next())[1]) for _ in range(300)])
            assert payloads == list(range(300))
    finally:
        await forget_session(broker_url, f"fl-{tag}-sub")


async def test_qos1_is_redelivered_when_the_handler_never_completes(broker_url: str) -> None:
    """A link stopped mid-handler never acknowledged the message; its successor with the
    same client id gets it again (nats-server after ack_wait, Mosquitto at reconnect)."""
    tag = unique()
    client_id, topic = f"fl-{tag}-worker", f"fl/{tag}/jobs"
    started_handling = asyncio.Event()

    async def stuck(_topic: str, _payload: bytes, _qos: int) -> None:
        started_handling.set()
        await asyncio.Event().wait()

    try:
        async with started(MqttLink(broker_url, client_id, stuck, stop_grace_s=0.1),
                           {topic: 1}), \
                started(MqttLink(broker_url, f"fl-{tag}-pub", Inbox()), {}) as publisher:
            await publisher.publish(topic, b"job-1", qos=1)
            await asyncio.wait_for(started_handling.wait(), DELIVERY_TIMEOUT_S)
        inbox = Inbox()
        async with started(MqttLink(broker_url, client_id, inbox), {topic: 1}):
            assert await inbox.next() == (topic, b"job-1", 1)
    finally:
        await forget_session(broker_url, client_id)


WORKER = """
import asyncio, sys
from fogline.transport.mqtt_link import MqttLink

async def stuck(topic, payload, qos):
    print("got", payload.decode(), flush=True)
    await asyncio.Event().wait()

async def main():
    link = MqttLink(sys.argv[1], sys.argv[2], stuck)
    await link.start({sys.argv[3]: 1})
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_qos1_is_redelivered_after_the_worker_process_is_killed(
        broker_url: str) -> None:
    tag = unique()
    client_id, topic = f"fl-{tag}-worker", f"fl/{tag}/jobs"
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, broker_url, client_id, topic,
        stdout=asyncio.subprocess.PIPE, preexec_fn=die_with_parent,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert worker.stdout is not None
        line = await asyncio.wait_for(worker.stdout.readline(), 15)
        assert line == b"ready\n"
        async with started(MqttLink(broker_url, f"fl-{tag}-pub", Inbox()), {}) as publisher:
            await publisher.publish(topic, b"job-1", qos=1)
        line = await asyncio.wait_for(worker.stdout.readline(), DELIVERY_TIMEOUT_S)
        assert line == b"got job-1\n"
        worker.kill()
        await worker.wait()
        inbox = Inbox()
        async with started(MqttLink(broker_url, client_id, inbox), {topic: 1}):
            assert await inbox.next() == (topic, b"job-1", 1)
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
        await forget_session(broker_url, client_id)


async def test_failing_handler_is_logged_and_acknowledged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A poison message is acknowledged, not redelivered for ever."""
    tag = unique()
    calls: list[bytes] = []

    async def poison(_topic: str, payload: bytes, _qos: int) -> None:
        calls.append(payload)
        raise ValueError("cannot parse")

    async with open_mqtt_broker(tmp_path / "mqtt", ack_wait_s=ACK_WAIT_S) as broker, \
            started(MqttLink(broker.url, f"fl-{tag}-sub", poison), {f"fl/{tag}": 1}), \
            started(MqttLink(broker.url, f"fl-{tag}-pub", Inbox()), {}) as publisher:
        with caplog.at_level(logging.ERROR, logger="fogline.transport.mqtt_link"):
            await publisher.publish(f"fl/{tag}", b"bad", qos=1)
            await wait_until(lambda: calls)
            await asyncio.sleep(ACK_WAIT_S * 2)  # past the broker's redelivery delay
    assert calls == [b"bad"]
    assert "MQTT handler failed" in caplog.text and "cannot parse" in caplog.text


async def test_handlers_run_concurrently_up_to_max_in_flight(tmp_path: Path) -> None:
    tag = unique()
    running, most, release = 0, 0, asyncio.Event()
    finished: list[bytes] = []

    async def slow(_topic: str, payload: bytes, _qos: int) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        finished.append(payload)

    async with open_mqtt_broker(tmp_path / "mqtt") as broker, \
            started(MqttLink(broker.url, f"fl-{tag}-sub", slow, max_in_flight=3),
                    {f"fl/{tag}": 1}), \
            started(MqttLink(broker.url, f"fl-{tag}-pub", Inbox()), {}) as publisher:
        for i in range(10):
            await publisher.publish(f"fl/{tag}", b"%d" % i, qos=1)
        await wait_until(lambda: running == 3)
        await asyncio.sleep(0.2)
        assert running == most == 3
        release.set()
        await wait_until(lambda: len(finished) == 10)
    assert most == 3


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "reason"), [
    ("", "must start with mqtt:// or mqtts://"),
    ("localhost:1883", "must start with mqtt:// or mqtts://"),
    ("http://localhost:1883", "must start with mqtt:// or mqtts://"),
    ("mqtt://", "has no host"),
    ("mqtt://:1883", "has no host"),
    ("mqtt://user:pw@:1883", "has no host"),
    ("mqtt://localhost:abc", "malformed"),
    ("mqtt://localhost:70000", "malformed"),
    ("mqtt://[::1:1883", "malformed"),
    ("mqtt://localhost:0", "port 0"),
    ("mqtt://localhost:1883/topic", "path, query or fragment"),
    ("mqtt://localhost:1883?qos=1", "path, query or fragment"),
    ("mqtt://localhost:1883#x", "path, query or fragment"),
    ("mqtt://:secret@localhost:1883", "empty user name"),
    ("mqtt://local host:1883", "whitespace"),
])
def test_url_rejections(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as caught:
        MqttLink(url, "fl-client", Inbox())
    assert "secret" not in str(caught.value)


def test_url_forms() -> None:
    plain = parse_mqtt_url("mqtt://broker.local")
    assert (plain.host, plain.port, plain.tls, plain.username) == ("broker.local", 1883,
                                                                   False, None)
    secure = parse_mqtt_url("mqtts://dev%2F1:p%40ss@[::1]:8884/")
    assert (secure.host, secure.port, secure.tls) == ("::1", 8884, True)
    assert (secure.username, secure.password) == ("dev/1", "p@ss")
    assert "p@ss" not in repr(secure)


@pytest.mark.parametrize("client_id", ["", "has space", "naïve", "x" * 65536])
def test_client_id_rejections(client_id: str) -> None:
    with pytest.raises(ConfigError, match="client id"):
        MqttLink(MOSQUITTO_URL, client_id, Inbox())


async def test_qos2_and_empty_filters_are_refused() -> None:
    link = MqttLink(MOSQUITTO_URL, f"fl-{unique()}", Inbox())
    with pytest.raises(ConfigError, match="QoS must be 0 or 1"):
        await link.publish("fl/x", b"", qos=2)
    with pytest.raises(ConfigError, match="QoS 2 is not supported"):
        await link.start({"fl/x": 2})
    with pytest.raises(ConfigError, match="start"):
        await link.start({"fl/x": 1})  # start() is once only
    with pytest.raises(ConfigError, match="needs a topic filter"):
        await MqttLink(MOSQUITTO_URL, f"fl-{unique()}", Inbox()).start({"": 0})
    await link.stop()
