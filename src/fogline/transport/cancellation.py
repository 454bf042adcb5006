"""Keeping cancellation intact in retry loops around nats-py."""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """On Python 3.11 `asyncio.wait_for` (used inside nats-py) can turn a cancellation
    that races its timeout into TimeoutError; a retry loop must not swallow it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def wait_or_wake(event: asyncio.Event, timeout_s: float) -> None:
    """Wait until `event` is set, setting it ourselves after `timeout_s`: for a loop's
    wake-up event (set early to act at once, else once per period). Unlike
    `asyncio.wait_for` on Python 3.11, a cancellation landing as the period ends is
    never turned into a timeout and swallowed."""
    timer = asyncio.get_running_loop().call_later(timeout_s, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()
