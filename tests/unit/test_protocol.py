from __future__ import annotations

import msgspec
import pytest

from fogline.errors import ProtocolError
from fogline.protocol import (
    MAX_MESSAGE_BYTES,
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
