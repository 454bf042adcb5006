"""A node's identity on disk and how it gets one: enrollment and renewal.

Everything lives in the node's data dir: `identity.json`, the TLS key and certificate,
the CA certificate, the NATS nkey seed and JWT. Private keys are created here and
never sent; a restart reuses them, so a node enrolls once.

cryptography and httpx are imported inside the functions that need them: an enrolled
node uses them only when it renews, and not loading them keeps an idle node ~15 MB
smaller.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fogline.errors import AuthError, ConfigError, RetryableError
from fogline.fsutil import write_private
from fogline.transport.natsjwt import NKey, create_user_key

HTTP_TIMEOUT_S = 10.0


@dataclass
class Identity:
    node_id: str
    name: str
    region: str
    zone: str
    tier: str
    labels: dict[str, str]
    hub_url: str
    nats_urls: list[str]
    heartbeat_interval_s: float
    issued_at_s: float
    expires_at_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EnrollOptions:
    hub_url: str
    token: str
    name: str
    region: str = ""
    zone: str = ""
    tier: str = "near"
    labels: dict[str, str] = field(default_factory=dict)
    endpoint: str = ""
    ca_sha256: str | None = None


class NodeFiles:
    """Paths and loaders for the node's data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.identity = data_dir / "identity.json"
        self.key = data_dir / "node.key"
        self.cert = data_dir / "node.crt"
        self.ca = data_dir / "ca.crt"
        self.nats_seed = data_dir / "nats.seed"
        self.nats_jwt = data_dir / "nats.jwt"

    def enrolled(self) -> bool:
        return self.identity.exists()

    def load_identity(self) -> Identity:
        return Identity(**json.loads(self.identity.read_text()))

    def save_identity(self, identity: Identity) -> None:
        write_private(self.identity, json.dumps(asdict(identity), indent=2))

    def private_key(self) -> Any:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        if not self.key.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            write_private(self.key, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()).decode())
        key = serialization.load_pem_private_key(self.key.read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{self.key} is not an EC private key")
        return key

    def nkey(self) -> NKey:
        if not self.nats_seed.exists():
            write_private(self.nats_seed, create_user_key().seed)
        return NKey(self.nats_seed.read_text().strip())

    def csr_pem(self, common_name: str) -> str:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import NameOID

        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .sign(self.private_key(), hashes.SHA256()))
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    def save_credentials(self, response: dict[str, Any]) -> None:
        self.ca.write_text(response["ca_pem"])
        self.cert.write_text(response["certificate_pem"])
        write_private(self.nats_jwt, response["nats_jwt"])


def _verify_for(hub_url: str, files: NodeFiles, ca_sha256: str | None) -> ssl.SSLContext | bool:
    """How to trust the hub: plain HTTP on loopback, else TLS 1.3 with the hub's CA.

    On first contact the CA is fetched and accepted only if its SHA-256 matches the
    fingerprint printed by `fogline token create` (as kubeadm's discovery hash does).
    """
    if not hub_url.startswith("https://"):
        return True
    if not files.ca.exists():
        import httpx
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        if not ca_sha256:
            raise ConfigError("the hub uses HTTPS: pass --ca-hash from `fogline token create`")
        response = httpx.get(f"{hub_url}/v1/ca", verify=False, timeout=HTTP_TIMEOUT_S)
        pem = response.json()["ca_pem"]
        der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(
            serialization.Encoding.DER)
        if hashlib.sha256(der).hexdigest() != ca_sha256.removeprefix("sha256:"):
            raise AuthError("the hub's CA does not match --ca-hash; refusing to enroll")
        files.ca.write_text(pem)
    context = ssl.create_default_context(cafile=str(files.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def _post(url: str, body: dict[str, Any], verify: ssl.SSLContext | bool) -> dict[str, Any]:
    import httpx

    try:
        response = httpx.post(url, json=body, verify=verify, timeout=HTTP_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise RetryableError(f"hub unreachable at {url}: {exc}", delay_s=2.0) from exc
    if response.status_code in (401, 403):
        raise AuthError(f"hub refused: {response.json().get('detail', response.text)}")
    if response.status_code >= 500:
        raise RetryableError(f"hub error {response.status_code}: {response.text[:200]}")
    if response.status_code >= 400:
        raise ConfigError(f"hub rejected the request ({response.status_code}): "
                          f"{response.text[:500]}")
    return dict(response.json())


def enroll(files: NodeFiles, options: EnrollOptions, capabilities: dict[str, Any],
           now_s: float) -> Identity:
    """Enroll with a bootstrap token; keys are made here and only public parts leave."""
    verify = _verify_for(options.hub_url, files, options.ca_sha256)
    body = {
        "token": options.token, "csr_pem": files.csr_pem(options.name),
        "nats_public_key": files.nkey().public_key, "name": options.name,
        "region": options.region, "zone": options.zone, "tier": options.tier,
        "labels": options.labels, "capabilities": capabilities, "endpoint": options.endpoint,
    }
    response = _post(f"{options.hub_url}/v1/enroll", body, verify)
    files.save_credentials(response)
    identity = Identity(
        node_id=response["node_id"], name=options.name,
        region=response.get("region") or options.region, zone=options.zone,
        tier=options.tier, labels=response.get("labels") or options.labels,
        hub_url=options.hub_url, nats_urls=response["nats_urls"],
        heartbeat_interval_s=response["heartbeat_interval_s"], issued_at_s=now_s,
        expires_at_s=response["expires_at_s"])
    files.save_identity(identity)
    return identity


def renew(files: NodeFiles, identity: Identity, now_s: float) -> Identity:
    """New certificate and NATS JWT for the same keys, before the old ones expire."""
    verify = _verify_for(identity.hub_url, files, None)
    response = _post(f"{identity.hub_url}/v1/nodes/{identity.node_id}/renew",
                     {"csr_pem": files.csr_pem(identity.node_id)}, verify)
    files.save_credentials(response)
    identity.issued_at_s = now_s
    identity.expires_at_s = response["expires_at_s"]
    identity.nats_urls = response["nats_urls"]
    files.save_identity(identity)
    return identity
