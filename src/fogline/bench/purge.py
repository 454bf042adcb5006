"""Benchmark `purge`: a fleet-wide cache purge reaching 1,000 hollow nodes over a WAN.

A real `fogline hub` runs as a subprocess; N hollow nodes (fogline.sim.hollow, each with
the node's real `NodePurges` over a small memory cache) run in this process, on uvloop as
the agent does. Their NATS connections go through WAN emulator links in processes of
their own (`purge_wan`): regions `near`, `metro`, `far` and `remote` at 5, 20, 40 and 80
ms one way, nodes spread evenly over them.

Per round a tag purge is issued with `POST /v1/purges` and the bench waits until
`GET /v1/purges/{seq}` shows every target's acknowledgement. Per node the sample is the
hub's own latency (applied_at at the node - issued_at at the hub, one machine clock)
minus the one-way latency of the node's link: what the purge path costs beyond the
speed of light. Figure: p99 over every node and round; the goal is p99 <= 150 ms
(Cloudflare publishes a 150 ms P50 for its global purge). The conditions break it down:
the hub's part (issued_at -> a probe subscribed straight to NATS received it), what
the emulator added beyond its latency (probes through each link), the hollow loop's lag
(its thousand nodes share one core), CPU per process.

Then a few nodes go offline, a purge is issued, and they come back: the time from
coming back to having applied it (reconnect through the WAN, fence, catch-up request)
is reported in the conditions, not in the figure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from fogline import __version__
from fogline.bench import result
from fogline.bench.heartbeats import HubRun, cpu_seconds, percentile, running_hub
from fogline.bench.purge_wan import WanReport, WanRun, running_wan
from fogline.bench.rollout import LoopLag, hollow_root
from fogline.runtime import fast_loop_factory
from fogline.sim.hollow import Enrolled, HollowFleet, HollowNode, create_token, enroll_many
from fogline.sim.hollow_purges import TAGS

NAME = "purge"
LINKS: dict[str, float] = {"near": 5.0, "metro": 20.0, "far": 40.0, "remote": 80.0}
INTERVAL_S = 10.0  # the production default's order; heartbeats are background load here
GOAL_P99_MS = 150.0
CLOUDFLARE_P50_MS = 150.0  # published, global purge
OFFLINE_NODES = 10
IDLE_S = 2.0
POLL_S = 0.2
# Before a round (the last one's acks settle) and before the first status poll (the
# hub's reads compete for CPU with the purge in flight): long enough for 1,000 nodes,
# shorter for a small fleet so a check stays quick.
SETTLE_S_MAX = 1.0
SETTLE_S_PER_NODE = 0.002
ROUND_TIMEOUT_S = 60.0
MB = 1024 * 1024


# The operator's side --------------------------------------------------------------------

class PurgeApi:
    """POST and GET /v1/purges from a thread of its own, so a busy hollow loop delays
    neither the issue nor the polling."""

    def __init__(self, hub: HubRun, settle_s: float) -> None:
        self.settle_s = settle_s
        self._client = hub.client(timeout_s=60)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bench-purge-api")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._client.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._client.request(method, path, json=body)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} "
                               f"{response.text[:500]}")
        return response.json()

    async def _in_thread(self, method: str, path: str,
                         body: dict[str, Any] | None = None) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, method, path, body)

    async def purge(self, tag: str, reason: str = "bench") -> dict[str, Any]:
        reply: dict[str, Any] = await self._in_thread(
            "POST", "/v1/purges", {"kind": "tag", "values": [tag], "reason": reason})
        return reply

    async def status(self, seq: int) -> dict[str, Any]:
        view: dict[str, Any] = await self._in_thread("GET", f"/v1/purges/{seq}")
        return view

    async def summary(self, seq: int) -> dict[str, Any]:
        """The purge's line in GET /v1/purges: counts only, small to poll (the full
        status lists every node, and parsing it here would hold the hollow loop's GIL)."""
        rows: list[dict[str, Any]] = await self._in_thread("GET", "/v1/purges?limit=5")
        return next(row for row in rows if row["seq"] == seq)

    async def wait(self, seq: int, done: Callable[[dict[str, Any]], bool], timeout_s: float,
                   what: str) -> dict[str, Any]:
        """Poll the purge's summary until `done(summary)`; then its full status."""
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(self.settle_s)
        while True:
            row = await self.summary(seq)
            if done(row):
                return await self.status(seq)
            if time.monotonic() > deadline:
                raise TimeoutError(f"purge {seq}: {what} not seen after {timeout_s:g}s "
                                   f"({row['applied']}/{row['targets']} applied, "
                                   f"{row['latency_ms']['acks']} acknowledged)")
            await asyncio.sleep(POLL_S)

    async def wait_acked(self, seq: int, timeout_s: float) -> dict[str, Any]:
        """Until every target applied `seq` and the hub recorded its acknowledgement."""
        return await self.wait(seq, lambda row: row["applied"] == row["targets"]
                               == row["latency_ms"]["acks"], timeout_s,
                               "every target's acknowledgement")


# The fleet --------------------------------------------------------------------------------

def enroll_over_links(hub: HubRun, count: int, root: Path, wan: WanRun) -> list[Enrolled]:
    """`count` nodes spread evenly over the links, each in the region named after its
    link and connecting to NATS through it."""
    token = create_token(hub.url, hub.admin_token, count)
    names = list(wan.ports)
    enrolled: list[Enrolled] = []
    for index, name in enumerate(names):
        share = count // len(names) + (index < count % len(names))
        url = f"nats://127.0.0.1:{wan.ports[name]}"
        enrolled += [dataclasses.replace(e, nats_urls=[url]) for e in enroll_many(
            hub.url, token, share, root, name_prefix=f"hollow-{name}", region=name)]
    return enrolled


def spread(nodes: list[HollowNode], count: int) -> list[HollowNode]:
    """`count` nodes taken evenly through the list (so over every link)."""
    step = max(1, len(nodes) // max(1, count))
    return nodes[::step][:count]


def samples_of(view: dict[str, Any], latency_ms: dict[str, float]) -> dict[str, list[float]]:
    """Link -> per node: the hub's latency minus the link's one-way latency."""
    by_link: dict[str, list[float]] = {}
    for node in view["nodes"]:
        if node["latency_ms"] is not None:
            by_link.setdefault(node["region"], []).append(
                node["latency_ms"] - latency_ms[node["region"]])
    return by_link


def summary_ms(values: list[float]) -> dict[str, float | None]:
    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 2)

    return {"p50": r(percentile(values, 50)), "p90": r(percentile(values, 90)),
            "p99": r(percentile(values, 99)), "max": r(max(values, default=None)),
            "n": len(values)}


# The measurement ------------------------------------------------------------------------

@dataclasses.dataclass
class Processes:
    hub: psutil.Process
    nats: psutil.Process | None
    wan: WanRun

    def cpu_s(self) -> dict[str, float]:
        return {"hub": cpu_seconds(self.hub),
                "nats_server": cpu_seconds(self.nats) if self.nats else 0.0,
                "hollow_nodes": cpu_seconds(psutil.Process()),
                "wan_emulator": self.wan.cpu_s()}


async def _round(fleet: HollowFleet, api: PurgeApi, tag: str,
                 timeout_s: float) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Restock `tag` everywhere, purge it, wait for every acknowledgement."""
    for node in fleet.nodes:
        node.purges.fill((tag,))
    await asyncio.sleep(api.settle_s)
    before_s = time.time()
    reply = await api.purge(tag)
    posted_ms = (time.time() - before_s) * 1000
    view = await api.wait_acked(int(reply["seq"]), timeout_s)
    reply["still_cached"] = sum(1 for node in fleet.nodes if node.purges.holds(tag))
    return reply, view, posted_ms


async def _offline(fleet: HollowFleet, api: PurgeApi, count: int,
                   timeout_s: float) -> dict[str, Any]:
    """Nodes away during a purge: how long after coming back they have applied it."""
    away = spread(fleet.nodes, count)
    ids = {node.node_id for node in away}
    fleet.take_offline(away)
    await fleet.wait(lambda: all(node.nc is None for node in away), 30,
                     "the offline nodes to disconnect")
    reply = await api.purge(TAGS[-1], reason="bench: offline nodes")
    seq = int(reply["seq"])
    view = await api.wait(seq, lambda row: row["applied"] >= row["targets"] - len(away),
                          timeout_s, "every online node applying it")
    missed = [n for n in view["nodes"] if n["node_id"] in ids and not n["applied"]]
    online_s = time.time()
    fleet.bring_online(away)
    view = await api.wait_acked(seq, timeout_s)
    rows = sorted((n for n in view["nodes"] if n["node_id"] in ids),
                  key=lambda n: LINKS[n["region"]])
    catch_up_ms = [(n["applied_at_s"] - online_s) * 1000 for n in rows]
    return {"nodes": len(away), "missed_while_away": len(missed),
            "applied_after_return": sum(1 for n in rows if n["applied"]),
            "catch_up_ms": summary_ms(catch_up_ms),
            "per_node": [{"link": n["region"], "one_way_ms": LINKS[n["region"]],
                          "ms": round(ms, 1)} for n, ms in zip(rows, catch_up_ms, strict=True)]}


async def _measure(fleet: HollowFleet, api: PurgeApi, processes: Processes, rounds: int,
                   offline: int, connect_timeout_s: float) -> dict[str, Any]:
    lag = LoopLag()
    async with fleet.running(connect_timeout_s=connect_timeout_s):
        await fleet.wait(lambda: not any(n.purges.purges.fenced for n in fleet.nodes), 60,
                         "every node caught up with the hub's purges")
        lag_task = asyncio.create_task(lag.run())
        await _round(fleet, api, TAGS[0], ROUND_TIMEOUT_S)  # warm-up, not counted
        idle_before = processes.cpu_s()
        await asyncio.sleep(IDLE_S)  # the background (heartbeats, hub ticks) alone
        idle = {k: v - idle_before[k] for k, v in processes.cpu_s().items()}
        lag.samples_s.clear()
        load_before = os.getloadavg()[0]
        cpu_before, wall_before, started_s = processes.cpu_s(), time.monotonic(), time.time()
        per_round: list[dict[str, Any]] = []
        views: list[dict[str, Any]] = []
        for index in range(rounds):
            reply, view, posted_ms = await _round(fleet, api, TAGS[index % len(TAGS)],
                                                  ROUND_TIMEOUT_S)
            views.append(view)
            per_round.append({"seq": reply["seq"], "targets": reply["targets"],
                              "post_ms": round(posted_ms, 1),
                              "issued_at_s": reply["issued_at_s"],
                              "removed": sum(n["removed"] or 0 for n in view["nodes"]),
                              "still_cached": reply["still_cached"]})
        cpu_after, wall_s = processes.cpu_s(), time.monotonic() - wall_before
        window_s = (started_s, time.time())
        load = (load_before, os.getloadavg()[0])
        lag_task.cancel()
        await asyncio.gather(lag_task, return_exceptions=True)
        away = await _offline(fleet, api, offline, ROUND_TIMEOUT_S)
    return {"views": views, "rounds": per_round, "offline": away,
            "loop_lag_s": list(lag.samples_s), "wall_s": wall_s, "window_s": window_s,
            "cpu_s": {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
            "idle_cpu_s_per_s": {k: v / IDLE_S for k, v in idle.items()},
            "rss_mb": psutil.Process().memory_info().rss / MB, "load": load}


def _wan_figures(report: WanReport, rounds: list[dict[str, Any]],
                 latency_ms: dict[str, float], window_s: tuple[float, float]) -> dict[str, Any]:
    """The hub's part and what the emulator added, from the probes' stamps."""
    seqs = [int(r["seq"]) for r in rounds]
    issued = {int(r["seq"]): float(r["issued_at_s"]) for r in rounds}
    hub_ms = [(report.direct[s] - issued[s]) * 1000 for s in seqs if s in report.direct]
    added: dict[str, dict[str, float | None]] = {}
    for link, by_seq in report.linked.items():
        direct = report.direct_by_link[link]
        added[link] = summary_ms([(by_seq[s] - direct[s]) * 1000 - latency_ms[link]
                                  for s in seqs if s in by_seq and s in direct])
    return {"hub_ms": summary_ms(hub_ms), "emulator_added_ms": added,
            "emulator_loop_lag_ms": summary_ms([late * 1000 for at, late in report.loop_lag_s
                                                if window_s[0] <= at <= window_s[1]]),
            "emulator_connections": report.connections}


def run(quick: bool = False, nodes: int | None = None, rounds: int | None = None,
        offline: int | None = None) -> dict[str, Any]:
    count = nodes or (100 if quick else 1000)
    rounds = rounds or (3 if quick else 10)
    offline = offline if offline is not None else min(OFFLINE_NODES, max(1, count // 10))
    workdir = Path(tempfile.mkdtemp(prefix="fogline-bench-purge-"))
    root = hollow_root()
    try:
        with running_hub(workdir, INTERVAL_S) as hub:
            nats_url = (hub.data / "nats.url").read_text().strip()
            # A process per link, and one for the direct probe alone.
            groups: list[dict[str, float]] = [{}, *({name: ms} for name, ms in LINKS.items())]
            with running_wan(nats_url, hub.data / "nats" / "hub.creds", groups,
                             workdir) as wan:
                started = time.monotonic()
                fleet = HollowFleet(enroll_over_links(hub, count, root, wan),
                                    interval_s=INTERVAL_S)
                enroll_s = time.monotonic() - started
                processes = Processes(psutil.Process(hub.process.pid), hub.nats_server(),
                                      wan)
                api = PurgeApi(hub, min(SETTLE_S_MAX, max(0.2, count * SETTLE_S_PER_NODE)))
                try:
                    with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
                        m = runner.run(_measure(fleet, api, processes, rounds, offline,
                                                connect_timeout_s=max(60.0, count / 10)))
                finally:
                    api.close()
                report = wan.finish()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return _result(m, report, count, rounds, enroll_s, quick)


def _result(m: dict[str, Any], report: WanReport, count: int, rounds: int, enroll_s: float,
            quick: bool) -> dict[str, Any]:
    samples: list[float] = []
    by_link: dict[str, list[float]] = {}
    per_round = []
    for view, row in zip(m["views"], m["rounds"], strict=True):
        round_samples = samples_of(view, LINKS)
        flat = [v for values in round_samples.values() for v in values]
        samples += flat
        for link, values in round_samples.items():
            by_link.setdefault(link, []).extend(values)
        per_round.append({**row, "acks": len(flat), "p50_ms": summary_ms(flat)["p50"],
                          "p99_ms": summary_ms(flat)["p99"]})
    p99 = percentile(samples, 99)
    figure = round(p99, 2) if p99 is not None else float("inf")
    complete = all(r["acks"] == r["targets"] == r["removed"] == count
                   and r["still_cached"] == 0 for r in per_round)
    wan = _wan_figures(report, m["rounds"], LINKS, m["window_s"])
    cpu = m["cpu_s"]
    conditions = {
        "nodes": count, "rounds": rounds, "quick": quick,
        "figure_is": "p99 over every node and round of (applied_at at the node - "
                     "issued_at at the hub) - the node link's one-way latency, from the "
                     "hub's acknowledgements (GET /v1/purges/{seq})",
        "latency_ms": summary_ms(samples),
        "by_link": {link: {"one_way_ms": LINKS[link], **summary_ms(values)}
                    for link, values in sorted(by_link.items(), key=lambda i: LINKS[i[0]])},
        "every_node_applied_every_purge": complete,
        "per_round": per_round,
        "hub_part_ms": wan["hub_ms"],
        "hub_part_note": "issued_at_s (stamped by the hub before its SQL insert) -> a NATS "
                         "client subscribed straight to the server received the purge: "
                         "record, publish and flush",
        "emulator_added_ms": wan["emulator_added_ms"],
        "emulator_note": "per link, a probe connection through it minus a direct probe "
                         "minus the configured latency, during the same broadcasts; the "
                         "emulator runs one process per link on its own loop",
        "emulator_loop_lag_ms": wan["emulator_loop_lag_ms"],
        "emulator_connections": wan["emulator_connections"],
        "hollow_loop_lag_ms": summary_ms([s * 1000 for s in m["loop_lag_s"]]),
        "hollow_loop_lag_note": "lateness of a 20 ms timer on the hollow nodes' loop during "
                                "the rounds: every node of this process shares it, so a "
                                "broadcast to all of them queues up here",
        "offline_catch_up": m["offline"],
        "offline_catch_up_note": "nodes taken off the hub, a purge issued, then back: "
                                 "from coming back to applied: NATS connect through the "
                                 "WAN (INFO, CONNECT/PING, PONG), subscribe, the fence's "
                                 "catch-up request and its reply, about 5 one-way trips",
        "every_node_applied_every_purge_note": "every target acknowledged every round's "
                                               "purge, each removed the one entry of the "
                                               "tag, and no node still holds it",
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_ms_per_purge": {k: round((v - m["idle_cpu_s_per_s"][k] * m["wall_s"]) / rounds
                                      * 1000, 1) for k, v in cpu.items()},
        "cpu_ms_per_purge_note": "CPU over the rounds minus the background rate measured "
                                 f"over {IDLE_S:g} s idle before them, per purge: an "
                                 "estimate (the hub's background ticks vary)",
        "wall_s": round(m["wall_s"], 1),
        "hollow_rss_mb": round(m["rss_mb"], 1),
        "hollow_rss_per_node_kb": round(m["rss_mb"] * 1024 / count, 1),
        "enroll_s": round(enroll_s, 1),
        "heartbeat_interval_s": INTERVAL_S,
        "hollow_nodes": "one process on uvloop (as the agent runs), a NATS connection, "
                        "data dir (tmpfs) and real NodePurges each, over a memory-only "
                        "CacheStore with one small entry per tag",
        "hub": "fogline hub subprocess, SQLite, embedded nats-server",
        "cores": os.cpu_count(),
        "machine_load_1m": {"before_rounds": round(m["load"][0], 2),
                            "after_rounds": round(m["load"][1], 2)},
        "machine_load_note": "the machine's 1-minute load average (this bench's processes "
                             "included): above the core count, others compete for the CPU",
        "python": platform.python_version(),
        "platform": platform.platform(), "fogline": __version__,
    }
    return result(
        name=NAME, figure=figure, unit="ms (p99, purge applied at node minus one-way latency)",
        peer="Cloudflare purge, 150 ms P50 (published)", peer_figure=CLOUDFLARE_P50_MS,
        better="lower", goal=f"p99 <= {GOAL_P99_MS:g} ms at 1,000 nodes",
        met=bool(samples) and complete and figure <= GOAL_P99_MS, conditions=conditions,
        samples=len(samples))


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
