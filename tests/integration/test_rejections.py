"""Every way in that must be refused is refused, with a reason, and changes nothing."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fogline.errors import AuthError, ConfigError
from fogline.node.identity import EnrollOptions, NodeFiles, enroll
from tests.fleet import HubProcess, connect_as, enrolled_node, run_hub


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    with run_hub(tmp_path_factory.mktemp("rejections") / "hub") as running:
        yield running


def snapshot(hub: HubProcess) -> tuple[Any, Any]:
    return hub.api("GET", "/v1/nodes"), hub.api("GET", "/v1/tokens")


def enroll_body(files: NodeFiles, token: str, name: str, **overrides: Any) -> dict[str, Any]:
    body = {"token": token, "csr_pem": files.csr_pem(name),
            "nats_public_key": files.nkey().public_key, "name": name, "tier": "near"}
    return {**body, **overrides}


def post_enroll(hub: HubProcess, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{hub.url}/v1/enroll", json=body, timeout=10, **kwargs)


def assert_refused_without_change(hub: HubProcess, response: httpx.Response, status: int,
                                  reason: str, before: tuple[Any, Any]) -> None:
    assert response.status_code == status, response.text
    assert reason in response.text
    assert snapshot(hub) == before


def test_expired_token_is_refused(hub: HubProcess, tmp_path: Path) -> None:
    token = hub.create_token(ttl_s=0.2)
    time.sleep(0.4)
    before = snapshot(hub)
    response = post_enroll(hub, enroll_body(NodeFiles(tmp_path), token, "late"))
    assert_refused_without_change(hub, response, 401, "expired", before)


def test_used_up_token_is_refused(hub: HubProcess, tmp_path: Path) -> None:
    token = hub.create_token(uses=1)
    first = post_enroll(hub, enroll_body(NodeFiles(tmp_path / "a"), token, "once"))
    assert first.status_code == 201
    before = snapshot(hub)
    response = post_enroll(hub, enroll_body(NodeFiles(tmp_path / "b"), token, "twice"))
    assert_refused_without_change(hub, response, 401, "no uses left", before)


def test_unknown_and_malformed_tokens_are_refused(hub: HubProcess, tmp_path: Path) -> None:
    before = snapshot(hub)
    files = NodeFiles(tmp_path)
    forged = "flt_0123456789_" + "A" * 43
    response = post_enroll(hub, enroll_body(files, forged, "forged"))
    assert_refused_without_change(hub, response, 401, "unknown bootstrap token", before)
    response = post_enroll(hub, enroll_body(files, "not-a-token", "junk"))
    assert_refused_without_change(hub, response, 401, "malformed bootstrap token", before)


def test_garbage_csr_is_refused(hub: HubProcess, tmp_path: Path) -> None:
    token = hub.create_token()
    before = snapshot(hub)
    body = enroll_body(NodeFiles(tmp_path), token, "garbage", csr_pem="-----BEGIN junk")
    response = post_enroll(hub, body)
    assert_refused_without_change(hub, response, 400, "not a PEM certificate signing", before)


def _der_length(data: bytes, offset: int) -> tuple[int, int]:
    """(length, offset of content) of the DER element whose length byte is at offset."""
    first = data[offset]
    if first < 0x80:
        return first, offset + 1
    count = first & 0x7F
    return int.from_bytes(data[offset + 1:offset + 1 + count], "big"), offset + 1 + count


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def csr_signed_by_other_key(name: str) -> str:
    """A CSR that names key A but carries a signature made with key B."""
    claimed, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(claimed, hashes.SHA256()))
    der = csr.public_bytes(serialization.Encoding.DER)
    _, body = _der_length(der, 1)
    tbs = csr.tbs_certrequest_bytes
    assert der[body:body + len(tbs)] == tbs
    algorithm_start = body + len(tbs)
    algorithm_length, algorithm_body = _der_length(der, algorithm_start + 1)
    algorithm = der[algorithm_start:algorithm_body + algorithm_length]
    signature = other.sign(tbs, ec.ECDSA(hashes.SHA256()))
    forged = _der(0x30, tbs + algorithm + _der(0x03, b"\x00" + signature))
    return x509.load_der_x509_csr(forged).public_bytes(serialization.Encoding.PEM).decode()


def test_csr_signed_by_a_different_key_is_refused(hub: HubProcess, tmp_path: Path) -> None:
    token = hub.create_token()
    before = snapshot(hub)
    body = enroll_body(NodeFiles(tmp_path), token, "forger",
                       csr_pem=csr_signed_by_other_key("forger"))
    response = post_enroll(hub, body)
    assert_refused_without_change(hub, response, 401, "signature does not match", before)


def test_bad_nats_key_and_bad_fields_are_refused(hub: HubProcess, tmp_path: Path) -> None:
    token = hub.create_token()
    files = NodeFiles(tmp_path)
    before = snapshot(hub)
    response = post_enroll(hub, enroll_body(files, token, "k", nats_public_key="U" + "A" * 55))
    assert_refused_without_change(hub, response, 400, "nkey user public key", before)
    response = post_enroll(hub, enroll_body(files, token, "k", tier="orbit"))
    assert_refused_without_change(hub, response, 422, "tier must be one of", before)
    response = post_enroll(hub, enroll_body(files, token, "bad name!"))
    assert_refused_without_change(hub, response, 422, "name", before)


def test_api_requires_the_admin_token(hub: HubProcess) -> None:
    before = snapshot(hub)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": hub.token}):
        for method, path in (("GET", "/v1/nodes"), ("POST", "/v1/tokens"), ("GET", "/metrics"),
                             ("GET", "/openapi.json"), ("GET", "/v1/collections"),
                             ("POST", "/v1/nodes/nd-0000000000/revoke")):
            response = httpx.request(method, f"{hub.url}{path}", headers=headers, json={},
                                     timeout=10)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["detail"] == "admin token required"
    assert httpx.get(f"{hub.url}/healthz").json()["status"] == "ok"
    schema = hub.api("GET", "/openapi.json")
    assert "/v1/enroll" in schema["paths"] and "/v1/nodes/{node_id}/revoke" in schema["paths"]
    assert snapshot(hub) == before


def test_malformed_json_gets_422_with_a_reason(hub: HubProcess) -> None:
    before = snapshot(hub)
    response = httpx.post(f"{hub.url}/v1/tokens", content=b"{not json",
                          headers={"Authorization": f"Bearer {hub.token}",
                                   "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"
    for bad in ({"uses": 0}, {"ttl_s": -5}, {"labels": {"bad key!": "x"}}, {"uses": "many"}):
        response = httpx.post(f"{hub.url}/v1/tokens", json=bad, timeout=10,
                              headers={"Authorization": f"Bearer {hub.token}"})
        assert response.status_code == 422, bad
        assert response.json()["detail"][0]["msg"]
    assert snapshot(hub) == before


# NATS ------------------------------------------------------------------------------

def _nats_url_from_enrollment(hub: HubProcess) -> str:
    conf = (hub.data / "nats" / "nats-server.conf").read_text()
    port = next(line.split(":")[1].strip() for line in conf.splitlines()
                if line.startswith("port:"))
    return f"nats://127.0.0.1:{port}"


# nats-py leaves the socket of a refused connection to the garbage collector; collect
# it inside the test that caused it so the warning is not blamed on the next test.
leaks_refused_socket = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@leaks_refused_socket
async def test_nats_refuses_connections_without_credentials(hub: HubProcess) -> None:
    with pytest.raises(nats.errors.Error, match=r"[Aa]uthorization"):
        nc = await nats.connect(_nats_url_from_enrollment(hub), allow_reconnect=False,
                                connect_timeout=3, max_reconnect_attempts=0)
        await nc.close()
    gc.collect()


async def test_node_cannot_use_another_nodes_subjects(hub: HubProcess, tmp_path: Path) -> None:
    url = _nats_url_from_enrollment(hub)
    files_a, id_a = enrolled_node(hub, tmp_path / "a", "perm-a")
    files_b, id_b = enrolled_node(hub, tmp_path / "b", "perm-b")
    errors: list[Exception] = []
    a = await connect_as(files_a, id_a, url, errors)
    b = await connect_as(files_b, id_b, url)
    try:
        received: list[str] = []

        async def on_msg(msg: Any) -> None:
            received.append(msg.subject)

        await b.subscribe(f"fl.cmd.{id_b}", cb=on_msg)
        await a.subscribe(f"fl.cmd.{id_b}", cb=on_msg)  # not a's subject
        await a.publish(f"fl.node.{id_b}.hb", b"spoof")  # not a's subject
        await a.publish(f"fl.node.{id_a}.hb", b"own")  # allowed
        await a.flush()
        wait_errors = 0
        while len(errors) < 2 and wait_errors < 40:
            await asyncio.sleep(0.05)
            wait_errors += 1
        text = " ".join(str(e) for e in errors)
        assert f'permissions violation for subscription to "fl.cmd.{id_b}"' in text
        assert f'permissions violation for publish to "fl.node.{id_b}.hb"' in text
        assert not a.is_closed  # the violation is refused; the node's own link stays up
    finally:
        await a.close()
        await b.close()


@leaks_refused_socket
async def test_revoked_node_is_cut_off_and_refused(hub: HubProcess, tmp_path: Path) -> None:
    url = _nats_url_from_enrollment(hub)
    files, node_id = enrolled_node(hub, tmp_path / "r", "revokee")
    nc = await connect_as(files, node_id, url)
    revoked_at = time.monotonic()
    await asyncio.to_thread(hub.api, "POST", f"/v1/nodes/{node_id}/revoke",
                            json={"reason": "stolen device"})
    while not nc.is_closed and time.monotonic() - revoked_at < 10:
        await asyncio.sleep(0.02)
    assert nc.is_closed, "revoked node still connected after 10 s"
    assert "revoked" in str(nc.last_error).lower()
    with pytest.raises(nats.errors.Error, match=r"[Rr]evoked|[Aa]uthorization"):
        again = await connect_as(files, node_id, url)
        await again.close()
    gc.collect()
    node = hub.api("GET", f"/v1/nodes/{node_id}")
    assert node["status"] == "revoked"
    assert node["status_reason"] == "stolen device"
    # Renewal is refused too, so the node cannot mint itself fresh credentials.
    response = httpx.post(f"{hub.url}/v1/nodes/{node_id}/renew",
                          json={"csr_pem": files.csr_pem(node_id)}, timeout=10)
    assert response.status_code == 401 and "revoked" in response.text


def test_renewal_with_a_different_key_is_refused(hub: HubProcess, tmp_path: Path) -> None:
    _, node_id = enrolled_node(hub, tmp_path / "k", "rekey")
    stranger = NodeFiles(tmp_path / "stranger")
    before = hub.api("GET", f"/v1/nodes/{node_id}")
    response = httpx.post(f"{hub.url}/v1/nodes/{node_id}/renew",
                          json={"csr_pem": stranger.csr_pem(node_id)}, timeout=10)
    assert response.status_code == 401
    assert "not the key this node enrolled with" in response.text
    assert hub.api("GET", f"/v1/nodes/{node_id}") == before


def test_node_cli_reports_a_refused_token_clearly(hub: HubProcess, tmp_path: Path) -> None:
    files = NodeFiles(tmp_path)
    with pytest.raises(AuthError, match="unknown bootstrap token"):
        enroll(files, EnrollOptions(hub_url=hub.url, token="flt_0123456789_" + "B" * 43,
                                    name="cli"), {}, time.time())
    with pytest.raises(ConfigError, match="already enrolled"):
        token = hub.create_token(uses=2)
        enroll(NodeFiles(tmp_path / "1"), EnrollOptions(hub.url, token, "dup"), {}, time.time())
        enroll(NodeFiles(tmp_path / "2"), EnrollOptions(hub.url, token, "dup"), {}, time.time())
