"""HTTP control of a running WAN emulator, so scenarios and people can shape links live.

    GET  /links                    every link: name, listen, upstream, config, counters
    GET  /links/{name}             one link
    POST /links/{name}             JSON object of config fields to change
    POST /links/{name}/partition   {"mode": "reset" | "blackhole"} (default "reset")
    POST /links/{name}/heal

Bad input answers 4xx with `{"error": ...}` and changes nothing: 400 for a body that
is not a JSON object, 422 for an unknown field or a bad value, 404 for an unknown link.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fogline.errors import ConfigError, NotFoundError
from fogline.sim.wan import WanEmulator, WanLink

__all__ = ["control_app", "describe_link"]

BODY_BYTES_MAX = 16 * 1024


class _BadRequest(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


def describe_link(link: WanLink) -> dict[str, Any]:
    """The JSON shape of one link, shared by every endpoint."""
    return {
        "name": link.name,
        "listen": {"host": link.address[0], "port": link.port},
        "upstream": {"host": link.upstream[0], "port": link.upstream[1]},
        "config": link.config.to_dict(),
        "counters": dataclasses.asdict(link.counters),
    }


async def _json_object(request: Request, *, empty_ok: bool = False) -> dict[str, Any]:
    body = await request.body()
    if len(body) > BODY_BYTES_MAX:
        raise _BadRequest(413, f"body larger than {BODY_BYTES_MAX} bytes")
    if not body.strip() and empty_ok:
        return {}
    try:
        value = json.loads(body)
    except ValueError as exc:
        raise _BadRequest(400, f"body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise _BadRequest(400, "body must be a JSON object")
    return value


Handler = Callable[[Request, WanLink], Awaitable[WanLink]]


def control_app(emulator: WanEmulator) -> Starlette:
    """An ASGI app bound to `emulator`; run it in the emulator's event loop."""

    def endpoint(handler: Handler) -> Callable[[Request], Awaitable[JSONResponse]]:
        # One place turns fogline errors into HTTP answers for every link endpoint.
        async def respond(request: Request) -> JSONResponse:
            try:
                link = emulator.link(request.path_params["name"])
                return JSONResponse(describe_link(await handler(request, link)))
            except NotFoundError as exc:
                return JSONResponse({"error": str(exc)}, status_code=404)
            except ConfigError as exc:
                return JSONResponse({"error": str(exc)}, status_code=422)
            except _BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=exc.status_code)

        return respond

    async def list_links(request: Request) -> JSONResponse:
        return JSONResponse([describe_link(link) for link in emulator.links.values()])

    async def show(request: Request, link: WanLink) -> WanLink:
        return link

    async def update(request: Request, link: WanLink) -> WanLink:
        link.update(**await _json_object(request))
        return link

    async def partition(request: Request, link: WanLink) -> WanLink:
        body = await _json_object(request, empty_ok=True)
        unknown = sorted(set(body) - {"mode"})
        if unknown:
            raise ConfigError(f"unknown partition field(s) {unknown}; known: ['mode']")
        link.partition(body.get("mode", "reset"))
        return link

    async def heal(request: Request, link: WanLink) -> WanLink:
        link.heal()
        return link

    return Starlette(
        routes=[
            # Link names may hold "/" (the demo names links "node-1/nats"), so the
            # specific routes come first and the name matches as a path.
            Route("/links", list_links, methods=["GET"]),
            Route("/links/{name:path}/partition", endpoint(partition), methods=["POST"]),
            Route("/links/{name:path}/heal", endpoint(heal), methods=["POST"]),
            Route("/links/{name:path}", endpoint(show), methods=["GET"]),
            Route("/links/{name:path}", endpoint(update), methods=["POST"]),
        ]
    )
