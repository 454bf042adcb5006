"""Benchmark `cache-hit`: a cached 10 KB object served from the edge cache, vs Varnish.

Both front the same trivial origin (a thread of this process) that serves
`GET /bench/object-10k` -> 10 KB with `Cache-Control: max-age=3600`.

- fogline: a real hub and one real node (the node pinned to core 0, as `http-route`
  does), with a `kind: Site` applied through the hub's `/v1/sites`; requests go through
  the node's HTTP front -> SiteFront -> CacheProxy's hit path (memory tier).
- peer: Varnish from Debian (installed with apt-get by this benchmark when `varnishd`
  is missing, saying so): `varnishd -F -a 127.0.0.1:PORT -b 127.0.0.1:ORIGIN
  -s malloc,256m -n TMPDIR` pinned to core 0, builtin VCL (it caches a 200 with
  max-age and no cookies).

Before measuring, each one must show a real hit: fogline `X-Cache: HIT`, Varnish an
`X-Varnish` field with two transaction ids (this request's and the one that stored it)
and an `Age`. The origin counts requests: each round should cost it one (the fill).

The method is `http-route`'s (`bench.compare.measure_http_target`): wrk on core 1 for
the maximum, alternating Varnish and fogline round by round, then the open-loop
generator on core 1 at 50% of each one's own maximum for the p99. Goal: fogline's rps at
or above Varnish's, and fogline's p99 at 50% load at most 1 ms.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from fogline.bench.compare import _best, measure_http_target
from fogline.bench.heartbeats import FOGLINE, running_hub, stop_process, wait_until
from fogline.bench.peers import (
    LOAD_CPU,
    SUT_CPU,
    PeerProcess,
    PeerUnavailable,
    ensure_wrk,
    pinned,
    require_tools,
    stop,
    wait_http,
)
from fogline.transport.nats_server import die_with_parent, free_port

NAME = "cache-hit"
OBJECT_PATH = "/bench/object-10k"
OBJECT_BYTES = 10 * 1024
CACHE_CONTROL = "max-age=3600"
SITE_NAME = "bench"
P99_GOAL_MS = 1.0
START_TIMEOUT_S = 60.0
SITE_TIMEOUT_S = 120.0  # placement and the desired state reaching the node, on a busy host
VARNISH_STORAGE = "malloc,256m"


# ---------------------------------------------------------------- the origin

@dataclass
class Origin:
    """The trivial origin both caches front; `requests` counts what reached it."""

    url: str
    server: ThreadingHTTPServer
    requests: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


@contextlib.contextmanager
def running_origin() -> Iterator[Origin]:
    """A threaded HTTP/1.1 origin on a free loopback port until the context exits."""
    body = (b"0123456789abcdef" * (OBJECT_BYTES // 16 + 1))[:OBJECT_BYTES]
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive towards both caches

        def do_GET(self) -> None:
            seen.append(self.path)
            if self.path != OBJECT_PATH:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Cache-Control", CACHE_CONTROL)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None  # quiet: the benchmark prints one JSON object

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True,
                              name="bench-origin")
    thread.start()
    try:
        yield Origin(f"http://127.0.0.1:{server.server_address[1]}", server, seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# ---------------------------------------------------------------- hit checks

def check_fogline_hit(url: str) -> dict[str, str]:
    """Two GETs; the second must be a fogline cache hit with the whole object."""
    with httpx.Client(timeout=10) as client:
        client.get(url)
        response = client.get(url)
    if (response.status_code, response.headers.get("x-cache"),
            len(response.content)) != (200, "HIT", OBJECT_BYTES):
        raise PeerUnavailable(f"fogline did not serve a cache hit at {url}: "
                              f"{response.status_code} {dict(response.headers)}")
    return {"x-cache": response.headers["x-cache"], "age": response.headers.get("age", "")}


def check_varnish_hit(url: str) -> dict[str, str]:
    """Two GETs; the second must be a Varnish hit: X-Varnish names two transactions
    (this one and the one that stored the object) and Age is present."""
    with httpx.Client(timeout=10) as client:
        client.get(url)
        response = client.get(url)
    ids = response.headers.get("x-varnish", "").split()
    if response.status_code != 200 or len(ids) != 2 or "age" not in response.headers \
            or len(response.content) != OBJECT_BYTES:
        raise PeerUnavailable(f"Varnish did not serve a cache hit at {url}: "
                              f"{response.status_code} {dict(response.headers)}")
    return {"x-varnish": response.headers["x-varnish"], "age": response.headers["age"]}


# ---------------------------------------------------------------- fogline

class _NodeRun:
    """A `fogline node` subprocess of the benchmark and its log."""

    def __init__(self, process: subprocess.Popen[bytes], data: Path, log: Path) -> None:
        self.process, self.data, self.log = process, data, log

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise PeerUnavailable(f"node exited: {self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _wait_served(node: _NodeRun, url: str) -> None:
    """Until GET `url` at the node answers 200 (the site reached it); a clear error
    with the last answer and the node's log otherwise."""
    last = ["no answer"]

    def served() -> bool:
        node.check_alive()
        try:
            response = httpx.get(url, timeout=5)
        except httpx.HTTPError as exc:
            last[0] = repr(exc)
            return False
        last[0] = f"{response.status_code} {response.text[:200]}"
        return response.status_code == 200

    try:
        wait_until(served, SITE_TIMEOUT_S, "the site at the node", interval_s=0.1)
    except TimeoutError as exc:
        raise PeerUnavailable(f"{exc} (last answer: {last[0]}); node log: "
                              f"{node.log_tail()}") from exc


@contextlib.contextmanager
def fogline_site(origin: Origin, cpu: int | None) -> Iterator[PeerProcess]:
    """A hub and one node (pinned to `cpu`) with a Site fronting `origin` applied through
    the hub; yields once the node serves the object as a cache hit (`.url` is the
    object's URL at the node, `.pid` the node agent)."""
    workdir = Path(tempfile.mkdtemp(prefix="fogline-bench-cache-"))
    try:
        with running_hub(workdir, interval_s=2.0) as hub:
            token = hub.create_token(uses=1)
            node_data, log_path = workdir / "node", workdir / "node.log"
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    pinned([*FOGLINE, "node", "--data", str(node_data), "--hub", hub.url,
                            "--token", token, "--name", "bench-cache"], cpu),
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            node = _NodeRun(process, node_data, log_path)
            try:
                def listening() -> bool:
                    node.check_alive()
                    return (node_data / "endpoint").exists()

                wait_until(listening, START_TIMEOUT_S, "the node to serve", interval_s=0.1)
                with hub.client() as client:
                    client.post("/v1/sites", json={
                        "name": SITE_NAME, "reason": "cache-hit benchmark",
                        "spec": {"origin": origin.url, "path_prefixes": ["/bench"],
                                 "cache": {"memory_mb": 64, "disk_mb": 64}},
                    }).raise_for_status()
                url = (node_data / "endpoint").read_text().strip() + OBJECT_PATH
                _wait_served(node, url)
                check_fogline_hit(url)
                yield PeerProcess(url, process, None, workdir)  # type: ignore[arg-type]
            finally:
                stop_process(process)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------- Varnish

def ensure_varnish() -> tuple[str, str]:
    """(path of varnishd, "present" or "installed by this benchmark"); installs
    Debian's varnish with apt-get when varnishd is missing, saying so."""
    found = shutil.which("varnishd") or shutil.which("varnishd", path="/usr/sbin:/sbin")
    if found:
        return found, "present"
    apt = shutil.which("apt-get")
    if apt is None:
        raise PeerUnavailable("varnishd is needed and apt-get is absent: install "
                              "Varnish by hand")
    print("fogline bench: varnishd not found, installing it: apt-get install -y varnish",
          file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "varnish"]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0 and argv[1] == "install":
            raise PeerUnavailable(f"apt-get install varnish failed: {done.stderr[-1500:]}")
    found = shutil.which("varnishd") or shutil.which("varnishd", path="/usr/sbin:/sbin")
    if found is None:
        raise PeerUnavailable("apt-get install varnish ran but varnishd is not found")
    # The Debian package starts a system service on port 6081; this benchmark runs its
    # own varnishd and leaves that service as the package set it up.
    return found, "installed by this benchmark"


def varnish_version(varnishd: str) -> str:
    done = subprocess.run([varnishd, "-V"], capture_output=True, text=True, check=False)
    first = (done.stderr or done.stdout).strip().splitlines()
    return first[0] if first else "unknown"


@contextlib.contextmanager
def varnish_cache(origin: Origin, cpu: int | None,
                  varnishd: str | None = None) -> Iterator[PeerProcess]:
    """varnishd in the foreground in front of `origin`, pinned to `cpu` (its worker
    threads inherit the affinity); yields once it serves the object as a hit."""
    varnishd = varnishd or ensure_varnish()[0]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fogline-varnish-") as tmp:
        workdir = Path(tmp)
        # varnishd drops privileges to its own users when started as root: they must
        # reach the working directory.
        workdir.chmod(0o755)
        log = workdir / "varnishd.log"
        argv = [varnishd, "-F", "-a", f"127.0.0.1:{port}", "-b", f"127.0.0.1:{origin.port}",
                "-s", VARNISH_STORAGE, "-n", str(workdir / "n")]
        with open(log, "wb") as log_file:
            process = subprocess.Popen(pinned(argv, cpu), stdin=subprocess.DEVNULL,
                                       stdout=log_file, stderr=subprocess.STDOUT,
                                       cwd=workdir, preexec_fn=die_with_parent)
        try:
            wait_http("127.0.0.1", port, OBJECT_PATH, process, START_TIMEOUT_S, "varnishd",
                      log)
            url = f"http://127.0.0.1:{port}{OBJECT_PATH}"
            check_varnish_hit(url)
            yield PeerProcess(url, process, varnish_version(varnishd), workdir)
        finally:
            stop(process)


# ---------------------------------------------------------------- the comparison

def measure_round(target: Any, origin: Origin, seconds: float,
                  latency_seconds: float) -> dict[str, Any]:
    """`measure_http_target` plus how many requests reached the origin meanwhile: only
    the fills of a fresh cache when every measured request was a hit (fogline: 1;
    Varnish: 2, as its key includes Host and the readiness probe sends it without the
    port)."""
    before = len(origin.requests)
    measured = measure_http_target(target, seconds, latency_seconds)
    return {**measured, "origin_requests": len(origin.requests) - before}


def run(quick: bool = False, *, rounds: int | None = None, seconds: float | None = None,
        latency_seconds: float | None = None) -> dict[str, Any]:
    """The benchmark; `rounds`, `seconds` and `latency_seconds` override the sizes (a
    smoke test runs a tiny one)."""
    from fogline.bench import result

    require_tools("taskset")
    ensure_wrk()
    varnishd, varnish_state = ensure_varnish()
    default_rounds, default_seconds, default_latency = (1, 3.0, 2.5) if quick \
        else (3, 5.0, 5.0)
    rounds = rounds or default_rounds
    seconds = seconds or default_seconds
    latency_seconds = latency_seconds or default_latency
    runs: dict[str, list[dict[str, Any]]] = {"fogline": [], "peer": []}
    with running_origin() as origin:
        def fogline(cpu: int | None) -> contextlib.AbstractContextManager[Any]:
            return fogline_site(origin, cpu)

        def peer(cpu: int | None) -> contextlib.AbstractContextManager[Any]:
            return varnish_cache(origin, cpu, varnishd)

        for _ in range(rounds):  # alternate, so drift on a shared machine hits both alike
            runs["peer"].append(measure_round(peer, origin, seconds, latency_seconds))
            runs["fogline"].append(measure_round(fogline, origin, seconds,
                                                 latency_seconds))
    ours, theirs = _best(runs["fogline"], "rps"), _best(runs["peer"], "rps")
    version = varnish_version(varnishd)
    return result(
        name=NAME, figure=ours["rps"], unit="req/s",
        peer=f"{version} (Debian), one core", peer_figure=theirs["rps"], better="higher",
        goal=f">= 1.0x Varnish rps, p99 <= {P99_GOAL_MS:g} ms at 50% load",
        met=ours["rps"] >= theirs["rps"] and ours["half_p99_ms"] <= P99_GOAL_MS,
        samples=rounds * 2,
        conditions={
            "cores": os.cpu_count(), "sut_core": SUT_CPU, "load_core": LOAD_CPU,
            "object": f"GET {OBJECT_PATH} -> {OBJECT_BYTES} B, Cache-Control: "
                      f"{CACHE_CONTROL}",
            "fogline_path": "node HTTP front -> SiteFront -> CacheProxy hit (memory tier)",
            "varnish": f"varnishd -s {VARNISH_STORAGE}, builtin VCL ({varnish_state})",
            "max_load": f"wrk -t1 -c32 {seconds:g}s",
            "latency_load": f"open loop at 50% of each one's max, {latency_seconds:g}s",
            "fogline_p99_ms_at_half": ours["half_p99_ms"],
            "peer_p99_ms_at_half": theirs["half_p99_ms"],
            "fogline": ours, "peer": theirs, "rounds": runs,
            "noisy": ours["clean_rounds"] == 0 or theirs["clean_rounds"] == 0,
            "python": platform.python_version(), "varnish_version": version})


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
