"""The edge cache's exchanges with its origin: one httpx pool, results as plain values.

`OriginClient.fetch` never raises for what the network or the origin does: it returns a
`Reply` (status, headers and the whole body), a `Streamed` reply whose body is too large
to hold (`max_object_bytes`; the caller streams it through and must close it), or a
`Failure` (no answer: 502 for a connection error, 504 for a timeout). httpx errors are
translated here, at one boundary.

Headers crossing the proxy lose their hop-by-hop fields both ways (RFC 9110 §7.6.1):
the fixed list, and whatever the Connection field names.

An https origin is reached as `OriginTls` says (a Site's `tls:`): its certificate is
verified against the default trust store, or only against `ca_file` (a private CA), or
not at all (`verify=False`); `server_name` replaces the URL's host as the SNI name and
the name the certificate must carry, as nginx's `proxy_ssl_name` does (the Host field
stays the URL's). TLS 1.2 is the floor here, not 1.3 as between fogline's own parts:
origins are other people's servers. A handshake that fails is a `Failure` (502) whose
reason says why (an untrusted or mismatched certificate, most often).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import httpx

from fogline.clock import Clock
from fogline.core.cachecontrol import Headers, get_combined, make_headers, parse_list, without
from fogline.core.cachepolicy import NOT_STORED
from fogline.errors import ConfigError

# RFC 9110 §7.6.1 hop-by-hop fields, plus the fields the proxy sets itself.
HOP_BY_HOP = NOT_STORED | {"host", "content-length"}
POOL_CONNECTIONS_MAX = 100
POOL_KEEPALIVE_MAX = 20


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete origin response; `headers` are end-to-end fields only."""

    status: int
    headers: Headers
    body: bytes
    request_time_s: float
    response_time_s: float


@dataclass(frozen=True, slots=True)
class Streamed:
    """An origin response too large to store: `prefix` was read, the rest is in
    `response` (close it with `aclose`)."""

    status: int
    headers: Headers
    prefix: bytes
    response: httpx.Response

    async def aclose(self) -> None:
        await self.response.aclose()


@dataclass(frozen=True, slots=True)
class Failure:
    """No usable answer from the origin. `reply` is the origin's own error response
    (a status in ERROR_STATUSES), None when it did not answer at all."""

    status: int
    reason: str
    reply: Reply | None = None


Fetched = Reply | Streamed | Failure


@dataclass(frozen=True, slots=True)
class OriginTls:
    """How to reach an https origin (see the module docstring)."""

    verify: bool = True
    ca_file: str | None = None
    server_name: str | None = None


def origin_tls_context(tls: OriginTls) -> ssl.SSLContext:
    """The client context for `tls`; ConfigError when its CA file cannot be loaded."""
    try:
        context = ssl.create_default_context(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"origin tls.ca_file {tls.ca_file!r} cannot be loaded: {exc}") \
            from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _failure_reason(exc: httpx.HTTPError) -> str:
    """Why the origin could not be reached; a TLS failure says so in plain words."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (f"origin TLS certificate rejected: {cause.verify_message} (the site's "
                "tls.ca_file and tls.server_name say what to trust and expect)")
    if isinstance(cause, ssl.SSLError):
        return f"origin TLS handshake failed: {cause.reason or cause}"
    return f"origin unreachable: {exc!r}"


def end_to_end(headers: Headers) -> Headers:
    """`headers` without hop-by-hop fields and those Connection names."""
    return without(headers, HOP_BY_HOP | set(parse_list(get_combined(headers, "connection"))))


class OriginClient:
    """Requests to one origin over a keep-alive pool; redirects are never followed."""

    def __init__(self, origin_url: str, clock: Clock, *, timeout_s: float,
                 max_object_bytes: int, client: httpx.AsyncClient | None = None,
                 tls: OriginTls | None = None) -> None:
        if client is not None and tls is not None:
            raise ConfigError("origin TLS settings need the client the proxy builds")
        self._base = origin_url.rstrip("/")
        self._clock = clock
        self._max_object_bytes = max_object_bytes
        tls = tls or OriginTls()
        # httpcore takes the SNI name (and so the name checked) per request.
        self._extensions = {"sni_hostname": tls.server_name} if tls.server_name else {}
        self._owned = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s), follow_redirects=False,
            verify=origin_tls_context(tls) if origin_url.startswith("https://") else True,
            limits=httpx.Limits(max_connections=POOL_CONNECTIONS_MAX,
                                max_keepalive_connections=POOL_KEEPALIVE_MAX))

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()

    async def fetch(self, method: str, target: str, headers: Headers,
                    body: bytes = b"") -> Fetched:
        """Send `method target` with `headers` (end-to-end fields) and read the reply."""
        # httpx.Request directly, not client.build_request: the client's default fields
        # (Accept-Encoding above all) must not change what the origin selects.
        request = httpx.Request(method, self._base + target, headers=list(headers),
                                content=body or None, extensions=self._extensions)
        request_time_s = self._clock.now()
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            return Failure(504, f"origin timed out: {exc!r}")
        except httpx.HTTPError as exc:
            return Failure(502, _failure_reason(exc))
        try:
            return await self._read(response, request_time_s)
        except httpx.TimeoutException as exc:
            await response.aclose()
            return Failure(504, f"origin timed out sending the body: {exc!r}")
        except httpx.HTTPError as exc:
            await response.aclose()
            return Failure(502, f"origin failed sending the body: {exc!r}")

    async def _read(self, response: httpx.Response, request_time_s: float) -> Fetched:
        headers = end_to_end(make_headers(response.headers.raw))
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_object_bytes:
            return Streamed(response.status_code, self._keep_length(response, headers), b"",
                            response)
        chunks: list[bytes] = []
        size = 0
        # Raw bytes: the proxy stores and forwards the representation as the origin
        # encoded it (Content-Encoding is part of the stored response).
        async for chunk in response.aiter_raw():
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_object_bytes:
                return Streamed(response.status_code, self._keep_length(response, headers),
                                b"".join(chunks), response)
        await response.aclose()
        return Reply(response.status_code, headers, b"".join(chunks), request_time_s,
                     self._clock.now())

    @staticmethod
    def _keep_length(response: httpx.Response, headers: Headers) -> Headers:
        length = response.headers.get("content-length")
        return headers if length is None else (*headers, ("content-length", length))
