from __future__ import annotations

from pathlib import Path

from fogline.hub.nats_authority import NatsAuthority
from fogline.transport import natsjwt


def test_keys_persist_with_private_mode(tmp_path: Path) -> None:
    first = NatsAuthority.open(tmp_path)
    assert (tmp_path / "keys.json").stat().st_mode & 0o777 == 0o600
    assert NatsAuthority.open(tmp_path) == first


def test_node_jwt_is_scoped_and_carries_no_permissions(tmp_path: Path) -> None:
    authority = NatsAuthority.open(tmp_path)
    user = natsjwt.create_user_key()
    claims = natsjwt.decode_claims(authority.node_jwt("nd-1", user.public_key, 100, 200))
    assert claims["sub"] == user.public_key
    assert claims["iss"] == authority.node_signing.public_key
    assert claims["name"] == "nd-1" and claims["exp"] == 200
    assert claims["nats"] == {"type": "user", "version": 2,
                              "issuer_account": authority.fleet_account.public_key}


def test_account_template_confines_nodes_to_their_own_subjects(tmp_path: Path) -> None:
    authority = NatsAuthority.open(tmp_path)
    claims = natsjwt.decode_claims(authority.fleet_account_jwt(100, {"UABC": 101}))
    (scope,) = claims["nats"]["signing_keys"]
    assert scope["kind"] == "user_scope"
    assert scope["template"]["pub"]["allow"] == [
        "fl.node.{{name()}}.>", "$JS.API.CONSUMER.MSG.NEXT.FL_FANOUT.{{name()}}",
        "$JS.ACK.FL_FANOUT.{{name()}}.>"]
    assert "_INBOX.{{name()}}.>" in scope["template"]["sub"]["allow"]
    assert claims["nats"]["revocations"] == {"UABC": 101}
    assert claims["nats"]["limits"]["disk_storage"] == -1


def test_each_jwt_gets_a_unique_jti(tmp_path: Path) -> None:
    authority = NatsAuthority.open(tmp_path)
    a = natsjwt.decode_claims(authority.fleet_account_jwt(100, {}))
    b = natsjwt.decode_claims(authority.fleet_account_jwt(100, {}))
    assert a["jti"] != b["jti"]


def test_user_public_key_validation() -> None:
    key = natsjwt.create_user_key().public_key
    assert natsjwt.is_user_public_key(key)
    assert not natsjwt.is_user_public_key(natsjwt.create_account_key().public_key)
    tampered = key[:10] + ("B" if key[10] != "B" else "C") + key[11:]
    assert not natsjwt.is_user_public_key(tampered)
    assert not natsjwt.is_user_public_key("U" + "!" * 55)
