"""What an app served recently: request and error counts, the p99 of its handling time
and other counters over a rolling window, in constant memory.

The window is a ring of `slots` time slots of `seconds / slots` each. A slot holds
counts and a histogram of latencies over fixed log-scale buckets (each bound 10% above
the previous, from 0.05 ms to 60 s), so recording is a bisect and three increments and
the p99 is exact to within one bucket: the reported value is the upper bound of the
bucket the true p99 falls in. A slot is reused (and cleared) once its time has passed
out of the window. The window covers the current slot and the `slots - 1` before it,
so between `seconds - seconds / slots` and `seconds` of history.

Sans-IO: every call takes `now_s` (seconds on a monotonic clock); nothing here reads a
clock.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable

from fogline.protocol import AppWindow

BUCKET_FIRST_MS = 0.05
BUCKET_GROWTH = 1.1
BUCKET_LAST_MS = 60_000.0
# Upper bounds of the latency buckets; one more bucket past the last takes the rest.
BUCKET_BOUNDS_MS: tuple[float, ...] = tuple(
    BUCKET_FIRST_MS * BUCKET_GROWTH ** i
    for i in range(math.ceil(math.log(BUCKET_LAST_MS / BUCKET_FIRST_MS,
                                      BUCKET_GROWTH)) + 1))
# AppWindow.metrics holds at most this many names.
METRIC_NAMES_MAX = 32
_NEVER = -(2 ** 62)  # the epoch of a slot never used


class _Slot:
    __slots__ = ("counters", "epoch", "errors", "histogram", "requests")

    def __init__(self) -> None:
        self.epoch = _NEVER
        self.requests = 0
        self.errors = 0
        self.histogram: list[int] = []
        self.counters: dict[str, float] = {}

    def reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.requests = 0
        self.errors = 0
        self.histogram = [0] * (len(BUCKET_BOUNDS_MS) + 1)
        self.counters = {}


class RollingWindow:
    """Counts over the last `seconds`. The snapshot's metrics name every counter given
    in `counters` (0 when none happened) and every other one counted so far."""

    def __init__(self, seconds: float = 10.0, slots: int = 10,
                 counters: Iterable[str] = ()) -> None:
        if seconds <= 0 or slots < 1:
            raise ValueError(f"a window needs seconds > 0 and slots >= 1, "
                             f"got {seconds} and {slots}")
        self.seconds = seconds
        self._slots_per_s = slots / seconds
        self._ring = [_Slot() for _ in range(slots)]
        self._size = slots
        self._names: set[str] = set()
        for name in counters:
            self._name(name)

    def _slot(self, now_s: float) -> _Slot | None:
        """The slot for `now_s`, cleared if it held older time; None if `now_s` is
        already out of the window (a clock that went back)."""
        epoch = int(now_s * self._slots_per_s)
        slot = self._ring[epoch % self._size]
        if slot.epoch != epoch:
            if slot.epoch > epoch:
                return None
            slot.reset(epoch)
        return slot

    def observe(self, now_s: float, latency_ms: float, error: bool) -> None:
        """One request handled in `latency_ms`; `error` if it failed (5xx, unavailable)."""
        # On every request's path: the slot lookup is inlined.
        epoch = int(now_s * self._slots_per_s)
        slot = self._ring[epoch % self._size]
        if slot.epoch != epoch:
            if slot.epoch > epoch:
                return
            slot.reset(epoch)
        slot.requests += 1
        if error:
            slot.errors += 1
        slot.histogram[bisect_left(BUCKET_BOUNDS_MS, latency_ms)] += 1

    def count(self, now_s: float, name: str, n: float = 1) -> None:
        """Add `n` to the counter `name` (timeouts, handler_errors, ...)."""
        if name not in self._names:
            self._name(name)
        slot = self._slot(now_s)
        if slot is not None:
            slot.counters[name] = slot.counters.get(name, 0) + n

    def _name(self, name: str) -> None:
        if len(self._names) >= METRIC_NAMES_MAX and name not in self._names:
            raise ValueError(f"a window keeps at most {METRIC_NAMES_MAX} counters; "
                             f"{name!r} would be one more")
        self._names.add(name)

    def snapshot(self, now_s: float) -> AppWindow:
        """The counts over the window ending at `now_s`; p99 0.0 with no requests."""
        current = int(now_s * self._slots_per_s)
        oldest = current - self._size
        live = [slot for slot in self._ring if oldest < slot.epoch <= current]
        requests = sum(slot.requests for slot in live)
        errors = sum(slot.errors for slot in live)
        metrics = {name: float(sum(slot.counters.get(name, 0) for slot in live))
                   for name in sorted(self._names)}
        p99_ms = 0.0
        if requests:
            histogram = [sum(counts)
                         for counts in zip(*(slot.histogram for slot in live), strict=True)]
            p99_ms = _p99(histogram, requests)
        return AppWindow(seconds=self.seconds, requests=requests, errors=errors,
                         p99_ms=p99_ms, metrics=metrics)


def _p99(histogram: list[int], total: int) -> float:
    """The upper bound of the bucket holding the nearest-rank 99th percentile; values
    past the last bound read as the last bound (a floor, not the value)."""
    rank = (99 * total + 99) // 100  # ceil(0.99 * total) without float rounding
    seen = 0
    for index, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return BUCKET_BOUNDS_MS[min(index, len(BUCKET_BOUNDS_MS) - 1)]
    raise AssertionError(f"the histogram holds {seen} values, not {total}")
