"""Which site a request goes to (fogline.node.sites.match)."""

from __future__ import annotations

from typing import Any

from fogline.node.sites import match
from fogline.protocol import SiteSetting


class _Fake:
    def __init__(self, setting: SiteSetting) -> None:
        self.setting = setting


def sites(*settings: SiteSetting) -> dict[str, Any]:
    return {s.name: _Fake(s) for s in settings}


A = SiteSetting(name="a", origin="http://a", path_prefixes=("/cat",))
B = SiteSetting(name="b", origin="http://b", path_prefixes=("/cat/big/",))
H = SiteSetting(name="h", origin="http://h", hosts=("h.example",))


def named(host: str, path: str) -> str | None:
    found = match(sites(A, B, H), host, path)
    return found.setting.name if found else None


def test_prefixes_match_whole_segments_and_the_longest_wins() -> None:
    assert named("node", "/cat") == "a"
    assert named("node", "/cat/x") == "a"
    assert named("node", "/catalogue") is None
    assert named("node", "/cat/big") == "b"
    assert named("node", "/cat/big/y") == "b"


def test_a_host_match_comes_before_prefixes() -> None:
    assert named("h.example", "/cat/x") == "h"
    assert named("other.example", "/x") is None
