from __future__ import annotations

import msgspec
import pytest

from fogline.errors import ProtocolError
from fogline.protocol import (
    APP_REASON_CHARS_MAX,
    APP_STATES,
    APPS_PER_NODE_MAX,
    MAX_MESSAGE_BYTES,
    AppStatus,
    Command,
    Heartbeat,
    Load,
    decode,
    encode,
    heartbeat_subject,
    node_id_from_subject,
    valid_node_id,
)


def test_heartbeat_round_trips() -> None:
    hb = Heartbeat(node_id="nd-1", seq=7, sent_at_s=1.5, interval_s=5.0, version="0.1.0",
                   load=Load(cpu_percent=3.0), failing_checks=("disk",))
    assert decode(encode(hb)) == hb
    assert decode(encode(Command("revoked", "why"))) == Command("revoked", "why")


def test_unknown_version_is_refused() -> None:
    data = encode(Heartbeat(node_id="n", seq=1, sent_at_s=0, interval_s=1, version="x", v=99))
    with pytest.raises(ProtocolError, match="unsupported protocol version 99"):
        decode(data)


@pytest.mark.parametrize("data", [b"", b"\xc1", msgspec.msgpack.encode({"type": "nope"}),
                                  msgspec.msgpack.encode({"type": "hb", "seq": "x"})])
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        decode(data)


def test_oversize_messages_are_refused_before_decoding() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(b"\x00" * (MAX_MESSAGE_BYTES + 1))


def test_subjects_and_node_ids() -> None:
    assert node_id_from_subject(heartbeat_subject("nd-abc")) == "nd-abc"
    with pytest.raises(ProtocolError):
        node_id_from_subject("other.subject")
    assert valid_node_id("nd-0a1b2c")
    for bad in ("a.b", "a*", "a>", "a b", "", "A"):
        assert not valid_node_id(bad)


def _heartbeat_fields(**extra: object) -> dict[str, object]:
    return {"type": "hb", "node_id": "nd-1", "seq": 1, "sent_at_s": 0.0, "interval_s": 5.0,
            "version": "0.1.0", **extra}


def test_heartbeat_carries_app_status() -> None:
    apps = (AppStatus("factory", "1.2.0", "running", since_s=10.0),
            AppStatus("vision", "0.3.0", "failed", restarts=3,
                      reason="crashed: exit code 1 (3 times in 60 s)", since_s=12.5))
    hb = Heartbeat(node_id="nd-1", seq=2, sent_at_s=1.0, interval_s=5.0, version="0.1.0",
                   apps=apps)
    assert decode(encode(hb)) == hb
    assert APP_STATES == ("starting", "running", "restarting", "failed", "stopped")


def test_heartbeat_of_a_node_without_apps_still_decodes() -> None:
    # What a node from before app status sends: no `apps` field at all.
    hb = decode(msgspec.msgpack.encode(_heartbeat_fields()))
    assert isinstance(hb, Heartbeat) and hb.apps == ()


@pytest.mark.parametrize("app", [
    {"name": "a", "version": "1", "state": "exploded"},
    {"name": "a", "version": "1", "state": "running", "restarts": -1},
    {"name": "a" * 65, "version": "1", "state": "running"},
    {"version": "1", "state": "running"},
])
def test_bad_app_status_refuses_the_heartbeat(app: dict[str, object]) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        decode(msgspec.msgpack.encode(_heartbeat_fields(apps=[app])))


def test_long_reasons_are_cut_not_refused() -> None:
    long = AppStatus("a", "1", "failed", reason="Traceback ..." + "x" * 5000)
    hb = decode(msgspec.msgpack.encode(_heartbeat_fields(apps=[msgspec.to_builtins(long)])))
    assert isinstance(hb, Heartbeat) and hb.apps == (long,)
    clipped = long.clipped()
    assert len(clipped.reason) == APP_REASON_CHARS_MAX and clipped.reason.endswith("…")
    assert clipped.reason.startswith("Traceback ...")
    short = AppStatus("a", "1", "failed", reason="oom")
    assert short.clipped() is short


def test_too_many_apps_refuse_the_heartbeat() -> None:
    apps = [{"name": f"a{i}", "version": "1", "state": "running"}
            for i in range(APPS_PER_NODE_MAX + 1)]
    with pytest.raises(ProtocolError, match="malformed"):
        decode(msgspec.msgpack.encode(_heartbeat_fields(apps=apps)))
