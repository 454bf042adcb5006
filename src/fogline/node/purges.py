"""Fleet-wide cache purges on the node: apply each in order, never serve what was purged.

The hub broadcasts every purge once on `fl.purge`. The node applies them strictly in
sequence (`fogline.core.purge.next_step`) to every cache it holds (each site's, and the
apps' cache), remembers the last one applied in `DATA/cache/purges.json`, and
acknowledges it to the hub. A gap in the numbers, a (re)connection to the hub and a
periodic check make it ask the hub for what it missed.

The fence: from the moment the node (re)connects until it has caught up, it may hold
objects purged while it was away, so the sites' caches are bypassed (requests go to the
origin) rather than served. If the hub does not answer within `FENCE_MAX_S` the fence
lifts anyway: with the hub gone the node serves what it has (local first), as it did
during the partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fogline.clock import Clock
from fogline.core.purge import Apply, CatchUp, applies_to, next_step
from fogline.errors import ProtocolError
from fogline.protocol import (
    PURGE_SUBJECT,
    Purge,
    PurgeAck,
    PurgeLog,
    PurgesRequest,
    decode,
    encode,
    purged_subject,
    purges_get_subject,
)
from fogline.transport.cancellation import raise_if_cancelling

if TYPE_CHECKING:  # the cache loads with the first site, not before
    from fogline.node.cache_store import CacheStore

log = logging.getLogger("fogline.node.purges")

CATCH_UP_TIMEOUT_S = 5.0
CHECK_INTERVAL_S = 30.0  # a lost broadcast with no purge after it is found by this
FENCE_MAX_S = 10.0
# The cursor is written this long after a purge applied by broadcast, once for all that
# came meanwhile. Losing it costs nothing: the hub replays what follows the saved
# cursor, and each cache skips the purges it had applied already (its own count is
# committed with the purge).
SAVE_DELAY_S = 0.2


@dataclass(frozen=True)
class PurgeTarget:
    """One cache the purges reach. `key_base` turns a purge's path into this cache's
    key (a site's origin); None if URL and prefix purges do not concern it. `everything`
    are key prefixes matching every entry, to empty it when the node fell too far behind.
    """

    store: CacheStore
    site: str
    key_base: str | None
    everything: tuple[str, ...]

    def empty(self, seq: int) -> None:
        for index, prefix in enumerate(self.everything):
            self.store.purge_prefix(prefix, seq=seq if index == len(self.everything) - 1
                                    else None)


def apply_to(target: PurgeTarget, purge: Purge) -> int:
    """Remove what `purge` names from one cache; the count of entries removed."""
    store = target.store
    if purge.site and purge.site != target.site:
        return 0
    if purge.kind == "tag":
        return store.purge_tags(frozenset(purge.values), seq=purge.seq)
    if target.key_base is None:
        return 0
    removed = 0
    method = store.purge_url if purge.kind == "url" else store.purge_prefix
    for index, value in enumerate(purge.values):
        # The store skips a purge numbered at or below the last it applied: only the
        # last call carries the number, so the others are not taken for redeliveries.
        seq = purge.seq if index == len(purge.values) - 1 else None
        removed += method(target.key_base + value, seq=seq)
    return removed


class NodePurges:
    def __init__(self, node_id: str, region: str, state_path: Path, clock: Clock,
                 targets: Callable[[], list[PurgeTarget]]) -> None:
        self.node_id = node_id
        self.region = region
        self.state_path = state_path
        self.clock = clock
        self.targets = targets
        self.applied_seq, self.applied_at_s = self._load()
        self.fenced = False
        self.applied = 0  # purges applied since start (for metrics and tests)
        self._caught_up = asyncio.Event()
        self._caught_up.set()
        self._queue: asyncio.Queue[Purge | None] = asyncio.Queue()
        self._fenced_since_s = 0.0
        self._save_pending: asyncio.TimerHandle | None = None
        self.state_path.parent.mkdir(parents=True, exist_ok=True)

    # State --------------------------------------------------------------------------

    def _load(self) -> tuple[int, float | None]:
        try:
            data = json.loads(self.state_path.read_text())
            return int(data["seq"]), data.get("applied_at_s")
        except FileNotFoundError:
            return 0, None
        except (ValueError, KeyError, TypeError) as exc:
            # Unreadable: start from 0, which makes the hub reset our caches.
            log.error("purge state %s unreadable (%s): caches will be emptied",
                      self.state_path, exc)
            return 0, None

    def _save_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (tools, tests): now
            self._save()
            return
        if self._save_pending is None:
            self._save_pending = loop.call_later(SAVE_DELAY_S, self._save)

    def _save(self) -> None:
        if self._save_pending is not None:
            self._save_pending.cancel()
            self._save_pending = None
        partial = self.state_path.with_suffix(".tmp")
        partial.write_text(json.dumps({"seq": self.applied_seq,
                                       "applied_at_s": self.applied_at_s}))
        os.replace(partial, self.state_path)

    def opened(self, target: PurgeTarget) -> None:
        """A cache opened after purges it never saw (a site placed again): empty it."""
        if target.store.purge_seq < self.applied_seq:
            target.empty(self.applied_seq)

    # Fence --------------------------------------------------------------------------

    def fence(self) -> None:
        """The link to the hub came (back): purges may have been missed."""
        if not self.fenced:
            self.fenced = True
            self._fenced_since_s = self.clock.monotonic()
            self._caught_up.clear()
        self._queue.put_nowait(None)  # a catch-up request

    def _unfence(self) -> None:
        self.fenced = False
        self._caught_up.set()

    async def wait_caught_up(self, timeout_s: float) -> bool:
        """Wait (up to `timeout_s`) for the fence to lift; True if it has."""
        if not self.fenced:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._caught_up.wait(), timeout_s)
        return not self.fenced

    # Applying -----------------------------------------------------------------------

    def apply(self, purge: Purge, save: bool = True) -> int:
        """Apply one purge (the next in order); `save=False` leaves the cursor's write
        to the caller, for a batch."""
        removed = 0
        if applies_to(purge, self.region):
            for target in self.targets():
                removed += apply_to(target, purge)
        self.applied_seq = purge.seq
        self.applied_at_s = self.clock.now()
        self.applied += 1
        if save:
            self._save_soon()
        return removed

    def reset(self, last_seq: int) -> None:
        """Too far behind to replay: empty every cache and continue from `last_seq`."""
        for target in self.targets():
            target.empty(last_seq)
        log.warning("purges %d..%d could not be replayed: caches emptied",
                    self.applied_seq + 1, last_seq)
        self.applied_seq = last_seq
        self.applied_at_s = self.clock.now()
        self._save()

    # The link -----------------------------------------------------------------------

    async def run(self, nc: NatsClient) -> None:
        """Take purges over one hub connection until cancelled."""
        async def on_purge(msg: Msg) -> None:
            try:
                purge = decode(msg.data)
            except ProtocolError as exc:
                log.warning("purge refused: %s", exc)
                return
            if isinstance(purge, Purge):
                self._queue.put_nowait(purge)

        subscription = await nc.subscribe(PURGE_SUBJECT, cb=on_purge)
        self.fence()
        checks = asyncio.create_task(self._check_now_and_then())
        try:
            while True:
                # nats-py's requests (the catch-up) use wait_for, which on Python 3.11 can
                # swallow a cancellation that lands as its reply does: never loop on one.
                raise_if_cancelling()
                item = await self._queue.get()
                if item is None:
                    await self._catch_up(nc)
                    continue
                step = next_step(self.applied_seq, item)
                if isinstance(step, Apply):
                    removed = self.apply(item)
                    await self._ack(nc, removed)
                elif isinstance(step, CatchUp):
                    await self._catch_up(nc)
        finally:
            checks.cancel()
            if self._save_pending is not None:
                self._save()
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    async def _check_now_and_then(self) -> None:
        """Ask the hub even without a reason, now and then (a lost broadcast with no
        purge after it), jittered: a fleet that got one broadcast at the same moment must
        not come asking at the same moment."""
        while True:
            await self.clock.sleep(CHECK_INTERVAL_S * random.uniform(0.8, 1.2))
            self._queue.put_nowait(None)

    async def _catch_up(self, nc: NatsClient) -> None:
        """Ask the hub for every purge after the last applied, and apply them."""
        while True:
            try:
                reply = await nc.request(purges_get_subject(self.node_id),
                                         encode(PurgesRequest(after=self.applied_seq)),
                                         timeout=CATCH_UP_TIMEOUT_S)
                log_ = decode(reply.data)
                if not isinstance(log_, PurgeLog):
                    raise ProtocolError(f"expected a purge log, got {type(log_).__name__}")
            except (nats.errors.Error, TimeoutError, ProtocolError) as exc:
                raise_if_cancelling()
                log.info("purge catch-up failed: %s", exc)
                if self.fenced and \
                        self.clock.monotonic() - self._fenced_since_s > FENCE_MAX_S:
                    log.warning("the hub does not answer: serving from cache without "
                                "knowing what was purged meanwhile")
                    self._unfence()
                await self.clock.sleep(1.0)
                self._queue.put_nowait(None)  # try again, after what is queued
                return
            removed, before = 0, self.applied_seq
            if log_.reset:
                self.reset(log_.last_seq)
            gap = False
            for purge in log_.purges:
                step = next_step(self.applied_seq, purge)
                if isinstance(step, CatchUp):  # numbered, not yet committed: ask again
                    gap = True
                    break
                if isinstance(step, Apply):
                    removed += self.apply(purge, save=False)
            if self.applied_seq != before:
                self._save()  # once for the batch
                await self._ack(nc, removed)
            if gap:
                await self.clock.sleep(0.05)
            elif not log_.more:
                break
        self._unfence()

    async def _ack(self, nc: NatsClient, removed: int) -> None:
        assert self.applied_at_s is not None
        with contextlib.suppress(nats.errors.Error):
            await nc.publish(purged_subject(self.node_id),
                             encode(PurgeAck(seq=self.applied_seq,
                                             applied_at_s=self.applied_at_s,
                                             removed=removed)))
