"""How busy the node's HTTP front is: requests in flight and the request rate.

`HttpMeter` is the outermost ASGI callable of the node. It counts user traffic (apps and
sites, not `/healthz` or `/metrics`, which clients probe constantly) with two integer
updates per request, so it costs the hot path next to nothing. The agent samples it
once per heartbeat (`Load.http_inflight`, `Load.http_rps`) for the hub's routing table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Gauge

from fogline.protocol import Load

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_NOT_COUNTED = frozenset({"/healthz", "/metrics"})


class HttpMeter:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inflight = 0
        self.total = 0
        self._sampled_total = 0
        self._sampled_at_s: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _NOT_COUNTED:
            await self.app(scope, receive, send)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
            self.total += 1

    def load(self, base: Load, monotonic_s: float) -> Load:
        """`base` with the front's in-flight count and its rate since the last call."""
        elapsed_s = 0.0 if self._sampled_at_s is None else monotonic_s - self._sampled_at_s
        done = self.total - self._sampled_total
        self._sampled_total, self._sampled_at_s = self.total, monotonic_s
        rps = done / elapsed_s if elapsed_s > 0 else 0.0
        return msgspec.structs.replace(base, http_inflight=self.inflight,
                                       http_rps=round(rps, 3))

    def register(self, registry: CollectorRegistry) -> None:
        Gauge("fogline_node_http_inflight", "User requests being served by the HTTP front",
              registry=registry).set_function(lambda: float(self.inflight))
        Gauge("fogline_node_http_requests", "User requests served since start",
              registry=registry).set_function(lambda: float(self.total))
