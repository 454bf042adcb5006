"""When to restart a crashed app worker, and when to call its app failed.

Pure: the supervisor tells `CrashHistory` when a worker started and exited (times from
the node clock) and gets back how long to wait before the next start and whether the
app is in a crash loop. The rules, the ones Kubernetes users know from CrashLoopBackOff:

- the wait doubles with each consecutive crash, from `backoff_initial_s` up to
  `backoff_max_s`; a worker that ran `stable_after_s` before exiting resets it;
- `crash_loop_crashes` exits within `crash_loop_window_s` make the app `failed`; it
  keeps being restarted at the backed-off pace, and stays `failed` until a worker has
  run `stable_after_s` without exiting.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    crash_loop_crashes: int = 3
    crash_loop_window_s: float = 60.0
    stable_after_s: float = 30.0


# Added to an app's handler timeout before a silent event loop counts as hung.
HANG_GRACE_S = 2.0


def replace_reason(*, silent_s: float, stuck_s: float, rss_bytes: int, timeout_s: float,
                   memory_mb: int) -> str | None:
    """Why a running worker must be replaced now, or None: its event loop has not
    answered a ping, or a sync handler has held its thread, for longer than the app's
    timeout plus a grace; or its RSS is over the app's memory limit."""
    hang_s = timeout_s + HANG_GRACE_S
    if silent_s > hang_s:
        return f"hung: event loop blocked for over {hang_s:.0f}s"
    if stuck_s > hang_s:
        return f"hung: a sync handler ran for over {hang_s:.0f}s"
    if rss_bytes > memory_mb * 1024 * 1024:
        return f"memory limit {memory_mb} MB exceeded (RSS {rss_bytes / 2**20:.0f} MB)"
    return None


@dataclass(frozen=True)
class RestartDecision:
    delay_s: float
    crash_loop: bool
    crashes_in_window: int


class CrashHistory:
    def __init__(self, policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self._exits: deque[float] = deque()
        self._consecutive = 0
        self._started_s: float | None = None
        self.failed = False
        self.restarts = 0

    def started(self, now_s: float) -> None:
        if self._started_s is not None:
            self.restarts += 1
        self._started_s = now_s

    def exited(self, now_s: float) -> RestartDecision:
        policy = self.policy
        ran_s = now_s - self._started_s if self._started_s is not None else 0.0
        if ran_s >= policy.stable_after_s:
            self._consecutive = 0
        self._consecutive += 1
        self._exits.append(now_s)
        while self._exits and self._exits[0] <= now_s - policy.crash_loop_window_s:
            self._exits.popleft()
        if len(self._exits) >= policy.crash_loop_crashes:
            self.failed = True
        delay_s = min(policy.backoff_initial_s * 2 ** (self._consecutive - 1),
                      policy.backoff_max_s)
        return RestartDecision(delay_s, self.failed, len(self._exits))

    def reset(self) -> None:
        """New code: forget earlier exits (the restart count stays)."""
        self._exits.clear()
        self._consecutive = 0
        self.failed = False

    def check_stable(self, now_s: float) -> bool:
        """Clear `failed` once the current worker has run `stable_after_s`; True if the
        app just left the failed state."""
        if self.failed and self._started_s is not None \
                and now_s - self._started_s >= self.policy.stable_after_s:
            self.failed = False
            self._consecutive = 0
            return True
        return False
