"""The edge cache's storage: two tiers, LRU by bytes, purges, reopen, rejections.

Real SQLite files in tmp_path; `flush()` waits for the write-behind where a test needs
the disk tier to hold what was put.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fogline.clock import ManualClock
from fogline.errors import ConfigError
from fogline.node.cache_store import (
    ENTRY_OVERHEAD_BYTES,
    CacheStore,
    Entry,
    entry_bytes,
)
from fogline.node.cache_store_disk import prefix_upper_bound

BODY_BYTES = 1000
# An entry made by `make` with a short key weighs about this much.
ENTRY_BYTES = BODY_BYTES + ENTRY_OVERHEAD_BYTES + 20


def make(key: str, variant: str = "", body: bytes | None = None,
         tags: frozenset[str] = frozenset()) -> Entry:
    return Entry(key, variant, b"meta:" + key.encode(), body if body is not None
                 else (key + variant).encode().ljust(BODY_BYTES, b"."), tags, 1_700_000_000.0)


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator:
    stores: list[CacheStore] = []

    def opener(memory_bytes_max: int = 100 * ENTRY_BYTES,
               disk_bytes_max: int = 1000 * ENTRY_BYTES, name: str = "cache.db",
               **kwargs: int) -> CacheStore:
        store = CacheStore(tmp_path / name, memory_bytes_max, disk_bytes_max, ManualClock(),
                           **kwargs)
        stores.append(store)
        return store

    yield opener
    for store in stores:
        store.close()


@contextmanager
def stalled_disk(store: CacheStore) -> Iterator[None]:
    """Hold the store's writer thread (a slow disk) so that puts stay written behind."""
    release = threading.Event()
    started = threading.Event()

    def hold(_conn: object) -> None:
        started.set()
        release.wait(10)

    store._writer.submit_sync(hold)  # the one place a test reaches inside the store
    started.wait(10)
    try:
        yield
    finally:
        release.set()


def test_memory_evicts_least_recently_used_by_bytes() -> None:
    store = CacheStore(None, 3 * ENTRY_BYTES, 0, ManualClock())
    for key in ("a", "b", "c"):
        store.put(make(key))
    assert store.get("a") is not None  # a is now the most recent
    store.put(make("d"))
    assert store.get("b") is None
    assert [store.get(k) is not None for k in ("a", "c", "d")] == [True, True, True]
    stats = store.stats()
    assert stats.memory_entries == 3 and stats.memory_evictions == 1
    assert stats.memory_bytes == sum(entry_bytes(make(k)) for k in "acd")
    assert stats.memory_bytes <= 3 * ENTRY_BYTES


def test_disk_evicts_least_recently_used_by_bytes(open_store) -> None:
    store = open_store(memory_bytes_max=ENTRY_BYTES, disk_bytes_max=3 * ENTRY_BYTES)
    for key in ("a", "b", "c"):
        store.put(make(key))
    store.flush()
    assert store.get("a") is not None  # read from disk: a is recent again
    store.put(make("d"))
    store.flush()
    stats = store.stats()
    assert stats.disk_evictions == 1 and stats.disk_entries == 3
    assert stats.disk_bytes <= 3 * ENTRY_BYTES
    store.close()
    reopened = open_store(memory_bytes_max=ENTRY_BYTES, disk_bytes_max=3 * ENTRY_BYTES)
    assert [reopened.get(k) is not None for k in "abcd"] == [True, False, True, True]


def test_a_memory_miss_reads_the_disk_and_promotes(open_store) -> None:
    store = open_store()
    store.put(make("https://x/a", tags=frozenset({"t1", "t2"})))
    store.close()
    store = open_store()
    entry = store.get("https://x/a")
    assert entry == make("https://x/a", tags=frozenset({"t1", "t2"}))
    assert store.get("https://x/a") is entry
    stats = store.stats()
    assert (stats.memory_misses, stats.disk_hits, stats.memory_hits) == (1, 1, 1)
    assert store.get("https://x/none") is None
    assert store.stats().disk_misses == 1


def test_entries_and_purge_seq_survive_reopen(open_store) -> None:
    store = open_store()
    for i in range(20):
        store.put(make(f"k{i}", variant=f"v{i % 2}"))
    assert store.purge_url("k0", seq=7) == 1
    store.close()
    store = open_store()
    assert store.purge_seq == 7
    assert store.stats().disk_entries == 19
    assert store.get("k0", "v0") is None
    assert all(store.get(f"k{i}", f"v{i % 2}") == make(f"k{i}", f"v{i % 2}")
               for i in range(1, 20))


def test_variants_come_from_both_tiers(open_store) -> None:
    store = open_store(memory_bytes_max=2 * ENTRY_BYTES)
    for variant in ("gzip", "br", ""):
        store.put(make("k", variant))
    store.put(make("other", "x"))
    assert store.variants("k") == ["", "br", "gzip"]
    assert store.get("k", "br") == make("k", "br")
    assert store.get("k", "zstd") is None
    assert store.delete("k", "br") == 1
    assert store.variants("k") == ["", "gzip"]
    assert store.delete("k") == 2
    assert store.variants("k") == []
    assert store.variants("other") == ["x"]


def test_remembered_variants_follow_puts_and_purges(open_store) -> None:
    store = open_store(memory_bytes_max=2 * ENTRY_BYTES)
    assert store.variants("k") == []          # remembered: nothing stored
    store.put(make("k", "gzip"))
    assert store.variants("k") == ["gzip"]    # a put forgets the key's answer
    assert store.variants("k") == ["gzip"]    # now remembered
    store.put(make("k", ""))
    store.put(make("x"))
    store.put(make("y"))                      # k's variants leave memory: disk only
    store.flush()
    assert store.variants("k") == ["", "gzip"]
    assert store.get("k", "gzip") == make("k", "gzip")
    assert store.purge_prefix("k") == 2
    assert store.variants("k") == []
    assert store.get("k", "") is None


def _tagged_store(open_store) -> CacheStore:
    """Entries in memory only, on disk only, and both; some still being written."""
    store = open_store(memory_bytes_max=4 * ENTRY_BYTES)
    for i in range(8):  # k0..k3 fall out of memory: on disk only
        store.put(make(f"https://s/a/{i}", tags=frozenset({f"t{i % 2}", "all"})))
    store.flush()
    for i in range(8, 10):  # queued behind the writer, maybe not yet written
        store.put(make(f"https://s/b/{i}", tags=frozenset({f"t{i % 2}", "all"})))
    return store


def _served(store: CacheStore) -> set[str]:
    keys = [f"https://s/a/{i}" for i in range(8)] + [f"https://s/b/{i}" for i in (8, 9)]
    return {key for key in keys if store.get(key) is not None}


@pytest.mark.parametrize(("purge", "gone"), [
    (lambda s: s.purge_tags({"t1"}), {"https://s/a/1", "https://s/a/3", "https://s/a/5",
                                      "https://s/a/7", "https://s/b/9"}),
    (lambda s: s.purge_url("https://s/a/2"), {"https://s/a/2"}),
    (lambda s: s.purge_url("https://s/b/8"), {"https://s/b/8"}),
    (lambda s: s.purge_prefix("https://s/b/"), {"https://s/b/8", "https://s/b/9"}),
    (lambda s: s.purge_prefix("https://s/"), None),
    (lambda s: s.purge_tags(frozenset({"all", "t0"})), None),
])
def test_purges_reach_both_tiers_and_the_write_behind(open_store, purge, gone) -> None:
    store = _tagged_store(open_store)
    everything = _served(store)
    assert len(everything) == 10
    gone = everything if gone is None else gone
    assert purge(store) == len(gone)
    assert _served(store) == everything - gone  # nothing purged from either tier
    store.close()
    assert _served(open_store()) == everything - gone


def test_a_purge_behind_queued_writes_removes_them(open_store) -> None:
    store = open_store(memory_bytes_max=2 * ENTRY_BYTES)
    for i in range(200):  # most are still queued when the purge is called
        store.put(make(f"p/{i}", tags=frozenset({"x"})))
    assert store.purge_tags({"x"}) == 200
    assert all(store.get(f"p/{i}") is None for i in range(200))
    stats = store.stats()
    assert (stats.disk_entries, stats.memory_entries, stats.write_behind_calls) == (0, 0, 0)


def test_entries_written_behind_are_served_and_purged(open_store) -> None:
    store = open_store(memory_bytes_max=2 * ENTRY_BYTES)
    store.put(make("k", body=b"old" * 100))
    store.flush()
    with stalled_disk(store):
        store.put(make("k", body=b"new" * 100))
        for i in range(5):  # push k out of memory while its write waits
            store.put(make(f"w/{i}", tags=frozenset({"w"})))
        assert store.stats().memory_entries == 2
        assert store.get("k").body == b"new" * 100  # not the old row on disk
        assert store.get("w/0") is not None
    assert store.purge_tags({"w"}) == 5
    assert all(store.get(f"w/{i}") is None for i in range(5))
    store.close()
    reopened = open_store()
    assert reopened.get("k").body == b"new" * 100
    assert all(reopened.get(f"w/{i}") is None for i in range(5))


def test_a_put_past_the_write_behind_bound_drops_the_outdated_row(open_store) -> None:
    store = open_store(memory_bytes_max=2 * ENTRY_BYTES, write_behind_bytes_max=ENTRY_BYTES)
    store.put(make("k", body=b"old" * 100))
    store.flush()
    with stalled_disk(store):
        store.put(make("filler"))                   # fills the write-behind
        store.put(make("k", body=b"new" * 100))     # skipped: memory only
        store.put(make("other/1"))
        store.put(make("other/2"))                  # push new k out of memory
        assert store.get("k") is None               # never the old row still on disk
        assert store.variants("k") == []
    store.flush()
    assert store.get("k") is None
    assert store.stats().disk_writes_skipped >= 1


def test_an_entry_hot_in_memory_is_rewritten_if_the_disk_evicted_it(open_store) -> None:
    store = open_store(memory_bytes_max=2 * ENTRY_BYTES, disk_bytes_max=3 * ENTRY_BYTES)
    store.put(make("hot"))
    for i in range(4):  # the disk evicts "hot" (oldest stamp) while memory keeps it
        store.put(make(f"cold/{i}"))
        assert store.get("hot") is not None
    store.flush()
    assert store.stats().disk_evictions >= 1
    store.put(make("last/1"))
    store.put(make("last/2"))  # "hot" leaves memory and goes back to disk
    store.close()
    assert open_store(memory_bytes_max=2 * ENTRY_BYTES,
                      disk_bytes_max=3 * ENTRY_BYTES).get("hot") is not None


def test_a_purge_already_applied_is_skipped(open_store) -> None:
    store = open_store()
    store.put(make("a", tags=frozenset({"t"})))
    assert store.purge_tags({"t"}, seq=3) == 1
    store.put(make("a", tags=frozenset({"t"})))  # fetched again after the purge
    assert store.purge_tags({"t"}, seq=3) == 0   # a redelivery must not remove it
    assert store.purge_prefix("a", seq=2) == 0
    assert store.get("a") is not None
    assert store.purge_prefix("a", seq=4) == 1
    assert store.purge_seq == 4
    assert store.stats().purge_applied_at_s == ManualClock().now()


def test_an_entry_larger_than_memory_lives_on_disk_only(open_store) -> None:
    store = open_store(memory_bytes_max=2 * ENTRY_BYTES)
    big = make("big", body=b"b" * (3 * ENTRY_BYTES))
    store.put(make("small"))
    store.put(big)
    assert store.get("big") == big  # from the write-behind or the disk
    store.flush()
    assert store.get("big") == big
    stats = store.stats()
    assert stats.memory_entries == 1 and stats.disk_entries == 2 and stats.disk_hits >= 1
    assert store.get("small") is not None  # the big one evicted nothing from memory


def test_a_put_replaces_the_older_version_in_both_tiers(open_store) -> None:
    store = open_store(memory_bytes_max=ENTRY_BYTES)
    store.put(make("k", body=b"old" * 100))
    store.put(make("other"))  # pushes k out of memory
    store.put(make("k", body=b"new" * 100))
    store.close()
    assert open_store().get("k").body == b"new" * 100


def test_past_the_write_behind_bound_a_put_stays_in_memory(open_store) -> None:
    store = open_store(write_behind_bytes_max=1)
    for i in range(50):
        store.put(make(f"k{i}"))
    assert all(store.get(f"k{i}") is not None for i in range(50))
    store.flush()
    stats = store.stats()
    assert stats.disk_entries + stats.disk_writes_skipped == 50
    assert stats.write_behind_bytes == 0


def test_stats_count_each_tier(open_store) -> None:
    store = open_store(memory_bytes_max=2 * ENTRY_BYTES)
    for key in "abc":
        store.put(make(key))
    store.flush()
    store.get("c")
    store.get("a")
    store.get("zz")
    stats = store.stats()
    assert (stats.memory_entries, stats.disk_entries) == (2, 3)
    assert (stats.memory_hits, stats.memory_misses) == (1, 2)
    assert (stats.disk_hits, stats.disk_misses) == (1, 1)
    assert stats.memory_evictions == 2 and stats.disk_evictions == 0
    assert stats.disk_bytes == sum(entry_bytes(make(k)) for k in "abc")
    assert stats.memory_bytes == entry_bytes(make("c")) + entry_bytes(make("a"))


def test_prefix_upper_bound() -> None:
    assert prefix_upper_bound("https://a/") == "https://a0"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\U0010ffff") is None
    assert prefix_upper_bound("\ud7ff") == "\ue000"


@pytest.mark.parametrize("args", [
    (None, -1, 0), (None, 10, -5), (None, 1.5, 0), (None, True, 0), (None, 0, 0),
    (None, 1000, 1000), ("path", 1000, 0),
])
def test_bad_budgets_are_refused(tmp_path: Path, args) -> None:
    path, memory, disk = args
    with pytest.raises(ConfigError):
        CacheStore(tmp_path / "c.db" if path else None, memory, disk, ManualClock())


@pytest.mark.parametrize("entry", [
    make(""),
    Entry(b"k", "", b"", b"", frozenset(), 0.0),  # type: ignore[arg-type]
    Entry("k", None, b"", b"", frozenset(), 0.0),  # type: ignore[arg-type]
    Entry("k", "", "meta", b"", frozenset(), 0.0),  # type: ignore[arg-type]
    Entry("k", "", b"", bytearray(b"x"), frozenset(), 0.0),  # type: ignore[arg-type]
    Entry("k", "", b"", b"", {"t"}, 0.0),  # type: ignore[arg-type]
    make("k", tags=frozenset({""})),
    make("k", tags=frozenset({"a\nb"})),
    make("k", tags=frozenset(f"t{i}" for i in range(300))),
    Entry("k", "", b"", b"", frozenset(), float("nan")),
    Entry("k", "", b"", b"", frozenset(), -1.0),
    Entry("\ud800", "", b"", b"", frozenset(), 0.0),
    make("k" * 20_000),
    make("k", body=b"x" * (2000 * ENTRY_BYTES)),  # larger than both budgets
    "not an entry",
])
def test_bad_entries_are_refused_and_change_nothing(open_store, entry) -> None:
    store = open_store()
    store.put(make("kept"))
    with pytest.raises(ConfigError):
        store.put(entry)
    store.flush()
    stats = store.stats()
    assert (stats.memory_entries, stats.disk_entries) == (1, 1)


def test_memory_only_store_refuses_an_entry_larger_than_memory() -> None:
    store = CacheStore(None, 2 * ENTRY_BYTES, 0, ManualClock())
    with pytest.raises(ConfigError, match="budgets"):
        store.put(make("big", body=b"x" * (3 * ENTRY_BYTES)))
    assert store.stats().memory_entries == 0


@pytest.mark.parametrize("purge", [
    lambda s: s.purge_url(""), lambda s: s.purge_prefix(""), lambda s: s.purge_tags(set()),
    lambda s: s.purge_tags({""}), lambda s: s.delete(""), lambda s: s.purge_url("k", seq=0),
    lambda s: s.purge_prefix("k", seq=-3), lambda s: s.purge_tags({"t"}, seq=True),
])
def test_bad_purges_are_refused(open_store, purge) -> None:
    store = open_store()
    store.put(make("k", tags=frozenset({"t"})))
    with pytest.raises(ConfigError):
        purge(store)
    assert store.get("k") is not None and store.purge_seq == 0


def test_a_closed_store_refuses_writes(open_store) -> None:
    store = open_store()
    store.close()
    store.close()
    with pytest.raises(ConfigError, match="closed"):
        store.put(make("k"))
    with pytest.raises(ConfigError, match="closed"):
        store.purge_url("k")


# The store against a dict ------------------------------------------------------------

KEYS = st.sampled_from(["a/1", "a/2", "a/b/1", "b/1", "b/2", "c"])
VARIANTS = st.sampled_from(["", "gz"])
TAG_SETS = st.frozensets(st.sampled_from(["t1", "t2", "t3"]), max_size=2)


class StoreAgainstDict(RuleBasedStateMachine):
    """Exact when nothing is evicted for good (memory small, disk large); with small
    budgets the store may forget, but never serve what the model does not hold."""

    memory_bytes_max = 3 * ENTRY_BYTES
    disk_bytes_max = 100 * ENTRY_BYTES
    write_behind_bytes_max = 100 * ENTRY_BYTES
    exact = True

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="cache-store-"))
        self.model: dict[tuple[str, str], Entry] = {}
        self.generation = 0
        self.store = self.open()

    def open(self) -> CacheStore:
        return CacheStore(self.directory / "c.db", self.memory_bytes_max, self.disk_bytes_max,
                          ManualClock(), write_behind_bytes_max=self.write_behind_bytes_max)

    @rule(key=KEYS, variant=VARIANTS, tags=TAG_SETS, size=st.integers(0, 2 * BODY_BYTES))
    def put(self, key: str, variant: str, tags: frozenset[str], size: int) -> None:
        self.generation += 1
        entry = make(key, variant, body=str(self.generation).encode().ljust(size, b"-"),
                     tags=tags)
        self.store.put(entry)
        self.model[(key, variant)] = entry

    @rule(key=KEYS, variant=VARIANTS)
    def get(self, key: str, variant: str) -> None:
        found = self.store.get(key, variant)
        expected = self.model.get((key, variant))
        if self.exact:
            assert found == expected
        else:
            assert found is None or found == expected

    @rule(key=KEYS, variant=st.none() | VARIANTS)
    def delete(self, key: str, variant: str | None) -> None:
        self.store.delete(key, variant)
        self._forget(lambda k, v, _: k == key and variant in (None, v))

    @rule(tags=st.frozensets(st.sampled_from(["t1", "t2", "t3"]), min_size=1, max_size=2))
    def purge_tags(self, tags: frozenset[str]) -> None:
        self._check_count(self.store.purge_tags(tags),
                          self._forget(lambda _k, _v, e: not e.tags.isdisjoint(tags)))

    @rule(key=KEYS)
    def purge_url(self, key: str) -> None:
        self._check_count(self.store.purge_url(key), self._forget(lambda k, _v, _e: k == key))

    @rule(prefix=st.sampled_from(["a/", "a/b", "b", "c", "d"]))
    def purge_prefix(self, prefix: str) -> None:
        self._check_count(self.store.purge_prefix(prefix),
                          self._forget(lambda k, _v, _e: k.startswith(prefix)))

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = self.open()

    @precondition(lambda self: self.exact)
    @rule(key=KEYS)
    def variants(self, key: str) -> None:
        assert self.store.variants(key) == sorted(v for k, v in self.model if k == key)

    @invariant()
    def within_budgets(self) -> None:
        stats = self.store.stats()
        assert stats.memory_bytes <= self.memory_bytes_max
        assert stats.disk_bytes <= self.disk_bytes_max
        assert stats.disk_errors == 0

    def _forget(self, matches) -> int:
        gone = [slot for slot, entry in self.model.items() if matches(*slot, entry)]
        for slot in gone:
            del self.model[slot]
        return len(gone)

    def _check_count(self, removed: int, expected: int) -> None:
        assert removed == expected if self.exact else removed <= expected

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class SmallStoreAgainstDict(StoreAgainstDict):
    memory_bytes_max = 2 * ENTRY_BYTES
    disk_bytes_max = 4 * ENTRY_BYTES
    write_behind_bytes_max = 2 * ENTRY_BYTES
    exact = False


_machine_settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
TestStoreAgainstDict = StoreAgainstDict.TestCase
TestStoreAgainstDict.settings = _machine_settings
TestSmallStoreAgainstDict = SmallStoreAgainstDict.TestCase
TestSmallStoreAgainstDict.settings = _machine_settings
