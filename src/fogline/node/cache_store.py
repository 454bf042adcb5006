"""Where the edge cache keeps responses: a memory tier over a disk tier, with purges.

No HTTP here: an entry is a primary key (a normalised URL), a variant key (the request
header values its Vary selects, "" without Vary), opaque metadata bytes (the proxy's
msgspec-encoded status, headers and times), the body, its tags and `stored_at_s`.

Tiers
- memory: an LRU bounded by `memory_bytes_max`; an entry counts its body, metadata,
  key, variant and tags plus `ENTRY_OVERHEAD_BYTES`. A hit is a dict lookup and a
  `move_to_end`: no lock, no SQLite, no allocation but the lookup tuple.
- disk: SQLite in WAL mode at `path`, bounded by `disk_bytes_max`, evicting the least
  recently used (see `cache_store_disk`). A memory miss reads the disk and promotes the
  entry; an entry leaving memory restamps its row (or rewrites it if the disk evicted
  it meanwhile), so disk recency follows memory use.
- an entry larger than `memory_bytes_max` is kept on disk only and served from there;
  one larger than the disk budget too (or than `ENTRY_BYTES_MAX`) is refused with
  ConfigError, like every other bad input, before anything changes.

Write-behind: `put` stores in memory and hands the disk write to a GroupCommitWriter
thread (one transaction per batch of queued writes), so a put costs a queue hand-off.
Until its write commits the entry stays readable from the write-behind table even if
memory evicted it. The write-behind is bounded (`write_behind_bytes_max`,
`WRITE_BEHIND_CALLS_MAX`); past the bound a put skips its disk write (counted in
`disk_writes_skipped`) and queues only the removal of the entry's outdated row, so the
disk never serves a version older than what memory replaced.

Purges are complete when they return: matching entries leave memory and the
write-behind table at once, then the disk delete (plus the new `purge_seq`, in the same
transaction) is queued behind every earlier write and the call waits for its commit.
So no purged object can be served afterwards, even one whose write was still queued.
A purge carrying `seq` at or below `purge_seq` was applied already and is skipped: a
redelivered purge must not remove content fetched after it. If the disk step fails
(RetryableError) the memory step stands and the caller must retry before serving.

Thread model: one owner thread (the node's event loop) calls every method. Disk writes
run on the writer thread, which only appends completions to a deque the owner drains.
Disk reads (memory misses, `variants`) run on the owner thread on a separate WAL read
connection that never waits for the writer. Purges, `delete` and `close` block the
owner until the writer commits (about a millisecond when idle).

Bodies are BLOBs in the SQLite file, not files of their own: `cache_store_disk` says
why, with measurements.

Measured with timeit on a 2-core VM (10 KB body, 300 B metadata): memory hit `get`
0.23 us; disk hit `get` (memory miss, read, promote, queue the demotion) 28 us; a miss
on both tiers 5 us; `put` 10 us (memory insert and write-behind hand-off, while the
writer commits the earlier puts). The writer thread needs the GIL between SQLite calls:
when the owner thread is CPU-bound it gets it only every switch interval (5 ms), so
the write-behind fills and puts go memory-only (`disk_writes_skipped`) instead of
slowing hits; an idle or IO-bound loop gives the writer all the time it needs.

(About 500 lines, past the ~400 aim: a fifth is this docstring; the SQL, the input
checks and the BLOB-vs-file reasoning already live in `cache_store_disk`.)
"""

from __future__ import annotations

import math
import sqlite3
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType

from fogline.clock import Clock
from fogline.errors import ConfigError, RetryableError
from fogline.node.cache_store_disk import (
    TAG_SEPARATOR,
    Demotion,
    DiskTier,
    Select,
    Slot,
    check_budget,
    check_tags,
    check_text,
    read_entry,
    read_variants,
    select_key,
    select_prefix,
    select_tags,
)
from fogline.node.sqlite_writer import GroupCommitWriter

ENTRY_OVERHEAD_BYTES = 256       # dict slots, the Entry object, the LRU link
ENTRY_BYTES_MAX = 256 * 1024**2  # well under SQLite's 1 GB BLOB limit
WRITE_BEHIND_BYTES_MAX = 64 * 1024**2
WRITE_BEHIND_CALLS_MAX = 10_000  # well under the writer's queue bound
WAIT_S_MAX = 30.0                # for a purge's or delete's commit
READ_MMAP_BYTES_MAX = 1024**3
KNOWN_VARIANTS_MAX = 65_536      # keys whose `variants` answer is remembered


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored response; the store never looks inside `metadata` or `body`."""

    key: str
    variant: str
    metadata: bytes
    body: bytes
    tags: frozenset[str]
    stored_at_s: float


@dataclass(frozen=True)
class CacheStats:
    memory_entries: int
    memory_bytes: int
    disk_entries: int
    disk_bytes: int
    memory_hits: int            # includes entries served from the write-behind table
    memory_misses: int
    disk_hits: int
    disk_misses: int
    memory_evictions: int
    disk_evictions: int
    write_behind_calls: int
    write_behind_bytes: int
    disk_writes_skipped: int    # puts past the write-behind bound: memory only
    disk_errors: int            # failed writes and reads (a failed read is a miss)
    purge_seq: int
    purge_applied_at_s: float | None  # when the purge numbered purge_seq was applied


def entry_bytes(entry: Entry) -> int:
    return (len(entry.body) + len(entry.metadata) + len(entry.key) + len(entry.variant)
            + sum(map(len, entry.tags)) + ENTRY_OVERHEAD_BYTES)


def _check_seq(seq: object) -> int | None:
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq <= 0):
        raise ConfigError(f"purge seq must be a positive integer, got {seq!r}")
    return seq


class CacheStore:
    """The node's edge cache storage. See the module docstring for the model."""

    def __init__(self, path: Path | None, memory_bytes_max: int, disk_bytes_max: int,
                 clock: Clock, *, write_behind_bytes_max: int = WRITE_BEHIND_BYTES_MAX) -> None:
        self._memory_bytes_max = check_budget("memory_bytes_max", memory_bytes_max)
        disk_bytes_max = check_budget("disk_bytes_max", disk_bytes_max)
        self._write_behind_bytes_max = check_budget("write_behind_bytes_max",
                                                     write_behind_bytes_max)
        if path is None and disk_bytes_max:
            raise ConfigError("disk_bytes_max needs a path for the disk tier")
        if path is not None and not disk_bytes_max:
            raise ConfigError("a disk tier at a path needs disk_bytes_max > 0")
        if not memory_bytes_max and not disk_bytes_max:
            raise ConfigError("a cache store needs a memory or a disk budget")
        self._clock = clock
        self._memory: OrderedDict[Slot, Entry] = OrderedDict()
        self._memory_bytes = 0
        self._variants: dict[str, set[str]] = {}  # memory's index for purges and variants
        # `variants` answers, so a hit does not read the disk for them. Only `put` adds a
        # variant, and it forgets the key's answer; what else removes one (eviction,
        # purges) leaves a remembered answer a superset at worst: `get` is None for it.
        self._known_variants: dict[str, tuple[str, ...]] = {}
        # Entries whose disk write is queued; None marks a row made outdated by a put
        # that skipped its write: the disk must not be read for it until it is deleted.
        self._write_behind: dict[Slot, Entry | None] = {}
        self._write_behind_bytes = 0
        self._write_behind_calls = 0
        self._written: deque[tuple[Slot | None, Entry | None, int, bool]] = deque()
        self._counts = dict.fromkeys(("memory_hits", "memory_misses", "disk_hits",
                                      "disk_misses", "memory_evictions",
                                      "disk_writes_skipped", "disk_errors"), 0)
        self._purge_seq = 0
        self._purge_applied_at_s: float | None = None
        self._used_seq = 0
        self._closed = False
        self._writer: GroupCommitWriter | None = None
        self._disk: DiskTier | None = None
        if path is not None:
            self._open_disk(path, disk_bytes_max)

    def _open_disk(self, path: Path, disk_bytes_max: int) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = GroupCommitWriter(path)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the cache file {path}: {exc}") from exc
        self._disk = DiskTier(disk_bytes_max)
        mmap_bytes = min(disk_bytes_max, READ_MMAP_BYTES_MAX)
        self._writer.read(lambda conn: conn.execute(f"PRAGMA mmap_size={mmap_bytes}"))
        self._purge_seq, self._used_seq = self._writer.read(self._disk.load)

    # Reads ----------------------------------------------------------------------------

    def get(self, key: str, variant: str = "") -> Entry | None:
        """The entry stored under (key, variant), or None."""
        slot = (key, variant)
        entry = self._memory.get(slot)
        if entry is not None:
            self._memory.move_to_end(slot)
            self._counts["memory_hits"] += 1
            return entry
        return self._get_missed(slot)

    def _get_missed(self, slot: Slot) -> Entry | None:
        self._drain_written()
        counts = self._counts
        if slot in self._write_behind:
            entry = self._write_behind[slot]
            if entry is None:  # the disk row is outdated and about to be deleted
                counts["memory_misses"] += 1
                return None
            # Evicted from memory before its write committed.
            counts["memory_hits"] += 1
            size = entry_bytes(entry)
            if size <= self._memory_bytes_max:
                self._demote(self._admit(slot, entry, size))
            return entry
        counts["memory_misses"] += 1
        if self._writer is None or self._closed:
            return None
        try:
            row = self._writer.read(partial(read_entry, key=slot[0], variant=slot[1]))
        except sqlite3.Error:
            counts["disk_errors"] += 1
            counts["disk_misses"] += 1
            return None
        if row is None:
            counts["disk_misses"] += 1
            return None
        counts["disk_hits"] += 1
        stored_at_s, tags, metadata, body = row
        entry = Entry(slot[0], slot[1], metadata, body,
                      frozenset(tags.split(TAG_SEPARATOR)) if tags else frozenset(), stored_at_s)
        size = entry_bytes(entry)
        if size <= self._memory_bytes_max:
            self._demote(self._admit(slot, entry, size))
        else:  # too big for memory: served from disk each time, so stamp its use there
            self._used_seq += 1
            self._submit(partial(self._disk_tier().touch, key=slot[0], variant=slot[1],
                                 used_seq=self._used_seq))
        return entry

    def variants(self, key: str) -> list[str]:
        """Every variant stored under `key` in either tier, sorted. Remembered per key
        (see `_known_variants`): it may name a variant evicted since, never miss one."""
        known = self._known_variants.get(key)
        if known is not None:
            return list(known)
        found = self._find_variants(key)
        if len(self._known_variants) >= KNOWN_VARIANTS_MAX:
            del self._known_variants[next(iter(self._known_variants))]
        self._known_variants[key] = tuple(found)
        return found

    def _find_variants(self, key: str) -> list[str]:
        self._drain_written()
        found = set(self._variants.get(key, ()))
        if self._writer is not None and not self._closed:
            found.update(self._writer.read(partial(read_variants, key=key)))
        for (k, variant), entry in self._write_behind.items():
            if k != key or variant in self._variants.get(key, ()):
                continue
            if entry is None:  # only an outdated row is left on disk
                found.discard(variant)
            else:
                found.add(variant)
        return sorted(found)

    @property
    def purge_seq(self) -> int:
        """The sequence number of the last purge applied (persisted with the disk tier)."""
        return self._purge_seq

    def stats(self) -> CacheStats:
        self._drain_written()
        disk = self._disk
        return CacheStats(
            memory_entries=len(self._memory), memory_bytes=self._memory_bytes,
            disk_entries=disk.entries if disk else 0, disk_bytes=disk.n_bytes if disk else 0,
            disk_evictions=disk.evictions if disk else 0,
            write_behind_calls=self._write_behind_calls,
            write_behind_bytes=self._write_behind_bytes, purge_seq=self._purge_seq,
            purge_applied_at_s=self._purge_applied_at_s, **self._counts)

    # Writes ---------------------------------------------------------------------------

    def put(self, entry: Entry) -> None:
        """Store `entry`, replacing any entry under the same (key, variant)."""
        size = self._check_entry(entry)
        self._drain_written()
        self._known_variants.pop(entry.key, None)
        slot = (entry.key, entry.variant)
        self._used_seq += 1
        used_seq = self._used_seq
        evicted: list[tuple[Entry, int]] = []
        if size <= self._memory_bytes_max:
            evicted = self._admit(slot, entry, size)
        else:
            self._forget_memory(slot)
        if self._writer is None:
            return
        demotions = self._demotions(evicted)
        fits_disk = size <= self._disk_tier().bytes_max
        written = entry if fits_disk and self._write_behind_room(size) else None
        held_bytes = sum(d.size_bytes for d in demotions if d.rewrite)
        if written is None:
            self._write_behind[slot] = None
            self._counts["disk_writes_skipped"] += 1
        else:
            self._write_behind[slot] = entry
            held_bytes += size
        self._submit(partial(self._disk_tier().put, key=entry.key, variant=entry.variant,
                             entry=written, size_bytes=size, used_seq=used_seq,
                             demotions=demotions), slot, written, held_bytes)

    def delete(self, key: str, variant: str | None = None) -> int:
        """Remove one variant of `key`, or all when `variant` is None; returns how many."""
        check_text("key", key, empty_ok=False)
        if variant is not None:
            check_text("variant", variant, empty_ok=True)
        return self._purge(lambda slot, _: slot[0] == key and variant in (None, slot[1]),
                           self._slots_of([key]),
                           select_key(key, variant), None)

    def purge_url(self, key: str, *, seq: int | None = None) -> int:
        """Remove every variant of `key`; returns how many entries were removed."""
        check_text("key", key, empty_ok=False)
        return self._purge(lambda slot, _: slot[0] == key, self._slots_of([key]),
                           select_key(key, None), _check_seq(seq))

    def purge_prefix(self, prefix: str, *, seq: int | None = None) -> int:
        """Remove every entry whose key starts with `prefix`."""
        check_text("prefix", prefix, empty_ok=False)
        keys = [key for key in self._variants if key.startswith(prefix)]
        return self._purge(lambda slot, _: slot[0].startswith(prefix), self._slots_of(keys),
                           select_prefix(prefix), _check_seq(seq))

    def purge_tags(self, tags: frozenset[str] | set[str], *, seq: int | None = None) -> int:
        """Remove every entry carrying at least one of `tags`."""
        if isinstance(tags, set):
            tags = frozenset(tags)
        tags = check_tags(tags)
        if not tags:
            raise ConfigError("a tag purge needs at least one tag")
        return self._purge(lambda _, entry: not entry.tags.isdisjoint(tags),
                           list(self._memory), select_tags(tags), _check_seq(seq))

    def flush(self) -> None:
        """Wait until every queued disk write has committed (shutdown, tests)."""
        if self._writer is not None and not self._closed:
            try:
                self._writer.submit_sync(lambda _conn: None).result(timeout=WAIT_S_MAX)
            except FutureTimeoutError as exc:
                raise RetryableError(f"cache writes not committed within {WAIT_S_MAX} s") \
                    from exc
        self._drain_written()

    def close(self) -> None:
        """Finish queued disk writes and close the file; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        self._drain_written()

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # Internals ------------------------------------------------------------------------

    def _check_entry(self, entry: Entry) -> int:
        if self._closed:
            raise ConfigError("the cache store is closed")
        if not isinstance(entry, Entry):
            raise ConfigError(f"a cache entry must be an Entry, got {type(entry).__name__}")
        check_text("key", entry.key, empty_ok=False)
        check_text("variant", entry.variant, empty_ok=True)
        for name in ("metadata", "body"):
            if not isinstance(getattr(entry, name), bytes):
                raise ConfigError(f"cache entry {name} must be bytes")
        check_tags(entry.tags)
        stored_at_s = entry.stored_at_s
        if (isinstance(stored_at_s, bool) or not isinstance(stored_at_s, int | float)
                or not math.isfinite(stored_at_s) or stored_at_s < 0):
            raise ConfigError(f"stored_at_s must be a finite time, got {stored_at_s!r}")
        size = entry_bytes(entry)
        disk_bytes_max = self._disk.bytes_max if self._disk else 0
        if size > min(max(self._memory_bytes_max, disk_bytes_max), ENTRY_BYTES_MAX):
            raise ConfigError(f"cache entry {entry.key!r} needs {size} bytes, more than the "
                              f"memory ({self._memory_bytes_max}) and disk "
                              f"({disk_bytes_max}) budgets or {ENTRY_BYTES_MAX}")
        return size

    def _admit(self, slot: Slot, entry: Entry, size: int) -> list[tuple[Entry, int]]:
        """Put `entry` at the recent end of memory; return the entries it evicted."""
        old = self._memory.pop(slot, None)
        if old is None:
            self._variants.setdefault(slot[0], set()).add(slot[1])
        else:
            self._memory_bytes -= entry_bytes(old)
        self._memory[slot] = entry
        self._memory_bytes += size
        evicted = []
        while self._memory_bytes > self._memory_bytes_max:
            victim_slot, victim = self._memory.popitem(last=False)
            victim_size = entry_bytes(victim)
            self._memory_bytes -= victim_size
            self._unindex(victim_slot)
            self._counts["memory_evictions"] += 1
            evicted.append((victim, victim_size))
        return evicted

    def _forget_memory(self, slot: Slot) -> None:
        old = self._memory.pop(slot, None)
        if old is not None:
            self._memory_bytes -= entry_bytes(old)
            self._unindex(slot)

    def _unindex(self, slot: Slot) -> None:
        variants = self._variants[slot[0]]
        variants.discard(slot[1])
        if not variants:
            del self._variants[slot[0]]

    def _demotions(self, evicted: list[tuple[Entry, int]]) -> list[Demotion]:
        demotions = []
        for entry, size in evicted:
            self._used_seq += 1
            demotions.append(Demotion(entry, size, self._used_seq,
                                      rewrite=self._write_behind_room(size)))
        return demotions

    def _demote(self, evicted: list[tuple[Entry, int]]) -> None:
        if evicted and self._writer is not None:
            demotions = self._demotions(evicted)
            self._submit(partial(self._disk_tier().demote, demotions=demotions),
                         held_bytes=sum(d.size_bytes for d in demotions if d.rewrite))

    def _write_behind_room(self, size: int) -> bool:
        # An empty write-behind always takes one entry, so a large one can still be stored.
        return (self._write_behind_calls < WRITE_BEHIND_CALLS_MAX
                and (not self._write_behind_bytes
                     or self._write_behind_bytes + size <= self._write_behind_bytes_max))

    def _submit(self, fn: Callable[[sqlite3.Connection], object], slot: Slot | None = None,
                written: Entry | None = None, held_bytes: int = 0) -> None:
        assert self._writer is not None
        future = self._writer.submit_sync(fn)
        self._write_behind_calls += 1
        self._write_behind_bytes += held_bytes
        disk = self._disk_tier()

        def done(f: Future) -> None:  # on the writer thread: touch nothing the owner reads
            failed = f.exception() is not None
            if failed:
                disk.stale = True
            self._written.append((slot, written, held_bytes, failed))

        future.add_done_callback(done)

    def _drain_written(self) -> None:
        written = self._written
        while written:
            slot, entry, held_bytes, failed = written.popleft()
            self._write_behind_calls -= 1
            self._write_behind_bytes -= held_bytes
            if slot in self._write_behind and self._write_behind[slot] is entry:
                del self._write_behind[slot]
            if failed:
                self._counts["disk_errors"] += 1

    def _slots_of(self, keys: Iterable[str]) -> list[Slot]:
        return [(key, variant) for key in keys for variant in self._variants.get(key, ())]

    def _purge(self, match: Callable[[Slot, Entry], bool], candidates: list[Slot],
               select: Select, seq: int | None) -> int:
        """Remove the memory `candidates` and write-behind entries that `match`, then the
        disk rows `select` finds; `candidates` narrows the memory scan, `match` decides."""
        if self._closed:
            raise ConfigError("the cache store is closed")
        if seq is not None and seq <= self._purge_seq:
            return 0
        self._drain_written()
        removed: set[Slot] = set()
        for slot in candidates:
            entry = self._memory.get(slot)
            if entry is not None and match(slot, entry):
                self._forget_memory(slot)
                removed.add(slot)
        for slot, entry in list(self._write_behind.items()):
            if entry is not None and match(slot, entry):
                del self._write_behind[slot]
                removed.add(slot)
        if self._writer is not None:
            future = self._writer.submit_sync(partial(self._disk_tier().purge, select=select,
                                                      seq=seq))
            try:
                removed.update(future.result(timeout=WAIT_S_MAX))
            except FutureTimeoutError as exc:
                raise RetryableError(f"cache purge not committed within {WAIT_S_MAX} s") \
                    from exc
            except sqlite3.Error as exc:
                raise RetryableError(f"cache purge failed on disk: {exc}") from exc
        for key, _ in removed:
            self._known_variants.pop(key, None)
        if seq is not None:
            self._purge_seq = seq
            self._purge_applied_at_s = self._clock.now()
        return len(removed)

    def _disk_tier(self) -> DiskTier:
        assert self._disk is not None
        return self._disk

