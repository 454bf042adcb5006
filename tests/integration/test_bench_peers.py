"""Benchmark peers and load generators (fogline.bench.peers) and the front-choice
mechanisms.

The peer smoke tests install workerd and Node-RED from npm and wrk from Debian, so they
run only with FOGLINE_BENCH_PEERS=1 (not in every CI run); each says why it skipped.
The pure helpers and the front-choice mechanisms need nothing installed and always run.
Speed goals live in the benchmarks, never here: these check that things work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fogline.bench import compare, front_choice, peers
from fogline.transport.nats_server import free_port
from tests.benchcheck import assert_result_shape

PEERS_REASON = ("benchmark peers need network installs (workerd and Node-RED from npm, "
                "wrk from Debian): set FOGLINE_BENCH_PEERS=1 to run these smoke tests")
MOSQUITTO = "mqtt://127.0.0.1:1883"


@pytest.fixture
def bench_peers() -> None:
    if os.environ.get("FOGLINE_BENCH_PEERS") != "1":
        pytest.skip(PEERS_REASON)


@pytest.fixture
def mosquitto(bench_peers: None) -> str:
    from tests.conftest import require_service

    require_service("Mosquitto", "127.0.0.1", 1883)
    return MOSQUITTO


# ---------------------------------------------------------------- pure helpers (always)

def test_out_topic_fills_the_out_filters_wildcards_from_the_in_topic() -> None:
    assert peers.out_topic_for("bench/+/in", "bench/+/out", "bench/d7/in") == "bench/d7/out"
    assert peers.out_topic_for("a/+/b/+", "x/+/+", "a/1/b/2") == "x/1/2"
    assert peers.probe_topic("bench/+/in") == "bench/probe/in"


def test_node_red_flow_is_mqtt_in_function_mqtt_out_at_qos1() -> None:
    flows = peers.node_red_flows("mqtt://127.0.0.1:1884", "bench/+/in", "bench/+/out")
    by_type = {node["type"]: node for node in flows}
    assert by_type["mqtt-broker"]["port"] == "1884"
    assert by_type["mqtt-broker"]["protocolVersion"] == "4"  # MQTT 3.1.1
    assert by_type["mqtt in"]["topic"] == "bench/+/in" and by_type["mqtt in"]["qos"] == "1"
    assert by_type["mqtt out"]["qos"] == "1" and by_type["mqtt out"]["topic"] == ""
    assert by_type["mqtt in"]["wires"] == [[by_type["function"]["id"]]]
    assert by_type["function"]["wires"] == [[by_type["mqtt out"]["id"]]]
    assert 'const OUT = ["bench", null, "out"]' in by_type["function"]["func"]
    with pytest.raises(ValueError):
        peers.node_red_flows(MOSQUITTO, "bench/#", "bench/+/out")


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    output = """Running 2s test @ http://127.0.0.1:1/hello/json
  1 threads and 32 connections
  Latency Distribution
     50%  812.00us
     75%    1.02ms
     90%    1.50ms
     99%    2.10ms
  64001 requests in 2.00s, 9.1MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:  32000.50
"""
    parsed = peers.parse_wrk(output)
    assert parsed["rps"] == 32000.50 and parsed["requests"] == 64001
    assert parsed["p50_ms"] == pytest.approx(0.812) and parsed["p99_ms"] == 2.10
    assert parsed["socket_errors"] == 3 and parsed["non_2xx"] == 5
    with pytest.raises(ValueError):
        peers.parse_wrk("garbage")


def test_npm_cache_honours_fogline_bench_cache(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("FOGLINE_BENCH_CACHE", str(tmp_path))
    assert peers.npm_prefix("workerd") == peers.cache_root() / "bench-npm" / "workerd"
    assert str(peers.cache_root()) == str(tmp_path)
    monkeypatch.delenv("FOGLINE_BENCH_CACHE")
    assert peers.cache_root().parts[-2:] == (".cache", "fogline")


def test_npm_absent_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                     tmp_path: Path) -> None:
    monkeypatch.setenv("FOGLINE_BENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(peers.shutil, "which", lambda _name: None)
    with pytest.raises(peers.PeerUnavailable, match="npm is needed"):
        peers.ensure_npm_package("left-pad")


@pytest.mark.parametrize("mechanism", front_choice.MECHANISMS)
def test_front_choice_mechanism_answers_the_route_and_404s_others(mechanism: str,
                                                                 tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "fogline.bench.front_choice", "--serve", mechanism,
             str(port)], stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
            env=peers.src_env())
    try:
        peers.wait_http("127.0.0.1", port, front_choice.ROUTE, process, 30, mechanism, log)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(3):  # several requests on one keep-alive connection
                response = client.get(front_choice.ROUTE, headers={"x-probe": "1"})
                assert response.status_code == 200
                assert response.json() == {"hello": "world"}
                assert response.headers["content-type"] == "application/json"
            assert client.get("/app/nothing").status_code == 404  # the worker's 404
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/nothing").status_code == 404  # the front's own
    finally:
        peers.stop(process)
    assert process.returncode is not None


# ---------------------------------------------------------------- peers (opt-in)

def test_ensure_npm_package_installs_once_then_reuses(bench_peers: None,
                                                      capfd: pytest.CaptureFixture[str]
                                                      ) -> None:
    package_dir = peers.ensure_npm_package("workerd", peers.WORKERD_VERSION)
    capfd.readouterr()
    again = peers.ensure_npm_package("workerd", peers.WORKERD_VERSION)
    assert again == package_dir
    assert json.loads((package_dir / "package.json").read_text())["version"] == \
        peers.WORKERD_VERSION
    assert "installing" not in capfd.readouterr().err  # present: no second install
    assert peers.workerd_binary().exists()


def test_workerd_serves_the_json_route_and_wrk_measures_it(bench_peers: None) -> None:
    with peers.workerd_server(cpu=0) as server:
        response = httpx.get(server.url)
        assert response.status_code == 200
        assert response.json() == {"hello": "world"}
        assert response.headers["content-type"].startswith("application/json")
        assert httpx.get(server.url.replace("/hello/json", "/other")).status_code == 404
        assert server.version == peers.WORKERD_VERSION
        closed = peers.wrk_max(server.url, connections=8, duration_s=1, cpu=1)
        assert closed["rps"] > 100 and closed["non_2xx"] == 0 and closed["socket_errors"] == 0
        assert 0 < closed["p50_ms"] <= closed["p99_ms"]
        opened = peers.fixed_rate_latency(server.url, rate=300, duration_s=1.5, cpu=1,
                                          connections=8, warmup_s=0.2)
        assert opened["errors"] == 0
        assert opened["rps_achieved"] == pytest.approx(300, rel=0.05)
        assert 0 < opened["p50_ms"] <= opened["p99_ms"]
    assert server.process.poll() is not None  # stopped on exit


def test_wrk_is_installed_or_installable(bench_peers: None) -> None:
    path = peers.ensure_wrk()
    assert shutil.which("wrk") == path


def test_node_red_flow_doubles_v_and_answers_on_the_out_topic(mosquitto: str) -> None:
    with peers.node_red_flow(mosquitto, "bench/+/in", "bench/+/out", cpu=0) as flow:
        assert flow.version == peers.NODE_RED_VERSION
        full = peers.mqtt_flow_load(mosquitto, "bench/d{k}/in", "bench/+/out",
                                    messages=1000, rate=None, cpu=1, devices=20,
                                    timeout_s=30)
        assert full["lost"] == 0 and full["bad"] == 0 and full["duplicates"] == 0
        assert full["received"] == 1000 and full["msgs_per_s"] > 0
        paced = peers.mqtt_flow_load(mosquitto, "bench/d{k}/in", "bench/+/out",
                                     messages=300, rate=300, cpu=1, timeout_s=30)
        assert paced["lost"] == 0 and paced["bad"] == 0
        assert 0 < paced["p50_ms"] <= paced["p99_ms"]
    assert flow.process.poll() is not None


def test_mqtt_flow_load_reports_loss_when_nothing_answers(mosquitto: str) -> None:
    out = peers.mqtt_flow_load(mosquitto, "bench/nobody{k}/in", "bench/+/nobody-out",
                               messages=50, rate=500, cpu=1, devices=5, timeout_s=5)
    assert out["received"] == 0 and out["lost"] == 50


@pytest.mark.timeout(180)
def test_http_route_harness_reports_the_shared_shape(bench_peers: None) -> None:
    # workerd stands in for the fogline side until that is plugged in.
    out = compare.compare_http_route(fogline=compare.workerd_target, quick=True)
    assert_result_shape(out, "http-route", "higher")
    assert out["conditions"]["fogline"]["errors"] == 0
    assert out["conditions"]["peer"]["half_p50_ms"] > 0


@pytest.mark.timeout(180)
def test_mqtt_flow_harness_reports_the_shared_shape(mosquitto: str) -> None:
    out = compare.compare_mqtt_flow(fogline=compare.node_red_target, quick=True)
    assert_result_shape(out, "mqtt-flow", "higher")
    assert out["conditions"]["fogline_lost"] == 0
    assert out["conditions"]["generator_ceiling_msgs_per_s"] > out["peer_figure"] > 0
