"""Hybrid logical clocks: timestamps that order writes across nodes without a shared clock.

An `Hlc` is (wall_ms, counter, node): close to wall time, strictly increasing on each
node, and totally ordered across nodes (ties broken by node id), so last-writer-wins
merges are deterministic everywhere.
"""

from __future__ import annotations

import msgspec

from fogline.clock import Clock

# A remote timestamp this far ahead of our wall clock is not allowed to drag our clock
# forward: a node with a broken clock must not push every replica into the future.
MAX_DRIFT_MS = 60_000


class Hlc(msgspec.Struct, frozen=True, order=True, array_like=True):
    wall_ms: int
    counter: int
    node: str


ZERO = Hlc(0, 0, "")


class HybridLogicalClock:
    def __init__(self, node: str, clock: Clock, max_drift_ms: int = MAX_DRIFT_MS) -> None:
        self.node = node
        self.clock = clock
        self.max_drift_ms = max_drift_ms
        self.last = ZERO

    def _wall_ms(self) -> int:
        return int(self.clock.now() * 1000)

    def now(self) -> Hlc:
        """A timestamp for a local event, greater than every one seen before."""
        wall = self._wall_ms()
        if wall > self.last.wall_ms:
            self.last = Hlc(wall, 0, self.node)
        else:
            self.last = Hlc(self.last.wall_ms, self.last.counter + 1, self.node)
        return self.last

    def restore(self, last: Hlc) -> None:
        """Resume after a restart from this node's own last timestamp (saved with its
        writes), without the drift check `observe` applies to other nodes."""
        if (last.wall_ms, last.counter) > (self.last.wall_ms, self.last.counter):
            self.last = Hlc(last.wall_ms, last.counter, self.node)

    def observe(self, remote: Hlc) -> None:
        """Move past a timestamp received from another replica."""
        wall = self._wall_ms()
        if remote.wall_ms > wall + self.max_drift_ms:
            return
        if (remote.wall_ms, remote.counter) > (self.last.wall_ms, self.last.counter):
            # The next local timestamp will be past it (see `now`).
            self.last = Hlc(remote.wall_ms, remote.counter, self.node)
