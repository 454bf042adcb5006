"""Which changes in a node's reported apps the hub records as events.

A pure comparison of two heartbeat reports. Only entering or leaving `failed` is an
event: `starting`/`running`/`restarting` churn is normal supervision and would flood the
audit log, while a failed app (crash loop, memory limit, hung) needs someone to act.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fogline.protocol import AppStatus

FAILED = "failed"
# The state an app is given in an event when the node stopped reporting it.
ABSENT = "absent"


@dataclass(frozen=True)
class AppChange:
    app: str
    version: str
    before: str
    after: str
    restarts: int
    reason: str


def failure_changes(before: Sequence[AppStatus], after: Sequence[AppStatus]) -> list[AppChange]:
    """Apps that entered or left `failed` from one report to the next, by name.

    An app seen for the first time already failed counts as entering; a failed app that
    is no longer reported (undeployed) counts as leaving, with `after` = "absent".
    """
    old = {app.name: app for app in before}
    new = {app.name: app for app in after}
    changes: list[AppChange] = []
    for name, app in new.items():
        previous = old[name].state if name in old else ABSENT
        if (previous == FAILED) != (app.state == FAILED):
            changes.append(AppChange(name, app.version, previous, app.state, app.restarts,
                                     app.reason))
    for name, app in old.items():
        if name not in new and app.state == FAILED:
            changes.append(AppChange(name, app.version, FAILED, ABSENT, app.restarts, ""))
    return changes
