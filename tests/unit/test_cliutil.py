from __future__ import annotations

import pytest

from fogline.cliutil import parse_duration_s, parse_labels
from fogline.errors import ConfigError


@pytest.mark.parametrize("text, seconds", [("90", 90), ("30s", 30), ("15m", 900),
                                           ("1h", 3600), ("2d", 172800), ("250ms", 0.25),
                                           ("0.5s", 0.5)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1y", "-1s", "1 h", "one"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid duration"):
        parse_duration_s(text)


def test_labels() -> None:
    assert parse_labels("a=1, b=two") == {"a": "1", "b": "two"}
    assert parse_labels(None) == {}
    for bad in ("a", "=x", "a=1,b"):
        with pytest.raises(ConfigError, match="invalid label"):
            parse_labels(bad)


def test_stream_policies() -> None:
    from fogline.cliutil import parse_stream_policy

    assert parse_stream_policy("alerts:priority=10,bandwidth_bps=50000") == (
        "alerts", {"priority": 10, "bandwidth_bps": 50000.0})
    assert parse_stream_policy("bulk:overflow=drop-oldest,quota_bytes=1e6") == (
        "bulk", {"overflow": "drop-oldest", "quota_bytes": 1_000_000})
    for bad, reason in [("x:priority=high", "must be a number"),
                        ("x:colour=red", "expected key=value"),
                        ("x:overflow=sometimes", "overflow must be one of"),
                        ("x:bandwidth_bps=-5", "positive"),
                        ("bad name:priority=1", "--stream")]:
        with pytest.raises(ConfigError, match=reason):
            parse_stream_policy(bad)
