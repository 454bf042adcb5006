"""The demo's live terminal view (rich): the fleet as the hub sees it and as each node
sees itself, with the chaos timeline underneath."""

from __future__ import annotations

import time

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fogline.sim.demo import DemoState

STATUS_STYLE = {"ready": "bold green", "degraded": "yellow", "quarantined": "magenta",
                "offline": "bold red", "revoked": "dim", "starting": "dim"}


def _age(last_seen_s: float | None) -> str:
    return "-" if last_seen_s is None else f"{max(0.0, time.time() - last_seen_s):.1f}s"


def render(state: DemoState) -> Panel:
    table = Table(expand=True, header_style="bold")
    for column in ("node", "region", "at the hub", "node says", "hub link", "RTT to hub",
                   "heartbeat age", "version", "id"):
        table.add_column(column)
    for node in state.nodes:
        local = node.local.get("status", "-")
        link = node.local.get("hub_connected")
        measured = node.local.get("hub_rtt_ms")
        rtt = f"{measured:.0f} ms" if measured else "-"
        table.add_row(
            node.name, node.region,
            Text(node.hub_status, style=STATUS_STYLE.get(node.hub_status, "")),
            Text(local, style="green" if local == "ok" else "red"),
            Text("up" if link else "down", style="green" if link else "red"),
            f"{rtt} (link {node.rtt_ms:.0f})", _age(node.last_seen_s), node.version or "-",
            node.node_id or "-")
    lines = Text()
    for entry in state.timeline[-8:]:
        detail = {k: v for k, v in entry.items() if k not in ("t_s", "at_s", "event")}
        text = ", ".join(f"{k}={v}" for k, v in detail.items() if k != "hub_since_s")
        lines.append(f"t={entry['t_s']:6.1f}s  {entry['event']:<14} {text}\n")
    title = (f"fogline demo — {state.phase} — t={state.elapsed_s():.0f}s — hub {state.hub_url}")
    data = Table(expand=True, header_style="bold", title="data: global collection "
                 "'readings' + stream 'telemetry'")
    for column in ("node", "writes", "emitted", "backlog on node", "at the hub"):
        data.add_column(column)
    if state.data is not None:
        for node in state.data.nodes.values():
            data.add_row(node.name, str(node.writes), str(len(node.acked_seqs)),
                         Text(str(node.backlog), style="yellow" if node.backlog > 5 else ""),
                         str(node.at_hub))
    return Panel(Group(table, data, Panel(lines, title="timeline", border_style="dim")),
                 title=title,
                 subtitle=f"WAN control: {state.wan_url}/links — Ctrl-C stops everything")
