"""Peers and load generators shared by the benchmarks that compare fogline's app runtime
with other systems in the same run (BENCHMARKS.md: `http-route`, `mqtt-flow`).

- `ensure_npm_package`: installs an npm package (workerd, Node-RED, autocannon) into a
  per-user cache with the machine's npm, saying so on stderr, once.
- `ensure_wrk`: Debian's wrk, installed with apt-get when missing, saying so.
- `workerd_server`: Cloudflare's workerd serving `GET /hello/json` -> {"hello":"world"}.
- `wrk_max`: closed-loop maximum throughput (wrk, with percentiles from `--latency`).
- `fixed_rate_latency`: open-loop latency at a fixed request rate (see below).
- `node_red_flow`: headless Node-RED with mqtt in -> function (v*2) -> mqtt out.
- `mqtt_flow_load`: MQTT publisher + subscriber in a pinned subprocess (gmqtt) that
  measures a flow's throughput and end-to-end latency.
- `ForeignLoad`: how much of a pinned core other processes took during a run (the
  machines are shared: a run with a high share is noise, not a figure).

Open loop: wrk is closed-loop (each connection waits for its response), so a stalled
server is sent less and its stall hides from the latency figures (coordinated
omission). `fixed_rate_latency` therefore runs this module's own open-loop generator
in a subprocess pinned to the other core: requests come due at fixed times, a due
request that finds every connection busy queues and that wait counts in its latency.
autocannon `--overallRate` was tried and is kept only for comparison
(`autocannon_fixed_rate`): it releases each second's quota in a burst at the start of
the second and records whole milliseconds, too coarse for a p99 goal of 2 ms.

Every server and generator runs under `taskset -c CPU` when a CPU is given; the usual
layout on a 2-core machine is the system under test on core 0 and the load on core 1.
The HELLO route and the bench flow are the peers' side of `http-route` and `mqtt-flow`;
the fogline side plugs in as its own server or flow and is driven by the same loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fogline.transport.nats_server import die_with_parent, free_port

WORKERD_VERSION = "1.20261117.1"  # pinned so peer figures compare across runs
NODE_RED_VERSION = "4.1.8"  # 5.x needs Node.js >= 22.9; Debian 12 has 20
AUTOCANNON_VERSION = "9.0.0"
WORKERD_COMPAT_DATE = "2025-01-01"
START_TIMEOUT_S = 60.0
LOAD_CPU = 1  # default core for load generators
SUT_CPU = 0  # default core for the system under test

HELLO_BODY = b'{"hello":"world"}'


class PeerUnavailable(RuntimeError):
    """A peer or tool could not be installed or started; the message says why."""


# ---------------------------------------------------------------- installs

def cache_root() -> Path:
    """$FOGLINE_BENCH_CACHE, else ~/.cache/fogline."""
    env = os.environ.get("FOGLINE_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fogline"


def npm_prefix(name: str) -> Path:
    """Where `name` is installed: <cache root>/bench-npm/<name> (scoped names: '@' and
    '/' become '_')."""
    safe = name.replace("@", "").replace("/", "_")
    return cache_root() / "bench-npm" / safe


def _installed_version(package_dir: Path) -> str | None:
    try:
        version = json.loads((package_dir / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None
    return str(version)


def ensure_npm_package(name: str, version: str | None = None) -> Path:
    """The directory of npm package `name` (its `node_modules/<name>`), installed into
    the cache with the machine's npm when missing or at another version than asked.
    Its commands are in `npm_bin(name, command)`. Safe to call from concurrent
    processes (a lock file serialises installs)."""
    prefix = npm_prefix(name)
    package_dir = prefix / "node_modules" / name
    have = _installed_version(package_dir)
    if have is not None and (version is None or have == version):
        return package_dir
    npm = shutil.which("npm")
    if npm is None:
        raise PeerUnavailable(
            f"npm is needed to install the benchmark peer {name!r} and was not found: "
            "install Node.js and npm (Debian: apt-get install -y nodejs npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        have = _installed_version(package_dir)
        if have is not None and (version is None or have == version):
            return package_dir
        spec = f"{name}@{version}" if version else name
        print(f"fogline bench: installing npm package {spec} into {prefix} "
              f"({'replacing ' + have if have else 'not installed'})", file=sys.stderr,
              flush=True)
        package_json = prefix / "package.json"
        if not package_json.exists():
            package_json.write_text('{"private": true, "name": "fogline-bench-peer"}\n')
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--save-exact",
             spec], cwd=prefix, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PeerUnavailable(f"npm install {spec} failed ({done.returncode}): "
                                  f"{(done.stderr or done.stdout)[-2000:]}")
    if _installed_version(package_dir) is None:
        raise PeerUnavailable(f"npm install {spec} left no {package_dir}/package.json")
    return package_dir


def npm_bin(name: str, command: str | None = None, version: str | None = None) -> Path:
    """Path of command `command` (default: the package name) of npm package `name`."""
    package_dir = ensure_npm_package(name, version)
    path = package_dir.parents[0] / ".bin" / (command or name.rsplit("/", 1)[-1])
    if not path.exists():
        raise PeerUnavailable(f"{name} installed but has no command {path.name} ({path})")
    return path


def npm_version(name: str) -> str | None:
    return _installed_version(npm_prefix(name) / "node_modules" / name)


def ensure_wrk() -> str:
    """Path of wrk; installs Debian's package with apt-get when missing, saying so."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise PeerUnavailable("wrk is needed and apt-get is absent: install wrk by hand")
    print("fogline bench: wrk not found, installing it: apt-get install -y wrk",
          file=sys.stderr, flush=True)
    for argv in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "wrk"]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0 and argv[1] == "install":
            raise PeerUnavailable(f"apt-get install wrk failed: {done.stderr[-1500:]}")
    found = shutil.which("wrk")
    if found is None:
        raise PeerUnavailable("apt-get install wrk ran but wrk is still not on PATH")
    return found


def require_tools(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise PeerUnavailable(f"{tool} is needed: apt-get install -y "
                                  f"{'util-linux' if tool == 'taskset' else tool}")


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """`argv` under `taskset -c cpu` when a CPU is given."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


# ---------------------------------------------------------------- processes

def stop(process: subprocess.Popen[Any], grace_s: float = 5.0) -> None:
    """Terminate a child we started (by its own pid), kill it after a grace period."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(grace_s)


def http_get(host: str, port: int, path: str, timeout_s: float = 2.0) -> tuple[int, bytes]:
    """A bare HTTP/1.1 GET: (status, body). Raises OSError when nothing answers."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        length: int | None = None
        while chunk := sock.recv(65536):  # some servers keep the connection open anyway
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep and length is None:
                found = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                length = int(found.group(1)) if found else None
            if length is not None and len(body) >= length:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if match is None:
        raise OSError(f"not an HTTP response: {data[:200]!r}")
    return int(match.group(1)), body


def wait_http(host: str, port: int, path: str, process: subprocess.Popen[Any] | None,
              timeout_s: float, name: str, log: Path | None = None) -> None:
    """Until GET path answers 200; a clear error with the log tail otherwise."""
    deadline = time.monotonic() + timeout_s
    last: str = "no attempt"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise PeerUnavailable(f"{name} exited with {process.returncode} before "
                                  f"answering: {tail}")
        try:
            status, _ = http_get(host, port, path)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise PeerUnavailable(f"{name} did not answer GET {path} on {host}:{port} within "
                          f"{timeout_s:.0f}s ({last}) {tail}")


def run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine to completion from sync code, even inside a running loop (then in
    a helper thread with its own loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def src_env() -> dict[str, str]:
    """Subprocesses of this module import this very source tree."""
    src = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{path}" if path else src}


# ---------------------------------------------------------------- noise on a shared machine

_CLK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def core_times(cpu: int) -> tuple[float, float]:
    """(seconds busy in user/nice/system, seconds in all states) of one core so far."""
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                return (v[0] + v[1] + v[2]) / _CLK, sum(v) / _CLK
    raise ValueError(f"no cpu{cpu} in /proc/stat")


def tree_cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds of these processes and their live children."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = p.cpu_times()
                    total += times.user + times.system
    return total


class ForeignLoad:
    """The share of a core's time that went to processes *other than* `pids` (and, with
    reaped=True, the children this process reaped meanwhile) between start() and
    stop(): how much another user of a shared machine took from a pinned benchmark.
    Interrupt time is left out, since loopback traffic is accounted there."""

    def __init__(self, cpu: int, pids: list[int] | None = None, reaped: bool = False
                 ) -> None:
        self.cpu, self.pids, self.reaped = cpu, pids or [], reaped
        self.busy = self.total = self.own = 0.0

    def _own(self) -> float:
        import resource

        own = tree_cpu_s(self.pids)
        if self.reaped:  # e.g. wrk, run to completion by subprocess.run
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)
            own += usage.ru_utime + usage.ru_stime
        return own

    def start(self) -> ForeignLoad:
        self.busy, self.total = core_times(self.cpu)
        self.own = self._own()
        return self

    def stop(self, contended: bool = False) -> float:
        """Other processes' share of the core. contended=True counts it only when the
        core had no idle time left (< 5%), i.e. when they took time from ours: right
        for throughput; latency suffers from any co-runner, so use the plain share."""
        busy, total = core_times(self.cpu)
        span = max(1e-9, total - self.total)
        foreign = max(0.0, ((busy - self.busy) - (self._own() - self.own)) / span)
        idle = max(0.0, 1.0 - (busy - self.busy) / span)
        return round(0.0 if contended and idle >= 0.05 else foreign, 3)


# ---------------------------------------------------------------- workerd

WORKER_JS = """\
// GET /hello/json -> {"hello": "world"}: the peer of a trivial fogline JSON route.
export default {
  async fetch(request) {
    const url = new URL(request.url);
    if (request.method === "GET" && url.pathname === "/hello/json") {
      return Response.json({ hello: "world" });
    }
    return new Response("not found", { status: 404 });
  },
};
"""

WORKERD_CONFIG = """\
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [ (name = "main", worker = .helloWorker) ],
  sockets = [ (name = "http", address = "127.0.0.1:{port}", http = (), service = "main") ],
);

const helloWorker :Workerd.Worker = (
  modules = [ (name = "worker", esModule = embed "worker.js") ],
  compatibilityDate = "{compat}",
);
"""


class PeerProcess:
    """A running peer: its base URL (or broker), process and installed version."""

    def __init__(self, url: str, process: subprocess.Popen[Any], version: str | None,
                 workdir: Path) -> None:
        self.url = url
        self.process = process
        self.version = version
        self.workdir = workdir

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float | None:
        try:
            import psutil

            proc = psutil.Process(self.process.pid)
            tree = [proc, *proc.children(recursive=True)]
            return round(sum(p.memory_info().rss for p in tree) / 2**20, 1)
        except Exception:
            return None


def workerd_binary() -> Path:
    """The native workerd binary that the npm package ships (no node shim between)."""
    package_dir = ensure_npm_package("workerd", WORKERD_VERSION)
    modules = package_dir.parent
    for candidate in (modules / "@cloudflare" / "workerd-linux-64" / "bin" / "workerd",
                      modules / "@cloudflare" / "workerd-linux-arm64" / "bin" / "workerd",
                      package_dir / "bin" / "workerd"):
        if candidate.exists():
            return candidate
    raise PeerUnavailable(f"workerd installed in {package_dir} but no binary found")


@contextlib.contextmanager
def workerd_server(port: int | None = None, cpu: int | None = SUT_CPU
                   ) -> Iterator[PeerProcess]:
    """workerd serving GET /hello/json on 127.0.0.1:port (free port when None), pinned to
    `cpu`; yields once it answers 200. `.url` is the route's full URL."""
    require_tools("taskset")
    binary = workerd_binary()
    port = port or free_port()
    with tempfile.TemporaryDirectory(prefix="fogline-workerd-") as tmp:
        workdir = Path(tmp)
        (workdir / "worker.js").write_text(WORKER_JS)
        config = workdir / "config.capnp"
        config.write_text(WORKERD_CONFIG.replace("{port}", str(port))
                          .replace("{compat}", WORKERD_COMPAT_DATE))
        log = workdir / "workerd.log"
        with open(log, "wb") as log_file:
            process = subprocess.Popen(pinned([str(binary), "serve", str(config)], cpu),
                                       stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, cwd=workdir,
                                       preexec_fn=die_with_parent)
        try:
            wait_http("127.0.0.1", port, "/hello/json", process, START_TIMEOUT_S,
                      "workerd", log)
            yield PeerProcess(f"http://127.0.0.1:{port}/hello/json", process,
                              npm_version("workerd"), workdir)
        finally:
            stop(process)


# ---------------------------------------------------------------- wrk (closed loop)

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_PCT = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                         r"timeout (\d+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in")


def parse_wrk(output: str) -> dict[str, Any]:
    rps = _WRK_RPS.search(output)
    pct = {int(m.group(1)): float(m.group(2)) * _UNIT_MS[m.group(3)]
           for m in _WRK_PCT.finditer(output)}
    if rps is None or 99 not in pct or 50 not in pct:
        raise ValueError(f"unexpected wrk output: {output[-2000:]}")
    non2xx = _WRK_NON2XX.search(output)
    socket_errors = _WRK_SOCKET.search(output)
    total = _WRK_TOTAL.search(output)
    return {"rps": float(rps.group(1)), "p50_ms": pct[50], "p99_ms": pct[99],
            "p90_ms": pct.get(90), "requests": int(total.group(1)) if total else None,
            "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(int(x) for x in socket_errors.groups())
            if socket_errors else 0}


def wrk_max(url: str, connections: int = 32, duration_s: float = 5.0, threads: int = 1,
            cpu: int | None = LOAD_CPU) -> dict[str, Any]:
    """Closed-loop maximum throughput with wrk: {rps, p50_ms, p99_ms, p90_ms, requests,
    non_2xx, socket_errors, load_core_foreign_share}. Percentiles are of the saturated
    server (queueing included), from wrk's `--latency` table. The last is the share of
    wrk's core that other processes took from it (`ForeignLoad`, contended): above ~0.1
    the run was noisy."""
    wrk = ensure_wrk()
    argv = pinned([wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
                   "--latency", url], cpu)
    meter = ForeignLoad(cpu, reaped=True).start() if cpu is not None else None
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=duration_s + 60)
    if done.returncode != 0:
        raise PeerUnavailable(f"wrk failed ({done.returncode}): {done.stderr[-1000:]}")
    out = parse_wrk(done.stdout)
    out["load_core_foreign_share"] = meter.stop(contended=True) if meter else None
    return out


# ---------------------------------------------------------------- open-loop HTTP load

def fixed_rate_latency(url: str, rate: float, duration_s: float = 5.0,
                       cpu: int | None = LOAD_CPU, connections: int = 64,
                       warmup_s: float | None = None) -> dict[str, Any]:
    """Open-loop latency at `rate` requests/s for `duration_s` (after a warm-up that is
    not counted): {rps_achieved, p50_ms, p99_ms, p999_ms, max_ms, errors, sent,
    backlog_wait_p99_ms, generator_lag_p99_ms, generator_cpu_share}. A server stall
    counts for every request that came due during it (they queue for a connection and
    that wait is part of their latency). The generator is this module run in a
    subprocess pinned to `cpu`; it polls its schedule without sleeping (it owns that
    core). `generator_cpu_share` well below 1.0 or a large `generator_lag_p99_ms` means
    other processes took its core: treat that run's figures as noisy."""
    require_tools("taskset")
    warmup = min(1.0, duration_s / 5) if warmup_s is None else warmup_s
    spec = {"url": url, "rate": rate, "duration_s": duration_s, "warmup_s": warmup,
            "connections": connections}
    return _run_worker("http-load", spec, cpu, timeout_s=duration_s + warmup + 60)


def _run_worker(kind: str, spec: dict[str, Any], cpu: int | None,
                timeout_s: float) -> dict[str, Any]:
    argv = pinned([sys.executable, "-m", "fogline.bench.peers", kind, json.dumps(spec)], cpu)
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=timeout_s, env=src_env(), stdin=subprocess.DEVNULL)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise PeerUnavailable(f"{kind} generator failed ({done.returncode}): "
                              f"{done.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(lines[-1])
    if "error" in out:
        raise PeerUnavailable(f"{kind} generator: {out['error']}")
    return out


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


async def _http_load(a: dict[str, Any]) -> dict[str, Any]:
    """The open-loop generator (runs in the pinned subprocess).

    Each request has a scheduled time (start + i / rate). The polling loop notices it is
    due within microseconds when this process has its core; if other processes take the
    core, the lateness is the generator's, not the server's, so latency runs from the
    moment the request was *noticed* due (`generator_lag_*` reports that lateness). A
    due request that finds every connection waiting on the server queues, and that wait
    (`backlog_wait_*`) counts in its latency: coordinated omission is not hidden."""
    import httptools

    parts = urlsplit(a["url"])
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "User-Agent: fogline-bench\r\n\r\n").encode()
    rate, warmup, duration = float(a["rate"]), float(a["warmup_s"]), float(a["duration_s"])
    total = int(rate * (warmup + duration))
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    start = clock() + 0.05
    count_from = start + warmup
    latencies: list[float] = []
    generator_lags: list[float] = []
    backlog_waits: list[float] = []
    stats = {"errors": 0, "non_2xx": 0, "done": 0, "last": 0.0}
    backlog: deque[tuple[float, float]] = deque()  # (scheduled, noticed) not yet sent
    idle: list[Conn] = []
    finished = loop.create_future()

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            self.parser = httptools.HttpResponseParser(self)
            self.inflight: deque[tuple[float, float]] = deque()  # (scheduled, noticed)
            self.transport: asyncio.Transport | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]
            transport.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def send(self, scheduled: float, noticed: float, now: float) -> None:
            if scheduled >= count_from:
                backlog_waits.append(now - noticed)
            self.inflight.append((scheduled, noticed))
            assert self.transport is not None
            self.transport.write(request)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                stats["errors"] += 1
                assert self.transport is not None
                self.transport.close()

        def on_message_complete(self) -> None:
            now = clock()
            scheduled, noticed = self.inflight.popleft()
            if self.parser.get_status_code() >= 300:
                stats["non_2xx"] += 1
            elif scheduled >= count_from:
                latencies.append(now - noticed)
                stats["last"] = now
            stats["done"] += 1
            if backlog:
                self.send(*backlog.popleft(), now)
            else:
                idle.append(self)
            if stats["done"] + stats["errors"] >= total and not finished.done():
                finished.set_result(None)

        def connection_lost(self, exc: Exception | None) -> None:
            stats["errors"] += len(self.inflight)
            self.inflight.clear()
            if self in idle:
                idle.remove(self)

    conns = []
    for _ in range(int(a["connections"])):
        _, conn = await loop.create_connection(Conn, host, port)
        conns.append(conn)
        idle.append(conn)
    sent = 0
    while clock() < start:
        await asyncio.sleep(0.001)
    cpu0, wall0 = time.process_time(), clock()

    def tick() -> None:
        nonlocal sent
        now = clock()
        due = min(total, int((now - start) * rate) + 1)
        while sent < due:
            scheduled = start + sent / rate
            sent += 1
            if scheduled >= count_from:
                generator_lags.append(now - scheduled)
            if idle:
                idle.pop().send(scheduled, now, now)
            else:
                backlog.append((scheduled, now))
        if sent < total:
            loop.call_soon(tick)  # poll, do not sleep: this process owns its core

    loop.call_soon(tick)
    end_of_schedule = start + (warmup + duration)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(finished, max(1.0, end_of_schedule - clock()) + 10.0)
    cpu_share = (time.process_time() - cpu0) / max(1e-9, min(clock(), end_of_schedule) - wall0)
    unanswered = total - stats["done"] - stats["errors"]
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    for values in (latencies, generator_lags, backlog_waits):
        values.sort()
    counted = len(latencies)
    span = max(duration, stats["last"] - count_from) if counted else duration
    ms = 1000.0

    def pct(values: list[float], q: float) -> float:
        return (_percentile(values, q) or 0.0) * ms

    return {"rate": rate, "rps_achieved": counted / span, "sent": sent,
            "completed": stats["done"], "errors": stats["errors"] + stats["non_2xx"]
            + unanswered, "non_2xx": stats["non_2xx"], "unanswered": unanswered,
            "p50_ms": pct(latencies, 0.50), "p99_ms": pct(latencies, 0.99),
            "p999_ms": pct(latencies, 0.999),
            "max_ms": (latencies[-1] if latencies else 0) * ms,
            "backlog_wait_p99_ms": pct(backlog_waits, 0.99),
            "generator_lag_p99_ms": pct(generator_lags, 0.99),
            "generator_cpu_share": round(cpu_share, 3),
            "connections": a["connections"], "duration_s": duration, "warmup_s": warmup}


def autocannon_fixed_rate(url: str, rate: float, duration_s: float = 5.0,
                          cpu: int | None = LOAD_CPU, connections: int = 64
                          ) -> dict[str, Any]:
    """autocannon `--overallRate` (for comparison only): its rate limit releases each
    second's quota at the start of that second and it records whole milliseconds, so
    its p99 at a fixed rate is coarse; `fixed_rate_latency` is the one to report."""
    command = npm_bin("autocannon", version=AUTOCANNON_VERSION)
    argv = pinned(["node", str(command), "--json", "-c", str(connections),
                   "-d", str(max(1, round(duration_s))), "--overallRate", str(int(rate)),
                   url], cpu)
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          timeout=duration_s + 60)
    if done.returncode != 0:
        raise PeerUnavailable(f"autocannon failed: {done.stderr[-1000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"rps_achieved": out["requests"]["average"], "p50_ms": out["latency"]["p50"],
            "p99_ms": out["latency"]["p99"], "errors": out["errors"] + out["non2xx"]
            + out["timeouts"]}


# ---------------------------------------------------------------- MQTT topics

def parse_broker(broker_url: str) -> tuple[str, int]:
    """'mqtt://host:port', 'tcp://host:port' or 'host:port' -> (host, port)."""
    parts = urlsplit(broker_url if "://" in broker_url else f"mqtt://{broker_url}")
    return parts.hostname or "127.0.0.1", parts.port or 1883


def out_topic_for(in_filter: str, out_filter: str, topic: str) -> str:
    """The out topic for a message on `topic` (which matches `in_filter`): the values of
    in_filter's '+' levels fill out_filter's '+' levels in order. bench/+/in,
    bench/+/out: bench/d7/in -> bench/d7/out."""
    in_levels, out_levels = in_filter.split("/"), out_filter.split("/")
    values = iter([level for pattern, level in zip(in_levels, topic.split("/"), strict=False)
                   if pattern == "+"])
    return "/".join(next(values) if pattern == "+" else pattern for pattern in out_levels)


def _check_filters(in_filter: str, out_filter: str) -> None:
    if "#" in in_filter or "#" in out_filter:
        raise ValueError("use '+' wildcards ('#' cannot be mapped to an out topic)")
    if in_filter.count("+") < out_filter.count("+"):
        raise ValueError(f"{out_filter!r} has more '+' levels than {in_filter!r}")


def probe_topic(in_filter: str) -> str:
    return in_filter.replace("+", "probe")


# ---------------------------------------------------------------- Node-RED

NODE_RED_FUNCTION = """\
const p = JSON.parse(msg.payload);
const levels = msg.topic.split("/");
let j = 0;
msg.topic = OUT.map(x => x === null ? levels[WILD[j++]] : x).join("/");
msg.payload = JSON.stringify({ v: p.v * 2 });
return msg;
"""


def node_red_flows(broker_url: str, in_topic: str, out_topic: str) -> list[dict[str, Any]]:
    """mqtt in (QoS1, `in_topic`) -> function (v*2, out topic from the in topic) ->
    mqtt out (QoS1), all through one MQTT 3.1.1 connection to the broker."""
    _check_filters(in_topic, out_topic)
    host, port = parse_broker(broker_url)
    wild = [i for i, level in enumerate(in_topic.split("/")) if level == "+"]
    out = [None if level == "+" else level for level in out_topic.split("/")]
    func = (f"const WILD = {json.dumps(wild)};\nconst OUT = {json.dumps(out)};\n"
            + NODE_RED_FUNCTION)
    return [
        {"id": "fb_tab", "type": "tab", "label": "fogline bench", "disabled": False},
        {"id": "fb_broker", "type": "mqtt-broker", "name": "bench broker", "broker": host,
         "port": str(port), "clientid": f"fb-node-red-{uuid.uuid4().hex[:8]}",
         "autoConnect": True, "usetls": False, "protocolVersion": "4", "keepalive": "60",
         "cleansession": True, "autoUnsubscribe": True, "birthTopic": "",
         "closeTopic": "", "willTopic": ""},
        {"id": "fb_in", "type": "mqtt in", "z": "fb_tab", "name": "in", "topic": in_topic,
         "qos": "1", "datatype": "utf8", "broker": "fb_broker", "nl": False, "rap": True,
         "rh": 0, "inputs": 0, "x": 100, "y": 100, "wires": [["fb_fn"]]},
        {"id": "fb_fn", "type": "function", "z": "fb_tab", "name": "double", "func": func,
         "outputs": 1, "timeout": 0, "noerr": 0, "initialize": "", "finalize": "",
         "libs": [], "x": 300, "y": 100, "wires": [["fb_out"]]},
        {"id": "fb_out", "type": "mqtt out", "z": "fb_tab", "name": "out", "topic": "",
         "qos": "1", "retain": "false", "respTopic": "", "contentType": "",
         "userProps": "", "correl": "", "expiry": "", "broker": "fb_broker",
         "x": 500, "y": 100, "wires": []},
    ]


NODE_RED_SETTINGS = """\
// Headless Node-RED for fogline benchmarks: no editor, no admin API, no HTTP nodes, so
// it opens no HTTP port at all; no telemetry or update checks.
module.exports = {
  flowFile: "flows.json",
  credentialSecret: false,
  uiHost: "127.0.0.1",
  uiPort: %(port)d,
  httpAdminRoot: false,
  httpNodeRoot: false,
  disableEditor: true,
  logging: { console: { level: "warn", metrics: false, audit: false } },
  diagnostics: { enabled: false, ui: false },
  runtimeState: { enabled: false, ui: false },
  telemetry: { enabled: false, updateNotification: false },
  externalModules: { autoInstall: false, palette: { allowInstall: false },
                     modules: { allowInstall: false } },
  functionExternalModules: false,
  mqttReconnectTime: 1000,
  editorTheme: { projects: { enabled: false } },
};
"""


@contextlib.contextmanager
def node_red_flow(broker_url: str = "mqtt://127.0.0.1:1883", in_topic: str = "bench/+/in",
                  out_topic: str = "bench/+/out", cpu: int | None = SUT_CPU,
                  ready_timeout_s: float = START_TIMEOUT_S) -> Iterator[PeerProcess]:
    """Headless Node-RED running the bench flow (`node_red_flows`) pinned to `cpu`, with
    its userDir in a temp dir; yields once a probe published on the in topic comes back
    on the out topic (so its subscription is live). `.url` is the broker URL."""
    require_tools("taskset", "node")
    package_dir = ensure_npm_package("node-red", NODE_RED_VERSION)
    with tempfile.TemporaryDirectory(prefix="fogline-node-red-") as tmp:
        user_dir = Path(tmp)
        (user_dir / "flows.json").write_text(
            json.dumps(node_red_flows(broker_url, in_topic, out_topic), indent=1))
        (user_dir / "settings.js").write_text(NODE_RED_SETTINGS % {"port": free_port()})
        log = user_dir / "node-red.log"
        argv = ["node", str(package_dir / "red.js"), "--settings",
                str(user_dir / "settings.js"), "--userDir", str(user_dir), "flows.json"]
        with open(log, "wb") as log_file:
            process = subprocess.Popen(pinned(argv, cpu), stdin=subprocess.DEVNULL,
                                       stdout=log_file, stderr=subprocess.STDOUT,
                                       cwd=user_dir, preexec_fn=die_with_parent)
        try:
            try:
                run_coroutine(wait_flow(broker_url, in_topic, out_topic, ready_timeout_s,
                                        process))
            except (PeerUnavailable, OSError, TimeoutError) as exc:
                raise PeerUnavailable(f"Node-RED flow not ready: {exc}; log: "
                                      f"{log.read_text(errors='replace')[-3000:]}") from exc
            yield PeerProcess(broker_url, process, npm_version("node-red"), user_dir)
        finally:
            stop(process)


async def wait_flow(broker_url: str, in_filter: str, out_filter: str, timeout_s: float,
                    process: subprocess.Popen[Any] | None = None) -> float:
    """Publish a probe {"v": 1} on the in topic every 0.25 s until {"v": 2} comes back on
    the matching out topic; returns seconds waited. Works for any flow under test."""
    from gmqtt import Client
    from gmqtt.mqtt.constants import MQTTv311

    host, port = parse_broker(broker_url)
    topic = probe_topic(in_filter)
    expect = out_topic_for(in_filter, out_filter, topic)
    arrived = asyncio.Event()

    def on_message(_c: Any, got_topic: str, payload: bytes, _qos: int, _p: Any) -> int:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            if got_topic == expect and json.loads(payload)["v"] == 2:
                arrived.set()
        return 0

    client = Client(f"fb-probe-{uuid.uuid4().hex[:8]}", clean_session=True)
    client.on_message = on_message
    await client.connect(host, port, version=MQTTv311)
    began = time.monotonic()
    try:
        client.subscribe(expect, qos=1)
        while not arrived.is_set():
            if process is not None and process.poll() is not None:
                raise PeerUnavailable(f"process exited with {process.returncode}")
            if time.monotonic() - began > timeout_s:
                raise TimeoutError(f"no reply on {expect} within {timeout_s:.0f}s")
            client.publish(topic, json.dumps({"v": 1, "t": time.time()}), qos=1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(arrived.wait(), 0.25)
    finally:
        await client.disconnect()
    return time.monotonic() - began


# ---------------------------------------------------------------- MQTT flow load

def mqtt_flow_load(broker_url: str = "mqtt://127.0.0.1:1883",
                   in_topic_fmt: str = "bench/d{k}/in", out_topic_filter: str = "bench/+/out",
                   messages: int = 20_000, rate: float | None = None,
                   cpu: int | None = LOAD_CPU, devices: int = 100, window: int = 900,
                   timeout_s: float = 120.0, factor: int = 2) -> dict[str, Any]:
    """Drive an MQTT flow (in topic -> handler -> out topic) from a gmqtt publisher and
    subscriber in a subprocess pinned to `cpu`. Message i is QoS1 `{"v": i, "t": wall
    time}` on in_topic_fmt.format(k=i % devices); the flow must answer `{"v": 2*i}` on a
    topic matching out_topic_filter (subscribed QoS1).

    rate=None: full speed, with at most `window` messages in the flow at once (sent, not
    yet back), kept below Mosquitto's default per-client queue of 1,000 so the broker
    never drops QoS1 for lag; msgs_per_s is the sustained end-to-end rate. A flow whose
    latency is not CPU-bound (Node-RED through a default Mosquitto: Nagle, 20 QoS1 in
    flight per client) scales with the window: compare flows at the same window. rate=R: open
    loop at R msg/s, latency from each message's scheduled time. Returns {msgs_per_s,
    p50_ms, p99_ms, p999_ms, max_ms, lost, duplicates, bad, sent, received, ...}.

    factor=1 with in topics that match the out filter measures the generator and broker
    alone (no flow): the ceiling any flow can show with this generator."""
    spec = {"broker": broker_url, "in_fmt": in_topic_fmt, "out_filter": out_topic_filter,
            "messages": messages, "rate": rate, "devices": devices, "window": window,
            "timeout_s": timeout_s, "factor": factor}
    return _run_worker("mqtt-load", spec, cpu, timeout_s=timeout_s + 60)


def _cork(client: Any) -> None:
    """Join the generator's packets of one loop turn into one write, as MqttLink does:
    the generator then spends its core on MQTT, not on syscalls."""
    from fogline.transport.mqtt_link import CorkedTransport

    with contextlib.suppress(AttributeError):  # a gmqtt without these internals: uncorked
        protocol = client._connection._protocol
        protocol._transport = CorkedTransport(protocol._transport)


async def _mqtt_load(a: dict[str, Any]) -> dict[str, Any]:
    import msgspec
    from gmqtt import Client
    from gmqtt.mqtt.constants import MQTTv311

    host, port = parse_broker(a["broker"])
    count, devices, window = int(a["messages"]), int(a["devices"]), int(a["window"])
    rate, factor = a["rate"], int(a.get("factor", 2))
    topics = [a["in_fmt"].format(k=k) for k in range(devices)]
    clock = time.perf_counter
    scheduled = [0.0] * count
    arrivals = [0.0] * count
    received = {"n": 0, "dup": 0, "bad": 0, "last": 0.0}
    space = asyncio.Event()
    all_in = asyncio.Event()
    sent = 0

    decode = msgspec.json.Decoder().decode

    def on_message(_c: Any, _topic: str, payload: bytes, _qos: int, _p: Any) -> int:
        now = clock()
        try:
            i = int(decode(payload)["v"]) // factor
        except (msgspec.DecodeError, ValueError, TypeError, KeyError):
            received["bad"] += 1
            return 0
        if not 0 <= i < count or scheduled[i] == 0.0:
            received["bad"] += 1
        elif arrivals[i]:
            received["dup"] += 1
        else:
            arrivals[i] = now
            received["n"] += 1
            received["last"] = now
            if sent - received["n"] < window:
                space.set()
            if received["n"] >= count:
                all_in.set()
        return 0

    tag = uuid.uuid4().hex[:8]
    sub = Client(f"fb-load-sub-{tag}", clean_session=True)
    sub.on_message = on_message
    subscribed = asyncio.Event()
    sub.on_subscribe = lambda *_: subscribed.set()
    pub = Client(f"fb-load-pub-{tag}", clean_session=True)
    await sub.connect(host, port, version=MQTTv311)
    await pub.connect(host, port, version=MQTTv311)
    _cork(sub)
    _cork(pub)
    sub.subscribe(a["out_filter"], qos=1)
    await asyncio.wait_for(subscribed.wait(), 10)
    start = clock()
    wall0 = time.time() - start
    for i in range(count):
        if rate is None:
            if sent - received["n"] >= window:
                space.clear()
                await space.wait()
            elif i % 200 == 199:
                await asyncio.sleep(0)  # let the loop flush and read acks
            scheduled[i] = clock()
        else:
            due = start + i / rate
            while (wait := due - clock()) > 0:
                if wait > 0.002:
                    await asyncio.sleep(wait - 0.0015)
                else:
                    await asyncio.sleep(0)
            scheduled[i] = due
        sent += 1
        pub.publish(topics[i % devices],
                    b'{"v":%d,"t":%.6f}' % (i, wall0 + scheduled[i]), qos=1)
    publish_end = clock()
    deadline = start + float(a["timeout_s"])
    while not all_in.is_set() and clock() < deadline:
        idle_for = clock() - (received["last"] or publish_end)
        if idle_for > 2.0 and clock() - publish_end > 2.0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), 0.1)
    storage = pub._persistent_storage
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(storage.wait_empty(), 5)
    unacked = len(storage.get_all())
    await pub.disconnect()
    await sub.disconnect()
    lat = sorted(arrivals[i] - scheduled[i] for i in range(count) if arrivals[i])
    n = len(lat)
    span = (received["last"] - start) if n else 0.0
    ms = 1000.0
    return {"messages": count, "rate": rate, "sent": sent, "received": n,
            "lost": count - n, "duplicates": received["dup"], "bad": received["bad"],
            "unacked": unacked, "msgs_per_s": n / span if span > 0 else 0.0,
            "publish_s": publish_end - start, "span_s": span,
            "p50_ms": (_percentile(lat, 0.50) or 0) * ms,
            "p99_ms": (_percentile(lat, 0.99) or 0) * ms,
            "p999_ms": (_percentile(lat, 0.999) or 0) * ms,
            "max_ms": (lat[-1] if lat else 0) * ms, "devices": devices,
            "window": window if rate is None else None}


# ---------------------------------------------------------------- subprocess entry

def main(argv: list[str]) -> None:
    """`python -m fogline.bench.peers http-load|mqtt-load JSON`: one generator run; its
    result is the last stdout line."""
    kind, spec = argv[0], json.loads(argv[1])
    workers: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
        "http-load": _http_load, "mqtt-load": _mqtt_load}
    try:
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        out = asyncio.run(workers[kind](spec))
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
