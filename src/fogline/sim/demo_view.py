"""The demo's live terminal view (rich): the fleet as the hub sees it and as each node
sees itself, the data story, the app story (edge vs cloud latency per region, device
messages and summaries per node), the rollouts (each version's step, phase and nodes on
it), with the chaos timeline underneath."""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fogline.sim.demo import DemoState
from fogline.sim.demo_apps import COMPARED, USER_TO_CLOUD, USER_TO_EDGE, AppWorkload
from fogline.sim.demo_catalog import CacheStory
from fogline.sim.demo_rollouts import RolloutStory

PHASE_STYLE = {"complete": "green", "progressing": "bold yellow", "rolled_back": "bold red",
               "paused": "magenta", "applying": "dim"}
STATUS_STYLE = {"ready": "bold green", "degraded": "yellow", "quarantined": "magenta",
                "offline": "bold red", "revoked": "dim", "starting": "dim"}


TIMELINE_LINES = 6


def _table(title: str | None = None) -> Table:
    """A table without outer edges: the view has to fit a terminal."""
    return Table(expand=True, header_style="bold", title=title, box=box.SIMPLE_HEAD,
                 show_edge=False, pad_edge=False)


def _age(last_seen_s: float | None) -> str:
    return "-" if last_seen_s is None else f"{max(0.0, time.time() - last_seen_s):.1f}s"


def render(state: DemoState) -> Panel:
    table = _table()
    for column in ("node", "region", "tier", "at the hub", "node says", "hub link", "RTT to hub",
                   "heartbeat age", "version", "id"):
        table.add_column(column)
    for node in state.nodes:
        local = node.local.get("status", "-")
        link = node.local.get("hub_connected")
        measured = node.local.get("hub_rtt_ms")
        rtt = f"{measured:.0f} ms" if measured else "-"
        table.add_row(
            node.name, node.region, node.tier,
            Text(node.hub_status, style=STATUS_STYLE.get(node.hub_status, "")),
            Text(local, style="green" if local == "ok" else "red"),
            Text("up" if link else "down", style="green" if link else "red"),
            f"{rtt} (link {node.rtt_ms:.0f})" if node.api_link else f"{rtt} (no WAN)",
            _age(node.last_seen_s), node.version or "-",
            node.node_id or "-")
    lines = Text()
    for entry in state.timeline[-TIMELINE_LINES:]:
        detail = {k: v for k, v in entry.items() if k not in ("t_s", "at_s", "event")}
        text = ", ".join(f"{k}={v}" for k, v in detail.items() if k != "hub_since_s")
        lines.append(f"t={entry['t_s']:6.1f}s  {entry['event']:<14} {text}\n")
    lines.rstrip()
    title = (f"fogline demo — {state.phase} — t={state.elapsed_s():.0f}s — hub {state.hub_url}"
             f" — {state.processes} processes, RSS {state.rss_mb:.0f} MB")
    data = _table("data: global collection 'readings' + stream 'telemetry'")
    for column in ("node", "writes", "emitted", "backlog on node", "at the hub"):
        data.add_column(column)
    if state.data is not None:
        for node in state.data.nodes.values():
            data.add_row(node.name, str(node.writes), str(len(node.acked_seqs)),
                         Text(str(node.backlog), style="yellow" if node.backlog > 5 else ""),
                         str(node.at_hub))
    parts: list[Table | Panel] = [table]
    if state.data is not None and state.data.nodes:
        parts.append(data)
    if state.apps is not None:
        parts.append(render_apps(state.apps))
    if state.rollouts is not None:
        parts.append(render_rollouts(state.rollouts))
    if state.cache is not None and state.cache.regions():
        parts.append(render_cache(state.cache))
    parts.append(Panel(lines, title="timeline", border_style="dim"))
    return Panel(Group(*parts),
                 title=title,
                 subtitle=f"WAN control: {state.wan_url}/links — Ctrl-C stops everything")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _path(figures: dict[str, Any]) -> Text:
    text = Text(f"{_ms(figures.get('p50_ms'))} / {_ms(figures.get('p99_ms'))}")
    failed = figures.get("failed") or 0
    text.append(f"  {figures.get('ok') or 0} ok", style="dim")
    if failed:
        text.append(f" {failed} failed", style="red")
    return text


def render_apps(apps: AppWorkload) -> Panel:
    """Edge vs cloud per region, and what each node's copy of the app is doing."""
    latency = _table("users: GET /factory/machines/<m> — p50 / p99 ms, client-side")
    for column in ("region", "RTT", "edge node", "edge p50 / p99", "cloud p50 / p99",
                   "cloud / edge (p50, p99)"):
        latency.add_column(column)
    for row in apps.regions():
        ratios = f"{row['ratio_p50'] or '-'}x, {row['ratio_p99'] or '-'}x"
        latency.add_row(row["region"], f"{row['rtt_ms']:.0f} ms", row["edge_node"],
                        _path(row["edge"]), _path(row["cloud"]),
                        Text(ratios, style="bold green" if row["ratio_p99"] else ""))
    nodes = _table("app 'factory' per node: device messages in, summaries out "
                   "(stream 'summaries')")
    for column in ("node", "tier", "app", "device msgs", "malformed", "requests",
                   "summaries", "queued", "at the hub"):
        nodes.add_column(column)
    for row in apps.node_rows():
        state = row["state"]
        nodes.add_row(row["node"], row["tier"],
                      Text(f"{state} {row['version']}".strip(),
                           style="green" if state == "running" else "yellow"),
                      str(row["messages"]), str(row["malformed"]), str(row["requests"]),
                      str(row["summaries_emitted"]),
                      Text(str(row["summaries_backlog"]),
                           style="yellow" if row["summaries_backlog"] > 5 else ""),
                      str(row["summaries_at_hub"]))
    note = Text(f"users → edge: {USER_TO_EDGE}; users → cloud: {USER_TO_CLOUD}.\n"
                f"Compared: {COMPARED}.", style="dim")
    cut = apps.during_cut()
    if cut:
        edge, cloud = cut["edge_requests"], cut["cloud_requests"]
        healed = " (healed)" if cut["healed"] else ""
        note.append(f"\n{cut['region']} cut off from the hub and the cloud for "
                    f"{cut['cut_s']:.0f} s{healed}: edge requests {edge['ok']} ok, {edge['failed']}"
                    f" failed; cloud requests {cloud['ok']} ok, {cloud['failed']} failed; "
                    f"device messages handled at the edge {cut['messages_during_cut']}",
                    style="yellow" if not cut["healed"] else "")
    return Panel(Group(latency, nodes, note), title="edge vs cloud: the factory app",
                 border_style="cyan")


def render_rollouts(story: RolloutStory) -> Panel:
    """Each version applied through the hub: its rollout's step and phase, the nodes
    running it, why it was rolled back."""
    table = _table()
    for column in ("version", "applied", "phase", "step", "on it"):
        table.add_column(column, no_wrap=True)
    table.add_column("why", ratio=1)
    for row in story.rows():
        phase = row["phase"]
        why = row["reason"]
        if phase == "progressing" and row["cohort"]:
            why = "on " + ", ".join(row["cohort"])
        if phase == "complete" and row["from_revision"] and row["ended_t_s"] is not None:
            why = f"complete at t={row['ended_t_s']:.1f}s"
        if row["back_t_s"] is not None:
            why += f"; every node back on r{row['from_revision']} at t={row['back_t_s']:.1f}s"
        table.add_row(
            f"{row['release']} {row['version']} (r{row['revision']})",
            f"t={row['applied_t_s']:.0f}s", Text(phase, style=PHASE_STYLE.get(phase, "")),
            row["step"], f"{row['on_it']}/{row['nodes']}",
            Text(why, style="red" if phase == "rolled_back" else "dim"))
    return Panel(Group(table, Text(story.plan(), style="dim")),
                 title=f"rollouts of '{story.app}' through the hub", border_style="blue")


def render_cache(story: CacheStory) -> Panel:
    """The catalog's shoppers per region: which node serves them (the client SDK's
    choice), hits and their latency against trips to the origin, failures; then the
    purge and the node kill as they happen."""
    table = _table()
    for column in ("shoppers in", "served by", "hits", "hit p50 / p99 ms",
                   "origin p50 / p99 ms", "stale", "requests"):
        table.add_column(column, no_wrap=True)
    for region, row in story.regions().items():
        counts = row.get("x_cache", {})
        total = sum(counts.values())
        hits = sum(counts.get(k, 0) for k in ("HIT", "STALE", "STALE-IF-ERROR"))
        requests = Text(f"{row.get('ok', 0)} ok")
        if row.get("failed"):
            requests.append(f" {row['failed']} failed", style="red")
        node = story.names.get(row.get("node") or "", row.get("node") or "-")
        table.add_row(region, node, f"{hits / total:.0%}" if total else "-",
                      f"{_ms(row.get('hit_p50_ms'))} / {_ms(row.get('hit_p99_ms'))}",
                      f"{_ms(row.get('origin_p50_ms'))} / {_ms(row.get('origin_p99_ms'))}",
                      Text(str(counts.get("STALE-IF-ERROR", 0)),
                           style="yellow" if counts.get("STALE-IF-ERROR") else "dim"),
                      requests)
    lines = Text()
    purge = story.purge
    if purge:
        latency = purge.get("latency_ms") or {}
        lines.append(f"purge {purge['tag']} (#{purge['seq']}): applied on "
                     f"{purge.get('applied', 0)}/{purge['targets']} nodes, p50 "
                     f"{_ms(latency.get('p50'))} ms, max {_ms(latency.get('max'))} ms; "
                     f"old prices served after it: {len(story.stale_after_purge())}\n")
    kill = story.kill_figures()
    if kill:
        elsewhere = kill.get("served_elsewhere") or {}
        lines.append(f"{kill['node']} killed: its shoppers on {elsewhere.get('node', '...')} "
                     f"after {elsewhere.get('after_s', '...')} s, "
                     f"{kill['failed_requests']} failed requests", style="bold")
        if kill.get("back_on_it_after_s") is not None:
            lines.append(f"; back on it {kill['back_on_it_after_s']:.1f} s after the kill")
    lines.rstrip()
    return Panel(Group(table, lines), title="edge cache: catalog, shoppers routed by "
                 "fogline.client", border_style="cyan")
