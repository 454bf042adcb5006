"""wan-accuracy: what the WAN emulator adds to a round trip, and how true its latency is.

Peer: a bare loopback socket to the same echo server, pinged alternately with a link
at L=0 in the same run, so machine noise hits both alike. The figure is the p50 RTT the
proxy adds; `met` is whether the p50 RTT through a link at a configured L is within
max(1 ms, 5%) of 2L. `conditions` also records the proxy's CPU cost at 10k msg/s.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fogline import __version__
from fogline.bench import result
from fogline.sim.wan import TIMER_GRID_S, LinkConfig, WanEmulator

NAME = "wan-accuracy"
PAYLOAD = b"x" * 16
CONFIGURED_LATENCY_MS = 20.0
LOAD_MSGS_PER_S = 10_000
LOAD_TICK_S = 0.001

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def _echo_server() -> AsyncIterator[tuple[str, int]]:
    writers: set[asyncio.StreamWriter] = set()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writers.discard(writer)
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        for writer in list(writers):
            writer.close()
        await server.wait_closed()


@asynccontextmanager
async def _connect(address: tuple[str, int]) -> AsyncIterator[Stream]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        yield reader, writer
    finally:
        writer.close()
        await writer.wait_closed()


async def _ping_ms(stream: Stream) -> float:
    reader, writer = stream
    start_s = time.perf_counter()
    writer.write(PAYLOAD)
    await reader.readexactly(len(PAYLOAD))
    return (time.perf_counter() - start_s) * 1000


def _quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def _load_cpu_s(stream: Stream, duration_s: float) -> tuple[float, int]:
    """Echo LOAD_MSGS_PER_S small messages (one write each) for duration_s.

    Returns the process CPU seconds spent and the messages echoed back.
    """
    reader, writer = stream
    sent = 0

    async def send() -> None:
        nonlocal sent
        start_s = time.perf_counter()
        while (elapsed_s := time.perf_counter() - start_s) < duration_s:
            while sent < elapsed_s * LOAD_MSGS_PER_S:
                writer.write(PAYLOAD)
                sent += 1
            await writer.drain()
            await asyncio.sleep(LOAD_TICK_S)

    cpu_start_s = time.process_time()
    await send()
    await reader.readexactly(sent * len(PAYLOAD))
    return time.process_time() - cpu_start_s, sent


async def _measure(quick: bool) -> dict[str, Any]:
    pairs = 300 if quick else 2000
    configured_samples = 100 if quick else 1000
    load_rounds, load_round_s = (2, 1.0) if quick else (3, 3.0)
    configured = LinkConfig(latency_ms=CONFIGURED_LATENCY_MS)

    async with _echo_server() as echo, WanEmulator(seed=1) as emulator:
        zero_link = emulator.add_link("zero", echo)
        configured_link = emulator.add_link("configured", echo, configured)
        async with (
            _connect(echo) as bare,
            _connect(zero_link.address) as proxied,
            _connect(configured_link.address) as shaped,
        ):
            for _ in range(20):  # warm up every path
                await _ping_ms(bare), await _ping_ms(proxied), await _ping_ms(shaped)
            bare_ms: list[float] = []
            proxied_ms: list[float] = []
            for _ in range(pairs):
                proxied_ms.append(await _ping_ms(proxied))
                bare_ms.append(await _ping_ms(bare))
            shaped_ms = [await _ping_ms(shaped) for _ in range(configured_samples)]

            cpu_bare_s = cpu_proxied_s = 0.0
            messages = 0
            for _ in range(load_rounds):
                cpu_s, sent = await _load_cpu_s(bare, load_round_s)
                cpu_bare_s += cpu_s
                cpu_s, sent = await _load_cpu_s(proxied, load_round_s)
                cpu_proxied_s += cpu_s
                messages += sent

    load_s = load_rounds * load_round_s
    achieved_msgs_per_s = messages / load_s
    proxy_cpu_per_s = (cpu_proxied_s - cpu_bare_s) / load_s
    bare_p50, proxied_p50 = statistics.median(bare_ms), statistics.median(proxied_ms)
    expected_ms = 2 * CONFIGURED_LATENCY_MS
    shaped_p50 = statistics.median(shaped_ms)
    error_ms = shaped_p50 - expected_ms
    tolerance_ms = max(1.0, 0.05 * expected_ms)
    # Two extra loopback hops always cost something; the floor only guards the ratio.
    added_ms = max(proxied_p50 - bare_p50, 0.0001)
    return result(
        name=NAME,
        figure=round(added_ms, 4),
        unit="ms",
        peer="bare loopback socket (asyncio streams, same echo server)",
        peer_figure=round(bare_p50, 4),
        better="lower",
        goal="p50 RTT through a link at latency L within max(1 ms, 5%) of 2L",
        met=abs(error_ms) <= tolerance_ms,
        conditions={
            "figure_is": "p50 RTT through an L=0 link minus p50 RTT of the bare socket",
            "ratio_is": "bare p50 RTT over the added p50 RTT (above 1: the proxy adds less "
            "than one bare loopback round trip)",
            "quick": quick,
            "payload_bytes": len(PAYLOAD),
            "proxied_rtt_p50_ms": round(proxied_p50, 4),
            "proxied_rtt_p99_ms": round(_quantile(proxied_ms, 0.99), 4),
            "bare_rtt_p99_ms": round(_quantile(bare_ms, 0.99), 4),
            "configured_latency_ms": CONFIGURED_LATENCY_MS,
            "configured_rtt_p50_ms": round(shaped_p50, 4),
            "configured_rtt_p99_ms": round(_quantile(shaped_ms, 0.99), 4),
            "configured_rtt_error_ms": round(error_ms, 4),
            "configured_rtt_tolerance_ms": tolerance_ms,
            "configured_samples": configured_samples,
            "load_msgs_per_s": round(achieved_msgs_per_s),
            "load_s": load_s,
            "load_note": "each message is one 16-byte write, about 10 per 1 ms tick (TCP may "
            "coalesce them), echoed, so it crosses the proxy both ways; proxy CPU is this "
            "process's CPU with the proxy in the path minus without it",
            "proxy_cpu_s_per_s_at_10k_msgs": round(
                proxy_cpu_per_s * LOAD_MSGS_PER_S / achieved_msgs_per_s, 4
            ),
            "process_cpu_s_per_s_bare": round(cpu_bare_s / load_s, 4),
            "process_cpu_s_per_s_proxied": round(cpu_proxied_s / load_s, 4),
            "timer_grid_s": TIMER_GRID_S,
            "cores": os.cpu_count(),
            "cores_used": 1,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "fogline": __version__,
        },
        samples=pairs,
    )


def run(quick: bool = False) -> dict[str, Any]:
    """Measure and return the benchmark's JSON object (BENCHMARKS.md shape)."""
    return asyncio.run(_measure(quick))


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
