"""The node's HTTP front for apps: `/{app}/{path}` goes to one of the app's workers.

A raw ASGI callable in front of the node's own Starlette app (which keeps `/healthz`,
`/metrics` and `/local/...`): requests for an app skip Starlette's routing, so the
front adds as little as it can to each request. The rejections are the front's own:
413 before the body is read when Content-Length says it is too big (or as soon as the
bytes read pass the limit), 503 with the reason when no worker of the app is ready,
504 when the worker's event loop does not answer in time. 404/405/500/504 for a
handler come from the worker.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fogline.node.apps.supervisor import AppSupervisor, AppUnavailable

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Paths the node itself serves; an app may not take these names.
RESERVED_NAMES = frozenset({"healthz", "metrics", "local"})


async def _send(send: Send, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, body: dict[str, Any],
                 headers: list[tuple[str, str]] | None = None) -> None:
    await _send(send, status, json.dumps(body).encode(),
                [("content-type", "application/json"), *(headers or [])])


class AppFront:
    def __init__(self, fallback: ASGIApp,
                 apps: Callable[[], Mapping[str, AppSupervisor]]) -> None:
        self.fallback = fallback
        self.apps = apps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            name, _, rest = scope["path"][1:].partition("/")
            supervisor = self.apps().get(name)
            if supervisor is not None:
                await self._serve(supervisor, "/" + rest, scope, receive, send)
                return
        await self.fallback(scope, receive, send)

    async def _serve(self, supervisor: AppSupervisor, path: str, scope: Scope,
                     receive: Receive, send: Send) -> None:
        limit = supervisor.definition.limits.request_body_bytes
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        for key, value in headers:
            if key == "content-length" and value.isdigit() and int(value) > limit:
                return await self._too_large(send, limit)
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > limit:
                return await self._too_large(send, limit)
            body += chunk
            more = message.get("more_body", False)
        # A deployment may have switched the app to a new version while the body was
        # read: look it up again, with no await before the call, so the call goes to a
        # version that is not being drained.
        supervisor = self.apps().get(supervisor.name, supervisor)
        try:
            reply = await supervisor.http(scope["method"], path,
                                          scope["query_string"].decode("latin-1"), headers,
                                          body)
        except AppUnavailable as exc:
            return await _error(send, 503, {"error": "app unavailable",
                                            "app": supervisor.name, "reason": str(exc)},
                                [("retry-after", "1")])
        except TimeoutError:
            return await _error(send, 504, {"error": "app worker did not answer in time",
                                            "app": supervisor.name})
        await _send(send, reply.status, reply.body, reply.headers)

    @staticmethod
    async def _too_large(send: Send, limit: int) -> None:
        await _error(send, 413, {"error": "request body too large", "limit_bytes": limit})
