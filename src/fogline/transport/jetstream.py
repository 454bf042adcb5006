"""Pull-consumer fetching that returns as soon as work is there."""

from __future__ import annotations

import contextlib

from nats.aio.msg import Msg
from nats.js import JetStreamContext


async def fetch_ready(subscription: JetStreamContext.PullSubscription, batch: int,
                      timeout_s: float) -> list[Msg]:
    """Wait for one message, then take what is already waiting, up to `batch`.

    nats-py's `fetch(batch > 1)` can fall back, after an earlier fetch expired, to a
    plain batch request that holds a lone message until the batch fills or the timeout
    passes (hundreds of ms on an idle stream). Fetching one first and then exactly the
    pending count never waits for messages that do not exist.
    """
    msgs = await subscription.fetch(1, timeout=timeout_s)
    waiting = msgs[0].metadata.num_pending if msgs else 0
    if waiting and batch > 1:
        with contextlib.suppress(TimeoutError):
            msgs += await subscription.fetch(min(waiting, batch - 1), timeout=timeout_s)
    return msgs
