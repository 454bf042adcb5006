"""CLI for global routing: `fogline get routes` and `fogline gateway`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fogline.cliutil import HubClient, parse_host_port
from fogline.cliviews import STATUS_STYLE, age
from fogline.errors import ConfigError, FoglineError

console = Console()

HubOpt = Annotated[str | None, typer.Option("--hub", help="Hub API URL [env FOGLINE_HUB]")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="Admin token [env FOGLINE_TOKEN]")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="Data dir of a local hub")]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="table or json")]
AppOpt = Annotated[str | None, typer.Option("--app", help="Only nodes running this app")]
SiteOpt = Annotated[str | None, typer.Option("--site", help="Only nodes fronting this site")]


def _fail(exc: FoglineError) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(2)


def _query(app: str | None, site: str | None) -> str:
    if app is not None and site is not None:
        raise ConfigError("--app and --site exclude each other")
    from urllib.parse import urlencode

    query = urlencode({"app": app} if app else {"site": site} if site else {})
    return f"?{query}" if query else ""


def routes_table(table: dict[str, Any]) -> Table:
    view = Table(box=None, header_style="bold")
    for column in ("NODE", "REGION", "TIER", "ENDPOINT", "HEALTH", "SERVING", "CPU",
                   "INFLIGHT", "RPS", "HUB RTT", "USER RTT", "LAST SEEN", "APPS", "SITES"):
        view.add_column(column)
    for r in table["routes"]:
        load = r["load"]
        health = escape(r["health"])
        style = STATUS_STYLE.get(r["health"], "")
        rtt = r["hub_rtt_ms"]
        # Apps and endpoints come from nodes' heartbeats: escaped, never markup.
        view.add_row(
            escape(r["node_id"]), escape(r["region"]) or "-", escape(r["tier"]),
            escape(r["endpoint"]) or "-", f"[{style}]{health}[/{style}]" if style else health,
            "[green]yes[/green]" if r["serving"] else "[red]no[/red]",
            f"{load['cpu_percent']:.0f}%", str(load["http_inflight"]),
            f"{load['http_rps']:.1f}", f"{rtt:.1f} ms" if rtt is not None else "-",
            " ".join(escape(f"{where}={ms:.0f}ms") for where, ms in
                     sorted(r.get("user_rtt_ms", {}).items())) or "-",
            age(r["last_seen_s"]),
            ",".join(escape(f"{a['name']}:{a['state']}") for a in r["apps"]) or "-",
            ",".join(escape(s["name"]) for s in r["sites"]) or "-")
    return view


def get_routes(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
               app: AppOpt = None, site: SiteOpt = None, output: OutputOpt = "table") -> None:
    """The routing table: nodes, endpoints, health, load, hub RTT (for DNS or LB export
    use -o json)."""
    try:
        if output not in ("table", "json"):
            raise ConfigError(f"-o must be table or json, not {output!r}")
        table = HubClient.resolve(hub, token, data).request("GET",
                                                            "/v1/routes" + _query(app, site))
    except FoglineError as exc:
        raise _fail(exc) from exc
    if output == "json":
        typer.echo(json.dumps(table, indent=2))
        return
    console.print(routes_table(table))


def _resolve_map(items: list[str]) -> dict[str, str]:
    mapping = {}
    for item in items:
        endpoint, sep, url = item.partition("=")
        if not sep or not endpoint.startswith(("http://", "https://")) \
                or not url.startswith(("http://", "https://")):
            raise ConfigError(f"--resolve {item!r}: expected ENDPOINT=URL, both http(s) URLs")
        mapping[endpoint.rstrip("/")] = url
    return mapping


def gateway(
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to serve on")] = (
        "127.0.0.1:8780"),
    hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
    app: AppOpt = None, site: SiteOpt = None,
    resolve: Annotated[list[str] | None, typer.Option(
        "--resolve", help="ENDPOINT=URL: reach a node's endpoint at another URL "
                          "(NAT, emulated networks), repeatable")] = None,
    probe_interval: Annotated[float, typer.Option(
        help="Seconds between RTT probes of the candidate nodes")] = 1.0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Proxy HTTP to the best node serving an app or site, failing over like the SDK."""
    from fogline.client import Client
    from fogline.gateway import run_gateway
    from fogline.runtime import run_service

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        if app is not None and site is not None:
            raise ConfigError("--app and --site exclude each other")
        address = parse_host_port(listen, "--listen")
        hub_client = HubClient.resolve(hub, token, data)
        client = Client(hub_client.url, token=hub_client.token, app=app, site=site,
                        resolve=_resolve_map(resolve or []), verify=hub_client.verify,
                        probe_interval_s=probe_interval)

        def ready(port: int) -> None:
            typer.echo(f"gateway listening on http://{address[0]}:{port}")
            sys.stdout.flush()

        run_service(lambda: run_gateway(address, client, ready))
    except FoglineError as exc:
        raise _fail(exc) from exc
