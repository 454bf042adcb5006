"""Bootstrap tokens: format, hashing and the checks an enrollment must pass.

A token reads `flt_<id>_<secret>`. The hub stores only a SHA-256 of the secret, so a
leaked database does not leak usable tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from fogline.errors import AuthError

_TOKEN = re.compile(r"^flt_([a-z0-9]{10})_([A-Za-z0-9_-]{32,64})$")


@dataclass(frozen=True)
class TokenRecord:
    token_id: str
    secret_sha256: str
    created_at_s: float
    expires_at_s: float
    uses_max: int
    uses: int
    region: str = ""
    labels: tuple[tuple[str, str], ...] = ()


def new_token() -> tuple[str, str, str]:
    """A fresh token: (token text for the user, token id, secret hash to store)."""
    token_id = secrets.token_hex(5)
    secret = secrets.token_urlsafe(32)
    return f"flt_{token_id}_{secret}", token_id, hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(text: str) -> tuple[str, str]:
    """(token id, secret) of a token, or AuthError if it is not shaped like one."""
    match = _TOKEN.match(text.strip())
    if match is None:
        raise AuthError("malformed bootstrap token")
    return match.group(1), match.group(2)


def check_token(record: TokenRecord | None, secret: str, now_s: float) -> TokenRecord:
    """Raise AuthError naming why `secret` cannot enroll now; the record otherwise."""
    if record is None or not hmac.compare_digest(record.secret_sha256, hash_secret(secret)):
        raise AuthError("unknown bootstrap token")
    if now_s >= record.expires_at_s:
        raise AuthError("bootstrap token expired")
    if record.uses >= record.uses_max:
        raise AuthError("bootstrap token has no uses left")
    return record
