"""Purge rules (fogline.core.purge) and how a node applies purges to its caches."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fogline.clock import ManualClock
from fogline.core.purge import (
    Apply,
    CatchUp,
    Skip,
    applies_to,
    check_purge,
    next_step,
    target_path,
)
from fogline.errors import ConfigError
from fogline.node.cache_store import CacheStore, Entry
from fogline.node.purges import NodePurges, PurgeTarget
from fogline.protocol import Purge, PurgeLog, decode, encode

BASE = "http://origin.example:8080"


def purge(seq: int, kind: str = "tag", *values: str, region: str = "",
          site: str = "") -> Purge:
    return Purge(seq=seq, kind=kind, values=values or ("t",), issued_at_s=1.0,
                 region=region, site=site)


def entry(path: str, *tags: str) -> Entry:
    return Entry(key=BASE + path, variant="", metadata=b"m", body=b"b",
                 tags=frozenset(tags), stored_at_s=0.0)


@pytest.mark.parametrize(("value", "path"), [
    ("/catalog/a", "/catalog/a"),
    ("/catalog/%7Ea?x=1", "/catalog/~a?x=1"),  # unreserved characters decoded, as keys are
    ("https://shop.example/catalog/a?b=2", "/catalog/a?b=2"),
    ("HTTP://Shop.Example:80", "/"),
])
def test_purge_urls_become_normalised_paths(value: str, path: str) -> None:
    assert target_path(value) == path


@pytest.mark.parametrize(("kind", "values", "region", "site", "message"), [
    ("all", ["x"], "", "", "purge kind must be one of"),
    ("tag", [], "", "", "needs at least one value"),
    ("tag", ["a b"], "", "", "no spaces or commas"),
    ("tag", ["x" * 1025], "", "", "at most 1024"),
    ("url", ["catalog/a"], "", "", "give a path starting with /"),
    ("url", ["mailto:x@y"], "", "", "give a path starting with /"),
    ("url", ["/" + "a" * 5000], "", "", "longer than"),
    ("prefix", ["https://x.example/"], "", "", "would empty the cache"),
    ("tag", ["x"], "EU", "", "invalid region"),
    ("tag", ["x"], "", "a/b", "invalid site name"),
    ("tag", ["x"] * 65, "", "", "at most 64 values"),
])
def test_bad_purges_are_refused(kind: str, values: list[str], region: str, site: str,
                                message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_purge(kind, values, region, site)


def test_purge_values_are_checked_and_deduplicated() -> None:
    assert check_purge("url", ["/a", "https://h/a", "/b"]) == ("url", ("/a", "/b"))
    assert check_purge("tag", ["x", "x"], "eu-west", "catalog") == ("tag", ("x",))


def test_a_regional_purge_applies_in_its_region_only() -> None:
    assert applies_to(purge(1, region="eu"), "eu")
    assert not applies_to(purge(1, region="eu"), "us")
    assert applies_to(purge(1), "us")


@given(st.integers(0, 1000), st.integers(1, 1000))
def test_purges_apply_strictly_in_order(applied: int, seq: int) -> None:
    step = next_step(applied, purge(seq))
    if seq <= applied:
        assert step == Skip()
    elif seq == applied + 1:
        assert step == Apply(purge(seq))
    else:
        assert step == CatchUp(applied)


def test_purge_messages_round_trip() -> None:
    log = PurgeLog(purges=(purge(3, "url", "/a", "/b", region="eu"),), last_seq=9,
                   more=True)
    assert decode(encode(log)) == log


# Applying at a node -------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> CacheStore:
    cache = CacheStore(tmp_path / "site.db", 1 << 20, 1 << 22, ManualClock())
    for path, tags in [("/catalog/a", ("shoes",)), ("/catalog/b", ("shoes", "sale")),
                       ("/catalog/c", ("hats",)), ("/other/d", ())]:
        cache.put(entry(path, *tags))
    return cache


def node_purges(tmp_path: Path, targets: list[PurgeTarget],
                region: str = "eu") -> NodePurges:
    return NodePurges("n1", region, tmp_path / "purges.json", ManualClock(), lambda: targets)


def keys(store: CacheStore) -> list[str]:
    return sorted(k.removeprefix(BASE) for k in ("/catalog/a", "/catalog/b", "/catalog/c",
                                                 "/other/d") if store.get(BASE + k))


def test_a_node_applies_tag_url_and_prefix_purges_and_remembers_them(
        tmp_path: Path, store: CacheStore) -> None:
    target = PurgeTarget(store, "catalog", BASE, (BASE + "/",))
    purges = node_purges(tmp_path, [target])
    assert purges.apply(purge(1, "tag", "sale")) == 1
    assert keys(store) == ["/catalog/a", "/catalog/c", "/other/d"]
    assert purges.apply(purge(2, "url", "/catalog/a", "/catalog/zzz")) == 1
    assert purges.apply(purge(3, "prefix", "/other/")) == 1
    assert keys(store) == ["/catalog/c"]
    assert store.purge_seq == 3
    # Another site's purge, or another region's, removes nothing but is counted.
    assert purges.apply(purge(4, "tag", "hats", site="blog")) == 0
    assert purges.apply(purge(5, "tag", "hats", region="us")) == 0
    assert keys(store) == ["/catalog/c"]
    assert node_purges(tmp_path, [target]).applied_seq == 5  # persisted


def test_a_cache_opened_behind_the_purges_is_emptied(tmp_path: Path,
                                                     store: CacheStore) -> None:
    purges = node_purges(tmp_path, [])
    purges.apply(purge(1, "tag", "nothing-here"))
    purges.opened(PurgeTarget(store, "catalog", BASE, (BASE + "/",)))
    assert keys(store) == [] and store.purge_seq == 1
    store.put(entry("/catalog/new"))
    purges.opened(PurgeTarget(store, "catalog", BASE, (BASE + "/",)))  # caught up: kept
    assert store.get(BASE + "/catalog/new") is not None


def test_a_reset_empties_every_cache_and_continues_from_the_hub(
        tmp_path: Path, store: CacheStore) -> None:
    purges = node_purges(tmp_path, [PurgeTarget(store, "catalog", BASE, (BASE + "/",))])
    purges.reset(40)
    assert keys(store) == [] and purges.applied_seq == 40
    assert next_step(purges.applied_seq, purge(41)) == Apply(purge(41))


def test_an_unreadable_state_file_starts_over(tmp_path: Path) -> None:
    (tmp_path / "purges.json").write_text("{not json")
    assert node_purges(tmp_path, []).applied_seq == 0
