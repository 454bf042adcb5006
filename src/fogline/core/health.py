"""Node status rules: when a node is ready, degraded, quarantined, offline or revoked.

Pure functions over `NodeHealth` with the time passed in. The hub applies them to each
heartbeat it receives (`observe_heartbeat`) and to every node on a periodic sweep
(`check_liveness`). The rule, in words:

- **offline**: no heartbeat for `missed_heartbeats_offline` intervals (default 3).
- **degraded**: the node reports a failing health check.
- **quarantined**: a check has failed for `failing_heartbeats_quarantine` heartbeats in a
  row (default 3), or the node has come back from offline more than `flap_limit` times
  within `flap_window_s` (flapping). A quarantined node leaves quarantine only after it
  has been connected and healthy for `quarantine_stable_s`.
- **ready**: connected and healthy otherwise.
- **revoked**: final; nothing a node sends changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fogline.protocol import Status


@dataclass(frozen=True)
class HealthPolicy:
    missed_heartbeats_offline: int = 3
    failing_heartbeats_quarantine: int = 3
    flap_limit: int = 3
    flap_window_s: float = 600.0
    quarantine_stable_s: float = 60.0


@dataclass(frozen=True)
class NodeHealth:
    status: Status
    status_since_s: float
    interval_s: float
    last_seen_s: float | None = None
    failing_streak: int = 0
    # When the node came back from offline, newest last, within the flap window.
    returns_s: tuple[float, ...] = ()
    healthy_since_s: float | None = None
    reason: str = ""


def _with_status(health: NodeHealth, status: Status, now_s: float, reason: str) -> NodeHealth:
    if status == health.status and reason == health.reason:
        return health
    since = health.status_since_s if status == health.status else now_s
    return replace(health, status=status, status_since_s=since, reason=reason)


def observe_heartbeat(health: NodeHealth, failing_checks: tuple[str, ...], interval_s: float,
                      now_s: float, policy: HealthPolicy = HealthPolicy()) -> NodeHealth:
    """The node's health after a heartbeat arrives at `now_s`."""
    if health.status == "revoked":
        return health
    returns = tuple(t for t in health.returns_s if now_s - t <= policy.flap_window_s)
    if health.status == "offline":
        returns = (*returns, now_s)
    healthy = not failing_checks
    streak = 0 if healthy else health.failing_streak + 1
    healthy_since = (health.healthy_since_s if health.healthy_since_s is not None
                     and health.status != "offline" else now_s) if healthy else None
    updated = replace(health, last_seen_s=now_s, interval_s=interval_s, failing_streak=streak,
                      returns_s=returns, healthy_since_s=healthy_since)

    if streak >= policy.failing_heartbeats_quarantine:
        return _with_status(updated, "quarantined", now_s,
                            f"health checks failing: {', '.join(failing_checks)}")
    if len(returns) > policy.flap_limit:
        return _with_status(updated, "quarantined", now_s,
                            f"flapping: back from offline {len(returns)} times "
                            f"in {policy.flap_window_s:.0f}s")
    if health.status == "quarantined":
        stable = healthy_since is not None and now_s - healthy_since >= policy.quarantine_stable_s
        if not stable:
            return updated
    if not healthy:
        return _with_status(updated, "degraded", now_s,
                            f"health checks failing: {', '.join(failing_checks)}")
    return _with_status(updated, "ready", now_s, "")


def check_liveness(health: NodeHealth, now_s: float,
                   policy: HealthPolicy = HealthPolicy()) -> NodeHealth:
    """The node's health at `now_s` judged only by how long it has been silent."""
    if health.status in ("revoked", "offline"):
        return health
    reference = health.last_seen_s if health.last_seen_s is not None else health.status_since_s
    silent_s = now_s - reference
    if silent_s > policy.missed_heartbeats_offline * health.interval_s:
        return _with_status(replace(health, healthy_since_s=None), "offline", now_s,
                            f"no heartbeat for {silent_s:.1f}s")
    return health


def revoke(health: NodeHealth, now_s: float, reason: str) -> NodeHealth:
    return _with_status(health, "revoked", now_s, reason)
