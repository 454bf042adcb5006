"""`fogline.client`: send requests to the best node serving an app or site, with failover.

    async with Client(hub="http://hub:8700", token=TOKEN, site="catalog") as client:
        response = await client.get("/catalog/items/7")
        client.current                  # the node in use
        response.extensions["fogline_node_id"]   # the node that answered

The client reads the hub's routing table (`GET /v1/routes`), probes every candidate
node (`GET /healthz`, timed) and sends each request to the best one as
`fogline.core.routing.Router` ranks them: lowest measured RTT, with load as a penalty.
Probes repeat in the background (they keep the chosen node's connection warm and notice
a node that slowed down or died) and the table is refreshed every heartbeat interval; a
hub that cannot be reached leaves the last table in use. Paths are the node's own: an
app's routes are under `/{app}/...`, a site's as its origin serves them.

`report_as="eu-west"` (a location: a region, a network) sends what the client measured
to the hub every refresh, which shows it in the table as each node's `user_rtt_ms`
(for DNS or load balancers that steer by measured latency). `where` narrows the
candidates further (say, to some regions or tiers). A node the hub
reports `offline` stays a candidate, ranked as if degraded: the hub lost its
heartbeats, but this client may still reach it (local first); if it is really gone
its probes fail and it ranks last.

Failover: a connection error, a timeout or a 5xx marks the node down (not a 5xx from a
site's cache, `X-Cache` set: there the origin failed, not the node) and an idempotent
request (RFC 9110 §9.2.2; POST/PATCH with an `Idempotency-Key`) goes on to the next
node, at most `RoutingPolicy.attempts_max` nodes in all. Any other request goes on only
if it provably never left (the connection could not be opened); once it may have
reached a node, its failure is returned (a 5xx response) or raised (`RequestFailed`
with `maybe_delivered=True`), never sent again.

Errors: `NoRouteError` (no node serves it), `RequestFailed` (every node tried failed),
both RetryableError; AuthError and NotFoundError from the hub; ConfigError for bad
arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json as jsonlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import msgspec

from fogline.clock import Clock, SystemClock
from fogline.core.routing import (
    Route,
    Router,
    RouteTable,
    RoutingPolicy,
    check_rtt_report,
    decode_table,
    is_idempotent,
    may_serve,
    may_try_next,
    node_failed,
)
from fogline.errors import AuthError, ConfigError, NotFoundError, RetryableError

__all__ = ["Client", "ClientStats", "NoRouteError", "RequestFailed", "Route",
           "RoutingPolicy"]

log = logging.getLogger("fogline.client")

HeaderItems = list[tuple[str, str]]
Body = bytes | AsyncIterable[bytes] | None
# Until the table says otherwise (static routes have no heartbeat interval).
DEFAULT_REFRESH_S = 5.0
# A client with no candidate asks the hub again, but not more often than this.
REFRESH_ON_DEMAND_MIN_S = 0.25
PROBE_PATH = "/healthz"


class NoRouteError(RetryableError):
    """No node serves the app or site right now."""


class RequestFailed(RetryableError):
    """Every node tried failed. `maybe_delivered`: the last node may have received (and
    applied) the request, so a non-idempotent one was not sent again."""

    def __init__(self, message: str, node_id: str, maybe_delivered: bool) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.maybe_delivered = maybe_delivered


@dataclass
class ClientStats:
    requests: int = 0
    retries: int = 0  # attempts beyond a request's first
    failovers: int = 0  # requests answered by another node after a failure
    failures: int = 0  # requests that ended in an error or a 5xx
    refreshes: int = 0
    refresh_errors: int = 0
    probes: int = 0
    probe_failures: int = 0


def _header_items(headers: Mapping[str, str] | Sequence[tuple[str, str]] | None) -> HeaderItems:
    if headers is None:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(k), str(v)) for k, v in items]


class Client:
    """Requests to the nodes serving one app or site (or all nodes, if neither)."""

    def __init__(
        self,
        hub: str | None = None,
        *,
        token: str | None = None,
        app: str | None = None,
        site: str | None = None,
        routes: Sequence[Route | Mapping[str, Any]] | None = None,
        resolve: Callable[[str], str] | Mapping[str, str] | None = None,
        where: Callable[[Route], bool] | None = None,
        report_as: str | None = None,
        refresh_s: float | None = None,
        probe: bool = True,
        probe_interval_s: float = 1.0,
        probe_samples: int = 3,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        policy: RoutingPolicy | None = None,
        verify: Any = True,
        clock: Clock | None = None,
    ) -> None:
        if (hub is None) == (routes is None):
            raise ConfigError("give the hub's URL (hub=) or a static list of routes "
                              "(routes=), one of them")
        if hub is not None and not token:
            raise ConfigError("the hub's routing table needs the admin token (token=)")
        if app is not None and site is not None:
            raise ConfigError("route for an app or for a site, not both")
        for name, value in (("refresh_s", refresh_s), ("probe_interval_s", probe_interval_s),
                            ("timeout_s", timeout_s), ("connect_timeout_s", connect_timeout_s)):
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        if not 1 <= probe_samples <= 10:
            raise ConfigError("probe_samples must be between 1 and 10")
        self.hub = hub.rstrip("/") if hub else None
        self.app, self.site = app, site
        self.clock = clock or SystemClock()
        policy = policy or RoutingPolicy()
        if not probe and policy.confirm_after_down:
            # Nothing would ever confirm a failed node: its cooldown alone brings it back.
            policy = dataclasses.replace(policy, confirm_after_down=False)
        self.router = Router(self.clock, policy)
        self.stats = ClientStats()
        self.probe, self.probe_interval_s, self.probe_samples = probe, probe_interval_s, \
            probe_samples
        self._token = token
        self._resolve = resolve
        self._where = where
        if report_as is not None:
            if hub is None:
                raise ConfigError("report_as needs the hub (hub=) to report to")
            check_rtt_report(report_as, {"-": 0.0})  # the location's spelling
        self.report_as = report_as
        self._reported_at_s = -1e9
        self._refresh_s = refresh_s
        self._interval_s = DEFAULT_REFRESH_S
        self._static = [self._static_route(r) for r in routes] if routes is not None else None
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        # A probe slower than this says the node is no place to send users.
        self._probe_timeout = httpx.Timeout(min(timeout_s, 2.0), connect=connect_timeout_s)
        self._verify = verify
        self._nodes: httpx.AsyncClient | None = None
        self._hub: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._refreshed_at_s = -1e9
        self.table: RouteTable | None = None

    @staticmethod
    def _static_route(route: Route | Mapping[str, Any]) -> Route:
        if isinstance(route, Route):
            return route
        try:  # a route given by hand serves unless it says otherwise
            return msgspec.convert({"serving": True, **route}, Route)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid route {dict(route)!r}: {exc}") from exc

    # Lifecycle ----------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Read the table, probe the candidates, start the background upkeep."""
        if self._nodes is not None:
            return
        # Routing measures the direct path to each node: no proxy from the environment.
        self._nodes = httpx.AsyncClient(timeout=self._timeout, trust_env=False,
                                        verify=self._verify)
        if self.hub is not None:
            self._hub = httpx.AsyncClient(base_url=self.hub, timeout=self._timeout,
                                          verify=self._verify, headers={
                                              "Authorization": f"Bearer {self._token}"})
        try:
            await self.refresh()
            if self.probe:
                await self.probe_all(self.probe_samples)
        except BaseException:
            await self.aclose()
            raise
        self._task = asyncio.create_task(self._upkeep(), name="fogline-client-upkeep")

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in (self._nodes, self._hub):
            if client is not None:
                await client.aclose()
        self._nodes = self._hub = None

    @property
    def current(self) -> str | None:
        """The node requests go to now (None before the first success)."""
        return self.router.current

    def candidates(self) -> list[dict[str, Any]]:
        """The candidates best first, with what the client measured of each."""
        return [{"node_id": r.node_id, "endpoint": r.endpoint, "url": self.url_of(r),
                 "rtt_ms": self.router.rtt_ms(r.node_id), "score": self.router.score(r.node_id),
                 "up": self.router.is_up(r.node_id)} for r in self.router.ranked()]

    def url_of(self, route: Route) -> str:
        resolve = self._resolve
        if resolve is None:
            url = route.endpoint
        elif callable(resolve):
            url = resolve(route.endpoint)
        else:
            url = resolve.get(route.endpoint, route.endpoint)
        return url.rstrip("/")

    # Table and probes ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the routing table again (or apply the static routes)."""
        async with self._refresh_lock:
            self._refreshed_at_s = self.clock.monotonic()
            if self._static is not None:
                routes = self._static
            else:
                self.table = await self._fetch_table()
                self._interval_s = self.table.heartbeat_interval_s or DEFAULT_REFRESH_S
                routes = list(self.table.routes)
            self.router.set_routes(r for r in routes if may_serve(r, self.app, self.site)
                                   and (self._where is None or self._where(r)))
            self.stats.refreshes += 1

    async def _fetch_table(self) -> RouteTable:
        assert self._hub is not None
        params = {"app": self.app} if self.app else {"site": self.site} if self.site else {}
        try:
            response = await self._hub.get("/v1/routes", params=params)
        except httpx.HTTPError as exc:
            raise RetryableError(f"cannot reach the hub at {self.hub}: {exc!r}") from exc
        detail = response.text[:300]
        if response.status_code == 401:
            raise AuthError(f"the hub refused the token: {detail}")
        if response.status_code == 404:
            raise NotFoundError(f"the hub: {detail}")
        if response.status_code != 200:
            raise RetryableError(f"the hub answered {response.status_code}: {detail}")
        try:
            return decode_table(response.json())
        except (ValueError, ConfigError) as exc:
            raise RetryableError(f"the hub sent no routing table: {exc}") from exc

    async def probe_all(self, samples: int = 1) -> None:
        """Time `GET /healthz` on every candidate (`samples` in a row, keeping the
        fastest: the first may pay for opening the connection)."""
        await asyncio.gather(*(self._probe(route, samples)
                               for route in self.router.ranked()))

    async def _probe(self, route: Route, samples: int) -> None:
        assert self._nodes is not None
        url = self.url_of(route) + PROBE_PATH
        best: float | None = None
        for _ in range(samples):
            self.stats.probes += 1
            started = self.clock.monotonic()
            try:
                response = await self._send(self._nodes.build_request(
                    "GET", url, timeout=self._probe_timeout))
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if not ok:
                self.stats.probe_failures += 1
                self.router.mark_down(route.node_id)
                return
            elapsed_ms = (self.clock.monotonic() - started) * 1000
            best = elapsed_ms if best is None else min(best, elapsed_ms)
        if best is not None:
            self.router.observe_rtt(route.node_id, best)

    async def _upkeep(self) -> None:
        """Probe every probe interval; refresh the table every heartbeat interval."""
        while True:
            wait_s = self.probe_interval_s if self.probe else self._period_s()
            await self.clock.sleep(wait_s)
            try:
                if self.probe:
                    await self.probe_all()
                if self.clock.monotonic() - self._refreshed_at_s >= self._period_s():
                    await self.refresh()
                if self.report_as is not None and \
                        self.clock.monotonic() - self._reported_at_s >= self._period_s():
                    await self.report_rtt()
            except (RetryableError, AuthError, NotFoundError) as exc:
                self.stats.refresh_errors += 1  # keep routing on the last table
                log.warning("routing table not refreshed: %s", exc)
            except Exception:  # the upkeep must outlive any one bad round
                self.stats.refresh_errors += 1
                log.exception("routing upkeep failed; trying again")

    async def report_rtt(self) -> int:
        """Tell the hub what this client measured to each node, as `report_as`; the
        routing table shows it per location (`user_rtt_ms`). Returns nodes recorded."""
        assert self._hub is not None and self.report_as is not None
        self._reported_at_s = self.clock.monotonic()
        measured = {node_id: round(rtt, 3) for node_id in self.router.node_ids
                    if (rtt := self.router.rtt_ms(node_id)) is not None}
        if not measured:
            return 0
        try:
            response = await self._hub.post("/v1/routes/rtt", json={
                "location": self.report_as, "rtt_ms": measured})
        except httpx.HTTPError as exc:
            raise RetryableError(f"cannot report RTTs to the hub: {exc!r}") from exc
        if response.status_code != 202:
            raise RetryableError(f"the hub refused the RTT report ({response.status_code}): "
                                 f"{response.text[:200]}")
        return int(response.json()["recorded"])

    def _period_s(self) -> float:
        return self._refresh_s if self._refresh_s is not None else self._interval_s

    # Requests -----------------------------------------------------------------------

    async def request(self, method: str, path: str, *,
                      params: Mapping[str, str] | None = None,
                      headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
                      content: bytes | str | None = None, json: Any = None,
                      timeout_s: float | None = None) -> httpx.Response:
        """Send one request (body read in full) with failover; see the module doc."""
        items = _header_items(headers)
        if json is not None:
            content = jsonlib.dumps(json).encode()
            if not any(k.lower() == "content-type" for k, _ in items):
                items.append(("content-type", "application/json"))
        body = content.encode() if isinstance(content, str) else content
        _, response = await self._exchange(method, path, params, items, body, timeout_s,
                                           stream=False)
        return response

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", path, **kwargs)

    async def head(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("HEAD", path, **kwargs)

    async def options(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("OPTIONS", path, **kwargs)

    async def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", path, **kwargs)

    async def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PUT", path, **kwargs)

    async def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("PATCH", path, **kwargs)

    async def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.request("DELETE", path, **kwargs)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, *, params: Mapping[str, str] | None = None,
                     headers: HeaderItems | None = None, body: Body = None,
                     timeout_s: float | None = None
                     ) -> AsyncIterator[tuple[str, httpx.Response]]:
        """(node id, response) with the body not yet read, for proxies. A body given as
        an iterator cannot be sent twice: only an unsent request then fails over."""
        node_id, response = await self._exchange(method, path, params, list(headers or []),
                                                 body, timeout_s, stream=True)
        try:
            yield node_id, response
        finally:
            await response.aclose()

    async def _plan(self) -> Sequence[Route]:
        if self._nodes is None:
            raise ConfigError("the client is not started: use `async with Client(...)` "
                              "or await client.start()")
        plan = self.router.plan()
        if not plan and self.clock.monotonic() - self._refreshed_at_s >= REFRESH_ON_DEMAND_MIN_S:
            with contextlib.suppress(RetryableError):
                await self.refresh()
            plan = self.router.plan()
        if not plan:
            what = f"app {self.app!r}" if self.app else f"site {self.site!r}" if self.site \
                else "requests"
            raise NoRouteError(f"no node serves {what} right now")
        return plan

    async def _exchange(self, method: str, path: str, params: Mapping[str, str] | None,
                        headers: HeaderItems, body: Body, timeout_s: float | None,
                        stream: bool) -> tuple[str, httpx.Response]:
        assert path.startswith("/"), "paths are absolute on the node"
        method = method.upper()
        plan = await self._plan()
        assert self._nodes is not None
        self.stats.requests += 1
        idempotent = is_idempotent(method, headers) and not isinstance(body, AsyncIterable)
        timeout = self._timeout if timeout_s is None else httpx.Timeout(
            timeout_s, connect=self._timeout.connect)
        failure: tuple[str, Exception, bool] | None = None
        for attempt, route in enumerate(plan):
            if attempt:
                self.stats.retries += 1
            request = self._nodes.build_request(
                method, self.url_of(route) + path, params=params,
                headers=self._with_host(route, headers), content=body, timeout=timeout)
            try:
                response = await self._send(request, stream=stream)
            except httpx.TransportError as exc:
                self.router.mark_down(route.node_id)
                # A connection never opened carried nothing: safe for any method.
                sent = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
                failure = (route.node_id, exc, sent)
                if may_try_next(idempotent, sent):
                    continue
                break
            if response.status_code >= 500:
                if node_failed(response.status_code, "x-cache" in response.headers):
                    self.router.mark_down(route.node_id)
                if idempotent and attempt + 1 < len(plan):
                    await response.aclose()
                    continue
                self.stats.failures += 1
            else:
                if attempt:
                    self.stats.failovers += 1
                self.router.mark_ok(route.node_id)
            response.extensions["fogline_node_id"] = route.node_id
            return route.node_id, response
        self.stats.failures += 1
        assert failure is not None
        node_id, exc, sent = failure
        raise RequestFailed(
            f"{method} {path} failed at node {node_id}: {exc!r}"
            + ("; it may have been delivered, so it was not sent again"
               if sent and not idempotent else ""), node_id, sent) from exc

    async def _send(self, request: httpx.Request, stream: bool = False) -> httpx.Response:
        assert self._nodes is not None
        try:
            return await self._nodes.send(request, stream=stream)
        except AttributeError as exc:
            # httpcore over anyio raises this when the peer resets a connection just as
            # it opens (a node dying behind a proxy), before any byte of the request was
            # written: a failed connect, as far as retrying is concerned.
            raise httpx.ConnectError(f"connection reset as it opened ({exc})",
                                     request=request) from exc

    def _with_host(self, route: Route, headers: HeaderItems) -> HeaderItems:
        """A site served by host name only needs its Host header on the node."""
        if self.site is None or any(k.lower() == "host" for k, _ in headers):
            return headers
        for site in route.sites:
            if site.name == self.site and site.hosts and not site.path_prefixes:
                return [*headers, ("host", site.hosts[0])]
        return headers
