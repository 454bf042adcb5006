"""Apps on a real node: routes, topic handlers, schedules and every ctx API end to end,
each rejection, isolation of misbehaving apps, and a node cut off from its hub.

The hub, the node, its app workers and the MQTT brokers (the node's embedded
nats-server, and Mosquitto at 127.0.0.1:1883) are real processes.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from fogline.transport.mqtt_link import MqttLink
from tests.conftest import require_service
from tests.fleet import HubProcess, LocalNode, ThreadedWan, run_hub, stop, wait_for

APPS = Path(__file__).resolve().parent.parent / "apps"
MOSQUITTO = "mqtt://127.0.0.1:1883"


class AppNode(LocalNode):
    """A node running apps: its front, its local API and its broker."""

    @property
    def endpoint(self) -> str:
        return (self.data / "endpoint").read_text().strip()

    @property
    def mqtt_url(self) -> str:
        return (self.data / "mqtt.url").read_text().strip()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, self.endpoint + path, timeout=15, **kwargs)

    def apps(self) -> dict[str, dict[str, Any]]:
        with self._client() as client:
            return {a["name"]: a for a in client.get("/local/apps").json()}

    def metric(self, name: str, app: str) -> float:
        text = httpx.get(self.endpoint + "/metrics", timeout=10).text
        found = re.search(rf'^{name}{{app="{app}"[^}}]*}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0


def start_app_node(hub: HubProcess, data: Path, *extra: str,
                   apps: tuple[str, ...] = ("probe", "steady")) -> AppNode:
    args = [arg for app in apps for arg in ("--app", str(APPS / app))]
    hub.start_node(data, data.name, hub.create_token(region="eu", labels={"site": "lab"}),
                   "--heartbeat-interval", "1s", "--tier", "near", *args, *extra)
    node = AppNode(data)

    def running() -> bool:
        if not (data / "endpoint").exists():
            return False
        try:
            states = {a["state"] for a in node.apps().values()}
        except httpx.HTTPError:
            return False
        return states == {"running"}

    wait_for(running, 60, "the node's apps to run")
    return node


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, AppNode]]:
    root = tmp_path_factory.mktemp("apps")
    with run_hub(root / "hub", "--heartbeat-interval", "1s") as hub:
        yield hub, start_app_node(hub, root / "edge")


# Routes and ctx --------------------------------------------------------------------------

def test_routes_answer_with_params_query_headers_and_return_types(fleet: Any) -> None:
    _, node = fleet
    assert node.request("GET", "/probe/hello").json() == {"hello": "world"}
    echoed = node.request("POST", "/probe/echo?x=1&x=2&y=", json={"a": [1, 2]},
                          headers={"user-agent": "probe-test"}).json()
    assert echoed == {"got": {"a": [1, 2]}, "query": {"x": "2", "y": ""},
                      "agent": "probe-test"}
    assert node.request("GET", "/probe/sync").json() == {"sync": True, "value": None}
    assert node.request("PUT", "/probe/kv/answer", json=42).status_code == 204
    missing = node.request("GET", "/probe/nothing")
    assert missing.status_code == 404 and missing.json()["error"] == "no route"
    wrong = node.request("DELETE", "/probe/hello")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
    bad_json = node.request("POST", "/probe/echo", content=b"{not json")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]
    # The node's own endpoints are still the node's.
    assert node.request("GET", "/healthz").json()["status"] == "ok"


def test_ctx_gives_node_config_clock_and_every_collection_type(fleet: Any) -> None:
    hub, node = fleet
    info = node.request("GET", "/probe/info").json()
    node_id = (node.data / "endpoint").exists() and hub.nodes_by_name()["edge"]["id"]
    assert info["node"] == {"id": node_id, "region": "eu", "tier": "near",
                            "labels": {"site": "lab"}}
    assert info["config"] == {"greeting": "hello"}
    assert abs(info["now"] - time.time()) < 5
    assert node.request("PUT", "/probe/kv/k1", json={"v": 1}).status_code == 204
    assert node.request("GET", "/probe/kv/k1").json() == {"value": {"v": 1}}
    assert node.request("GET", "/probe/kv/none").status_code == 404
    assert [node.request("POST", "/probe/kv/n/incr").json()["value"] for _ in range(3)] \
        == [1, 2, 3]
    assert node.request("POST", "/probe/tags/blue").json() == {"contains": True,
                                                               "tags": ["blue"]}
    before = node.request("POST", "/probe/hits").json()["hits"]
    after = node.request("POST", "/probe/hits").json()["hits"]
    assert after >= before + 1
    # The same state through the node's own local API: one store, not a copy.
    assert node.value("kv")["k1"] == {"v": 1}


def test_concurrent_updates_from_two_workers_of_a_key_lose_nothing(fleet: Any) -> None:
    _, node = fleet
    errors: list[str] = []

    def bump(n: int) -> None:
        for _ in range(n):
            response = node.request("POST", "/probe/kv/race/incr")
            if response.status_code != 200:
                errors.append(response.text)

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert node.request("GET", "/probe/kv/race").json() == {"value": 100}


def test_schedule_runs_on_the_node_clock(fleet: Any) -> None:
    _, node = fleet
    runs = node.metric("fogline_app_schedule_runs_total", "probe")
    wait_for(lambda: node.metric("fogline_app_schedule_runs_total", "probe") >= runs + 5,
             10, "the 200 ms schedule to run five more times")


def test_handler_writes_replicate_and_emits_reach_the_hub(
        fleet: Any, tmp_path: Path) -> None:
    hub, node = fleet
    node.request("PUT", "/probe/kv/replicated", json={"from": "edge"})
    assert node.request("POST", "/probe/emit", json={"n": 1}).json() == {"emitted": True}
    # The app declared `kv` (global scope): the hub created it, and another node gets it.
    other = LocalNode(tmp_path / "other")
    hub.start_node(other.data, "other", hub.create_token(region="us"),
                   "--heartbeat-interval", "1s")
    wait_for(lambda: (other.data / "endpoint").exists()
             and (other.value("kv") or {}).get("replicated") == {"from": "edge"},
             30, "the app's write to reach another node")
    edge_id = hub.nodes_by_name()["edge"]["id"]
    wait_for(lambda: any(r["record"] == {"n": 1} for r in hub.api(
        "GET", f"/v1/nodes/{edge_id}/streams/events/records")), 30,
        "the app's emit to reach the hub")


# Device messages -------------------------------------------------------------------------

async def _device_round_trip(node: AppNode, broker: str, device: str) -> dict[str, Any]:
    """Publish to `probe/<device>/in` as a device; the app answers on `.../out`."""
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_message(topic: str, payload: bytes, qos: int) -> None:
        await got.put(payload)

    link = MqttLink(broker, f"test-device-{device}", on_message, clean_session=True)
    await link.start({f"probe/{device}/out": 1})
    try:
        await link.publish(f"probe/{device}/in", json.dumps({"t": 21.5}).encode(), qos=1)
        answer = json.loads(await asyncio.wait_for(got.get(), 15))
    finally:
        await link.stop()
    assert answer == {"echo": {"t": 21.5}}
    stored = await asyncio.to_thread(node.request, "GET", f"/probe/kv/device:{device}")
    return dict(stored.json())


async def test_topic_handler_gets_device_messages_and_publishes_back(fleet: Any) -> None:
    _, node = fleet
    stored = await _device_round_trip(node, node.mqtt_url, "d1")
    assert stored == {"value": {"t": 21.5}}


async def test_malformed_payload_is_counted_and_never_reaches_the_handler(fleet: Any) -> None:
    _, node = fleet
    before = await asyncio.to_thread(node.metric, "fogline_app_malformed_total", "probe")

    async def ignore(topic: str, payload: bytes, qos: int) -> None:
        return None

    link = MqttLink(node.mqtt_url, "test-device-bad", ignore, clean_session=True)
    await link.start({})
    try:
        await link.publish("probe/bad/in", b"\xff{not json", qos=1)
    finally:
        await link.stop()

    def counted() -> bool:
        return node.metric("fogline_app_malformed_total", "probe") >= before + 1

    await asyncio.to_thread(wait_for, counted, 10, "the malformed payload to be counted")
    missing = await asyncio.to_thread(node.request, "GET", "/probe/kv/device:bad")
    assert missing.status_code == 404  # the handler never ran
    log = (node.data.parent / "edge.log").read_text()
    assert "malformed payload dropped" in log and "probe/+/in" in log


async def test_apps_use_an_external_broker_given_with_mqtt(tmp_path: Path) -> None:
    require_service("mosquitto", "127.0.0.1", 1883)
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        node = await asyncio.to_thread(start_app_node, hub, tmp_path / "mq", "--mqtt",
                                       MOSQUITTO, apps=("probe",))
        assert node.mqtt_url == MOSQUITTO
        assert not (node.data / "mqtt" / "port").exists()  # no embedded broker
        stored = await _device_round_trip(node, MOSQUITTO, f"mq{int(time.time())}")
        assert stored["value"] == {"t": 21.5}


# Rejections ------------------------------------------------------------------------------

def test_request_body_over_the_limit_is_413_declared_or_streamed(fleet: Any) -> None:
    _, node = fleet
    declared = node.request("POST", "/probe/echo", content=b"x" * 5000)
    assert declared.status_code == 413
    assert declared.json() == {"error": "request body too large", "limit_bytes": 4096}

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"y" * 1000

    streamed = node.request("POST", "/probe/echo", content=chunks())
    assert streamed.status_code == 413
    assert node.request("POST", "/probe/echo", json={"small": True}).status_code == 200


def test_handler_past_its_timeout_is_504_and_the_worker_keeps_serving(fleet: Any) -> None:
    _, node = fleet
    started = time.monotonic()
    slow = node.request("GET", "/probe/slow?s=30")
    assert slow.status_code == 504
    assert slow.json() == {"error": "handler timed out", "timeout_s": 1.0}
    assert time.monotonic() - started < 5
    assert node.request("GET", "/probe/hello").status_code == 200
    assert node.apps()["probe"]["restarts"] == 0  # a timeout is not a crash


def test_handler_exception_is_500_with_an_error_id_that_is_in_the_log(fleet: Any) -> None:
    _, node = fleet
    response = node.request("GET", "/probe/boom")
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "internal error" and re.fullmatch(r"[0-9a-f]{12}", body["error_id"])
    assert "boom on purpose" not in response.text  # details stay in the log

    def logged() -> bool:
        log = (node.data.parent / "edge.log").read_text()
        return any(body["error_id"] in line and "boom on purpose" in line
                   for line in log.splitlines())

    wait_for(logged, 10, "the error id and the exception in the node's log")


def test_app_that_cannot_load_is_503_with_the_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(APPS / "steady", broken)
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        node = start_app_node(hub, tmp_path / "n", apps=("steady",))
        # Break the code on disk, then reload: the new worker fails to import.
        (broken / "steady_app.py").write_text("import no_such_module_here\n")
        hub.start_node(tmp_path / "n2", "n2", hub.create_token(), "--app", str(broken))
        node2 = AppNode(tmp_path / "n2")
        wait_for(lambda: (node2.data / "endpoint").exists()
                 and node2.apps()["steady"]["state"] in ("restarting", "failed"), 30,
                 "the broken app to be reported")
        response = node2.request("GET", "/steady/ping")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        body = response.json()
        assert body["error"] == "app unavailable" and body["app"] == "steady"
        assert "failed to load" in body["reason"] and "no_such_module_here" in body["reason"]
        # Another node's copy of the same app is unaffected.
        assert node.request("GET", "/steady/ping").status_code == 200


def test_bad_app_directories_and_mqtt_options_stop_the_node_before_it_enrolls(
        tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fogline.yaml").write_text("apiVersion: fogline/v1\nkind: App\n"
                                      "metadata: {name: healthz, version: '1'}\n"
                                      "spec: {entrypoint: 'a:app'}\n")
    cases = [
        (["--app", str(tmp_path / "missing")], "no app manifest"),
        (["--app", str(bad)], "reserved"),
        (["--app", str(APPS / "steady"), "--app", str(APPS / "steady")], "same app"),
        (["--app", str(APPS / "steady"), "--mqtt", "http://x:1"], "mqtt"),
        (["--app", str(APPS / "steady"), "--mqtt-listen", "nope"], "--mqtt-listen"),
    ]
    for args, message in cases:
        data = tmp_path / f"n{len(message)}"
        result = subprocess.run([sys.executable, "-m", "fogline", "node", "--data", str(data),
                                 "--hub", "http://127.0.0.1:9", "--token", "x", *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0, args
        said = (result.stdout + result.stderr).replace("\n", "").lower()  # rich wraps lines
        assert message.lower() in said, (args, said)
        assert not (data / "identity.json").exists()  # nothing enrolled, nothing written


# Isolation -------------------------------------------------------------------------------

class Hammer:
    """Calls a steady app's route in a loop on a thread; records every failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                try:
                    response = client.get(self.url)
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{response.status_code} {response.text}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.005)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_crashing_hanging_and_leaking_apps_are_replaced_while_others_serve(
        tmp_path: Path) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        node = start_app_node(hub, tmp_path / "iso")
        pids: list[int] = []

        def replaced(reason: str) -> None:
            wait_for(lambda: node.apps()["probe"]["state"] == "running"
                     and node.request("GET", "/probe/info").json()["pid"] not in pids,
                     30, f"probe to be replaced after: {reason}")

        with Hammer(node.endpoint + "/steady/ping") as hammer:
            pids.append(node.request("GET", "/probe/info").json()["pid"])
            crash = node.request("GET", "/probe/crash")
            assert crash.status_code == 503
            assert "exit code 7" in crash.json()["reason"]
            replaced("crash")

            pids.append(node.request("GET", "/probe/info").json()["pid"])
            started = time.monotonic()
            hung = node.request("GET", "/probe/block?s=60")
            assert hung.status_code == 504  # the loop is blocked: the front's backstop
            wait_for(lambda: "hung" in node.apps()["probe"]["reason"]
                     or node.apps()["probe"]["restarts"] >= 2, 15, "the hang to be seen")
            replaced("hang")
            assert time.monotonic() - started < 15

            pids.append(node.request("GET", "/probe/info").json()["pid"])
            for _ in range(50):  # past RLIMIT_DATA an allocation fails (500) until the
                response = node.request("GET", "/probe/leak")  # RSS check kills it
                if response.status_code == 503:
                    break
                time.sleep(0.1)
            assert "memory limit 160 MB exceeded" in response.json()["reason"]
            # Three ends within a minute: a crash loop. It is restarted still, but the
            # app reads `failed` (with the last reason) at the node and at the hub.
            wait_for(lambda: node.apps()["probe"]["restarts"] == 3, 10, "a third restart")
            status = node.apps()["probe"]
            assert status["state"] == "failed" and "memory limit" in status["reason"]
            assert node.request("GET", "/healthz").status_code == 200

            def hub_sees_failed() -> bool:
                apps = hub.nodes_by_name()["iso"].get("apps", [])
                return any(a["name"] == "probe" and a["state"] == "failed" for a in apps)

            wait_for(hub_sees_failed, 10, "the hub to see the failed app in heartbeats")
            time.sleep(0.5)
        assert hammer.failures == []
        assert hammer.ok > 100
        assert node.request("GET", "/probe/hello").status_code == 200  # restarted again
        # Each ended worker is gone: no process left behind.
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                       for pid in pids)


def test_stopping_the_node_stops_its_workers_and_broker(tmp_path: Path) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        node = start_app_node(hub, tmp_path / "gone")
        process = hub.nodes[-1]
        children = psutil.Process(process.pid).children(recursive=True)
        assert len(children) >= 3  # two workers and the embedded broker
        assert node.request("GET", "/steady/ping").status_code == 200
        stop(process, signal.SIGTERM)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive


# Cut off from the hub --------------------------------------------------------------------

async def test_apps_keep_serving_and_queue_emits_while_the_hub_is_unreachable(
        tmp_path: Path) -> None:
    wan = ThreadedWan()
    try:
        with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
            host, port = (hub.data / "nats.url").read_text().strip() \
                .split("://", 1)[1].rsplit(":", 1)
            link_port = wan.add_link("edge/nats", (host, int(port)), latency_ms=5)
            node = await asyncio.to_thread(start_app_node, hub, tmp_path / "cut", "--nats",
                                           f"nats://127.0.0.1:{link_port}", apps=("probe",))
            edge_id = hub.nodes_by_name()["cut"]["id"]
            wan.partition("edge/nats")
            await asyncio.to_thread(wait_for, lambda: hub.nodes_by_name()["cut"]["status"]
                                    == "offline", 15, "the hub to see the node offline")
            for i in range(20):
                emitted = await asyncio.to_thread(node.request, "POST", "/probe/emit",
                                                  json={"cut": i})
                assert emitted.status_code == 200
            stored = await _device_round_trip(node, node.mqtt_url, "cut1")
            assert stored == {"value": {"t": 21.5}}
            assert (await asyncio.to_thread(node.request, "GET", "/probe/hello")).json() \
                == {"hello": "world"}
            with node._client() as client:
                backlog = client.get("/local/streams").json()["events"]["records"]
            assert backlog >= 20
            wan.heal("edge/nats")

            def delivered() -> bool:
                records = hub.api("GET", f"/v1/nodes/{edge_id}/streams/events/records",
                                  params={"limit": 1000})
                return {i for i in range(20)} <= {r["record"].get("cut") for r in records}

            await asyncio.to_thread(wait_for, delivered, 30, "the queued emits to arrive")
    finally:
        wan.close()


# Per-app environments ---------------------------------------------------------------------

REQUIRING_CODE = '''from fogline import App
import humanize

app = App("needs")


@app.route("GET", "/size")
async def size(req, ctx):
    return {"size": humanize.naturalsize(3000000), "where": humanize.__file__}
'''


def _requiring_app(directory: Path, requirement: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "fogline.yaml").write_text(
        "apiVersion: fogline/v1\nkind: App\nmetadata: {name: needs, version: '1'}\n"
        f"spec: {{entrypoint: 'needs_app:app', requirements: ['{requirement}']}}\n")
    (directory / "needs_app.py").write_text(REQUIRING_CODE)
    return directory


def test_requirements_install_into_a_per_app_environment(tmp_path: Path) -> None:
    import importlib.util

    assert importlib.util.find_spec("humanize") is None  # not on the node's interpreter
    good = _requiring_app(tmp_path / "good", "humanize==4.9.0")
    bad = _requiring_app(tmp_path / "bad", "fogline-no-such-package==1.0")
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        hub.start_node(tmp_path / "n", "n", hub.create_token(), "--app", str(good))
        node = AppNode(tmp_path / "n")
        wait_for(lambda: (node.data / "endpoint").exists()
                 and node.apps().get("needs", {}).get("state") == "running", 180,
                 "the app's requirements to install and the app to run")
        body = node.request("GET", "/needs/size").json()
        assert body["size"] == "3.0 MB"
        assert str(node.data / "apps" / "envs") in body["where"]
        hub.start_node(tmp_path / "m", "m", hub.create_token(), "--app", str(bad))
        other = AppNode(tmp_path / "m")
        wait_for(lambda: (other.data / "endpoint").exists()
                 and other.apps().get("needs", {}).get("state") == "failed", 180,
                 "the failed install to be reported")
        response = other.request("GET", "/needs/size")
        assert response.status_code == 503
        assert "installing requirements failed" in response.json()["reason"]


def test_an_app_whose_collection_the_hub_refuses_is_stopped_as_failed(tmp_path: Path) -> None:
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s") as hub:
        # The fleet already has `kv`, as a counter: probe declares it as a map.
        hub.api("POST", "/v1/collections", json={"name": "kv", "type": "counter",
                                                 "scope": "global"})
        hub.start_node(tmp_path / "r", "r", hub.create_token(), "--app", str(APPS / "probe"),
                       "--app", str(APPS / "steady"))
        node = AppNode(tmp_path / "r")
        wait_for(lambda: (node.data / "endpoint").exists()
                 and node.apps().get("probe", {}).get("state") == "failed", 30,
                 "the hub's refusal to stop the app")
        reason = node.apps()["probe"]["reason"]
        assert "the hub refused collection 'kv'" in reason and "counter" in reason
        assert node.request("GET", "/probe/hello").status_code == 503
        wait_for(lambda: node.apps()["steady"]["state"] == "running", 30, "steady to run")
        assert node.request("GET", "/steady/ping").status_code == 200
        assert hub.api("GET", "/v1/collections/kv")["type"] == "counter"  # unchanged
