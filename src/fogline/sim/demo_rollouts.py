"""The demo's rollout story: the app goes to the fleet through the hub, then v2 rolls out
in health-gated steps and v3, which fails a fifth of its requests, rolls back by itself.

The nodes start with no app. Once they are ready the demo makes a publisher key in its
data dir, registers it at the hub and applies v1 (`POST /v1/apply`, as `fogline apply`
does), which a first revision sends to every node at once. At `v2_at_s` it applies v2:
the same code with its version bumped, rolled out to one node (the canary), then, after
a bake, to the rest. At `v3_at_s` (and not before v2's rollout ended) it applies v3, whose
config sets `error_ratio`, so the app answers that fraction of its user requests with a
500: the canary's error rate breaches the gate and the hub puts every node back on v2
with nobody's help. Each version is a copy of the app directory in `DATA/apps/<name>-
<version>/` whose `fogline.yaml` names the version, config and rollout strategy.

The demo only watches: it polls `GET /v1/deployments/<app>` about every half second for
the view (step, phase, nodes on the new revision) and the summary (the times of each
step, of the breach, of the fleet being back on v2, and the users' failed requests in
each rollout's window, from the users' per-second counters).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from fogline.bundle import create_key, read_public_key
from fogline.deploy_client import apply_request, read_documents
from fogline.errors import ConfigError, TerminalError

KEY_FILE = "publisher.key"
DEPLOYMENT_POLL_INTERVAL_S = 0.5
FIRST_DEPLOY_TIMEOUT_S = 60.0
_SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", ".venv")
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


@dataclass(frozen=True)
class RolloutSettings:
    """When v2 and v3 are applied, and the strategy every version is deployed with."""

    v2_at_s: float = 40.0
    v3_at_s: float = 70.0  # and not before v2's rollout ended
    steps: tuple[int | str, ...] = (1, "100%")  # the canary, then the rest
    bake_s: float = 8.0
    error_rate: float = 0.05
    min_requests: int = 20
    progress_deadline_s: float = 30.0
    v3_error_ratio: float = 0.2

    def __post_init__(self) -> None:
        if not 0 <= self.v2_at_s < self.v3_at_s:
            raise ConfigError("the demo applies v2 before v3 (0 <= v2 time < v3 time)")
        if not 0 < self.v3_error_ratio <= 1:
            raise ConfigError("v3's error ratio must be in (0, 1]")

    def strategy(self) -> dict[str, Any]:
        """The manifest's `spec.rollout`."""
        return {"steps": list(self.steps), "bake": f"{self.bake_s:g}s",
                "gates": {"error_rate": self.error_rate, "min_requests": self.min_requests},
                "on_failure": "rollback", "progress_deadline": f"{self.progress_deadline_s:g}s"}


def bumped(version: str, by: int) -> str:
    """`version` with its patch number raised `by` ("0.1.0", 2 -> "0.1.2")."""
    if by == 0:
        return version
    match = _SEMVER.match(version)
    if match is None:
        return f"{version}.{by}"
    major, minor, patch = (int(part) for part in match.groups())
    return f"{major}.{minor}.{patch + by}"


def prepare_release(source: Path, root: Path, version: str, config: Mapping[str, Any],
                    strategy: Mapping[str, Any]) -> Path:
    """A copy of the app directory `source` in `root/<name>-<version>/` whose manifest
    names `version`, merges `config` into spec.config and deploys with `strategy` to
    every node (placement and pins dropped)."""
    manifest = yaml.safe_load((source / "fogline.yaml").read_text(encoding="utf-8"))
    name = manifest["metadata"]["name"]
    target = root / f"{name}-{version}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=_SKIPPED)
    manifest["metadata"]["version"] = version
    spec = manifest.setdefault("spec", {})
    spec["config"] = {**(spec.get("config") or {}), **config}
    spec["rollout"] = dict(strategy)
    spec.pop("placement", None)
    spec.pop("pins", None)
    (target / "fogline.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return target


def requests_between(paths: Mapping[str, Any], start_s: float, end_s: float
                     ) -> dict[str, Any]:
    """The users' ok and failed requests in every wall-clock second that overlaps
    [start_s, end_s] (the users count per second), per path and in all."""
    by_path = {}
    for key, stats in paths.items():
        inside = [counts for second, counts in stats.get("by_second", {}).items()
                  if int(second) + 1 > start_s and int(second) <= end_s]
        by_path[key] = {"ok": sum(c[0] for c in inside), "failed": sum(c[1] for c in inside)}
    return {"ok": sum(p["ok"] for p in by_path.values()),
            "failed": sum(p["failed"] for p in by_path.values()),
            "seconds": [int(start_s), int(end_s) + 1], "by_path": by_path}


@dataclass
class Release:
    """One version the demo applied, and what its rollout did as the hub reported it."""

    number: int  # the story's v1, v2, v3
    version: str
    config: dict[str, Any]
    applied_t_s: float
    revision: int = 0
    result: str = ""
    rollout: dict[str, Any] = field(default_factory=dict)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    got_it: set[str] = field(default_factory=set)  # node ids seen running it
    all_on_t_s: float | None = None  # every node ran it
    # After a rollback: when every node that got it ran the previous revision again.
    back_t_s: float | None = None
    step_count: int = 0
    step_nodes: dict[int, list[str]] = field(default_factory=dict)  # step -> its new nodes

    @property
    def phase(self) -> str:
        return str(self.rollout.get("phase", "applying"))

    @property
    def done(self) -> bool:
        return self.phase in ("complete", "rolled_back")

    def on_it(self) -> int:
        return sum(n["running"] == self.revision for n in self.nodes)


class RolloutStory:
    def __init__(self, source: Path, data: Path, settings: RolloutSettings,
                 started_at_s: float, note: Callable[..., None],
                 names: Callable[[], dict[str, str]], rollouts: bool = True) -> None:
        self.source, self.data, self.settings = source, data, settings
        self.started_at_s = started_at_s
        self.note = note
        self.names = names  # node id -> the demo's name for it
        self.rollouts = rollouts  # v2 and v3; v1 always goes through the hub
        self.app = str(yaml.safe_load((source / "fogline.yaml").read_text(
            encoding="utf-8"))["metadata"]["name"])
        self.base_version = ""
        self.releases: list[Release] = []
        self.waiting_note = False
        self._polled_s = 0.0

    def t(self, at_s: float | None) -> float | None:
        return None if at_s is None else round(at_s - self.started_at_s, 3)

    # Applying -----------------------------------------------------------------------

    async def register_key(self, api: httpx.AsyncClient) -> str:
        """The demo's publisher key (made once per data dir), trusted at the hub."""
        path = self.data / KEY_FILE
        if not path.exists():
            create_key(path)
        public = read_public_key(path.with_suffix(".pub"))
        response = await api.post("/v1/keys", json={
            "key_id": public.key_id, "public_key": public.public_key, "name": "fogline demo"})
        _check(response, "registering the demo's publisher key")
        self.note("publisher key", key_id=public.key_id)
        return public.key_id

    async def apply(self, api: httpx.AsyncClient, number: int) -> Release:
        """Apply the story's version `number` (1, 2 or 3) through the hub."""
        if not self.base_version:
            manifest = yaml.safe_load((self.source / "fogline.yaml").read_text("utf-8"))
            self.base_version = str(manifest["metadata"]["version"])
        version = bumped(self.base_version, number - 1)
        config = {"error_ratio": self.settings.v3_error_ratio if number == 3 else 0}
        reason = {1: "demo: first deployment", 2: "demo: v2, same code",
                  3: f"demo: v3 fails {config['error_ratio']:.0%} of requests"}[number]

        def pack() -> dict[str, Any]:  # in a thread: the WAN links share this loop
            target = prepare_release(self.source, self.data / "apps", version, config,
                                     self.settings.strategy())
            document = read_documents(target / "fogline.yaml")[0]
            return apply_request(document, self.data / KEY_FILE, reason)

        body = await asyncio.to_thread(pack)
        release = Release(number, version, config, self.t(time.time()) or 0.0)
        response = await api.post("/v1/apply", json=body)
        _check(response, f"applying {self.app} v{number}")
        release.revision, release.result = response.json()["revision"], response.json()["result"]
        self.releases.append(release)
        self.note("apply", app=self.app, version=version, revision=release.revision,
                  **({"error_ratio": config["error_ratio"]} if number == 3 else {}))
        await self.poll(api)
        return release

    async def first_deployed(self, api: httpx.AsyncClient, node_ids: list[str]) -> bool:
        """Whether every node runs v1 (applied on the first call)."""
        if not self.releases:
            await self.register_key(api)
            await self.apply(api, 1)
        await self.poll(api)
        release = self.releases[0]
        running = {n["node_id"]: n["running"] for n in release.nodes}
        return all(running.get(node) == release.revision for node in node_ids)

    async def step(self, api: httpx.AsyncClient, now_t_s: float) -> None:
        """Apply v2 and v3 when their time comes; follow the current rollout."""
        numbers = [r.number for r in self.releases]
        if self.rollouts and numbers == [1] and now_t_s >= self.settings.v2_at_s:
            await self.apply(api, 2)
        elif self.rollouts and numbers == [1, 2] and now_t_s >= self.settings.v3_at_s:
            if self.releases[-1].done:
                await self.apply(api, 3)
            elif not self.waiting_note:
                self.waiting_note = True
                self.note("v3 waits", reason="v2's rollout has not ended yet")
        if time.monotonic() - self._polled_s >= DEPLOYMENT_POLL_INTERVAL_S:
            await self.poll(api)

    async def poll(self, api: httpx.AsyncClient) -> None:
        self._polled_s = time.monotonic()
        if not self.releases:
            return
        response = await api.get(f"/v1/deployments/{self.app}")
        if response.status_code != 200:
            return
        self.observe(response.json(), time.time())

    # Watching -----------------------------------------------------------------------

    def observe(self, deployment: Mapping[str, Any], at_s: float) -> None:
        """Take in one `GET /v1/deployments/<app>` answer, seen at `at_s`."""
        rollout, nodes = deployment["rollout"], deployment["nodes"]
        for release in self.releases:
            release.got_it |= {n["node_id"] for n in nodes if n["running"] == release.revision}
        release = next((r for r in self.releases if r.revision == rollout["to_revision"]),
                       None)
        if release is None:
            return
        before = release.rollout
        release.rollout, release.nodes = dict(rollout), list(nodes)
        release.step_count = len(deployment.get("step_sizes", []))
        if rollout["phase"] == "progressing":
            earlier = {n for step, ids in release.step_nodes.items()
                       if step < rollout["step"] for n in ids}
            release.step_nodes[rollout["step"]] = sorted(set(rollout["cohort"]) - earlier)
        if release.all_on_t_s is None and nodes and release.on_it() == len(nodes):
            release.all_on_t_s = self.t(at_s)
        # A step is noted once its cohort is filled (the controller's next tick).
        if _stage(before) != _stage(rollout) and not (
                rollout["phase"] == "progressing" and not rollout["cohort"]):
            self._note_change(release)
        if rollout["phase"] == "rolled_back" and release.back_t_s is None:
            back_to = rollout["from_revision"]
            running = {n["node_id"]: n["running"] for n in nodes}
            if all(running.get(node) == back_to for node in release.got_it | set(
                    rollout["cohort"])):
                release.back_t_s = self.t(at_s)
                self.note("fleet back", revision=back_to, nodes=len(release.got_it),
                          after_breach_s=round(release.back_t_s - (self.t(
                              rollout["ended_s"]) or 0.0), 3))

    def _note_change(self, release: Release) -> None:
        rollout = release.rollout
        detail: dict[str, Any] = {"revision": release.revision, "phase": rollout["phase"]}
        if rollout["phase"] == "progressing":
            detail["step"] = f"{rollout['step'] + 1}/{release.step_count}"
            detail["nodes"] = ",".join(self._name(n) for n in release.step_nodes.get(
                rollout["step"], []))
        if rollout["reason"]:
            detail["reason"] = rollout["reason"]
        self.note("rollout", **detail)

    def _name(self, node_id: str) -> str:
        return self.names().get(node_id, node_id)

    # What the view and the summary show ---------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for release in self.releases:
            rollout = release.rollout
            rows.append({
                "release": f"v{release.number}", "version": release.version,
                "revision": release.revision, "applied_t_s": release.applied_t_s,
                "phase": release.phase,
                "step": "-" if not rollout else "all at once" if not rollout[
                    "from_revision"] else f"{rollout['step'] + 1}/{release.step_count}",
                "on_it": release.on_it(), "nodes": len(release.nodes),
                "cohort": [self._name(n) for n in rollout.get("cohort", [])],
                "reason": rollout.get("reason", ""),
                "ended_t_s": self.t(rollout.get("ended_s")),
                "from_revision": rollout.get("from_revision", 0),
                "back_t_s": release.back_t_s})
        return rows

    def plan(self) -> str:
        s = self.settings
        steps = ", ".join(str(step) for step in s.steps)
        if not self.rollouts:
            return "v1 deployed through the hub; rollouts off"
        return (f"v2 at t={s.v2_at_s:g}s, v3 (fails {s.v3_error_ratio:.0%} of requests) at "
                f"t={s.v3_at_s:g}s; steps {steps}, bake {s.bake_s:g}s, gate error rate "
                f"<= {s.error_rate:.0%} once >= {s.min_requests} requests, on failure "
                "roll back")

    def summary(self, users: Mapping[str, Any],
                user_paths: Mapping[str, list[str]]) -> dict[str, Any]:
        """Per release: when it was applied, its steps, how it ended, what users saw.
        `user_paths` names the user paths calling each node (by the demo's names)."""
        paths = users.get("paths", {})
        out: dict[str, Any] = {"app": self.app, "plan": self.plan(),
                               "strategy": self.settings.strategy()}
        for release in self.releases:
            out[f"v{release.number}"] = self._release_summary(release, paths, user_paths)
        return out

    def _release_summary(self, release: Release, paths: Mapping[str, Any],
                         user_paths: Mapping[str, list[str]]) -> dict[str, Any]:
        rollout = release.rollout
        ended_t = self.t(rollout.get("ended_s"))
        steps = [{"step": record["index"] + 1, "started_t_s": self.t(record["started_s"]),
                  "converged_t_s": self.t(record["converged_s"]),
                  "ended_t_s": self.t(record["ended_s"]),
                  "nodes": [self._name(n) for n in release.step_nodes.get(record["index"], [])]}
                 for record in rollout.get("steps", [])]
        cohort = [self._name(n) for n in rollout.get("cohort", [])]
        got_it = sorted(self._name(n) for n in release.got_it)
        if steps and not rollout.get("from_revision"):
            steps[0]["nodes"] = got_it  # a first revision goes to every node at once
        first = release.step_nodes.get(0, [])
        canary = self._name(first[0]) if len(first) == 1 else None
        body: dict[str, Any] = {
            "version": release.version, "revision": release.revision,
            "result": release.result, "config": release.config,
            "from_revision": rollout.get("from_revision"), "applied_t_s": release.applied_t_s,
            "phase": release.phase, "reason": rollout.get("reason", ""),
            "steps": steps, "cohort": cohort, "ended_t_s": ended_t,
            "nodes_got_it": got_it,
            "all_nodes_on_it_t_s": release.all_on_t_s}
        if rollout.get("from_revision"):
            body["canary"] = canary
            body["canary_user_paths"] = user_paths.get(canary or "", [])
        end_t = ended_t
        if release.phase == "complete" and ended_t is not None:
            body["completed_after_s"] = round(ended_t - release.applied_t_s, 3)
        if release.phase == "rolled_back" and ended_t is not None:
            body["breach_t_s"] = ended_t
            body["breach_after_apply_s"] = round(ended_t - release.applied_t_s, 3)
            body["fleet_back_t_s"] = release.back_t_s
            body["rollback_s"] = None if release.back_t_s is None \
                else round(release.back_t_s - ended_t, 3)
            end_t = release.back_t_s
        if rollout.get("from_revision"):  # (the users start after v1)
            # Until the rollout is over, or so far when the demo ends first.
            end_s = time.time() if end_t is None else self.started_at_s + end_t
            body["user_requests"] = requests_between(
                paths, self.started_at_s + release.applied_t_s, end_s)
        return body


def _stage(rollout: Mapping[str, Any]) -> tuple[Any, ...]:
    return (rollout.get("step"), rollout.get("phase"), tuple(rollout.get("cohort", ())))


def _check(response: httpx.Response, doing: str) -> None:
    if response.status_code >= 400:
        raise TerminalError(f"{doing}: the hub answered {response.status_code}: "
                            f"{response.text[:500]}")


__all__ = ["Release", "RolloutSettings", "RolloutStory", "bumped", "prepare_release",
           "requests_between"]
