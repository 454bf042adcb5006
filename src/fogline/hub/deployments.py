"""Deployments at the hub: apply, delete, operator commands and the rollout controller.

`apply` checks a signed bundle (digest, publisher key, signature), stores it in the
Object Store and records a revision; a new revision starts a rollout from the
deployment's stable revision. The controller, every `tick_s`, places each deployment
on the fleet (fogline.core.placement), advances its rollout (fogline.core.rollout) from
the nodes' latest heartbeats, and publishes every node's desired state
(fogline.hub.desired). Every change lands in the audit log with who, when and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fogline.bundle import check_digest, verify
from fogline.clock import Clock
from fogline.core import rollout as ro
from fogline.core.outbox import StreamPolicy, check_stream_name
from fogline.core.placement import NodeFacts, place
from fogline.core.rollout import AppReport, NodeView, Rollout
from fogline.deploy_spec import DeploySpec, deploy_spec, to_placement, to_strategy
from fogline.errors import ConfigError
from fogline.hub.deploy_store import DeployStore, rollout_from_json
from fogline.hub.desired import DesiredPublisher
from fogline.hub.store import HubStore
from fogline.manifest import AppManifest
from fogline.protocol import (
    AppStatus,
    BundleRefusal,
    DesiredApp,
    PublisherKey,
    SiteSetting,
    StreamSetting,
)
from fogline.site_spec import SiteSpec, check_site_name, site_spec, to_setting

log = logging.getLogger("fogline.hub.deployments")

CONTROLLER = "rollout-controller"
STREAM_FIELDS = {"priority", "bandwidth_bps", "quota_bytes", "overflow"}


@dataclass(frozen=True)
class Placed:
    """One deployment laid over the fleet at one moment."""

    app: str
    spec: DeploySpec
    eligible: tuple[str, ...]
    pins: dict[str, int]
    unsatisfied: dict[str, str]
    views: tuple[NodeView, ...]


def report_of(app: str, apps: tuple[AppStatus, ...], refusals: tuple[BundleRefusal, ...],
              revision: int) -> AppReport | None:
    refused = next((f"{r.code}: {r.reason}" for r in refusals
                    if r.app == app and r.revision == revision), "")
    status = next((a for a in apps if a.name == app), None)
    if status is None:
        return AppReport(revision=0, state="absent", refused=refused) if refused else None
    window = status.window
    return AppReport(
        revision=status.revision, state=status.state, restarts=status.restarts,
        requests=window.requests if window else 0, errors=window.errors if window else 0,
        p99_ms=window.p99_ms if window else 0.0,
        metrics=dict(window.metrics) if window else {}, refused=refused)


def lay_out(row: Mapping[str, Any], fleet: list[tuple[NodeFacts, tuple[AppStatus, ...],
                                                      tuple[BundleRefusal, ...]]],
            versions: Mapping[str, int], target: int) -> Placed:
    """Place a deployment row on the fleet: eligible nodes, pins, views for gates.
    `versions` maps each version of the app to its latest revision (for pins)."""
    app = row["app"]
    spec = DeploySpec.model_validate(row["spec"])
    result = place(to_placement(spec.placement), (facts for facts, _, _ in fleet))
    unsatisfied = dict(result.unsatisfied)
    pins: dict[str, int] = {}
    by_id = {facts.id: (facts, apps, refusals) for facts, apps, refusals in fleet}
    for node_id in result.selected:
        for pin in spec.pins:
            if pin.matches(by_id[node_id][0]):
                if pin.version in versions:
                    pins[node_id] = versions[pin.version]
                else:
                    unsatisfied[node_id] = f"pinned to version {pin.version}, never applied"
                break
    eligible = tuple(n for n in result.selected if n not in pins and n not in unsatisfied)
    views = tuple(NodeView(n, by_id[n][0].online,
                           report_of(app, by_id[n][1], by_id[n][2], target))
                  for n in eligible)
    return Placed(app, spec, eligible, pins, unsatisfied, views)


IDLE_TICK_S = 5.0


class HubDeployments:
    def __init__(self, store: HubStore, clock: Clock, publisher: DesiredPublisher | None,
                 tick_s: float = 0.5) -> None:
        self.hub_store = store
        self.store = DeployStore(store.engine)
        self.clock = clock
        self.publisher = publisher
        self.tick_s = tick_s
        # With no rollout progressing nothing changes on its own: API changes and node
        # status changes wake the controller, and this slower pass is a backstop.
        self.idle_tick_s = max(tick_s, IDLE_TICK_S)
        self.wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # A rollout is progressing: fresh heartbeats are worth a controller pass at once.
        self.active = False

    # Apply --------------------------------------------------------------------------

    def apply(self, manifest: dict[str, Any], bundle: bytes, digest: str, key_id: str,
              signature: str, actor: str, reason: str = "",
              before_revision: Callable[[AppManifest], None] | None = None
              ) -> dict[str, Any]:
        """Validate and record. A new revision calls `before_revision` first (the hub
        stores the bundle there, so no node is told of a bundle it cannot fetch).
        Returns {"app", "result": created|configured|unchanged, "revision"}."""
        from fogline.manifest import parse_manifest

        parsed = parse_manifest(manifest, "manifest")
        name, version = parsed.metadata.name, parsed.metadata.version
        spec = deploy_spec(manifest.get("spec", {}), "manifest")
        check_digest(bundle, digest)
        verify(self.store.trusted_keys(), key_id, signature, name, version, digest)
        now_s = self.clock.now()
        existing = self.store.get(name)
        history = self.store.revisions_of(name)
        for old in history:
            if old["version"] == version and old["digest"] != digest:
                raise ConfigError(f"{name} version {version} was applied with other "
                                  f"content (revision {old['revision']}); bump "
                                  "metadata.version")
        spec_json = spec.model_dump(mode="json")
        latest = history[-1] if history else None
        if latest is not None and existing is not None and latest["digest"] == digest:
            if existing["spec"] == spec_json:
                return {"app": name, "result": "unchanged", "revision": latest["revision"]}
            self.store.apply(name, None, spec_json, None, now_s, existing["rollout_seq"])
            self.record_event(actor, "deployment.configured", name, reason,
                              revision=latest["revision"])
            self.poke()
            return {"app": name, "result": "configured", "revision": latest["revision"]}
        if before_revision is not None:
            before_revision(parsed)
        number = latest["revision"] + 1 if latest else 1
        stable = stable_revision(rollout_from_json(existing["rollout"])) if existing else 0
        revision = {"app": name, "revision": number, "version": version, "digest": digest,
                    "size": len(bundle), "key_id": key_id, "signature": signature,
                    "manifest": manifest, "created_at_s": now_s, "actor": actor}
        rollout = ro.start(name, stable, number, now_s)
        self.store.apply(name, revision, spec_json, rollout, now_s,
                         existing["rollout_seq"] if existing else None)
        self.record_event(actor, "deployment.applied", name, reason, revision=number,
                          version=version, digest=digest, from_revision=stable)
        self.poke()
        return {"app": name, "result": "created" if existing is None else "configured",
                "revision": number}

    def set_stream(self, name: str, fields: dict[str, Any], actor: str,
                   reason: str = "") -> str:
        """A fleet-wide stream policy (`kind: Stream`): created, configured, unchanged."""
        check_stream_name(name)
        unknown = set(fields) - STREAM_FIELDS
        if unknown:
            raise ConfigError(f"stream {name}: unknown fields {', '.join(sorted(unknown))}")
        StreamPolicy(**fields)  # refuses bad values with a clear ConfigError
        result = self.store.set_stream(name, fields, self.clock.now())
        if result != "unchanged":
            self.record_event(actor, f"stream.{result}", name, reason, **fields)
            self.poke()
        return result

    def delete_stream(self, name: str, actor: str, reason: str = "") -> None:
        self.store.delete_stream(name)
        self.record_event(actor, "stream.deleted", name, reason)
        self.poke()

    def set_site(self, name: str, spec: dict[str, Any], actor: str, reason: str = "") -> str:
        """An origin fronted by the nodes it is placed on (`kind: Site`): created,
        configured or unchanged."""
        check_site_name(name)
        spec_json = site_spec(spec, f"site {name}").model_dump(mode="json")
        result = self.store.set_site(name, spec_json, self.clock.now())
        if result != "unchanged":
            self.record_event(actor, f"site.{result}", name, reason,
                              origin=spec_json["origin"])
            self.poke()
        return result

    def delete_site(self, name: str, actor: str, reason: str = "") -> None:
        self.store.delete_site(name)
        self.record_event(actor, "site.deleted", name, reason)
        self.poke()

    def delete(self, app: str, actor: str, reason: str = "") -> None:
        self.store.delete(app)
        self.record_event(actor, "deployment.deleted", app, reason)
        self.poke()

    # Operator commands --------------------------------------------------------------

    def command(self, app: str, verb: str, actor: str, reason: str = "") -> dict[str, Any]:
        row = self.store.require(app)
        rollout = rollout_from_json(row["rollout"])
        strategy = to_strategy(DeploySpec.model_validate(row["spec"]).rollout)
        now_s = self.clock.now()
        if verb == "pause":
            changed = ro.pause(rollout, reason or f"paused by {actor}")
        elif verb == "resume":
            changed = ro.resume(rollout, now_s)
        elif verb == "promote":
            changed = ro.promote(rollout, strategy, now_s)
        elif verb == "undo":
            if rollout.phase == "complete":
                previous = previous_revision(self.store.revisions_of(app), rollout.to_revision)
                if previous == 0:
                    raise ConfigError(f"{app} has no earlier revision to go back to")
                changed = ro.immediate(app, rollout.to_revision, previous,
                                       reason or f"undone by {actor}", now_s)
            else:
                changed = ro.undo(rollout, reason or f"undone by {actor}", now_s)
        else:
            raise ConfigError(f"unknown rollout command {verb!r}")
        if changed == rollout:
            raise ConfigError(f"cannot {verb} a rollout that is {rollout.phase}")
        if not self.store.save_rollout(app, changed, row["rollout_seq"]):
            raise ConfigError(f"rollout of {app!r} changed meanwhile; try again")
        self.record_event(actor, f"rollout.{verb}", app, reason, phase=changed.phase,
                    step=changed.step, to_revision=changed.to_revision)
        self.poke()
        return rollout_view(changed)

    def record_event(self, actor: str, kind: str, app: str, reason: str, /, **detail: Any) -> None:
        self.hub_store.add_event(self.clock.now(), actor, kind, app,
                                 {"reason": reason, **detail} if reason else detail)

    # Views --------------------------------------------------------------------------

    def describe(self, app: str | None = None) -> list[dict[str, Any]]:
        """Deployments (or one) with their rollout and every targeted node."""
        rows = [self.store.require(app)] if app else self.store.all()
        fleet = self.store.fleet()
        revisions = self.store.all_revisions()
        views = []
        for row in rows:
            rollout = rollout_from_json(row["rollout"])
            placed = lay_out(row, fleet, versions_of(revisions, row["app"]),
                             rollout.to_revision)
            strategy = to_strategy(placed.spec.rollout)
            desired = ro.desired_revisions(rollout, placed.eligible, placed.pins)
            running = {facts.id: next((a.revision for a in apps if a.name == row["app"]), 0)
                       for facts, apps, _ in fleet}
            online = {facts.id: facts.online for facts, _, _ in fleet}
            target = revisions.get((row["app"], rollout.to_revision), {})
            views.append({
                "app": row["app"], "revision": row["revision"],
                "version": target.get("version", ""),
                "rollout": rollout_view(rollout),
                "steps": [str(step) for step in strategy.steps],
                "step_sizes": [step.size(len(placed.eligible)) for step in strategy.steps],
                "bake_s": strategy.bake_s,
                "nodes": [{"node_id": n, "desired": desired[n], "running": running.get(n, 0),
                           "online": online.get(n, False), "pinned": n in placed.pins}
                          for n in sorted(desired)],
                "unsatisfied": placed.unsatisfied,
                "spec": row["spec"], "updated_at_s": row["updated_at_s"]})
        return views

    # The controller -----------------------------------------------------------------

    async def run(self) -> None:
        assert self.publisher is not None
        fleet = await asyncio.to_thread(self.store.fleet)
        await self.publisher.load_written([facts.id for facts, _, _ in fleet])
        self._loop = asyncio.get_running_loop()
        while True:
            self.wake.clear()
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(),
                                       self.tick_s if self.active else self.idle_tick_s)

    def poke(self) -> None:
        """Run the controller now (callable from any thread: API handlers run in a
        thread pool)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.wake.set)

    async def tick(self) -> int:
        """One pass: advance every rollout, publish desired state; nodes written."""
        desired, keys, streams, sites = await asyncio.to_thread(self.decide)
        assert self.publisher is not None
        return await self.publisher.publish(desired, keys, streams, sites)

    def decide(self) -> tuple[dict[str, tuple[DesiredApp, ...]], tuple[PublisherKey, ...],
                              tuple[StreamSetting, ...], dict[str, tuple[SiteSetting, ...]]]:
        """Every node's apps, the trusted keys, the stream policies and each node's
        sites; advances rollouts on the way."""
        now_s = self.clock.now()
        fleet = self.store.fleet()
        revisions = self.store.all_revisions()
        desired: dict[str, list[DesiredApp]] = {
            facts.id: [] for facts, _, _ in fleet if facts.status != "revoked"}
        active = False
        for row in self.store.all():
            app = row["app"]
            rollout = rollout_from_json(row["rollout"])
            placed = lay_out(row, fleet, versions_of(revisions, app), rollout.to_revision)
            advanced = ro.advance(rollout, to_strategy(placed.spec.rollout), placed.views,
                                  now_s)
            if advanced != rollout or placed.unsatisfied != row["unsatisfied"]:
                if self.store.save_rollout(app, advanced, row["rollout_seq"],
                                           placed.unsatisfied):
                    self._record(rollout, advanced, placed, row["unsatisfied"])
                else:
                    advanced = rollout  # another hub decided this tick
            active = active or advanced.phase == "progressing"
            for node, number in ro.desired_revisions(advanced, placed.eligible,
                                                     placed.pins).items():
                revision = revisions.get((app, number))
                if revision is not None and node in desired:
                    desired[node].append(desired_app(revision))
        self.active = active
        keys = tuple(PublisherKey(k, v) for k, v in sorted(self.store.trusted_keys().items()))
        streams = tuple(StreamSetting(name=name, **fields)
                        for name, fields in self.store.streams().items())
        sites = sites_by_node(self.store.sites(), [facts for facts, _, _ in fleet])
        return ({node: tuple(apps) for node, apps in desired.items()}, keys, streams,
                {node: sites.get(node, ()) for node in desired})

    def _record(self, before: Rollout, after: Rollout, placed: Placed,
                unsatisfied_before: Mapping[str, str]) -> None:
        app = after.app
        if after.step != before.step and not after.done:
            self.record_event(CONTROLLER, "rollout.step", app, "", step=after.step + 1,
                        to_revision=after.to_revision)
        if after.phase != before.phase:
            log.info("rollout of %s to revision %d: %s%s", app, after.to_revision,
                     after.phase, f" ({after.reason})" if after.reason else "")
            self.record_event(CONTROLLER, f"rollout.{after.phase}", app, after.reason,
                        from_revision=after.from_revision, to_revision=after.to_revision)
        for node, why in placed.unsatisfied.items():
            if unsatisfied_before.get(node) != why:
                self.record_event(CONTROLLER, "placement.unsatisfied", app, why, node_id=node)


def sites_by_node(rows: Mapping[str, dict[str, Any]],
                  fleet: list[NodeFacts]) -> dict[str, tuple[SiteSetting, ...]]:
    """node id -> the sites whose placement picks it (sorted by name)."""
    placed: dict[str, list[SiteSetting]] = {}
    for name, spec_json in sorted(rows.items()):
        spec = SiteSpec.model_validate(spec_json)
        setting = to_setting(name, spec)
        for node in place(to_placement(spec.placement), fleet).selected:
            placed.setdefault(node, []).append(setting)
    return {node: tuple(settings) for node, settings in placed.items()}


def stable_revision(rollout: Rollout) -> int:
    """The revision a new rollout starts from: what the fleet runs when it is done."""
    return rollout.to_revision if rollout.phase == "complete" else rollout.from_revision


def previous_revision(history: list[dict[str, Any]], current: int) -> int:
    earlier = [r["revision"] for r in history if r["revision"] < current]
    return earlier[-1] if earlier else 0


def versions_of(revisions: Mapping[tuple[str, int], dict[str, Any]], app: str) -> dict[str, int]:
    versions: dict[str, int] = {}
    for (name, number), row in sorted(revisions.items()):
        if name == app:
            versions[row["version"]] = number
    return versions


def desired_app(revision: Mapping[str, Any]) -> DesiredApp:
    return DesiredApp(name=revision["app"], revision=revision["revision"],
                      version=revision["version"], digest=revision["digest"],
                      size=revision["size"], key_id=revision["key_id"],
                      signature=revision["signature"])


def rollout_view(rollout: Rollout) -> dict[str, Any]:
    view = dataclasses.asdict(rollout)
    view["cohort"] = sorted(rollout.cohort)
    return view

