"""The demo's simulated users: per region, one client of its edge node and one of the
cloud node, each calling `GET /factory/machines/<machine>` at a fixed rate.

They run in a process of their own (`python -m fogline.sim.demo_users CONFIG`), so the
latency they measure does not include the scheduling delays of the demo's own busy event
loop (WAN proxy, device simulators, live view). Requests go out on a fixed schedule
(open loop: a slow answer does not delay the next request, so slowness is not hidden),
over kept-alive HTTP/1.1 connections with a small hand-written client (a few lines of
asyncio streams, far less client-side overhead than a general HTTP library). Latency is
measured client-side, from taking a connection to the last byte of the body.

Before measuring, each path is warmed up: requests are repeated (not counted) until
every machine of the path answers 200, i.e. the devices' first batches have reached the
app. The stats go to a JSON file, replaced atomically every half second and once more at
exit (SIGTERM).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fogline.errors import ConfigError, ProtocolError
from fogline.sim.procs import python_module, run_reporting

REQUEST_TIMEOUT_S = 2.0
WARMUP_TIMEOUT_S = 30.0
SPARE_CONNECTIONS = 4  # per path: 20 requests/s at 150 ms RTT keep about 3 in flight
IN_FLIGHT_MAX = 32  # per path; above it a tick is counted as failed ("overloaded")
HEADERS_MAX = 64
BODY_BYTES_MAX = 1 << 20
LATENCIES_MAX = 500_000  # per path: hours at the demo's rates
WRITE_INTERVAL_S = 1.0
RECENT_S = 10


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`, None when there are none."""
    return sorted_percentile(sorted(values), q)


def sorted_percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass(frozen=True)
class UserPath:
    """One user population: `region`'s users calling `node` (`kind` edge or cloud) at
    host:port, which is the node itself (edge) or a WAN link in front of it (cloud)."""

    region: str
    kind: str
    node: str
    host: str
    port: int
    machines: tuple[str, ...]
    rate_per_s: float

    @property
    def key(self) -> str:
        return f"{self.region}/{self.kind}"


@dataclass
class PathStats:
    ok: int = 0
    failed: int = 0
    # Kept sorted as they come (bisect.insort, a memmove): reading a percentile then costs
    # nothing, where sorting on every write would stall this loop and show up in p99.
    latencies_ms: list[float] = field(default_factory=list)
    # Wall-clock second -> [ok, failed], so the demo can count what happened in a window
    # (the partition) without this process knowing about it.
    by_second: dict[int, list[int]] = field(default_factory=dict)
    recent: collections.deque[tuple[float, float]] = field(
        default_factory=collections.deque)  # (at_s, ms) of the last RECENT_S seconds
    errors: dict[str, int] = field(default_factory=dict)
    measuring_since_s: float | None = None
    warmed_up: bool = False

    def record(self, at_s: float, latency_ms: float | None, error: str = "") -> None:
        bucket = self.by_second.setdefault(int(at_s), [0, 0])
        if latency_ms is None:
            self.failed += 1
            bucket[1] += 1
            self.errors[error] = self.errors.get(error, 0) + 1
            return
        self.ok += 1
        bucket[0] += 1
        if len(self.latencies_ms) < LATENCIES_MAX:
            bisect.insort(self.latencies_ms, latency_ms)
        self.recent.append((at_s, latency_ms))

    def to_dict(self, now_s: float) -> dict[str, Any]:
        while self.recent and self.recent[0][0] < now_s - RECENT_S:
            self.recent.popleft()
        recent = [ms for _, ms in self.recent]
        return {
            "ok": self.ok, "failed": self.failed, "warmed_up": self.warmed_up,
            "measuring_since_s": self.measuring_since_s,
            "p50_ms": _round(sorted_percentile(self.latencies_ms, 50)),
            "p99_ms": _round(sorted_percentile(self.latencies_ms, 99)),
            "max_ms": _round(self.latencies_ms[-1] if self.latencies_ms else None),
            "recent_p99_ms": _round(percentile(recent, 99)),
            "errors": dict(self.errors),
            "by_second": {str(second): counts for second, counts in self.by_second.items()},
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class _Stale(ConnectionResetError):
    """The connection ended before any byte of the response came back."""


class _Connection:
    """One kept-alive HTTP/1.1 connection; `get` returns the status code."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> _Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def get(self, request: bytes) -> tuple[int, bool]:
        """(status, reusable) of one GET; ProtocolError on a response it cannot read."""
        try:
            self.writer.write(request)
            line = await self.reader.readline()
        except (RuntimeError, ConnectionResetError, BrokenPipeError) as exc:
            # RuntimeError: uvloop, on a transport the peer has closed.
            raise _Stale(f"connection closed before the response: {exc}") from exc
        if not line:
            raise _Stale("connection closed before the response")
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {line[:80]!r}")
        status, length, reusable = int(parts[1]), 0, True
        for _ in range(HEADERS_MAX):
            header = await self.reader.readline()
            if header in (b"\r\n", b"\n", b""):
                break
            name, _, value = header.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                if not value.strip().isdigit():
                    raise ProtocolError(f"bad content-length {value[:40]!r}")
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                reusable = False
            elif name == b"transfer-encoding":
                raise ProtocolError("chunked responses are not expected here")
        else:
            raise ProtocolError(f"more than {HEADERS_MAX} headers")
        if not 0 <= length <= BODY_BYTES_MAX:
            raise ProtocolError(f"body of {length} bytes")
        await self.reader.readexactly(length)
        return status, reusable

    @property
    def stale(self) -> bool:
        """Closed by the peer while idle (a real client would not reuse it either)."""
        return self.writer.is_closing() or self.reader.at_eof()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class PathClient:
    """The open-loop request schedule of one path, with its connection pool."""

    def __init__(self, path: UserPath) -> None:
        self.path = path
        self.stats = PathStats()
        self._idle: list[_Connection] = []
        self._in_flight = 0
        self._next_machine = 0

    def _request(self, machine: str) -> bytes:
        return (f"GET /factory/machines/{machine} HTTP/1.1\r\n"
                f"Host: {self.path.host}:{self.path.port}\r\n\r\n").encode()

    async def call(self, machine: str) -> tuple[int, float]:
        """(status, latency_ms) of one request; OSError, TimeoutError or ProtocolError."""
        started = time.perf_counter()
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            while self._idle and self._idle[-1].stale:
                self._idle.pop().close()
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await _Connection.open(
                self.path.host, self.path.port)
            try:
                status, reusable = await conn.get(self._request(machine))
            except _Stale:
                # The server closed this idle connection (uvicorn's keep-alive timeout)
                # and its FIN was still on the way: like any HTTP client, send the GET
                # again on a new connection. The time of both attempts is counted.
                conn.close()
                if not reused:
                    raise
                conn = await _Connection.open(self.path.host, self.path.port)
                try:
                    status, reusable = await conn.get(self._request(machine))
                except BaseException:
                    conn.close()
                    raise
            except BaseException:
                conn.close()
                raise
        latency_ms = (time.perf_counter() - started) * 1000
        if reusable:
            self._idle.append(conn)
        else:
            conn.close()
        return status, latency_ms

    async def warm_up(self, stop: asyncio.Event) -> None:
        """Until every machine answers 200 here (not counted), then open a few spare
        connections so the measured requests do not pay for connecting."""
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        pending = list(self.path.machines)
        while pending and time.monotonic() < deadline and not stop.is_set():
            machine = pending[0]
            with contextlib.suppress(OSError, TimeoutError, ProtocolError,
                                     asyncio.IncompleteReadError):
                if (await self.call(machine))[0] == 200:
                    pending.pop(0)
                    continue
            await asyncio.sleep(0.1)
        self.stats.warmed_up = not pending
        with contextlib.suppress(OSError, TimeoutError):
            while len(self._idle) < SPARE_CONNECTIONS:
                self._idle.append(await _Connection.open(self.path.host, self.path.port))

    async def one(self, machine: str) -> None:
        at_s = time.time()
        try:
            status, latency_ms = await self.call(machine)
        except (OSError, TimeoutError, ProtocolError, asyncio.IncompleteReadError) as exc:
            name = "ConnectionResetError" if isinstance(exc, ConnectionResetError) \
                else type(exc).__name__
            self.stats.record(at_s, None, name)
            return
        finally:
            self._in_flight -= 1
        if status == 200:
            self.stats.record(at_s, latency_ms)
        else:
            self.stats.record(at_s, None, f"HTTP {status}")

    async def run(self, stop: asyncio.Event) -> None:
        await self.warm_up(stop)
        self.stats.measuring_since_s = time.time()
        loop = asyncio.get_running_loop()
        interval_s = 1.0 / self.path.rate_per_s
        next_s = loop.time()
        async with asyncio.TaskGroup() as group:
            while not stop.is_set():
                if self._in_flight >= IN_FLIGHT_MAX:
                    self.stats.record(time.time(), None, "overloaded")
                else:
                    machine = self.path.machines[self._next_machine % len(self.path.machines)]
                    self._next_machine += 1
                    self._in_flight += 1
                    group.create_task(self.one(machine))
                next_s += interval_s
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, next_s - loop.time()))
        for conn in self._idle:
            conn.close()


def write_stats(target: Path, clients: list[PathClient]) -> None:
    now_s = time.time()
    body = {"written_at_s": now_s, "pid": os.getpid(),
            "paths": {c.path.key: c.stats.to_dict(now_s) for c in clients}}
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(body))
    os.replace(temporary, target)


async def serve_users(config: dict[str, Any]) -> None:
    """Run every path until cancelled; the stats file is written to the end."""
    target = Path(config["stats_path"])
    target.parent.mkdir(parents=True, exist_ok=True)
    clients = [PathClient(UserPath(**{**p, "machines": tuple(p["machines"])}))
               for p in config["paths"]]
    await run_reporting([client.run for client in clients],
                        lambda: write_stats(target, clients), WRITE_INTERVAL_S)


def users_process(paths: list[UserPath], stats_path: Path,
                  log_path: Path) -> contextlib.AbstractAsyncContextManager[
                      asyncio.subprocess.Process]:
    """The users process, running until the context exits (SIGTERM: it writes its final
    stats and ends; SIGKILL after a grace period)."""
    config = {"stats_path": str(stats_path),
              "paths": [dataclasses.asdict(path) for path in paths]}
    return python_module("fogline.sim.demo_users", config, log_path)


def read_stats(stats_path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(stats_path.read_text()))
    except (OSError, ValueError):
        return {}


def main() -> None:
    from fogline.runtime import run_service

    if len(sys.argv) != 2:
        raise ConfigError("usage: python -m fogline.sim.demo_users CONFIG_JSON")
    config = json.loads(sys.argv[1])
    # This process is the measuring instrument: its own pauses would be counted as the
    # nodes' latency. Objects alive after start-up are left out of garbage collection,
    # and collections of the young generation are made rarer (the requests' garbage is
    # freed by reference counting anyway).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    run_service(lambda: serve_users(config))


if __name__ == "__main__":
    main()
