"""`fogline gateway`: the routing client as an HTTP reverse proxy, for clients that
cannot use `fogline.client`.

Every request goes through one `Client`: to the best node serving the app or site,
with the same failover rules (idempotent requests go on to the next node after a
connection error, a timeout or a 5xx; others only when they never left). Bodies
stream both ways. A request body up to `BODY_BUFFER_BYTES_MAX` with a Content-Length
is read first so it can be sent again; a larger or chunked one streams, and then only
an unsent request fails over. Hop-by-hop headers are dropped (RFC 9110 §7.6.1), the
Host header is kept (nodes pick a site by it), X-Forwarded-For/-Proto are added, and
every response names the node that served it in `X-Fogline-Node`. With no node to
serve, the gateway answers 503; when every node tried failed, 502.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fogline.client import Client, NoRouteError, RequestFailed
from fogline.transport.http_server import serve_http

log = logging.getLogger("fogline.gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BODY_BUFFER_BYTES_MAX = 1024 * 1024
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-connection"})
NODE_HEADER = "x-fogline-node"


def end_to_end(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers without the hop-by-hop ones, including those the Connection header
    names."""
    named = {token.strip().lower() for key, value in headers if key.lower() == "connection"
             for token in value.split(",")}
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


async def _error(send: Send, status: int, body: dict[str, Any],
                 node_id: str = "") -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(data)).encode())]
    if node_id:
        headers.append((NODE_HEADER.encode(), node_id.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class Gateway:
    """An ASGI app forwarding every HTTP request through `client`."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no websockets; lifespan is off
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        forwarded = end_to_end(headers)
        length = next((v for k, v in forwarded if k.lower() == "content-length"), None)
        chunked = any(k.lower() == "transfer-encoding" for k, _ in headers)
        body: bytes | AsyncIterator[bytes] | None = None
        if length is not None and length.isdigit() and int(length) <= BODY_BUFFER_BYTES_MAX:
            body = await _read_all(receive)
            if body is None:
                return  # the client went away
        elif length is not None or chunked:
            body = _stream(receive)
        # httpx sets the length of what it sends.
        forwarded = [(k, v) for k, v in forwarded if k.lower() != "content-length"]
        client_host = (scope.get("client") or ("", 0))[0]
        earlier = [v for k, v in forwarded if k.lower() == "x-forwarded-for"]
        forwarded = [(k, v) for k, v in forwarded if k.lower() != "x-forwarded-for"]
        forwarded += [("x-forwarded-for", ", ".join([*earlier, client_host])),
                      ("x-forwarded-proto", scope.get("scheme", "http"))]
        path = scope.get("raw_path") or scope["path"].encode()
        target = path.decode("latin-1").split("?", 1)[0]
        query = scope.get("query_string", b"").decode("latin-1")
        if query:
            target += "?" + query
        try:
            async with self.client.stream(scope["method"], target, headers=forwarded,
                                          body=body) as (node_id, response):
                raw = [(k, v) for k, v in response.headers.raw
                       if k.decode("latin-1").lower() not in HOP_BY_HOP]
                raw.append((NODE_HEADER.encode(), node_id.encode("latin-1")))
                await send({"type": "http.response.start", "status": response.status_code,
                            "headers": raw})
                async for chunk in response.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk,
                                "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except NoRouteError as exc:
            await _error(send, 503, {"error": "no node serves this", "detail": str(exc)})
        except RequestFailed as exc:
            await _error(send, 502, {"error": "every node tried failed", "detail": str(exc),
                                     "maybe_delivered": exc.maybe_delivered}, exc.node_id)


async def _read_all(receive: Receive) -> bytes | None:
    chunks = []
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def _stream(receive: Receive) -> AsyncIterator[bytes]:
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        more = message.get("more_body", False)


async def run_gateway(listen: tuple[str, int], client: Client,
                      on_ready: Callable[[int], None] | None = None) -> None:
    """Serve until cancelled; `on_ready` gets the bound port."""
    async with client, serve_http(Gateway(client), listen[0], listen[1]) as port:
        log.info("gateway on http://%s:%d, %d candidate node(s)", listen[0], port,
                 len(client.router.node_ids))
        if on_ready is not None:
            on_ready(port)
        await asyncio.Event().wait()  # until cancelled
