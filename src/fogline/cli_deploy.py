"""CLI for deployments: `apply`, `delete`, `keys`, `rollout`,
`get deployments|rollouts|sites`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fogline.cliutil import HubClient
from fogline.errors import FoglineError

console = Console()

keys_app = typer.Typer(help="Publisher keys that sign app bundles.", no_args_is_help=True)
rollout_app = typer.Typer(help="Watch and steer rollouts.", no_args_is_help=True)

HubOpt = Annotated[str | None, typer.Option("--hub", help="Hub API URL [env FOGLINE_HUB]")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="Admin token [env FOGLINE_TOKEN]")]
DataOpt = Annotated[Path | None, typer.Option("--data", help="Data dir of a local hub")]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="table or json")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the audit log)")]
FileOpt = Annotated[Path, typer.Option("-f", "--filename",
                                       help="Manifest file or directory of manifests")]


def default_key_path() -> Path:
    env = os.environ.get("FOGLINE_KEY")
    if env:
        return Path(env)
    return Path(os.environ.get("FOGLINE_HOME", Path.home() / ".fogline")) / "publisher.key"


KeyOpt = Annotated[Path | None, typer.Option(
    "--key", help="Publisher private key [env FOGLINE_KEY, default ~/.fogline/publisher.key]")]


def _fail(exc: FoglineError) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}", highlight=False)
    return typer.Exit(2)


def _client(hub: str | None, token: str | None, data: Path | None) -> HubClient:
    try:
        return HubClient.resolve(hub, token, data)
    except FoglineError as exc:
        raise _fail(exc) from exc


def _call(client: HubClient, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    try:
        return client.request(method, path, body)
    except FoglineError as exc:
        raise _fail(exc) from exc


# apply / delete ---------------------------------------------------------------------

def apply(file: FileOpt, hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
          key: KeyOpt = None, reason: ReasonOpt = "") -> None:
    """Make the fleet match manifests (idempotent): App, Collection, Stream and Site kinds."""
    from fogline.deploy_client import apply_request, read_documents

    try:
        documents = read_documents(file)  # all validated before anything is sent
    except FoglineError as exc:
        raise _fail(exc) from exc
    client = _client(hub, token, data)
    for doc in documents:
        if doc.kind == "App":
            try:
                body = apply_request(doc, key or default_key_path(), reason)
            except FoglineError as exc:
                raise _fail(exc) from exc
            result = _call(client, "POST", "/v1/apply", body)
            typer.echo(f"app/{doc.name} {result['result']} (revision {result['revision']})")
        elif doc.kind == "Stream":
            result = _call(client, "POST", "/v1/stream-policies",
                           {"name": doc.name, "policy": doc.body.get("spec", {}),
                            "reason": reason})
            typer.echo(f"stream/{doc.name} {result['result']}")
        elif doc.kind == "Site":
            result = _call(client, "POST", "/v1/sites",
                           {"name": doc.name, "spec": doc.body["spec"], "reason": reason})
            typer.echo(f"site/{doc.name} {result['result']}")
        else:
            spec = doc.body["spec"]
            result = _call(client, "POST", "/v1/collections",
                           {"name": doc.name, "type": spec["type"], "scope": spec["scope"]})
            shown = "created" if result["result"] == "created" else "unchanged"
            typer.echo(f"collection/{doc.name} {shown}")


def delete(file: FileOpt, hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
           reason: ReasonOpt = "") -> None:
    """Remove the apps of these manifests from every node."""
    from urllib.parse import quote

    from fogline.deploy_client import read_documents

    try:
        documents = read_documents(file)
    except FoglineError as exc:
        raise _fail(exc) from exc
    client = _client(hub, token, data)
    for doc in documents:
        if doc.kind == "Collection":
            typer.echo(f"collection/{doc.name} kept (collections are not deleted: their "
                       "data lives on every replica)")
        elif doc.kind == "Stream":
            _call(client, "DELETE", f"/v1/stream-policies/{doc.name}?reason={quote(reason)}")
            typer.echo(f"stream/{doc.name} deleted (nodes go back to their own policy)")
        elif doc.kind == "Site":
            _call(client, "DELETE", f"/v1/sites/{doc.name}?reason={quote(reason)}")
            typer.echo(f"site/{doc.name} deleted")
        else:
            _call(client, "DELETE", f"/v1/deployments/{doc.name}?reason={quote(reason)}")
            typer.echo(f"app/{doc.name} deleted")


# keys -------------------------------------------------------------------------------

@keys_app.command("create")
def keys_create(path: Annotated[Path | None, typer.Argument(help="Private key file")] = None
                ) -> None:
    """Create an ed25519 publisher key (private key 0600, public key in PATH.pub)."""
    from fogline.bundle import create_key

    target = path or default_key_path()
    try:
        key = create_key(target)
    except FoglineError as exc:
        raise _fail(exc) from exc
    typer.echo(f"key {key.key_id} written to {target} (public: {target.with_suffix('.pub')})")
    typer.echo(f"register it: fogline keys register {target.with_suffix('.pub')}")


@keys_app.command("register")
def keys_register(public: Annotated[Path, typer.Argument(help="The .pub file")],
                  name: Annotated[str, typer.Option(help="Who or what it is")] = "",
                  hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None) -> None:
    """Trust a publisher key at the hub; nodes then accept bundles it signed."""
    from fogline.bundle import read_public_key

    try:
        key = read_public_key(public)
    except FoglineError as exc:
        raise _fail(exc) from exc
    result = _call(_client(hub, token, data), "POST", "/v1/keys",
                   {"key_id": key.key_id, "public_key": key.public_key, "name": name})
    typer.echo(f"key/{key.key_id} {result['result']}")


@keys_app.command("list")
def keys_list(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
              output: OutputOpt = "table") -> None:
    rows = _call(_client(hub, token, data), "GET", "/v1/keys")
    if output == "json":
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("KEY", "NAME", "STATUS"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["key_id"], row["name"],
                      "revoked" if row["revoked_at_s"] is not None else "trusted")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, hub: HubOpt = None, token: TokenOpt = None,
                data: DataOpt = None, reason: ReasonOpt = "") -> None:
    """Stop trusting a key: nodes refuse bundles it signs from now on."""
    _call(_client(hub, token, data), "POST", f"/v1/keys/{key_id}/revoke", {"reason": reason})
    typer.echo(f"key/{key_id} revoked")


# rollouts ---------------------------------------------------------------------------

def _command(verb: str):  # type: ignore[no-untyped-def]
    def run(name: str, hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
            reason: ReasonOpt = "") -> None:
        view = _call(_client(hub, token, data), "POST",
                     f"/v1/deployments/{name}/rollout/{verb}", {"reason": reason})
        typer.echo(f"rollout/{name} {view['phase']} (revision {view['from_revision']} → "
                   f"{view['to_revision']}, step {view['step'] + 1})")
    run.__doc__ = {"pause": "Hold the rollout at its current step.",
                   "resume": "Continue a paused rollout.",
                   "promote": "Skip the current step's bake and go on.",
                   "undo": "Put every node back on the previous revision now."}[verb]
    return run


for _verb in ("pause", "resume", "promote", "undo"):
    rollout_app.command(_verb)(_command(_verb))


def rollout_panel(view: dict[str, Any]) -> Group:
    """One deployment's rollout: a line per step with a bar of nodes on the revision."""
    rollout = view["rollout"]
    target = rollout["to_revision"]
    on_target = sum(1 for n in view["nodes"] if n["running"] == target and not n["pinned"])
    eligible = sum(1 for n in view["nodes"] if not n["pinned"])
    colour = {"complete": "green", "rolled_back": "red", "paused": "yellow"}.get(
        rollout["phase"], "cyan")
    header = Text.assemble(
        (f"{view['app']} ", "bold"), f"revision {rollout['from_revision']} → {target} ",
        (rollout["phase"], colour),
        f"  {on_target}/{eligible} nodes on revision {target}")
    lines: list[Any] = [header]
    table = Table(box=None, show_header=False, padding=(0, 1))
    for index, (step, size) in enumerate(zip(view["steps"], view["step_sizes"], strict=True)):
        done = rollout["phase"] == "complete" or index < rollout["step"]
        current = index == rollout["step"] and rollout["phase"] != "complete"
        mark = "✓" if done else ("▶" if current else " ")
        reached = min(on_target, size) if (done or current) else 0
        table.add_row(mark, f"step {index + 1}: {step} ({size} nodes)",
                      ProgressBar(total=max(size, 1), completed=reached, width=30),
                      f"{reached}/{size}")
    lines.append(table)
    if rollout["reason"]:
        lines.append(Text(f"reason: {rollout['reason']}", style=colour))
    if view["unsatisfied"]:
        for node, why in sorted(view["unsatisfied"].items()):
            lines.append(Text(f"not placed on {node}: {why}", style="yellow"))
    return Group(*lines)


@rollout_app.command("status")
def rollout_status(name: str, hub: HubOpt = None, token: TokenOpt = None,
                   data: DataOpt = None, watch: Annotated[bool, typer.Option(
                       "--watch", "-w", help="Follow until the rollout ends")] = False,
                   output: OutputOpt = "table") -> None:
    """Steps of the current rollout with the nodes on the new revision."""
    client = _client(hub, token, data)
    view = _call(client, "GET", f"/v1/deployments/{name}")
    if output == "json":
        typer.echo(json.dumps(view, indent=2))
        return
    if not watch:
        console.print(rollout_panel(view))
        return
    with Live(rollout_panel(view), console=console, refresh_per_second=4) as live:
        while view["rollout"]["phase"] in ("progressing", "paused"):
            time.sleep(0.5)
            view = _call(client, "GET", f"/v1/deployments/{name}")
            live.update(rollout_panel(view))


def get_deployments(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
                    output: OutputOpt = "table") -> None:
    """Deployed apps: revision, version, where they run and their rollout."""
    views = _call(_client(hub, token, data), "GET", "/v1/deployments")
    if output == "json":
        typer.echo(json.dumps(views, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("APP", "REVISION", "VERSION", "NODES", "ON REVISION", "ROLLOUT",
                   "UNPLACED"):
        table.add_column(column)
    for view in views:
        rollout = view["rollout"]
        running = sum(1 for n in view["nodes"] if n["running"] == rollout["to_revision"])
        table.add_row(view["app"], str(view["revision"]), view["version"],
                      str(len(view["nodes"])), str(running), rollout["phase"],
                      str(len(view["unsatisfied"])))
    console.print(table)


def get_rollouts(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
                 output: OutputOpt = "table") -> None:
    """Every deployment's current rollout, step by step."""
    views = _call(_client(hub, token, data), "GET", "/v1/deployments")
    if output == "json":
        typer.echo(json.dumps([{"app": v["app"], **v["rollout"], "steps_spec": v["steps"]}
                               for v in views], indent=2))
        return
    for view in views:
        console.print(rollout_panel(view))


def get_sites(hub: HubOpt = None, token: TokenOpt = None, data: DataOpt = None,
              output: OutputOpt = "table") -> None:
    """Sites (kind: Site): the origins nodes front as a shared cache."""
    sites = _call(_client(hub, token, data), "GET", "/v1/sites")
    if output == "json":
        typer.echo(json.dumps(sites, indent=2))
        return
    table = Table(box=None, header_style="bold")
    for column in ("SITE", "ORIGIN", "HOSTS", "PATH PREFIXES", "SELECTOR"):
        table.add_column(column)
    for name, spec in sites.items():
        selector = spec.get("placement", {}).get("selector", {})
        shown = ", ".join(f"{k}={v}" for k, v in selector.items() if v) or "every node"
        table.add_row(name, spec["origin"], ", ".join(spec.get("hosts", [])),
                      ", ".join(spec.get("path_prefixes", [])), shown)
    console.print(table)
