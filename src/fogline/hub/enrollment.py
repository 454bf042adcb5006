"""Enrollment and renewal: bootstrap token + CSR in, node identity and credentials out.

The node keeps both private keys (TLS and NATS nkey) to itself. The hub checks the
token and the CSR, assigns a node id, signs a client certificate and a NATS user JWT
bound to the node's nkey, and records the node in the registry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fogline import __version__
from fogline.clock import Clock
from fogline.core.tokens import check_token, parse_token
from fogline.errors import AuthError, ConfigError, ProtocolError
from fogline.hub.nats_authority import NatsAuthority
from fogline.hub.pki import CertificateAuthority, load_csr, public_key_fingerprint
from fogline.hub.store import HubStore
from fogline.protocol import TIERS
from fogline.transport import natsjwt


@dataclass(frozen=True)
class Credentials:
    node_id: str
    certificate_pem: str
    ca_pem: str
    nats_jwt: str
    expires_at_s: float
    # Where the hub placed the node (a token's region and labels apply when the node
    # gave none), so the node knows what the fleet knows it as.
    region: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


def _check_nats_key(public_key: str) -> None:
    if not natsjwt.is_user_public_key(public_key):
        raise ProtocolError("nats_public_key is not an nkey user public key")


def _new_node_id() -> str:
    return "nd-" + secrets.token_hex(5)


class Enrollment:
    def __init__(self, store: HubStore, ca: CertificateAuthority, authority: NatsAuthority,
                 clock: Clock, cert_lifetime_s: float, heartbeat_interval_s: float) -> None:
        self.store = store
        self.ca = ca
        self.authority = authority
        self.clock = clock
        self.cert_lifetime_s = cert_lifetime_s
        self.heartbeat_interval_s = heartbeat_interval_s

    def _credentials(self, node_id: str, csr_pem: str, nats_public_key: str,
                     now_s: float) -> tuple[Credentials, str]:
        csr = load_csr(csr_pem)
        now = dt.datetime.fromtimestamp(now_s, dt.UTC)
        lifetime = dt.timedelta(seconds=self.cert_lifetime_s)
        cert = self.ca.issue_node_certificate(csr, node_id, now, lifetime)
        expires_s = now_s + self.cert_lifetime_s
        jwt = self.authority.node_jwt(node_id, nats_public_key, int(now_s), int(expires_s))
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        creds = Credentials(
            node_id=node_id,
            certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            ca_pem=self.ca.cert_pem, nats_jwt=jwt, expires_at_s=expires_s)
        return creds, public_key_fingerprint(public_key)

    def enroll(self, request: dict[str, Any]) -> Credentials:
        """Check everything, then create the node; a rejection changes nothing."""
        now_s = self.clock.now()
        token_id, secret = parse_token(request["token"])
        record = check_token(self.store.get_token(token_id), secret, now_s)
        if request["tier"] not in TIERS:
            raise ConfigError(f"tier must be one of {', '.join(TIERS)}")
        _check_nats_key(request["nats_public_key"])
        node_id = _new_node_id()
        creds, fingerprint = self._credentials(node_id, request["csr_pem"],
                                               request["nats_public_key"], now_s)
        labels = {**dict(record.labels), **request["labels"]}
        node = {
            "id": node_id, "name": request["name"],
            "region": request["region"] or record.region, "zone": request["zone"],
            "tier": request["tier"], "labels": labels,
            "capabilities": request["capabilities"],
            "version": request["capabilities"].get("version", ""),
            "endpoint": request["endpoint"], "status": "offline",
            "status_since_s": now_s, "status_reason": "enrolled, no heartbeat yet",
            "last_seen_s": None, "interval_s": self.heartbeat_interval_s,
            "failing_streak": 0, "returns_s": [], "healthy_since_s": None, "load": {},
            "failing_checks": [], "heartbeat_seq": 0, "enrolled_at_s": now_s,
            "token_id": token_id, "key_fingerprint": fingerprint,
            "nats_public_key": request["nats_public_key"], "cert_expires_s": creds.expires_at_s,
        }
        if not self.store.enroll(token_id, now_s, node):
            raise AuthError("bootstrap token expired or has no uses left")
        creds = dataclasses.replace(creds, region=node["region"], labels=labels)
        self.store.add_event(now_s, f"token:{token_id}", "node.enrolled", node_id,
                             {"name": request["name"], "region": node["region"],
                              "hub_version": __version__})
        return creds

    def renew(self, node_id: str, csr_pem: str) -> Credentials:
        """New certificate and JWT for a node that proves it holds its registered key.

        The CSR's signature is the proof: the certificate and JWT it yields are useless
        to anyone without the node's private keys, so a replayed CSR gains nothing.
        """
        now_s = self.clock.now()
        node = self.store.get_node(node_id)
        if node["status"] == "revoked":
            raise AuthError(f"node {node_id} is revoked")
        csr = load_csr(csr_pem)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        if public_key_fingerprint(public_key) != node["key_fingerprint"]:
            raise AuthError("CSR key is not the key this node enrolled with")
        creds, _ = self._credentials(node_id, csr_pem, node["nats_public_key"], now_s)
        self.store.update_credentials(node_id, creds.expires_at_s)
        self.store.add_event(now_s, f"node:{node_id}", "node.renewed", node_id,
                             {"expires_at_s": creds.expires_at_s})
        return creds
