"""Benchmark `cold-start`: from starting an app worker to its first HTTP response.

Measured with the node's own supervisor (`AppSupervisor`): spawn the worker process,
import the app, `Hello`, then one request through the same call the HTTP front makes.
The peer, measured in the same run, is the floor any worker pays: a bare
`python -c pass`. Then a real hub and node with one idle app report the memory each
part takes (agent, worker, embedded MQTT broker).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from fogline.bench import result
from fogline.bench.http_route import CODE, MANIFEST, fogline_node, write_app
from fogline.clock import SystemClock
from fogline.errors import ConfigError
from fogline.node.apps.host import AppServices
from fogline.node.apps.manager import read_definition
from fogline.node.apps.supervisor import AppSupervisor

GOAL_MS = 300.0
MB = 1024 * 1024


def _unused() -> Any:
    raise ConfigError("the benchmark app has no state")


async def cold_starts(app_dir: Path, runs: int) -> list[tuple[float, float]]:
    """(ms to ready, ms to first response) for `runs` fresh workers."""
    definition, _, _ = read_definition(app_dir)
    services = AppServices("hello", {}, frozenset(), _unused, _unused)
    node = {"id": "nd-bench", "region": "bench", "tier": "near", "labels": {}}
    timings = []
    for _ in range(runs):
        supervisor = AppSupervisor(definition, services, node, app_dir / "state.db", None,
                                   SystemClock())
        started = time.perf_counter()
        supervisor.start()
        await supervisor.wait_running()
        ready = time.perf_counter()
        reply = await supervisor.http("GET", "/json", "", [], b"")
        first = time.perf_counter()
        if reply.status != 200:
            raise RuntimeError(f"first response was {reply.status}: {reply.body!r}")
        await supervisor.stop()
        timings.append(((ready - started) * 1000, (first - started) * 1000))
    return timings


def bare_python_ms(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append((time.perf_counter() - started) * 1000)
    return times


def idle_node_memory(idle_s: float) -> dict[str, float]:
    """RSS (MB) of a node agent, its app worker and its broker, idle with one app."""
    with fogline_node(MANIFEST, CODE, "hello_app", cpu=None) as node:
        time.sleep(idle_s)
        agent = psutil.Process(node.pid)
        parts = {"agent": agent.memory_info().rss / MB, "worker": 0.0, "broker": 0.0}
        for child in agent.children(recursive=True):
            kind = "broker" if "nats-server" in child.name() else "worker"
            parts[kind] += child.memory_info().rss / MB
    parts["total"] = sum(parts.values())
    return {key: round(value, 1) for key, value in parts.items()}


def run(quick: bool = False) -> dict[str, Any]:
    runs = 5 if quick else 20
    workdir = Path(tempfile.mkdtemp(prefix="fogline-bench-cold-start-"))
    try:
        app_dir = write_app(workdir / "app")
        # Warm the page cache once, as any node that started before would have.
        asyncio.run(cold_starts(app_dir, 1))
        timings = asyncio.run(cold_starts(app_dir, runs))
        floor = bare_python_ms(runs)
        memory = idle_node_memory(2.0 if quick else 8.0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    first = sorted(t for _, t in timings)
    ready = sorted(r for r, _ in timings)
    p90 = first[max(0, int(len(first) * 0.9) - 1)]
    median = statistics.median(first)
    conditions = {
        "first_response_ms": {"p50": round(median, 1), "p90": round(p90, 1),
                              "max": round(first[-1], 1)},
        "worker_ready_ms_p50": round(statistics.median(ready), 1),
        "bare_python_ms_p50": round(statistics.median(floor), 1),
        "idle_node_with_one_app_rss_mb": memory,
        "what": "spawn worker -> import app -> Hello -> one GET through the supervisor",
        "python": platform.python_version(), "cores": os.cpu_count(),
    }
    return result(name="cold-start", figure=round(p90, 1), unit="ms p90 to first response",
                  peer="bare `python -c pass`", peer_figure=round(statistics.median(floor), 1),
                  better="lower", goal="<= 300 ms", met=bool(p90 <= GOAL_MS),
                  conditions=conditions, samples=runs)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
