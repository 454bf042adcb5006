"""Keeping cancellation intact in retry loops around nats-py."""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """On Python 3.11 `asyncio.wait_for` (used inside nats-py) can turn a cancellation
    that races its timeout into TimeoutError; a retry loop must not swallow it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
