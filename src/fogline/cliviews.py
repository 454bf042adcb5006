"""The tables `fogline get` prints for nodes and apps.

App names, versions and reasons come from nodes' heartbeats, and nodes are not trusted:
they are escaped so they can never smuggle rich markup into an operator's terminal.
"""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape
from rich.table import Table

STATUS_STYLE = {"ready": "green", "degraded": "yellow", "quarantined": "magenta",
                "offline": "red", "revoked": "dim"}
APP_STATE_STYLE = {"running": "green", "starting": "cyan", "restarting": "yellow",
                   "failed": "red", "stopped": "dim"}
# A node in these states no longer reports: its apps' states are its last report.
_STALE_NODE = ("offline", "revoked")


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    elapsed = max(0.0, time.time() - seconds)
    return f"{elapsed:.0f}s" if elapsed < 120 else f"{elapsed / 60:.0f}m" if (
        elapsed < 7200) else f"{elapsed / 3600:.0f}h"


def _styled(text: str, style: str) -> str:
    return f"[{style}]{escape(text)}[/{style}]" if style else escape(text)


def app_cell(app: dict[str, Any]) -> str:
    """`factory:running`, or `factory:failed(3)` when it has restarted 3 times."""
    restarts = f"({app['restarts']})" if app.get("restarts") else ""
    text = f"{app['name']}:{app['state']}{restarts}"
    return _styled(text, APP_STATE_STYLE.get(app["state"], ""))


def nodes_table(nodes: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for column in ("ID", "NAME", "REGION", "TIER", "STATUS", "LAST SEEN", "VERSION",
                   "CAPABILITIES", "APPS", "LABELS"):
        table.add_column(column)
    for n in nodes:
        caps = n["capabilities"]
        cap_text = (f"{caps.get('cores', '?')} cores, "
                    f"{caps.get('memory_bytes', 0) / 2**30:.1f} GiB, {caps.get('arch', '?')}"
                    f"{', gpu' if caps.get('gpu') else ''}")
        apps = sorted(n.get("apps") or [], key=lambda a: a["name"])  # older hubs: none
        table.add_row(n["id"], n["name"], n["region"], n["tier"],
                      _styled(n["status"], STATUS_STYLE.get(n["status"], "")),
                      age(n["last_seen_s"]), n["version"], cap_text,
                      ",".join(app_cell(a) for a in apps) or "-",
                      ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())))
    return table


def apps_table(rows: list[dict[str, Any]]) -> Table:
    """One row per app per node (rows as `GET /v1/apps` returns them)."""
    table = Table(box=None, header_style="bold")
    for column in ("NODE", "APP", "VERSION", "STATE", "RESTARTS", "SINCE", "REASON"):
        table.add_column(column)
    for row in rows:
        state = _styled(row["state"], APP_STATE_STYLE.get(row["state"], ""))
        if row["node_status"] in _STALE_NODE:
            state += f" (node {row['node_status']})"
        table.add_row(escape(row["node"]), escape(row["app"]), escape(row["version"]), state,
                      str(row["restarts"]), age(row["since_s"] or None),
                      escape(row["reason"]) or "-")
    return table
