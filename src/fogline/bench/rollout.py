"""Benchmarks `desired-propagation` and `rollout`: deployments over a fleet of hollow nodes.

A real `fogline hub` runs as a subprocess; N hollow nodes (fogline.sim.hollow: the node's
real enrollment, NATS link, heartbeats and deployment loop, with fake app execution)
run in this process. Apps go through the public path: a publisher key registered with
`POST /v1/keys`, bundles packed and signed by `fogline.deploy_client.apply_request` and
sent to `POST /v1/apply`. The apply call runs in its own thread and is stamped there when
it returns, so a busy hollow-node loop cannot delay the start of a measurement. Nodes
stamp what they receive and apply on the same monotonic clock.

- desired-propagation: rounds of a new version with a single 100% step. Per node and
  round: apply returned -> the node holds a DesiredState with the new revision
  (figure: p95 over all), and -> it runs it (conditions). No peer: the limit is the goal.
  A thousand nodes' work shares one event loop here, which delays their stamps; so the
  conditions also give that loop's lag, and the hub's side alone: a separate process
  subscribed with the hub's own NATS credentials stamps every push as it leaves.
- rollout: v1 everywhere; v2 in steps 1%, 10%, 50%, 100% with a bake and an error-rate
  gate (figure: apply returned -> every node runs v2); then v3, whose hollow app answers
  20% errors: from the first heartbeat that makes the breach visible (the cohort's
  windows sum to enough requests at too high an error rate) to every node that got v3
  running v2 again (conditions, with its own goal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil
import yaml

from fogline.bench import result
from fogline.bench.heartbeats import (
    HubRun,
    cpu_seconds,
    percentile,
    running_hub,
    stop_process,
    wait_until,
)
from fogline.protocol import DesiredState, decode
from fogline.sim.hollow import HollowFleet, HollowNode, Traffic

APP = "hollow-probe"
INTERVAL_S = 2.0
PROPAGATION_GOAL_S = 1.0
ROLLOUT_GOAL_S = 60.0
ROLLBACK_GOAL_S = 10.0
BAD_ERROR_RATE = 0.2
GATE_ERROR_RATE = 0.05
GATE_MIN_REQUESTS = 20
CANARY_STEPS = ["1%", "10%", "50%", "100%"]
T = TypeVar("T")


# The app and the publisher ------------------------------------------------------------

def write_app(root: Path, version: str, deploy: dict[str, Any], name: str = APP) -> Path:
    """A tiny app directory for `version` with the deployment fields `deploy`
    (rollout, pins, placement); hollow nodes never import its code."""
    directory = root / f"{name}-{version}"
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"apiVersion": "fogline/v1", "kind": "App",
                "metadata": {"name": name, "version": version},
                "spec": {"entrypoint": "probe_app:app", **deploy}}
    (directory / "fogline.yaml").write_text(yaml.safe_dump(manifest, sort_keys=True))
    (directory / "probe_app.py").write_text(
        f'from fogline import App\n\napp = App("{name}")\n\n\n'
        f'@app.route("GET", "/version")\nasync def version(req, ctx):\n'
        f'    return {{"version": "{version}"}}\n')
    return directory


class Deployer:
    """The operator's side: a registered publisher key, apply and the deployment view,
    over the hub's HTTP API from a thread of its own."""

    def __init__(self, hub_url: str, admin_token: str, key_dir: Path) -> None:
        from fogline.bundle import create_key

        self.hub_url = hub_url
        self.admin_token = admin_token
        self.key_path = key_dir / "publisher.key"
        key = create_key(self.key_path)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bench-api")
        self.call("POST", "/v1/keys", {"key_id": key.key_id, "public_key": key.public_key,
                                       "name": "bench"})

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.request(method, f"{self.hub_url}{path}", json=body, timeout=60,
                                 headers={"Authorization": f"Bearer {self.admin_token}"})
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json()

    def body(self, app_dir: Path, reason: str = "bench") -> dict[str, Any]:
        """The POST /v1/apply body: packed and signed as `fogline apply` does."""
        from fogline.deploy_client import apply_request, read_documents

        (document,) = read_documents(app_dir / "fogline.yaml")
        return apply_request(document, self.key_path, reason)

    def _apply(self, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        reply = self.call("POST", "/v1/apply", body)
        return time.monotonic(), reply

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def apply(self, app_dir: Path) -> tuple[float, int]:
        """Apply; (monotonic time the call returned, revision)."""
        body = self.body(app_dir)
        returned_s, reply = await self.in_thread(self._apply, body)
        return returned_s, int(reply["revision"])

    async def deployment(self, app: str = APP) -> dict[str, Any]:
        view: dict[str, Any] = await self.in_thread(self.call, "GET", f"/v1/deployments/{app}")
        return view

    async def wait_phase(self, fleet: HollowFleet, revision: int, phases: Iterable[str],
                         timeout_s: float, app: str = APP) -> dict[str, Any]:
        """Poll until the rollout to `revision` is in one of `phases`; its view."""
        wanted = set(phases)
        deadline = time.monotonic() + timeout_s
        while True:
            view = await self.deployment(app)
            rollout = view["rollout"]
            if rollout["to_revision"] == revision and rollout["phase"] in wanted:
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"rollout to revision {revision} still {rollout['phase']} "
                                   f"after {timeout_s:g}s ({rollout['reason']})")
            await asyncio.sleep(0.2)


# What the nodes recorded ---------------------------------------------------------------

def breach_visible_s(nodes: Iterable[HollowNode], app: str, revision: int,
                     error_rate: float, min_requests: int) -> float | None:
    """The send time of the first heartbeat after which the latest windows of
    `revision` sum to at least `min_requests` at an error rate above `error_rate`: the
    moment the hub can see the breach (as fogline.core.rollout.breach judges it)."""
    events = sorted((t, node.node_id, requests, errors) for node in nodes
                    for t, name, number, requests, errors in node.window_log
                    if name == app and number == revision)
    latest: dict[str, tuple[int, int]] = {}
    for t, node_id, requests, errors in events:
        latest[node_id] = (requests, errors)
        total = sum(r for r, _ in latest.values())
        if total >= min_requests and sum(e for _, e in latest.values()) / total > error_rate:
            return t
    return None


def summary(values: list[float]) -> dict[str, float | None]:
    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 3)

    return {"p50": r(percentile(values, 50)), "p95": r(percentile(values, 95)),
            "max": r(max(values, default=None)), "min": r(min(values, default=None))}


def step_times(view: dict[str, Any]) -> list[dict[str, Any]]:
    """Per step of the hub's rollout record: size, when it started after the apply,
    how long its nodes took to converge and how long it lasted (bake included)."""
    rollout = view["rollout"]
    started = rollout["started_s"]
    sizes = view.get("step_sizes", [])
    steps = []
    for record in rollout["steps"]:
        index = record["index"]

        def since(at: float | None, origin: float) -> float | None:
            return None if at is None else round(at - origin, 2)

        steps.append({"step": view["steps"][index] if index < len(view["steps"]) else index,
                      "nodes": sizes[index] if index < len(sizes) else None,
                      "started_after_s": since(record["started_s"], started),
                      "converged_in_s": since(record["converged_s"], record["started_s"]),
                      "lasted_s": since(record["ended_s"], record["started_s"])})
    return steps


# Shared setup ---------------------------------------------------------------------------

def hollow_root() -> Path:
    """Hollow nodes' data dirs on tmpfs where there is one: a thousand nodes fsync their
    desired state and ledger, which on one shared disk would measure the disk."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="fogline-hollow-", dir=base))


@dataclass
class Setup:
    fleet: HollowFleet
    deployer: Deployer
    hub: HubRun
    apps_dir: Path
    hub_process: psutil.Process
    nats_process: psutil.Process | None
    enroll_s: float


@contextlib.contextmanager
def hub_and_fleet(name: str, count: int, interval_s: float) -> Iterator[Setup]:
    workdir = Path(tempfile.mkdtemp(prefix=f"fogline-bench-{name}-"))
    root = hollow_root()
    try:
        with running_hub(workdir, interval_s) as hub:
            deployer = Deployer(hub.url, hub.admin_token, workdir)
            try:
                started = time.monotonic()
                fleet = HollowFleet.enroll(hub.url, hub.admin_token, count, root)
                enroll_s = time.monotonic() - started
                yield Setup(fleet, deployer, hub, workdir / "apps",
                            psutil.Process(hub.process.pid), hub.nats_server(), enroll_s)
            finally:
                deployer.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def base_conditions(setup: Setup, count: int, interval_s: float) -> dict[str, Any]:
    return {"nodes": count, "heartbeat_interval_s": interval_s,
            "enroll_s": round(setup.enroll_s, 1),
            "hollow_nodes": "one process, one event loop, one NATS connection and data "
                            "dir each (tmpfs); real NodeDeployments, fetch over NATS, "
                            "verify and unpack; app execution faked",
            "hub": "fogline hub subprocess, SQLite, embedded nats-server",
            "python": platform.python_version(), "cores": os.cpu_count()}


def cpu_now(setup: Setup) -> tuple[float, float, float]:
    nats_s = cpu_seconds(setup.nats_process) if setup.nats_process else 0.0
    return cpu_seconds(setup.hub_process), nats_s, cpu_seconds(psutil.Process())


# Watching from outside the hollow process ----------------------------------------------

PUSH_SUBJECTS = "fl.cmd.*.desired"


async def _observe(nats_url: str, creds: Path, out_path: Path) -> None:
    """Stamp every desired-state push the hub sends (monotonic clock, shared by every
    process on the machine); a line of JSON each, flushed every 100 ms."""
    import nats

    nc = await nats.connect(nats_url, user_credentials=str(creds), name="bench-observer")
    with out_path.open("a", encoding="utf-8") as out:
        async def on_push(msg: Any) -> None:
            at_s = time.monotonic()
            state = decode(msg.data)
            if isinstance(state, DesiredState):
                apps = [[app.name, app.revision] for app in state.apps]
                out.write(json.dumps([at_s, state.node_id, apps]) + "\n")

        await nc.subscribe(PUSH_SUBJECTS, cb=on_push, pending_msgs_limit=1_000_000)
        await nc.flush()
        out.write(json.dumps([0.0, "", []]) + "\n")  # subscribed: the bench may start
        out.flush()
        while True:
            await asyncio.sleep(0.1)
            out.flush()


@contextlib.contextmanager
def observing_pushes(hub: HubRun, out_path: Path) -> Iterator[Path]:
    """The observer process running for the block; its stamps land in `out_path`."""
    nats_url = (hub.data / "nats.url").read_text().strip()
    process = subprocess.Popen(
        [sys.executable, "-m", "fogline.bench.rollout", "observe", nats_url,
         str(hub.data / "nats" / "hub.creds"), str(out_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def subscribed() -> bool:
            if process.poll() is not None:
                raise RuntimeError("the push observer exited at start")
            return out_path.exists() and out_path.stat().st_size > 0

        wait_until(subscribed, 30, "the push observer to subscribe")
        yield out_path
    finally:
        stop_process(process, grace_s=5)


def pushes_of(out_path: Path, app: str, revision: int) -> dict[str, float]:
    """Node id -> when the first push holding `revision` of `app` left the hub."""
    first: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError), out_path.open(encoding="utf-8") as lines:
        for line in lines:
            with contextlib.suppress(ValueError):
                at_s, node_id, apps = json.loads(line)
                if [app, revision] in apps:
                    first.setdefault(node_id, at_s)
    return first


class LoopLag:
    """How late this loop runs a 20 ms timer: the hollow nodes' share of a stamp's delay."""

    def __init__(self) -> None:
        self.samples_s: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.02)
            self.samples_s.append(max(0.0, loop.time() - before - 0.02))


# desired-propagation -------------------------------------------------------------------

async def _propagation(setup: Setup, rounds: int, timeout_s: float,
                       pushes: Path) -> dict[str, Any]:
    fleet, deployer = setup.fleet, setup.deployer
    receive: list[float] = []
    applied: list[float] = []
    sent: list[float] = []
    per_round: list[dict[str, Any]] = []
    lag = LoopLag()
    async with fleet.running():
        lag_task = asyncio.create_task(lag.run())
        cpu_before = cpu_now(setup)
        for index in range(1, rounds + 1):
            app_dir = write_app(setup.apps_dir, f"{index}.0.0",
                                {"rollout": {"steps": ["100%"], "bake": "10ms"}})
            returned_s, revision = await deployer.apply(app_dir)
            await fleet.wait(lambda r=revision: fleet.on_revision(APP, r), timeout_s,
                             f"every node on revision {revision}")
            await deployer.wait_phase(fleet, revision, ["complete"], timeout_s)
            got = [n.revision_received_at[(APP, revision)] - returned_s for n in fleet.nodes]
            ran = [t - returned_s for n in fleet.nodes
                   if (t := n.apps.activated_at(APP, revision)) is not None]
            await asyncio.sleep(1.0)  # the last heartbeats land; the observer flushes
            left = [t - returned_s for t in pushes_of(pushes, APP, revision).values()]
            receive += got
            applied += ran
            sent += left
            per_round.append({"revision": revision, "receive_s": summary(got),
                              "hub_sent_s": summary(left), "applied_s": summary(ran)})
        cpu_after = cpu_now(setup)
        lag_task.cancel()
        await asyncio.gather(lag_task, return_exceptions=True)
    return {"receive": receive, "applied": applied, "sent": sent, "rounds": per_round,
            "loop_lag": lag.samples_s,
            "cpu": [after - before for after, before in zip(cpu_after, cpu_before,
                                                             strict=True)]}


def run_propagation(quick: bool = False, nodes: int | None = None,
                    rounds: int | None = None) -> dict[str, Any]:
    count = nodes or (100 if quick else 1000)
    rounds = rounds or (3 if quick else 5)
    interval_s = INTERVAL_S
    with hub_and_fleet("propagation", count, interval_s) as setup, \
            observing_pushes(setup.hub, setup.apps_dir.parent / "pushes.jsonl") as pushes:
        started = time.monotonic()
        m = asyncio.run(_propagation(setup, rounds, timeout_s=120, pushes=pushes))
        elapsed_s = time.monotonic() - started
        conditions = base_conditions(setup, count, interval_s)
    p95 = percentile(m["receive"], 95) or 0.0
    hub_cpu, nats_cpu, hollow_cpu = m["cpu"]
    conditions.update({
        "rounds": rounds,
        "rollout": "one 100% step, bake 10 ms; each round waits for every node to run "
                   "the revision and the rollout to complete",
        "receive_s": summary(m["receive"]),
        "hub_sent_s": summary(m["sent"]),
        "hub_sent_note": "apply returned -> the push left the hub, stamped by a separate "
                         "process subscribed with the hub's credentials: the hub's share, "
                         f"{len(m['sent'])} pushes seen",
        "hollow_loop_lag_s": summary(m["loop_lag"]),
        "hollow_loop_lag_note": "lateness of a 20 ms timer on the hollow nodes' loop "
                                "during the rounds: their stamps are late by up to this",
        "applied_s": summary(m["applied"]),
        "applied_note": "apply returned -> the node's HollowApps switched to the revision "
                        "(fetched over NATS, signature and digest checked, unpacked)",
        "per_round": m["rounds"],
        "cpu_s": {"hub": round(hub_cpu, 1), "nats_server": round(nats_cpu, 1),
                  "hollow_nodes": round(hollow_cpu, 1), "wall": round(elapsed_s, 1)},
    })
    return result(
        name="desired-propagation", figure=round(p95, 3), unit="s (p95, apply -> received)",
        peer="goal: p95 <= 1 s", peer_figure=PROPAGATION_GOAL_S, better="lower",
        goal="p95 <= 1 s from apply to every connected node holding the new desired state",
        met=bool(m["receive"]) and p95 <= PROPAGATION_GOAL_S, conditions=conditions,
        samples=len(m["receive"]))


# rollout -------------------------------------------------------------------------------

def rollout_spec(bake_s: float) -> dict[str, Any]:
    return {"rollout": {"steps": CANARY_STEPS, "bake": f"{bake_s:g}s",
                        "gates": {"error_rate": GATE_ERROR_RATE,
                                  "min_requests": GATE_MIN_REQUESTS}}}


async def _rollout(setup: Setup, bake_s: float, timeout_s: float) -> dict[str, Any]:
    fleet, deployer = setup.fleet, setup.deployer
    fleet.by_version["3.0.0"] = Traffic(error_rate=BAD_ERROR_RATE)
    spec = rollout_spec(bake_s)
    out: dict[str, Any] = {}
    async with fleet.running():
        # v1: the first revision goes everywhere at once.
        _, first = await deployer.apply(write_app(setup.apps_dir, "1.0.0", spec))
        await fleet.wait(lambda: fleet.on_revision(APP, first), timeout_s, "v1 everywhere")
        await deployer.wait_phase(fleet, first, ["complete"], timeout_s)
        await asyncio.sleep(1.0)

        # v2: the canary rollout.
        cpu_before = cpu_now(setup)
        returned_s, second = await deployer.apply(write_app(setup.apps_dir, "2.0.0", spec))
        await fleet.wait(lambda: fleet.on_revision(APP, second), timeout_s, "v2 everywhere")
        view = await deployer.wait_phase(fleet, second, ["complete", "rolled_back", "paused"],
                                         timeout_s)
        last = max(n.apps.activated_at(APP, second) or 0.0 for n in fleet.nodes)
        rollout = view["rollout"]
        out.update(rollout_s=last - returned_s, phase=rollout["phase"],
                   reason=rollout["reason"],
                   complete_s=(rollout["ended_s"] or 0.0) - rollout["started_s"],
                   steps=step_times(view),
                   cpu=[a - b for a, b in zip(cpu_now(setup), cpu_before, strict=True)])
        await asyncio.sleep(1.0)

        # v3: bad; it must roll back by itself.
        v3_applied_s, third = await deployer.apply(write_app(setup.apps_dir, "3.0.0", spec))
        view = await deployer.wait_phase(fleet, third, ["rolled_back", "complete", "paused"],
                                         timeout_s)
        got_v3 = [n for n in fleet.nodes if n.apps.activated_at(APP, third) is not None]
        await fleet.wait(lambda: fleet.on_revision(APP, second), timeout_s,
                         "every node back on v2")
        visible = breach_visible_s(got_v3, APP, third, GATE_ERROR_RATE, GATE_MIN_REQUESTS)
        back = [n.apps.activated_at(APP, second, after_s=n.apps.activated_at(APP, third) or 0.0)
                for n in got_v3]
        rollout = view["rollout"]
        out.update(
            v3_phase=rollout["phase"], v3_reason=rollout["reason"], v3_nodes=len(got_v3),
            v3_steps=step_times(view),
            breach_visible_after_apply_s=None if visible is None else visible - v3_applied_s,
            rollback_s=None if visible is None or not back or None in back
            else max(t for t in back if t is not None) - visible,
            all_on_v2=fleet.on_revision(APP, second))
    return out


def run(quick: bool = False, nodes: int | None = None,
        bake_s: float | None = None) -> dict[str, Any]:
    count = nodes or (100 if quick else 1000)
    bake = bake_s if bake_s is not None else (2.0 if quick else 5.0)
    interval_s = INTERVAL_S
    with hub_and_fleet("rollout", count, interval_s) as setup:
        m = asyncio.run(_rollout(setup, bake, timeout_s=180))
        conditions = base_conditions(setup, count, interval_s)
    figure = m["rollout_s"]
    rollback_s = m["rollback_s"]
    rollback_met = (rollback_s is not None and rollback_s <= ROLLBACK_GOAL_S
                    and m["v3_phase"] == "rolled_back" and m["all_on_v2"])
    rollout_met = m["phase"] == "complete" and figure <= ROLLOUT_GOAL_S
    hub_cpu, nats_cpu, hollow_cpu = m["cpu"]
    conditions.update({
        "steps": CANARY_STEPS, "bake_s": bake,
        "gates": {"error_rate": GATE_ERROR_RATE, "min_requests": GATE_MIN_REQUESTS},
        "traffic": f"{Traffic().requests_per_s:g} req/s per node, v3 {BAD_ERROR_RATE:.0%} "
                   "errors",
        "rollout_phase": m["phase"], "rollout_reason": m["reason"],
        "rollout_complete_s": round(m["complete_s"], 2),
        "rollout_complete_note": "hub's record: apply -> phase complete (last bake "
                                 "included); the figure is apply -> every node on v2",
        "rollout_steps": m["steps"],
        "rollout_cpu_s": {"hub": round(hub_cpu, 1), "nats_server": round(nats_cpu, 1),
                          "hollow_nodes": round(hollow_cpu, 1)},
        "rollback_s": None if rollback_s is None else round(rollback_s, 3),
        "rollback_goal": f"<= {ROLLBACK_GOAL_S:g} s from the breach becoming visible to "
                         "every node that got v3 running v2 again",
        "rollback_met": bool(rollback_met),
        "rollback_phase": m["v3_phase"], "rollback_reason": m["v3_reason"],
        "rollback_nodes": m["v3_nodes"],
        "breach_visible_after_apply_s": None if m["breach_visible_after_apply_s"] is None
        else round(m["breach_visible_after_apply_s"], 2),
        "rollback_steps": m["v3_steps"],
        "all_nodes_on_v2_after_rollback": m["all_on_v2"],
    })
    return result(
        name="rollout", figure=round(figure, 2), unit="s (apply -> every node on v2)",
        peer="goal: <= 60 s", peer_figure=ROLLOUT_GOAL_S, better="lower",
        goal="canary rollout <= 60 s; automatic rollback <= 10 s after the breach",
        met=bool(rollout_met and rollback_met), conditions=conditions, samples=count)


if __name__ == "__main__":
    if sys.argv[1:2] == ["observe"]:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_observe(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])))
    else:
        which = run_propagation if "desired-propagation" in sys.argv[1:] else run
        print(json.dumps(which(quick="--quick" in sys.argv[1:]), indent=2))
