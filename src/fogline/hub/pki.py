"""The hub's certificate authority: node client certificates from CSRs, TLS server certs.

The CA key is created at the hub's first start (mode 0600) and never leaves the hub.
Nodes generate their own keys and send only a CSR; the hub checks the CSR's signature
(proof that the sender holds the key) and issues a short-lived client certificate whose
subject and URI SAN name the node id it assigned.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fogline.errors import AuthError, ProtocolError
from fogline.fsutil import write_private

CA_LIFETIME_DAYS = 3650
MAX_CSR_BYTES = 16 * 1024


def node_uri(node_id: str) -> str:
    return f"spiffe://fogline/node/{node_id}"


def public_key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def certificate_fingerprint(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Parse a CSR and check it is signed by the key it carries."""
    if len(csr_pem) > MAX_CSR_BYTES:
        raise ProtocolError(f"CSR larger than {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise ProtocolError("CSR is not a PEM certificate signing request") from exc
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise ProtocolError("CSR key must be an EC (P-256) key")
    if not csr.is_signature_valid:
        raise AuthError("CSR signature does not match its public key")
    return csr


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fogline"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def open(cls, directory: Path, now: dt.datetime) -> CertificateAuthority:
        """Load the CA from `directory`, creating it at first start."""
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name("fogline hub CA")
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_LIFETIME_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert)

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def _builder(self, subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
                 now: dt.datetime, lifetime: dt.timedelta) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )

    def issue_node_certificate(self, csr: x509.CertificateSigningRequest, node_id: str,
                               now: dt.datetime, lifetime: dt.timedelta) -> x509.Certificate:
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return (
            self._builder(_name(node_id), public_key, now, lifetime)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(node_uri(node_id))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_hub_client_certificate(self, directory: Path,
                                     now: dt.datetime) -> tuple[Path, Path]:
        """The client certificate the hub itself presents to a mutual-TLS NATS server."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            self._builder(_name("hub"), key.public_key(), now, dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://fogline/hub")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return self._write_pair(key, cert, directory, "hub-client")

    def _write_pair(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                    directory: Path, stem: str) -> tuple[Path, Path]:
        key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.crt"
        write_private(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode())
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM)
                              + self.cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def issue_server_certificate(self, hosts: list[str], directory: Path,
                                 now: dt.datetime) -> tuple[Path, Path]:
        """A TLS server certificate for the hub's API and NATS listeners."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        cert = (
            self._builder(_name(hosts[0]), key.public_key(), now, dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return self._write_pair(key, cert, directory, "server")
