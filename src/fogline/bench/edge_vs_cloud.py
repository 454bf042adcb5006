"""Benchmark `edge-vs-cloud`: the demo's app answered by a regional node vs the cloud node.

A shortened headless `fogline demo` without chaos: one region (`eu-west`, 80 ms RTT to
the hub) with one node, and `cloud-1` next to the hub; both run examples/factory. The
region's machines publish to their edge node and a copy to the cloud node over the WAN
link, so both nodes hold the same machines' state. The region's users call
`GET /factory/machines/<machine>` on the edge node directly (they are on its site) and on
the cloud node through a WAN link with the region's RTT, 20 requests/s each, open loop,
in a process of their own; latency is measured client-side (see sim/demo_users.py).

The figure is the edge path's p99; the peer is the cloud path's p99 from the same run,
so the ratio (cloud / edge) holds on a noisy machine. Goal: edge p99 <= 3 ms and ratio
>= 25 (80 ms of RTT alone puts the cloud p99 above 80 ms, so the ratio follows from an
edge p99 of 3.2 ms or less).
"""

from __future__ import annotations

import asyncio
import os
import platform
from typing import Any

from fogline import __version__
from fogline.bench import result
from fogline.runtime import fast_loop_factory
from fogline.sim.demo import Demo, DemoConfig
from fogline.sim.demo_apps import USER_TO_CLOUD, USER_TO_EDGE, AppSettings

REGION = "eu-west"
RTT_MS = 80.0
EDGE_P99_MS_MAX = 3.0
RATIO_MIN = 25.0


def run(quick: bool = False) -> dict[str, Any]:
    settings = AppSettings()
    config = DemoConfig(nodes=1, regions=(REGION,), rtt_ms={REGION: RTT_MS},
                        duration_s=32.0 if quick else 90.0, chaos=False, data_story=False,
                        rollouts=False, app_settings=settings)
    load_before = os.getloadavg()[0]
    with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
        summary = runner.run(Demo(config).run())
    load_after = os.getloadavg()[0]
    apps = summary["apps"]
    region = apps["regions"][0]
    edge, cloud = region["edge"], region["cloud"]
    edge_p99, cloud_p99 = edge["p99_ms"], cloud["p99_ms"]
    ratio = cloud_p99 / edge_p99 if edge_p99 and cloud_p99 else 0.0
    met = bool(edge["failed"] == 0 and cloud["failed"] == 0 and edge_p99 is not None
               and edge_p99 <= EDGE_P99_MS_MAX and ratio >= RATIO_MIN)
    nodes = {row["node"]: row for row in apps["nodes"]}
    return result(
        name="edge-vs-cloud", figure=edge_p99 or 0.0, unit="ms",
        peer=f"the same app on the cloud node, users {RTT_MS:g} ms RTT away",
        peer_figure=cloud_p99, better="lower",
        goal=f"edge p99 <= {EDGE_P99_MS_MAX:g} ms and ratio >= {RATIO_MIN:g}", met=met,
        conditions={
            "region": REGION, "rtt_ms": RTT_MS, "route": "GET /factory/machines/<machine>",
            "user_to_edge": USER_TO_EDGE, "user_to_cloud": USER_TO_CLOUD,
            "compared": apps["compared"], "latency": apps["latency"],
            "edge": edge, "cloud": cloud,
            "ratio_p50": region["ratio_p50"],
            "cloud_p50_over_rtt_ms": region["cloud_p50_over_rtt_ms"],
            "requests_per_s_per_path": settings.user_rate_per_s,
            "machines": settings.machines_per_node,
            "device_batches_per_s_per_machine": 1 / settings.batch_interval_s,
            "samples_per_batch": settings.samples_per_batch,
            "device_messages_handled": {name: row["messages"] for name, row in nodes.items()},
            "processes": summary["resources"]["processes"],
            "rss_mb_max": summary["resources"]["rss_mb_max"],
            "demo_duration_s": summary["duration_s"],
            # The machine's load (everything on it, not only this run), to read p99 by.
            "load_average_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
            "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "fogline": __version__, "quick": quick,
        },
        samples=int(edge["ok"] or 0) + int(cloud["ok"] or 0))
