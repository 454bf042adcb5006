"""Minting NATS decentralized-auth JWTs (operator mode) with nkeys.

fogline's hub is the operator of its NATS deployment: it owns the operator key, a
system account and one fleet account. Each node gets a user JWT signed by a *scoped*
signing key of the fleet account, whose template confines the user to its own
subjects (`fl.node.<id>.>` out, `fl.cmd.<id>` and `_INBOX.<id>.>` in). Subject rules
therefore live in the account JWT, and enrollment code cannot over-grant.

The claim layout follows nats-io/jwt v2. Missing limits mean zero to the server, so
every limit is written out explicitly.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass

import nkeys

UNLIMITED = -1

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class NKey:
    """An nkey seed and its public key (`O...`, `A...`, `U...`)."""

    seed: str

    @classmethod
    def create(cls, prefix: int) -> NKey:
        return cls(nkeys.encode_seed(os.urandom(32), prefix).decode())

    @property
    def public_key(self) -> str:
        return _keypair(self.seed).public_key.decode()

    def sign(self, data: bytes) -> bytes:
        return _keypair(self.seed).sign(data)


def _keypair(seed: str) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(seed.encode()))


def is_user_public_key(text: str) -> bool:
    """Whether `text` is a well-formed nkey user public key (prefix and CRC checked)."""
    if len(text) != 56 or not text.startswith("U"):
        return False
    try:
        raw = base64.b32decode(text)
    except ValueError:
        return False
    body, checksum = raw[:-2], raw[-2:]
    return nkeys.crc16(bytearray(body)).to_bytes(2, "little") == checksum


def create_operator_key() -> NKey:
    return NKey.create(nkeys.PREFIX_BYTE_OPERATOR)


def create_account_key() -> NKey:
    return NKey.create(nkeys.PREFIX_BYTE_ACCOUNT)


def create_user_key() -> NKey:
    return NKey.create(nkeys.PREFIX_BYTE_USER)


def encode_jwt(issuer: NKey, subject: str, name: str, nats: dict, iat_s: int,
               exp_s: int | None = None) -> str:
    """Sign claims with the issuer's seed; every JWT gets a unique `jti`.

    The full resolver ignores an update whose jti it has already stored, so a random
    jti makes each re-issued account JWT count as new.
    """
    claims: dict[str, object] = {
        "jti": secrets.token_hex(16).upper(),
        "iat": iat_s,
        "iss": issuer.public_key,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    if exp_s is not None:
        claims["exp"] = exp_s
    head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{head}.{body}".encode()
    return f"{head}.{body}.{_b64(issuer.sign(signing_input))}"


def decode_claims(token: str) -> dict:
    """The claims of a JWT, without checking the signature (for display and tests)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT")
    return json.loads(_b64decode(parts[1]))


def operator_jwt(operator: NKey, system_account: str, iat_s: int) -> str:
    nats = {"type": "operator", "system_account": system_account, "signing_keys": []}
    return encode_jwt(operator, operator.public_key, "fogline", nats, iat_s)


def _account_limits(jetstream: bool) -> dict[str, object]:
    limits: dict[str, object] = {
        "subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED,
        "imports": UNLIMITED, "exports": UNLIMITED, "wildcards": True,
        "conn": UNLIMITED, "leaf": UNLIMITED,
    }
    if jetstream:
        limits.update({
            "mem_storage": UNLIMITED, "disk_storage": UNLIMITED, "streams": UNLIMITED,
            "consumer": UNLIMITED, "max_ack_pending": UNLIMITED,
            "mem_max_stream_bytes": UNLIMITED, "disk_max_stream_bytes": UNLIMITED,
            "max_bytes_required": False,
        })
    return limits


def node_permissions_template() -> dict[str, object]:
    """What any node may do, expressed once for the scoped signing key."""
    return {
        # Its own subjects, plus pulling from and acking its own durable consumer on the
        # collection fan-out stream (the hub creates that consumer, the node cannot).
        "pub": {"allow": ["fl.node.{{name()}}.>",
                          "$JS.API.CONSUMER.MSG.NEXT.FL_FANOUT.{{name()}}",
                          "$JS.ACK.FL_FANOUT.{{name()}}.>"]},
        # Commands for it alone, and the fleet's cache purges (one broadcast subject).
        "sub": {"allow": ["fl.cmd.{{name()}}", "fl.cmd.{{name()}}.>", "fl.purge",
                          "_INBOX.{{name()}}.>"]},
        "resp": {"max": 1, "ttl": 0},
        "subs": UNLIMITED, "data": UNLIMITED, "payload": UNLIMITED,
    }


def account_jwt(operator: NKey, account: NKey, name: str, iat_s: int, *,
                jetstream: bool, node_signing_key: str | None = None,
                revocations: dict[str, int] | None = None) -> str:
    nats: dict[str, object] = {"type": "account", "limits": _account_limits(jetstream),
                               "default_permissions": {"pub": {}, "sub": {}}}
    if node_signing_key is not None:
        nats["signing_keys"] = [{
            "kind": "user_scope", "key": node_signing_key, "role": "node",
            "template": node_permissions_template(), "description": "fogline nodes",
        }]
    if revocations:
        nats["revocations"] = dict(sorted(revocations.items()))
    return encode_jwt(operator, account.public_key, name, nats, iat_s)


def unrestricted_user_jwt(account: NKey, user_public_key: str, name: str, iat_s: int) -> str:
    nats = {"type": "user", "pub": {}, "sub": {}, "subs": UNLIMITED, "data": UNLIMITED,
            "payload": UNLIMITED}
    return encode_jwt(account, user_public_key, name, nats, iat_s)


def scoped_user_jwt(signing_key: NKey, account_public_key: str, user_public_key: str,
                    name: str, iat_s: int, exp_s: int) -> str:
    """A user JWT under a scoped signing key carries no permissions of its own."""
    nats = {"type": "user", "issuer_account": account_public_key}
    return encode_jwt(signing_key, user_public_key, name, nats, iat_s, exp_s)


def creds_file(user_jwt: str, user: NKey) -> str:
    """The `.creds` format that nats-py (`user_credentials=`) and the nats CLI read."""
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed}\n"
        "------END USER NKEY SEED------\n"
    )
