"""The `fogline` command: hub, node, token, get, apply, rollout, keys, dev, demo, bench."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console
from rich.table import Table

from fogline import __version__, cli_cache, cli_deploy, cli_routes
from fogline.cliutil import (
    HubClient,
    parse_duration_s,
    parse_host_port,
    parse_labels,
    parse_stream_policy,
)
from fogline.cliviews import apps_table, nodes_table
from fogline.errors import ConfigError, FoglineError
from fogline.runtime import run_service

app = typer.Typer(help="fogline: edge computing for Python.", no_args_is_help=True,
                  add_completion=False)
hub_app = typer.Typer(help="Run the hub, or print its NATS configuration.")
node_app = typer.Typer(help="Run an edge node, or manage enrolled nodes.")
token_app = typer.Typer(help="Bootstrap tokens for enrolling nodes.", no_args_is_help=True)
get_app = typer.Typer(help="Show fleet objects.", no_args_is_help=True)
collection_app = typer.Typer(help="Replicated collections.", no_args_is_help=True)
sim_app = typer.Typer(help="The deterministic simulator.", no_args_is_help=True)
app.add_typer(hub_app, name="hub")
app.add_typer(node_app, name="node")
app.add_typer(token_app, name="token")
app.add_typer(get_app, name="get")
app.add_typer(collection_app, name="collection")
app.add_typer(sim_app, name="sim")
app.add_typer(cli_deploy.keys_app, name="keys")
app.add_typer(cli_deploy.rollout_app, name="rollout")
app.command("apply")(cli_deploy.apply)
app.command("delete")(cli_deploy.delete)
get_app.command("deployments")(cli_deploy.get_deployments)
get_app.command("rollouts")(cli_deploy.get_rollouts)
get_app.command("sites")(cli_deploy.get_sites)
get_app.command("routes")(cli_routes.get_routes)
app.command("gateway")(cli_routes.gateway)
app.add_typer(cli_cache.cache_app, name="cache")
get_app.command("purges")(cli_cache.get_purges)

console = Console()

HubOpt = Annotated[str | None, typer.Option("--hub", help="Hub API URL [env FOGLINE_HUB]")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="Admin token [env FOGLINE_TOKEN]")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="Data dir of a local hub")]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="table or json")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _hub_request(hub: str | None, token: str | None, data: Path | None, method: str,
                 path: str, body: dict[str, Any] | None = None) -> Any:
    """One hub API call for a CLI command; a FoglineError exits with its message."""
    try:
        return HubClient.resolve(hub, token, data).request(method, path, body)
    except FoglineError as exc:
        raise _fail(exc) from exc


def _fail(exc: FoglineError) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(2)


# hub ------------------------------------------------------------------------------

@hub_app.callback(invoke_without_command=True)
def hub(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="Hub data dir")] = Path("fogline-hub"),
    listen: Annotated[str, typer.Option(help="API address HOST:PORT")] = "127.0.0.1:8700",
    db: Annotated[str | None, typer.Option("--db", help="postgresql://... (default: "
                                           "SQLite in DIR)")] = None,
    nats_url: Annotated[str | None, typer.Option("--nats", help="External NATS URL")] = None,
    nats_advertise: Annotated[str | None, typer.Option(
        help="NATS URL to give nodes (default: the server's own)")] = None,
    heartbeat_interval: Annotated[str, typer.Option(help="Node heartbeat interval")] = "5s",
    cert_ttl: Annotated[str, typer.Option(help="Node certificate lifetime")] = "24h",
    sweep_interval: Annotated[str, typer.Option(
        help="How often to look for silent nodes")] = "0.5s",
    tombstone_gc_interval: Annotated[str, typer.Option(
        help="How often to collect tombstones every replica has seen")] = "60s",
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the hub (embedded SQLite and nats-server unless --db/--nats are given)."""
    if ctx.invoked_subcommand is not None:
        return
    from fogline.hub.service import Hub, HubConfig

    _setup_logging(verbose)
    try:
        config = HubConfig(data_dir=data, listen=listen, db_url=db, nats_url=nats_url,
                           nats_advertise=nats_advertise,
                           heartbeat_interval_s=parse_duration_s(heartbeat_interval),
                           cert_lifetime_s=parse_duration_s(cert_ttl),
                           sweep_interval_s=parse_duration_s(sweep_interval),
                           tombstone_gc_interval_s=parse_duration_s(tombstone_gc_interval))
        run_service(Hub(config).run)
    except FoglineError as exc:
        raise _fail(exc) from exc


@hub_app.command("nats-config")
def hub_nats_config(
    data: Annotated[Path, typer.Option("--data", help="Hub data dir")] = Path("fogline-hub"),
    host: Annotated[str, typer.Option(help="Address nats-server listens on")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Client port")] = 4222,
    store_dir: Annotated[Path, typer.Option(help="nats-server store dir")] = Path(
        "/var/lib/nats-server/fogline"),
) -> None:
    """Print the nats-server config (operator mode) an external server needs for --nats."""
    from fogline.hub.nats_authority import NatsAuthority
    from fogline.hub.store import HubStore

    authority = NatsAuthority.open(data / "nats")
    store = HubStore(f"sqlite:///{data / 'hub.db'}") if (data / "hub.db").exists() else None
    revocations = store.revocations() if store else {}
    typer.echo(authority.server_config(host=host, port=port, store_dir=store_dir,
                                       now_s=int(time.time()), revocations=revocations),
               nl=False)


# token ----------------------------------------------------------------------------

@token_app.command("create")
def token_create(
    ttl: Annotated[str, typer.Option(help="Lifetime, e.g. 1h")] = "1h",
    uses: Annotated[int, typer.Option(help="How many nodes may enroll with it")] = 1,
    region: Annotated[str, typer.Option(help="Region given to nodes enrolling")] = "",
    labels: Annotated[str | None, typer.Option(help="k=v,... given to nodes")] = None,
    hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
    output: OutputOpt = "text",
) -> None:
    """Create a bootstrap token and print it."""
    try:
        client = HubClient.resolve(hub, token, data)
        created = client.request("POST", "/v1/tokens", {
            "ttl_s": parse_duration_s(ttl), "uses": uses, "region": region,
            "labels": parse_labels(labels)})
    except FoglineError as exc:
        raise _fail(exc) from exc
    if output == "json":
        typer.echo(json.dumps(created))
        return
    typer.echo(created["token"])
    hint = f"fogline node --hub {client.url} --token {created['token']} --data DIR"
    if client.url.startswith("https://"):
        hint += f" --ca-hash sha256:{created['ca_sha256']}"
    typer.echo(f"# enroll with: {hint}", err=True)


# node -----------------------------------------------------------------------------

@node_app.callback(invoke_without_command=True)
def node(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="Node data dir")] = Path("fogline-node"),
    hub: Annotated[str | None, typer.Option("--hub", help="Hub API URL (first start)")] = None,
    token: Annotated[str | None, typer.Option("--token", help="Bootstrap token")] = None,
    name: Annotated[str | None, typer.Option(help="Node name (default: hostname)")] = None,
    region: Annotated[str, typer.Option(help="Region, e.g. eu-west")] = "",
    zone: Annotated[str, typer.Option(help="Zone within the region")] = "",
    tier: Annotated[str, typer.Option(help="device, near, far or cloud")] = "near",
    labels: Annotated[str | None, typer.Option(help="k=v,...")] = None,
    listen: Annotated[str, typer.Option(help="HOST:PORT for /healthz and /metrics")] = (
        "127.0.0.1:0"),
    heartbeat_interval: Annotated[str | None, typer.Option(
        help="Override the hub's heartbeat interval")] = None,
    nats_url: Annotated[str | None, typer.Option(
        "--nats", help="NATS URL to use instead of the one the hub advertises")] = None,
    ca_hash: Annotated[str | None, typer.Option(
        help="sha256:... of the hub CA (HTTPS hubs)")] = None,
    fsync: Annotated[str, typer.Option(
        help="normal (group commit, WAL) or full (fsync every commit)")] = "normal",
    stream: Annotated[list[str] | None, typer.Option(
        help="Stream policy, repeatable: NAME:priority=10,bandwidth_bps=50000,"
             "quota_bytes=100000000,overflow=drop-oldest")] = None,
    app: Annotated[list[Path] | None, typer.Option(
        "--app", help="App directory with a fogline.yaml, repeatable; served at "
                      "/{app}/... on --listen")] = None,
    mqtt: Annotated[str | None, typer.Option(
        "--mqtt", help="Device MQTT broker URL (mqtt://[user:pass@]host:port); default: "
                       "an embedded broker when apps run")] = None,
    mqtt_listen: Annotated[str, typer.Option(
        help="HOST:PORT of the embedded MQTT broker (port 0: kept across restarts)")] = (
        "127.0.0.1:0"),
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run an edge node: enroll on first start, then heartbeat and serve."""
    if ctx.invoked_subcommand is not None:
        return
    from fogline.node.enroll_once import enroll_if_needed

    _setup_logging(verbose)
    try:
        config = {
            "data_dir": str(data), "hub_url": hub, "token": token, "name": name,
            "region": region, "zone": zone, "tier": tier, "labels": parse_labels(labels),
            "listen": listen, "nats_url": nats_url, "ca_sha256": ca_hash,
            "heartbeat_interval_s": parse_duration_s(heartbeat_interval)
            if heartbeat_interval else None,
            "fsync": fsync, "streams": dict(parse_stream_policy(t) for t in stream or []),
            "apps": [str(d.resolve()) for d in app or []], "mqtt_url": mqtt,
            "mqtt_listen": mqtt_listen}
        if fsync not in ("normal", "full"):
            raise ConfigError(f"--fsync must be normal or full, not {fsync!r}")
        _check_node_apps(config)
        enroll_if_needed(config)
    except FoglineError as exc:
        raise _fail(exc) from exc
    config["log_level"] = logging.DEBUG if verbose else logging.INFO
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process with the lean agent (see fogline/node/__main__.py).
    os.execv(sys.executable, [sys.executable, "-m", "fogline.node", json.dumps(config)])


def _check_node_apps(config: dict[str, Any]) -> None:
    """Bad app manifests and MQTT URLs stop `fogline node` before it enrolls."""
    from fogline.clock import SystemClock
    from fogline.node.apps.manager import NodeApps
    from fogline.transport.mqtt_link import parse_mqtt_url

    if config["mqtt_url"]:
        parse_mqtt_url(config["mqtt_url"])
    parse_host_port(config["mqtt_listen"], "--mqtt-listen")
    NodeApps(config["apps"], SystemClock())


@node_app.command("revoke")
def node_revoke(
    node_id: Annotated[str, typer.Argument(help="Node id")],
    reason: Annotated[str, typer.Option(help="Recorded in the audit log")] = "revoked by admin",
    hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
) -> None:
    """Revoke a node: its credentials stop working at once."""
    result = _hub_request(hub, token, data, "POST", f"/v1/nodes/{node_id}/revoke",
                          {"reason": reason})
    typer.echo(f"node {result['node_id']} revoked")


# get ------------------------------------------------------------------------------

@get_app.command("nodes")
def get_nodes(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
              output: OutputOpt = "table") -> None:
    """List the fleet's nodes."""
    nodes = _hub_request(hub, token, data, "GET", "/v1/nodes")
    if output == "json":
        typer.echo(json.dumps(nodes, indent=2))
    else:
        console.print(nodes_table(nodes))


@get_app.command("apps")
def get_apps(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
             output: OutputOpt = "table",
             state: Annotated[str | None, typer.Option(
                 help="Only apps in this state, e.g. failed")] = None) -> None:
    """Apps across the fleet, as each node last reported them."""
    path = "/v1/apps" + (f"?state={quote(state)}" if state else "")
    rows = _hub_request(hub, token, data, "GET", path)
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
    else:
        console.print(apps_table(rows))


@get_app.command("events")
def get_events(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
               output: OutputOpt = "table", limit: int = 50) -> None:
    """The audit log: enrollments, status changes, revocations, deployments, rollouts."""
    events = _hub_request(hub, token, data, "GET", f"/v1/events?limit={limit}")
    if output == "json":
        typer.echo(json.dumps(events, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("TIME", "ACTOR", "KIND", "SUBJECT", "DETAIL"):
        table.add_column(column)
    for e in reversed(events):
        table.add_row(time.strftime("%H:%M:%S", time.localtime(e["at_s"])), e["actor"],
                      e["kind"], e["subject"], json.dumps(e["detail"]))
    console.print(table)


@collection_app.command("create")
def collection_create(
    name: Annotated[str, typer.Argument(help="Collection name")],
    kind: Annotated[str, typer.Option("--type", help="map, counter or set")] = "map",
    scope: Annotated[str, typer.Option(help="node, region or global")] = "global",
    hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
) -> None:
    """Create a collection (idempotent; type and scope cannot change later)."""
    result = _hub_request(hub, token, data, "POST", "/v1/collections",
                          {"name": name, "type": kind, "scope": scope})
    typer.echo(f"collection/{name} {result['result']}")


@get_app.command("collections")
def get_collections(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
                    output: OutputOpt = "table") -> None:
    """List collections with their type, scope and replicas."""
    rows = _hub_request(hub, token, data, "GET", "/v1/collections")
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "TYPE", "SCOPE", "REPLICAS"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["type"], row["scope"], ", ".join(row["replicas"]))
    console.print(table)


@get_app.command("collection")
def get_collection(
    name: Annotated[str, typer.Argument(help="Collection name")],
    key: Annotated[str | None, typer.Argument(help="One key of a map")] = None,
    replica: Annotated[str | None, typer.Option(help="global, region.R or node.ID")] = None,
    hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
    output: OutputOpt = "table",
) -> None:
    """The hub's view of a collection (every replica, or one)."""
    path = f"/v1/collections/{name}" + (f"?replica={replica}" if replica else "")
    view = _hub_request(hub, token, data, "GET", path)
    if key is not None:
        if view["type"] != "map":
            raise _fail(ConfigError(f"{name} is a {view['type']}; keys exist only in maps"))
        view["replicas"] = {r: v.get(key) for r, v in view["replicas"].items()}
    if output == "json":
        typer.echo(json.dumps(view, indent=2))
        return
    console.print(f"[bold]{name}[/bold] ({view['type']}, scope {view['scope']})")
    for replica_name, value in view["replicas"].items():
        console.print(f"  {replica_name}: {json.dumps(value)}", highlight=False)


@get_app.command("streams")
def get_streams(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
                output: OutputOpt = "table") -> None:
    """Upstream streams per node: records at the hub, drops, gaps."""
    try:
        client = HubClient.resolve(hub, token, data)
        rows = client.request("GET", "/v1/streams")
        names = {n["id"]: n["name"] for n in client.request("GET", "/v1/nodes")}
    except FoglineError as exc:
        raise _fail(exc) from exc
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("NODE", "STREAM", "RECORDS", "LAST SEQ", "DROPPED", "LOST"):
        table.add_column(column)
    for row in rows:
        table.add_row(names.get(row["node_id"], row["node_id"]), row["stream"],
                      str(row["records"]), str(row["last_seq"]), str(row["dropped"]),
                      str(row["lost"]))
    console.print(table)


@get_app.command("tokens")
def get_tokens(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None) -> None:
    """Bootstrap tokens (secrets are never shown again)."""
    tokens = _hub_request(hub, token, data, "GET", "/v1/tokens")
    typer.echo(json.dumps(tokens, indent=2))


@app.command("dev")
def dev(
    app_dir: Annotated[Path, typer.Argument(help="App directory with a fogline.yaml")],
    data: Annotated[Path | None, typer.Option("--data", help="Keep the hub's and node's "
                                              "state here (default: a temporary dir)")] = None,
    port: Annotated[int, typer.Option(help="The node's HTTP port; 0 picks a free one")] = 8787,
    mqtt: Annotated[str | None, typer.Option(
        "--mqtt", help="Device MQTT broker URL (default: the node's embedded broker)")] = None,
) -> None:
    """Run one app on a local hub and node; reload it when its files change."""
    from fogline.sim.dev import DevConfig, DevSession

    try:
        session = DevSession(DevConfig(app_dir=app_dir, data_dir=data, port=port,
                                       mqtt_url=mqtt), echo=typer.echo)
        run_service(session.run)
    except FoglineError as exc:
        raise _fail(exc) from exc


@app.command("demo")
def demo(
    data: Annotated[Path | None, typer.Option("--data", help="Keep state here "
                                              "(default: a temporary dir)")] = None,
    nodes: Annotated[int, typer.Option(
        help="Regional nodes, spread across regions (cloud-1, next to the hub, is extra)")] = 3,
    rtt_ms: Annotated[str | None, typer.Option(
        "--rtt-ms", help="RTT to the hub: 80, or us-east=20,eu-west=80,ap-south=150")] = None,
    duration: Annotated[float, typer.Option(help="Seconds to run; 0 runs until Ctrl-C")] = 100,
    chaos: Annotated[bool, typer.Option("--chaos/--no-chaos",
                                        help="Partition eu-west at t=15s for 15s")] = True,
    rollouts: Annotated[bool, typer.Option(
        "--rollouts/--no-rollouts",
        help="Roll out v2 at t=40s and v3 (fails 20% of requests, rolled back) at t=70s; "
             "v1 is deployed through the hub either way")] = True,
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache",
        help="A catalog origin cached on every node, shoppers routed by the client SDK, "
             "a fleet purge at t=50s and a node killed at t=60s")] = True,
    headless: Annotated[bool, typer.Option(help="No live view")] = False,
    json_path: Annotated[Path | None, typer.Option("--json", help="Write a JSON summary")] = (
        None),
    app_dir: Annotated[Path | None, typer.Option(
        "--app", help="The app every node runs (default: examples/factory of the source "
                      "checkout)")] = None,
) -> None:
    """A hub and a regional fleet on this machine, behind emulated WAN links."""
    from rich.live import Live

    from fogline.sim.demo import DEFAULT_RTT_MS, Demo, DemoConfig, parse_rtt
    from fogline.sim.demo_view import render

    try:
        regions = tuple(DEFAULT_RTT_MS)
        config = DemoConfig(data_dir=data, nodes=nodes, regions=regions,
                            rtt_ms=parse_rtt(rtt_ms, list(regions)), duration_s=duration,
                            chaos=chaos, app_dir=app_dir, rollouts=rollouts, cache=cache)
    except FoglineError as exc:
        raise _fail(exc) from exc
    summary: dict[str, Any] = {}

    async def main() -> None:
        if headless:
            summary.update(await Demo(config).run())
            return
        with Live(console=console, refresh_per_second=4, screen=False) as live:
            summary.update(await Demo(config, lambda state: live.update(render(state))).run())

    try:
        run_service(main)
    except FoglineError as exc:
        raise _fail(exc) from exc
    if not summary:
        return
    if json_path is not None:
        json_path.write_text(json.dumps(summary, indent=2))
    ids = {node["name"]: node["ids_seen"] for node in summary["nodes"]}
    for name, entry in summary["partition"].get("nodes", {}).items():
        typer.echo(f"{name}: offline at the hub {entry.get('detection_s', '?')}s after the "
                   f"cut (the node itself said "
                   f"'{entry.get('local_status_while_offline', '?')}'), ready again "
                   f"{entry.get('recovery_s', '?')}s after heal, same id: {len(ids[name]) == 1}")
    for node in summary["nodes"]:
        typer.echo(f"{node['name']}: {node['status']}, RTT measured "
                   f"{node['rtt_measured_ms']} ms (link {node['rtt_configured_ms']} ms)")
    for key, entry in (summary.get("rollouts") or {}).items():
        if not key.startswith("v") or not entry.get("from_revision"):
            continue
        ended = (f"complete {entry['completed_after_s']}s after apply"
                 if "completed_after_s" in entry else
                 f"rolled back ({entry['reason']}), every node back {entry['rollback_s']}s "
                 "after the breach" if "breach_t_s" in entry else entry["phase"])
        errors = entry.get("user_requests", {}).get("failed", "?")
        typer.echo(f"{key} {entry['version']}: canary {entry.get('canary')}, {ended}; "
                   f"failed user requests meanwhile: {errors}")
    _echo_cache(summary.get("cache"))


def _echo_cache(cache: dict[str, Any] | None) -> None:
    if not cache:
        return
    typer.echo(f"catalog: hit ratio {cache['hit_ratio']}, {cache['origin_requests']} origin "
               "requests")
    for region, row in cache["regions"].items():
        typer.echo(f"  {region}: hit p50 {row['hit_p50_ms']} ms vs origin p50 "
                   f"{row['origin_p50_ms']} ms, {row['failed']} failed of "
                   f"{(row['ok'] or 0) + (row['failed'] or 0)}")
    purge = cache.get("purge") or {}
    if purge:
        latency = purge.get("latency_ms") or {}
        typer.echo(f"purge {purge['tag']}: applied on {purge.get('applied')} of "
                   f"{purge['targets']} nodes, p50 {latency.get('p50')} ms, max "
                   f"{latency.get('max')} ms; old prices served after it: "
                   f"{len(purge.get('stale_after_purge', []))}")
    kill = cache.get("kill") or {}
    if kill:
        elsewhere = kill.get("served_elsewhere") or {}
        typer.echo(f"{kill['node']} killed: its shoppers served by {elsewhere.get('node')} "
                   f"{elsewhere.get('after_s')}s later, {kill['failed_requests']} failed "
                   f"requests; back on it {kill.get('back_on_it_after_s')}s after the kill")


@app.command("bench")
def bench(
    name: Annotated[str, typer.Argument(help="Benchmark name, or 'list'")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write here")] = None,
    quick: Annotated[bool, typer.Option(help="A smaller run of the same shape (< 60 s)")] = (
        False),
) -> None:
    """Measure fogline beside a peer in the same run and print one JSON result."""
    from fogline.bench import BENCHMARKS, run

    if name == "list":
        for bench_name, (_, description) in sorted(BENCHMARKS.items()):
            typer.echo(f"{bench_name:<16} {description}")
        return
    if name not in BENCHMARKS:
        raise _fail(ConfigError(f"no benchmark {name!r}; see `fogline bench list`"))
    result = run(name, quick=quick)
    text = json.dumps(result, indent=2)
    typer.echo(text)
    if json_path is not None:
        json_path.write_text(text + "\n")


@sim_app.command("check")
def sim_check(
    seeds: Annotated[int, typer.Option(help="How many seeds to run")] = 2000,
    start: Annotated[int, typer.Option(help="First seed")] = 0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Run the sans-IO core through seeded faults; print a replay line per failure."""
    from fogline.sim.check import main as check_main

    try:
        code = check_main(seeds, start, verbose)
    except FoglineError as exc:
        raise _fail(exc) from exc
    raise typer.Exit(code)


@app.command("version")
def version() -> None:
    """Print fogline's version."""
    typer.echo(__version__)


def main() -> None:
    app()
