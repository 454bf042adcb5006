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
