"""CLI for the edge cache: `cache purge` and `get purges`."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.table import Table

from fogline.cli_deploy import (
    DataOpt,
    HubOpt,
    OutputOpt,
    ReasonOpt,
    TokenOpt,
    _call,
    _client,
    console,
)

cache_app = typer.Typer(help="The nodes' edge cache.", no_args_is_help=True)



@cache_app.command("purge")
def purge(tag: Annotated[list[str] | None, typer.Option(
              "--tag", help="Purge objects with this Cache-Tag / Surrogate-Key (repeatable)",
              show_default=False)] = None,
          url: Annotated[list[str] | None, typer.Option(
              "--url", help="Purge this path or URL, every variant (repeatable)",
              show_default=False)] = None,
          prefix: Annotated[list[str] | None, typer.Option(
              "--prefix", help="Purge every path under this prefix (repeatable)",
              show_default=False)] = None,
          region: Annotated[str, typer.Option("--region", help="Only this region's nodes")] = "",
          site: Annotated[str, typer.Option("--site", help="Only this site's cache")] = "",
          wait: Annotated[float, typer.Option(
              "--wait", help="Seconds to wait for every online node to apply it")] = 5.0,
          hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
          reason: ReasonOpt = "") -> None:
    """Purge cached objects on every node (or a region's) through the hub."""
    given = [(kind, values) for kind, values in (("tag", tag), ("url", url),
                                                 ("prefix", prefix)) if values]
    if len(given) != 1:
        console.print("[red]error:[/red] give one of --tag, --url or --prefix")
        raise typer.Exit(2)
    kind, values = given[0]
    client = _client(hub, token, data)
    issued = _call(client, "POST", "/v1/purges", {
        "kind": kind, "values": values, "region": region, "site": site, "reason": reason})
    console.print(f"purge/{issued['seq']} issued to {issued['targets']} nodes", highlight=False)
    deadline = time.monotonic() + wait
    status = _call(client, "GET", f"/v1/purges/{issued['seq']}")
    while wait > 0 and time.monotonic() < deadline and _online_pending(status):
        time.sleep(0.1)
        status = _call(client, "GET", f"/v1/purges/{issued['seq']}")
    latency = status["latency_ms"]
    shown = f", p50 {latency['p50']:.0f} ms, max {latency['max']:.0f} ms" \
        if latency["p50"] is not None else ""
    console.print(f"applied on {status['applied']} of {status['targets']} nodes{shown}",
                  highlight=False)
    for node in status["nodes"]:
        if not node["applied"]:
            console.print(f"  pending on {node['node']} ({node['status']}): it applies "
                          "the purge before serving from its cache again", highlight=False)


def _online_pending(status: dict[str, Any]) -> bool:
    return any(not n["applied"] and n["status"] in ("ready", "degraded")
               for n in status["nodes"])


def get_purges(seq: Annotated[int | None, typer.Argument(help="One purge, per node")] = None,
               limit: Annotated[int, typer.Option("--limit")] = 20,
               hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
               output: OutputOpt = "table") -> None:
    """Cache purges and where they have been applied."""
    client = _client(hub, token, data)
    if seq is not None:
        status = _call(client, "GET", f"/v1/purges/{seq}")
        if output == "json":
            typer.echo(json.dumps(status, indent=2))
            return
        table = Table(box=None, header_style="bold",
                      title=f"purge/{seq} {status['kind']} {', '.join(status['values'])}")
        for column in ("NODE", "REGION", "STATUS", "APPLIED", "LATENCY", "REMOVED"):
            table.add_column(column)
        for node in status["nodes"]:
            latency = node["latency_ms"]
            table.add_row(node["node"], node["region"], node["status"],
                          "yes" if node["applied"] else "pending",
                          f"{latency:.0f} ms" if latency is not None else "",
                          str(node["removed"]) if node["removed"] is not None else "")
        console.print(table)
        return
    purges = _call(client, "GET", f"/v1/purges?limit={limit}")
    if output == "json":
        typer.echo(json.dumps(purges, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("SEQ", "KIND", "VALUES", "REGION", "APPLIED", "P50", "MAX", "AGE", "ACTOR"):
        table.add_column(column)
    now = time.time()
    for p in purges:
        latency = p["latency_ms"]
        table.add_row(str(p["seq"]), p["kind"], ", ".join(p["values"])[:60],
                      p["region"] or "all", f"{p['applied']}/{p['targets']}",
                      _ms(latency["p50"]), _ms(latency["max"]),
                      f"{now - p['issued_at_s']:.0f}s", p["actor"])
    console.print(table)


def _ms(value: float | None) -> str:
    return f"{value:.0f} ms" if value is not None else ""
