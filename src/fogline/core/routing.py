"""Global routing, sans-IO: which node a request goes to, and what happens when it fails.

The hub's routing table (`RouteTable`, served at `GET /v1/routes`) lists every node
with its health, load and endpoint. A client keeps a `Router` over the routes that
serve its app or site and feeds it what it measures: RTT samples from its probes
(`observe_rtt`), failures (`mark_down`) and successes (`mark_ok`). The router ranks
nodes by a score in milliseconds:

    score = RTT (EWMA of the client's samples; unknown_rtt_ms + hub RTT if none yet)
          + overload penalty (CPU above the knee) + in-flight penalty
          + degraded penalty (or unseen penalty: a node the hub lost sight of)

and keeps the current node unless another one beats it by a margin, so the choice
does not flap on noise. A failed node is down for a cooldown and, when the client
probes, until a probe answers again; down nodes rank last, as a last resort.

Retrying follows RFC 9110 §9.2.2: GET, HEAD, OPTIONS, PUT, DELETE and TRACE are
idempotent; POST and PATCH only with an `Idempotency-Key` header. An idempotent request
fails over on a connection error, a timeout or a 5xx. Any other request fails over only
when it provably never left the client (the connection could not be opened), so a
non-idempotent request is never sent twice.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgspec

from fogline.clock import Clock
from fogline.errors import ConfigError

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
IDEMPOTENCY_KEY_HEADER = "idempotency-key"
# A node whose last heartbeat is older than this many of its intervals is not serving.
STALE_INTERVALS = 1.5
SERVING_HEALTH = frozenset({"ready", "degraded"})


def is_idempotent(method: str, headers: Iterable[tuple[str, str]] = ()) -> bool:
    """May this request be sent again after it may have reached a node?"""
    method = method.upper()
    if method in IDEMPOTENT_METHODS:
        return True
    if method in ("POST", "PATCH"):
        return any(key.lower() == IDEMPOTENCY_KEY_HEADER and value.strip()
                   for key, value in headers)
    return False


def node_failed(status: int, from_site_cache: bool) -> bool:
    """Does this answer say the node is down? A 5xx does, unless a site's cache gave it
    (it carries X-Cache): then the node works and its path to the origin failed, so
    another node may do better but this one is not marked down."""
    return status >= 500 and not from_site_cache


def may_try_next(idempotent: bool, sent: bool) -> bool:
    """After a failed attempt: may the request go to the next node? Only if sending it
    again cannot apply it twice."""
    return idempotent or not sent


def is_fresh(last_seen_s: float | None, interval_s: float, now_s: float) -> bool:
    """Has the node heartbeated recently enough to receive traffic?"""
    return last_seen_s is not None and now_s - last_seen_s <= interval_s * STALE_INTERVALS


# The routing table, as the hub builds it and clients decode it ------------------------

class RouteLoad(msgspec.Struct, frozen=True):
    cpu_percent: float = 0.0
    http_inflight: int = 0
    http_rps: float = 0.0


class RouteApp(msgspec.Struct, frozen=True):
    name: str
    revision: int = 0
    state: str = ""


class RouteSite(msgspec.Struct, frozen=True):
    name: str
    hosts: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """One node as a routing target. `serving`: healthy, heartbeating, reachable and
    (in a table asked for one app) running that app. `last_seen_s` is the hub's time of
    its last heartbeat; `interval_s` its heartbeat interval."""

    node_id: str
    region: str = ""
    tier: str = ""
    endpoint: str = ""
    health: str = ""
    serving: bool = False
    load: RouteLoad = RouteLoad()
    hub_rtt_ms: float | None = None
    apps: tuple[RouteApp, ...] = ()
    sites: tuple[RouteSite, ...] = ()
    last_seen_s: float | None = None
    interval_s: float = 0.0
    # RTT to this node as clients measured it, by the location they reported from.
    user_rtt_ms: dict[str, float] = {}


class RouteTable(msgspec.Struct, frozen=True, kw_only=True):
    generated_at: float
    heartbeat_interval_s: float
    routes: tuple[Route, ...] = ()


# User-side RTT: what clients measured, reported by location (a region, a network).
USER_RTT_WEIGHT = 0.3  # of a new report in the hub's running average
USER_RTT_FRESH_S = 600.0  # older reports are left out of the table
USER_RTT_NODES_MAX = 1000
USER_RTT_MS_MAX = 60_000.0
_LOCATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,63}$")


def check_rtt_report(location: object, rtt_ms: object) -> tuple[str, dict[str, float]]:
    """A client's report (where it is, node id -> ms), or ConfigError."""
    if not isinstance(location, str) or not _LOCATION.match(location):
        raise ConfigError(f"invalid location {location!r}: 1-64 letters, digits, "
                          "'_', '.', ':', '/' or '-'")
    if not isinstance(rtt_ms, dict) or not rtt_ms:
        raise ConfigError("rtt_ms must map node ids to milliseconds")
    if len(rtt_ms) > USER_RTT_NODES_MAX:
        raise ConfigError(f"at most {USER_RTT_NODES_MAX} nodes per report")
    checked = {}
    for node_id, value in rtt_ms.items():
        if not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
            raise ConfigError(f"invalid node id {node_id!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or not 0 <= value <= USER_RTT_MS_MAX:
            raise ConfigError(f"rtt of {node_id}: expected 0..{USER_RTT_MS_MAX:g} ms, "
                              f"got {value!r}")
        checked[node_id] = float(value)
    return location, checked


def merge_rtt(previous_ms: float | None, reported_ms: float) -> float:
    """The hub's running average of reports for one (location, node)."""
    if previous_ms is None:
        return reported_ms
    return (1 - USER_RTT_WEIGHT) * previous_ms + USER_RTT_WEIGHT * reported_ms


def decode_table(value: object) -> RouteTable:
    """A routing table from its JSON form; ConfigError if it is not one."""
    try:
        return msgspec.convert(value, RouteTable)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"not a routing table: {exc}") from exc


def serves(route: Route, app: str | None = None, site: str | None = None) -> bool:
    """Should traffic for `app` (or `site`) go to this route at all?"""
    if not route.serving or not route.endpoint:
        return False
    return _runs(route, app, site)


def may_serve(route: Route, app: str | None = None, site: str | None = None) -> bool:
    """`serves`, or a node the hub has lost sight of (`offline`: its heartbeats stopped
    arriving). The hub is one vantage point: a node cut off from it may still be the best
    one for its users (local first), so the client keeps it as a candidate and lets its
    own probes decide; a node that really died fails them and ranks last."""
    if serves(route, app, site):
        return True
    return route.health == "offline" and bool(route.endpoint) and _runs(route, app, site)


def _runs(route: Route, app: str | None, site: str | None) -> bool:
    if app is not None and not any(a.name == app and a.state == "running"
                                   for a in route.apps):
        return False
    return site is None or any(s.name == site for s in route.sites)


# Choosing -------------------------------------------------------------------------

@dataclass(frozen=True)
class RoutingPolicy:
    rtt_sample_weight: float = 0.4  # EWMA weight of a new RTT sample
    unknown_rtt_ms: float = 1000.0  # a node never measured ranks after measured ones
    cpu_knee_percent: float = 80.0  # CPU below this costs nothing
    overload_penalty_ms: float = 100.0  # at 100% CPU, scaled linearly from the knee
    inflight_penalty_ms: float = 0.5  # per request the node is serving
    degraded_penalty_ms: float = 50.0
    unseen_penalty_ms: float = 50.0  # a node the hub reports offline but that answers
    switch_margin_ms: float = 2.0  # keep the current node unless beaten by
    switch_margin_ratio: float = 0.1  # max(margin_ms, ratio x its score)
    down_cooldown_s: float = 5.0
    # With probing, a node that failed comes back only once a probe answers again.
    confirm_after_down: bool = True
    attempts_max: int = 3  # nodes tried for one request

    def __post_init__(self) -> None:
        if not 0 < self.rtt_sample_weight <= 1:
            raise ConfigError("rtt_sample_weight must be in (0, 1]")
        if not 0 <= self.cpu_knee_percent < 100:
            raise ConfigError("cpu_knee_percent must be in [0, 100)")
        for name in ("unknown_rtt_ms", "overload_penalty_ms", "inflight_penalty_ms",
                     "degraded_penalty_ms", "unseen_penalty_ms", "switch_margin_ms",
                     "switch_margin_ratio", "down_cooldown_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 1 <= self.attempts_max <= 10:
            raise ConfigError("attempts_max must be between 1 and 10")


@dataclass
class _Node:
    route: Route
    rtt_ms: float | None = None
    down_until_s: float = 0.0
    confirmed: bool = True  # answered since it was last marked down
    failures: int = 0


class Router:
    """The ranking of the nodes that serve one app or site, for one client."""

    def __init__(self, clock: Clock, policy: RoutingPolicy | None = None) -> None:
        self.clock = clock
        self.policy = policy or RoutingPolicy()
        self.current: str | None = None
        self._nodes: dict[str, _Node] = {}

    @property
    def node_ids(self) -> list[str]:
        return sorted(self._nodes)

    def set_routes(self, routes: Iterable[Route]) -> None:
        """Replace the candidates; measurements and down marks of nodes that stay are
        kept (a refresh of the table must not forget that a node just failed)."""
        nodes: dict[str, _Node] = {}
        for route in routes:
            node = self._nodes.get(route.node_id)
            if node is None:
                node = _Node(route)
            node.route = route
            nodes[route.node_id] = node
        self._nodes = nodes
        if self.current not in nodes:
            self.current = None

    def route(self, node_id: str) -> Route | None:
        node = self._nodes.get(node_id)
        return node.route if node else None

    def rtt_ms(self, node_id: str) -> float | None:
        node = self._nodes.get(node_id)
        return node.rtt_ms if node else None

    def observe_rtt(self, node_id: str, rtt_ms: float) -> None:
        """A probe answered in `rtt_ms`: the node is alive and this close."""
        node = self._nodes.get(node_id)
        if node is None or not math.isfinite(rtt_ms) or rtt_ms < 0:
            return
        weight = self.policy.rtt_sample_weight
        node.rtt_ms = rtt_ms if node.rtt_ms is None else (
            (1 - weight) * node.rtt_ms + weight * rtt_ms)
        node.confirmed = True

    def mark_down(self, node_id: str) -> None:
        node = self._nodes.get(node_id)
        if node is None:
            return
        node.down_until_s = self.clock.monotonic() + self.policy.down_cooldown_s
        node.confirmed = False
        node.failures += 1
        if self.current == node_id:
            self.current = None

    def mark_ok(self, node_id: str) -> None:
        """A request succeeded there: it is up, and the node in use."""
        node = self._nodes.get(node_id)
        if node is None:
            return
        node.down_until_s = 0.0
        node.confirmed = True
        node.failures = 0
        self.current = node_id

    def is_up(self, node_id: str) -> bool:
        node = self._nodes.get(node_id)
        if node is None:
            return False
        if node.down_until_s > self.clock.monotonic():
            return False
        return node.confirmed or not self.policy.confirm_after_down

    def score(self, node_id: str) -> float:
        node = self._nodes[node_id]
        policy = self.policy
        route = node.route
        rtt = node.rtt_ms
        if rtt is None:
            rtt = policy.unknown_rtt_ms + (route.hub_rtt_ms or 0.0)
        cpu_over = max(0.0, route.load.cpu_percent - policy.cpu_knee_percent)
        penalty = (policy.overload_penalty_ms * cpu_over / (100 - policy.cpu_knee_percent)
                   + policy.inflight_penalty_ms * max(0, route.load.http_inflight))
        if route.health == "degraded":
            penalty += policy.degraded_penalty_ms
        elif route.health == "offline":
            penalty += policy.unseen_penalty_ms
        return rtt + penalty

    def ranked(self) -> list[Route]:
        """Every candidate, best first: up nodes by score (the current one kept first
        unless clearly beaten), then down nodes, soonest back first."""
        up = sorted((n for n in self._nodes if self.is_up(n)),
                    key=lambda n: (self.score(n), n))
        current = self.current
        if up and current in up and up[0] != current:
            best, kept = self.score(up[0]), self.score(current)
            margin = max(self.policy.switch_margin_ms, self.policy.switch_margin_ratio * kept)
            if kept - best <= margin:
                up.remove(current)
                up.insert(0, current)
        down = sorted((n for n in self._nodes if n not in up),
                      key=lambda n: (self._nodes[n].down_until_s, n))
        return [self._nodes[n].route for n in (*up, *down)]

    def plan(self) -> Sequence[Route]:
        """The nodes to try for one request, in order."""
        return self.ranked()[:self.policy.attempts_max]
