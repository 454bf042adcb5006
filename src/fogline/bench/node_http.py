"""node-http: the node's own HTTP endpoint served by uvicorn (what fogline uses) beside
granian, on one pinned core each, loaded by wrk on the other core.

This is the measurement behind choosing uvicorn for the node's `/healthz` and
`/metrics`: it runs inside the agent's event loop, so it costs no extra process.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from typing import Any

import psutil

from fogline.bench import result
from fogline.node.http import NodeState, create_node_app
from fogline.transport.nats_server import free_port

app = create_node_app(NodeState(started_at_s=time.time(), node_id="nd-bench", name="bench"))

_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_P99 = re.compile(r"99%\s+([\d.]+)(us|ms|s)")
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _server_command(server: str, port: int) -> list[str]:
    target = "fogline.bench.node_http:app"
    if server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", target, "--port", str(port),
                "--log-level", "warning", "--no-access-log"]
    return [sys.executable, "-m", "granian", "--interface", "asgi", "--port", str(port),
            "--workers", "1", "--log-level", "warning", target]


def _wrk(port: int, seconds: float) -> tuple[float, float]:
    output = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c32", f"-d{seconds:.0f}s", "--latency",
         f"http://127.0.0.1:{port}/healthz"], capture_output=True, text=True,
        check=True).stdout
    rps = _RPS.search(output)
    p99 = _P99.search(output)
    if rps is None or p99 is None:
        raise ValueError(f"unexpected wrk output: {output}")
    return float(rps.group(1)), float(p99.group(1)) * _UNIT_MS[p99.group(2)]


def _measure(server: str, seconds: float) -> dict[str, float]:
    port = free_port()
    process = subprocess.Popen(["taskset", "-c", "0", *_server_command(server, port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/healthz"],
                               check=True, capture_output=True)
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        rps, p99_ms = _wrk(port, seconds)
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(True)]
        rss_mb = sum(p.memory_info().rss for p in tree) / 2**20
        return {"rps": rps, "p99_ms": p99_ms, "rss_mb": round(rss_mb, 1)}
    finally:
        process.terminate()
        process.wait(10)


def _ensure_granian() -> str:
    try:
        import granian  # noqa: F401
        return "present"
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "granian"],
                       check=True)
        return "installed by this benchmark"


def run(quick: bool = False) -> dict[str, Any]:
    for tool in ("wrk", "taskset", "curl"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"{tool} is needed: apt-get install {tool}")
    granian_state = _ensure_granian()
    rounds, seconds = (1, 3.0) if quick else (3, 5.0)
    samples: dict[str, list[dict[str, float]]] = {"uvicorn": [], "granian": []}
    for _ in range(rounds):  # alternate, so drift on a shared machine hits both alike
        for server in samples:
            samples[server].append(_measure(server, seconds))

    def best(server: str, key: str) -> float:
        values = [s[key] for s in samples[server]]
        return max(values) if key == "rps" else min(values)

    ours, peer = best("uvicorn", "rps"), best("granian", "rps")
    return result(
        name="node-http", figure=ours, unit="req/s", peer="granian 1 worker",
        peer_figure=peer, better="higher", goal="informs the server choice",
        met=True, samples=rounds * 2,
        conditions={"route": "GET /healthz (JSON)", "server_core": 0, "load": "wrk -c32 core 1",
                    "uvicorn_p99_ms": best("uvicorn", "p99_ms"),
                    "granian_p99_ms": best("granian", "p99_ms"),
                    "uvicorn_rss_mb": best("uvicorn", "rss_mb"),
                    "granian_rss_mb": best("granian", "rss_mb"), "granian": granian_state,
                    "rounds": samples})


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
