"""Time for every component: one injectable `Clock` (real or simulated).

Core logic never calls `time.time()` or `asyncio.sleep()` directly; it receives a
`Clock`, so the deterministic simulator and unit tests can drive time by hand.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Wall time for records and deadlines, monotonic time for intervals."""

    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock of this machine."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock that moves only when told to; for tests and the simulator."""

    def __init__(self, start_s: float = 1_700_000_000.0) -> None:
        self._now_s = start_s
        self._start_s = start_s

    def now(self) -> float:
        return self._now_s

    def monotonic(self) -> float:
        return self._now_s - self._start_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot move backwards")
        self._now_s += seconds

    async def sleep(self, seconds: float) -> None:
        # Sleeping on a manual clock moves it: a single-task test reads naturally.
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
