"""Benchmark `node-rss`: resident memory of an idle, enrolled, connected node agent.

The peer, KubeEdge EdgeCore at 70 MB, is a published figure, not measured here. What
is measured in the same run is the floor: a bare Python process that imports asyncio,
so the result shows how much of the node's RSS is fogline rather than the interpreter.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from fogline.bench import result
from fogline.bench.heartbeats import FOGLINE, running_hub, stop_process, wait_until

MB = 1024 * 1024
GOAL_MB = 50.0
PEER_MB = 70.0
FLOOR_CODE = "import asyncio,time; time.sleep(5)"


def memory_mb(process: psutil.Process) -> tuple[float, float | None]:
    """(RSS, USS) in MB of a process and its children; USS is None where unsupported."""
    procs = [process, *process.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in procs) / MB
    try:
        uss: float | None = sum(p.memory_full_info().uss for p in procs) / MB
    except (psutil.AccessDenied, AttributeError):
        uss = None
    return rss, uss


def floor_mb() -> tuple[float, float | None]:
    """Memory of a bare interpreter that imported asyncio, read once it is sleeping."""
    process = subprocess.Popen([sys.executable, "-c", FLOOR_CODE], stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        return memory_mb(psutil.Process(process.pid))
    finally:
        stop_process(process)


def run(quick: bool = False) -> dict[str, Any]:
    """Start a hub and one node, let the node idle, then read its memory."""
    idle_s = 5.0 if quick else 10.0
    readings = 5
    workdir = Path(tempfile.mkdtemp(prefix="fogline-bench-node-rss-"))
    node: subprocess.Popen[bytes] | None = None
    try:
        with running_hub(workdir) as hub:
            token = hub.create_token(uses=1)
            node_data = workdir / "n1"
            log_path = workdir / "n1.log"
            with open(log_path, "ab") as log:
                node = subprocess.Popen(
                    [*FOGLINE, "node", "--data", str(node_data), "--hub", hub.url,
                     "--token", token, "--name", "n1"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

            def ready() -> bool:
                if node is not None and node.poll() is not None:
                    raise RuntimeError(f"node exited: {log_path.read_text()[-3000:]}")
                return any(n["name"] == "n1" and n["status"] == "ready" for n in hub.nodes())

            started = time.monotonic()
            wait_until(ready, 60, "the node to be ready", interval_s=0.2)
            ready_s = time.monotonic() - started
            time.sleep(idle_s)
            process = psutil.Process(node.pid)
            samples: list[tuple[float, float | None]] = []
            for _ in range(readings):
                samples.append(memory_mb(process))
                time.sleep(0.5)
            threads = process.num_threads()
            still_ready = ready()
            floor_rss, floor_uss = floor_mb()
    finally:
        if node is not None:
            stop_process(node)
        shutil.rmtree(workdir, ignore_errors=True)

    rss_values = [rss for rss, _ in samples]
    uss_values = [uss for _, uss in samples if uss is not None]
    figure = max(rss_values)  # the worst reading, not the best
    conditions: dict[str, Any] = {
        "node_rss_mb": round(figure, 1),
        "node_rss_mb_min": round(min(rss_values), 1),
        "node_uss_mb": round(max(uss_values), 1) if uss_values else None,
        "node_threads": threads,
        "floor_python_asyncio_rss_mb": round(floor_rss, 1),
        "floor_python_asyncio_uss_mb": round(floor_uss, 1) if floor_uss is not None else None,
        "node_over_floor_rss_mb": round(figure - floor_rss, 1),
        "floor": f"bare `python -c \"{FLOOR_CODE}\"`, same run",
        "peer_source": "KubeEdge EdgeCore 70 MB is a published figure, not measured here",
        "idle_s": idle_s,
        "ready_after_s": round(ready_s, 1),
        "still_ready_after_idle": still_ready,
        "node_state": "enrolled, NATS connected, heartbeating every 5 s, local HTTP up",
        "python": platform.python_version(),
        "cores": os.cpu_count(),
    }
    return result(name="node-rss", figure=round(figure, 1), unit="MB RSS",
                  peer="KubeEdge EdgeCore (published)", peer_figure=PEER_MB, better="lower",
                  goal="<= 50 MB", met=bool(figure <= GOAL_MB), conditions=conditions,
                  samples=len(samples))


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
