"""A hub listening beyond loopback speaks only TLS 1.3, on its API and on NATS."""

from __future__ import annotations

import base64
import gc
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest

from fogline.node.identity import EnrollOptions, NodeFiles, enroll
from fogline.protocol import inbox_prefix
from tests.fleet import FOGLINE, HubProcess, run_hub, wait_for


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    data = tmp_path_factory.mktemp("tls") / "hub"
    with run_hub(data, "--heartbeat-interval", "1s", listen="0.0.0.0:0") as running:
        yield running


def host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def nats_port(hub: HubProcess) -> int:
    conf = (hub.data / "nats" / "nats-server.conf").read_text()
    return int(next(line.split(":")[1] for line in conf.splitlines()
                    if line.startswith("port:")))


def test_api_is_https_with_tls_1_3_only(hub: HubProcess) -> None:
    assert hub.url.startswith("https://")
    host, port = host_port(hub.url)
    context = ssl.create_default_context(cafile=str(hub.data / "pki" / "ca.crt"))
    with socket.create_connection((host, port)) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        assert tls.version() == "TLSv1.3"
    old = ssl.create_default_context(cafile=str(hub.data / "pki" / "ca.crt"))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{hub.url}/healthz", verify=old)
    with pytest.raises(httpx.HTTPError):
        httpx.get(hub.url.replace("https://", "http://") + "/healthz", timeout=5)
    assert httpx.get(f"{hub.url}/healthz", verify=context).json()["status"] == "ok"


def test_node_enrolls_over_https_with_the_ca_hash_and_uses_mutual_tls(
        hub: HubProcess, tmp_path: Path) -> None:
    created = hub.api("POST", "/v1/tokens", json={})
    node = hub.start_node(tmp_path / "secure", "secure", created["token"],
                          "--ca-hash", f"sha256:{created['ca_sha256']}")
    wait_for(lambda: hub.nodes_by_name().get("secure", {}).get("status") == "ready", 30,
             "node ready over TLS")
    assert node.poll() is None


def test_node_refuses_a_hub_whose_ca_does_not_match(hub: HubProcess, tmp_path: Path) -> None:
    token = hub.create_token()
    before = hub.api("GET", "/v1/nodes")
    result = subprocess.run(
        [*FOGLINE, "node", "--data", str(tmp_path / "n"), "--name", "mitm", "--hub", hub.url,
         "--token", token, "--ca-hash", "sha256:" + "0" * 64],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "does not match --ca-hash" in result.stdout + result.stderr
    # Nothing enrolled (other nodes' rows keep changing with their heartbeats).
    after = hub.api("GET", "/v1/nodes")
    assert {n["id"] for n in after} == {n["id"] for n in before}
    assert "mitm" not in {n["name"] for n in after}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_nats_requires_tls_and_a_client_certificate(hub: HubProcess,
                                                          tmp_path: Path) -> None:
    files = NodeFiles(tmp_path)
    identity = enroll(files, EnrollOptions(hub_url=hub.url, token=hub.create_token(),
                                           name="certless",
                                           ca_sha256=hub.api("GET", "/v1/ca")["sha256"]),
                      {}, time.time())
    seed, jwt = files.nkey(), files.nats_jwt.read_text().strip()
    port = nats_port(hub)

    async def connect(url: str, context: ssl.SSLContext | None) -> nats.NATS:
        kwargs = {"tls": context} if context else {}
        return await nats.connect(
            url, user_jwt_cb=lambda: jwt.encode(),
            signature_cb=lambda nonce: base64.b64encode(seed.sign(nonce.encode())),
            inbox_prefix=inbox_prefix(identity.node_id), allow_reconnect=False,
            max_reconnect_attempts=0, connect_timeout=3, **kwargs)

    no_cert = ssl.create_default_context(cafile=str(files.ca))
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
        nc = await connect(f"tls://127.0.0.1:{port}", no_cert)
        await nc.flush(timeout=2)
        await nc.close()
    with pytest.raises((nats.errors.Error, OSError, TimeoutError)):
        nc = await connect(f"nats://127.0.0.1:{port}", None)
        await nc.close()
    gc.collect()
    with_cert = ssl.create_default_context(cafile=str(files.ca))
    with_cert.load_cert_chain(files.cert, files.key)
    nc = await connect(f"tls://127.0.0.1:{port}", with_cert)
    await nc.publish(f"fl.node.{identity.node_id}.probe", b"ok")
    await nc.flush(timeout=2)
    await nc.close()
