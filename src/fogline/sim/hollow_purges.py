"""A hollow node's cache purges: the node's real `NodePurges` over a small memory cache.

Each hollow node applies fleet purges exactly as an agent does (`fogline.node.purges`:
in order, cursor persisted in its data dir, fence and catch-up on every connection,
acknowledged to the hub) to one memory-only `CacheStore` holding a few tiny tagged
entries, so a purge really removes something. A thousand of these fit in one process:
the store's budget is a few kilobytes and it has no disk tier (so no writer thread).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fogline.clock import Clock
from fogline.node.cache_store import CacheStore, Entry
from fogline.node.purges import NodePurges, PurgeTarget

CACHE_MEMORY_BYTES_MAX = 16 * 1024
# One entry per tag; a benchmark round purges one of them. `fill` puts them back.
TAGS = tuple(f"shelf-{index}" for index in range(8))
_BODY = b"x" * 64
_METADATA = b"{}"


class HollowPurges:
    """One node's purge state: `purges.run(nc)` per hub session, `applied_seq` for its
    heartbeats, and `fill` to (re)stock the cache with one entry per tag."""

    def __init__(self, node_id: str, region: str, data_dir: Path, clock: Clock) -> None:
        self.clock = clock
        self.cache = CacheStore(None, CACHE_MEMORY_BYTES_MAX, 0, clock)
        self.target = PurgeTarget(self.cache, "", None, ("/",))
        self.purges = NodePurges(node_id, region, data_dir / "cache" / "purges.json", clock,
                                 self._targets)
        self.fill()

    def _targets(self) -> list[PurgeTarget]:
        return [self.target]

    @property
    def applied_seq(self) -> int:
        return self.purges.applied_seq

    def fill(self, tags: Iterable[str] = TAGS) -> None:
        """One small entry under `/shelf/<tag>` per tag (replacing any already there)."""
        now_s = self.clock.now()
        for tag in tags:
            self.cache.put(Entry(f"/shelf/{tag}", "", _METADATA, _BODY, frozenset((tag,)),
                                 now_s))

    def holds(self, tag: str) -> bool:
        """Whether the entry `fill` stored for `tag` is still cached."""
        return self.cache.get(f"/shelf/{tag}") is not None
