from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fogline.core.tokens import TokenRecord, check_token, hash_secret, new_token, parse_token
from fogline.errors import AuthError


def record(secret: str, expires_at_s: float = 100.0, uses: int = 0,
           uses_max: int = 1) -> TokenRecord:
    return TokenRecord("0123456789", hash_secret(secret), 0.0, expires_at_s, uses_max, uses)


def test_new_token_round_trips_through_parse_and_check() -> None:
    text, token_id, secret_hash = new_token()
    parsed_id, secret = parse_token(text)
    assert parsed_id == token_id
    rec = TokenRecord(token_id, secret_hash, 0.0, 10.0, 1, 0)
    assert check_token(rec, secret, 5.0) is rec


@pytest.mark.parametrize("rec, now_s, reason", [
    (None, 0.0, "unknown"),
    (record("other"), 0.0, "unknown"),
    (record("s3cret", expires_at_s=10.0), 10.0, "expired"),
    (record("s3cret", uses=1, uses_max=1), 0.0, "no uses left"),
])
def test_check_token_names_the_reason(rec: TokenRecord | None, now_s: float,
                                      reason: str) -> None:
    with pytest.raises(AuthError, match=reason):
        check_token(rec, "s3cret", now_s)


@given(st.text(max_size=120))
def test_parse_token_rejects_anything_not_shaped_like_a_token(text: str) -> None:
    if text.strip().startswith("flt_"):
        return
    with pytest.raises(AuthError, match="malformed"):
        parse_token(text)
