"""Serving an ASGI app with uvicorn inside a running service.

uvicorn is used in-process: the node's and hub's endpoints share the service's event
loop and cost no extra process. Signals stay with the service (it cancels its task
group on SIGINT/SIGTERM), so uvicorn's own signal capture is turned off.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import uvicorn

from fogline.errors import ConfigError

START_TIMEOUT_S = 10.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert, key)
    return context


@contextlib.asynccontextmanager
async def serve_http(app: Any, host: str, port: int, *, tls_cert: Path | None = None,
                     tls_key: Path | None = None) -> AsyncIterator[int]:
    """Serve `app` until the context exits; yields the bound port."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            access_log=False, ssl_certfile=tls_cert, ssl_keyfile=tls_key,
                            timeout_graceful_shutdown=2,
                            # Nothing in front of a node rewrites client addresses, and
                            # the middleware costs ~5% of a trivial request.
                            proxy_headers=False, server_header=False)
    config.load()
    if config.ssl is not None:
        # TLS 1.3 only, whatever the Python default allows.
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_3
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not server.started:
            if task.done():
                task.result()
                raise ConfigError(f"HTTP server could not listen on {host}:{port}")
            if loop.time() > deadline:
                raise ConfigError(f"HTTP server did not start on {host}:{port}")
            await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()[1]
        yield int(bound)
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
