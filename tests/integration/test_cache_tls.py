"""The edge cache in front of an https origin: a site's TLS settings, end to end.

The origin serves a self-signed certificate for `origin.test` on 127.0.0.1: trusted
only through `ca_file`, and matching only with `server_name: origin.test`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fogline.clock import ManualClock
from fogline.errors import ConfigError
from fogline.node.cache_proxy import CacheProxy
from fogline.node.cache_proxy_origin import OriginTls
from fogline.node.cache_store import CacheStore
from fogline.transport.http_server import serve_http
from tests.tlscerts import self_signed

NAME = "origin.test"


async def page(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"secure {request.url.path}",
                             headers={"Cache-Control": "max-age=60"})


@contextlib.asynccontextmanager
async def https_origin(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    cert, key = self_signed(tmp_path / "pki", NAME)
    app = Starlette(routes=[Route("/{path:path}", page)])
    async with serve_http(app, "127.0.0.1", 0, tls_cert=cert, tls_key=key) as port:
        yield f"https://127.0.0.1:{port}", cert


@contextlib.asynccontextmanager
async def proxy_client(origin: str, tls: OriginTls) -> AsyncIterator[httpx.AsyncClient]:
    clock = ManualClock(start_s=time.time())
    with CacheStore(None, 1024**2, 0, clock) as store:
        async with CacheProxy(origin, store, clock, origin_timeout_s=5,
                              origin_tls=tls) as proxy, \
                serve_http(proxy, "127.0.0.1", 0) as port, \
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client


async def test_an_https_origin_is_cached_with_its_ca_file_and_server_name(
        tmp_path: Path) -> None:
    async with https_origin(tmp_path) as (origin, cert), \
            proxy_client(origin, OriginTls(ca_file=str(cert), server_name=NAME)) as client:
        first, second = await client.get("/a"), await client.get("/a")
        assert (first.status_code, first.text, first.headers["x-cache"]) == (
            200, "secure /a", "MISS")
        assert second.headers["x-cache"] == "HIT"


@pytest.mark.parametrize(("tls", "says"), [
    (OriginTls(), "origin TLS certificate rejected: self-signed certificate"),
    (OriginTls(server_name=NAME), "origin TLS certificate rejected: self-signed"),
    ("ca_file only", "origin TLS certificate rejected: IP address mismatch"),
])
async def test_an_untrusted_or_mismatched_origin_certificate_is_a_502_saying_why(
        tmp_path: Path, tls: OriginTls | str, says: str) -> None:
    async with https_origin(tmp_path) as (origin, cert):
        settings = OriginTls(ca_file=str(cert)) if tls == "ca_file only" else tls
        assert isinstance(settings, OriginTls)
        async with proxy_client(origin, settings) as client:
            refused = await client.get("/a")
            assert refused.status_code == 502
            assert says in refused.json()["error"]
            assert "tls.ca_file" in refused.json()["error"]


async def test_verify_false_takes_any_certificate(tmp_path: Path) -> None:
    async with https_origin(tmp_path) as (origin, _), \
            proxy_client(origin, OriginTls(verify=False)) as client:
        assert (await client.get("/b")).text == "secure /b"


def test_a_ca_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    clock = ManualClock()
    with CacheStore(None, 1024**2, 0, clock) as store, \
            pytest.raises(ConfigError, match=r"tls\.ca_file .* cannot be loaded"):
        CacheProxy("https://127.0.0.1:1", store, clock,
                   origin_tls=OriginTls(ca_file=str(tmp_path / "missing.pem")))
