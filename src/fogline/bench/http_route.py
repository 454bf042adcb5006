"""Benchmark `http-route`: a trivial JSON route on one core, fogline vs workerd.

fogline: a node (agent + the app's worker process, both pinned to core 0) serving
`GET /hello/json` -> {"hello": "world"} from an app through its HTTP front. Peer:
Cloudflare's workerd (npm) on core 0 serving the equivalent worker. The rounds, loads
and noise accounting are `bench.compare.compare_http_route`: wrk on core 1 for the
maximum, alternating fogline and workerd, then an open-loop generator on core 1 at 50%
of each one's own maximum for the p99. Goal: fogline's rps at or above workerd's, and
fogline's p99 at 50% load at most 2 ms.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fogline.bench.compare import compare_http_route
from fogline.bench.heartbeats import FOGLINE, running_hub, stop_process, wait_until
from fogline.bench.peers import PeerProcess, pinned

MANIFEST = """apiVersion: fogline/v1
kind: App
metadata: {name: hello, version: 1.0.0}
spec:
  entrypoint: hello_app:app
"""
CODE = """from fogline import App

app = App("hello")


@app.route("GET", "/json")
async def hello(req, ctx):
    return {"hello": "world"}
"""


def write_app(directory: Path, manifest: str = MANIFEST, code: str = CODE,
              module: str = "hello_app") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fogline.yaml").write_text(manifest)
    (directory / f"{module}.py").write_text(code)
    return directory


@contextlib.contextmanager
def fogline_node(manifest: str, code: str, module: str, *extra: str,
                 cpu: int | None) -> Iterator[PeerProcess]:
    """A hub and one node running the app, the node (and so its workers) on `cpu`;
    yields it (url = the node's endpoint, pid = the agent) once the app runs."""
    workdir = Path(tempfile.mkdtemp(prefix="fogline-bench-node-"))
    try:
        app_dir = write_app(workdir / "app", manifest, code, module)
        with running_hub(workdir) as hub:
            token = hub.create_token(uses=1)
            node_data = workdir / "node"
            log_path = workdir / "node.log"
            with open(log_path, "ab") as log:
                node = subprocess.Popen(
                    pinned([*FOGLINE, "node", "--data", str(node_data), "--hub", hub.url,
                            "--token", token, "--name", "bench", "--app", str(app_dir),
                            *extra], cpu),
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                def running() -> bool:
                    if node.poll() is not None:
                        raise RuntimeError(f"node exited: {log_path.read_text()[-3000:]}")
                    return ": running" in log_path.read_text()

                wait_until(running, 60, "the app to run", interval_s=0.1)
                endpoint = (node_data / "endpoint").read_text().strip()
                yield PeerProcess(endpoint, node, None, workdir)  # type: ignore[arg-type]
            finally:
                stop_process(node)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def fogline_route(cpu: int | None) -> Iterator[PeerProcess]:
    with fogline_node(MANIFEST, CODE, "hello_app", cpu=cpu) as node:
        node.url += "/hello/json"
        yield node


def run(quick: bool = False) -> dict[str, Any]:
    return compare_http_route(fogline_route, quick=quick)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
