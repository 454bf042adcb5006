"""The purge benchmark's WAN: emulator links in processes of their own, with probes.

A thousand hollow nodes keep their event loop busy when a purge lands on all of them at
once; an emulator sharing that loop (or that GIL) would release bytes late and blame
the WAN. So each group of links runs in its own process on its own loop (uvloop where
installed), started by `running_wan` as `python -m fogline.bench.purge_wan SPEC OUT`.

Each process also measures itself:
- probes: one NATS client straight to the server and one through each of its links,
  all subscribed to `fl.purge` with the hub's credentials. Per purge, the time the
  linked probe got it minus the direct probe's time minus the link's latency is what
  the emulator added beyond its configured latency, under the real fan-out load (the
  linked probe is one connection among the link's hundreds). The direct probe's time
  minus the purge's `issued_at_s` is the hub's part: issue -> on the wire.
- its loop's lag: lateness of a 20 ms timer, stamped so the parent keeps its rounds'.

Protocol with the parent: the child prints one JSON line `{"ports": {link: port}}` once
listening and probing, runs until its stdin closes, then writes its stamps to OUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psutil
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fogline.bench.heartbeats import cpu_seconds, stop_process
from fogline.errors import FoglineError, ProtocolError
from fogline.protocol import PURGE_SUBJECT, Purge, decode
from fogline.runtime import fast_loop_factory
from fogline.sim.wan import LinkConfig, WanEmulator

LAG_TICK_S = 0.02
LINK_CONNECTIONS_MAX = 4096  # a link carries a whole region's nodes


# The child ------------------------------------------------------------------------------

class _Stamps:
    """seq -> wall-clock time a probe received the purge, per probe."""

    def __init__(self) -> None:
        self.by_probe: dict[str, dict[int, float]] = {}

    def callback(self, probe: str) -> Any:
        stamps = self.by_probe.setdefault(probe, {})

        async def on_purge(msg: Msg) -> None:
            at_s = time.time()
            with contextlib.suppress(ProtocolError):
                purge = decode(msg.data)
                if isinstance(purge, Purge):
                    stamps.setdefault(purge.seq, at_s)

        return on_purge


async def _probe(url: str, creds: str, name: str, stamps: _Stamps) -> NatsClient:
    nc = await nats.connect(url, user_credentials=creds, name=f"bench-purge-probe-{name}",
                            allow_reconnect=False, connect_timeout=10)
    await nc.subscribe(PURGE_SUBJECT, cb=stamps.callback(name))
    await nc.flush()
    return nc


async def _lag(samples: list[tuple[float, float]]) -> None:
    """(wall time, lateness in s) of a 20 ms timer, so the parent can pick its window."""
    loop = asyncio.get_running_loop()
    while True:
        before = loop.time()
        await asyncio.sleep(LAG_TICK_S)
        samples.append((time.time(), max(0.0, loop.time() - before - LAG_TICK_S)))


async def _serve(spec: dict[str, Any], out_path: Path) -> None:
    upstream = (str(spec["upstream"][0]), int(spec["upstream"][1]))
    emulator = WanEmulator(seed=int(spec.get("seed", 1)))
    links = {name: emulator.add_link(name, upstream, LinkConfig(latency_ms=float(ms)))
             for name, ms in spec["links"]}
    for link in links.values():
        link.connections_max = LINK_CONNECTIONS_MAX
    stamps = _Stamps()
    lag_s: list[tuple[float, float]] = []
    async with emulator:
        probes = [await _probe(spec["nats_url"], spec["creds"], "direct", stamps)]
        for name, link in links.items():
            probes.append(await _probe(f"nats://{link.address[0]}:{link.port}",
                                       spec["creds"], name, stamps))
        lag = asyncio.create_task(_lag(lag_s))
        print(json.dumps({"ports": {name: link.port for name, link in links.items()}}),
              flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
        lag.cancel()
        await asyncio.gather(lag, return_exceptions=True)
        for nc in probes:
            with contextlib.suppress(Exception):
                await nc.close()
    out_path.write_text(json.dumps({
        "stamps": {probe: {str(seq): at for seq, at in by_seq.items()}
                   for probe, by_seq in stamps.by_probe.items()},
        "loop_lag_s": lag_s,
        "connections": {name: link.counters.connections_total
                        for name, link in links.items()},
    }))


# The parent -----------------------------------------------------------------------------

@dataclass
class WanProcess:
    process: subprocess.Popen[str]
    out_path: Path
    links: dict[str, float]  # name -> one-way latency, ms
    ports: dict[str, int] = field(default_factory=dict)


@dataclass
class WanReport:
    """What the emulator processes saw: per probe, seq -> wall time received."""

    direct: dict[int, float]  # the first process's direct probe
    linked: dict[str, dict[int, float]]  # link -> seq -> time
    direct_by_link: dict[str, dict[int, float]]  # the direct probe beside each link
    loop_lag_s: list[tuple[float, float]]  # (wall time, lateness)
    connections: dict[str, int]


class WanRun:
    def __init__(self, processes: list[WanProcess]) -> None:
        self.processes = processes
        self.latency_ms = {name: ms for p in processes for name, ms in p.links.items()}
        self.ports = {name: port for p in processes for name, port in p.ports.items()}
        self._psutil = [psutil.Process(p.process.pid) for p in processes]

    def cpu_s(self) -> float:
        total = 0.0
        for process in self._psutil:
            with contextlib.suppress(psutil.Error):
                total += cpu_seconds(process)
        return total

    def finish(self) -> WanReport:
        """Stop every process and gather its stamps."""
        report = WanReport({}, {}, {}, [], {})
        for wan in self.processes:
            if wan.process.stdin is not None:
                with contextlib.suppress(OSError):
                    wan.process.stdin.close()
        for wan in self.processes:
            try:
                wan.process.wait(30)
            except subprocess.TimeoutExpired:
                stop_process(wan.process)  # type: ignore[arg-type]
            data = json.loads(wan.out_path.read_text())
            stamps = {probe: {int(seq): at for seq, at in by_seq.items()}
                      for probe, by_seq in data["stamps"].items()}
            direct = stamps.pop("direct", {})
            if not wan.links or not report.direct:  # a process without links is quietest
                report.direct = direct
            for name, by_seq in stamps.items():
                report.linked[name] = by_seq
                report.direct_by_link[name] = direct
            report.loop_lag_s += [(at, late) for at, late in data["loop_lag_s"]]
            report.connections.update(data["connections"])
        return report


@contextlib.contextmanager
def running_wan(nats_url: str, creds: Path, groups: list[dict[str, float]],
                workdir: Path) -> Iterator[WanRun]:
    """One emulator process per group of links (name -> one-way latency in ms), each
    proxying to the NATS server at `nats_url`; stopped on exit. A group without links
    makes a process with only the direct probe: the hub's part, stamped by a quiet loop."""
    host, _, port = nats_url.rpartition("//")[2].rpartition(":")
    started: list[WanProcess] = []
    try:
        for index, group in enumerate(groups):
            spec = {"upstream": [host, int(port)], "links": list(group.items()),
                    "nats_url": nats_url, "creds": str(creds), "seed": index + 1}
            out_path = workdir / f"wan-{index}.json"
            with (workdir / f"wan-{index}.log").open("ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "fogline.bench.purge_wan", json.dumps(spec),
                     str(out_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=log, text=True)
            started.append(WanProcess(process, out_path, dict(group)))
        for index, wan in enumerate(started):
            assert wan.process.stdout is not None
            line = wan.process.stdout.readline()  # bounded by the child's own timeouts
            if not line:
                tail = (workdir / f"wan-{index}.log").read_text(errors="replace")[-2000:]
                raise FoglineError(f"a WAN emulator process exited at start:\n{tail}")
            wan.ports = {name: int(p) for name, p in json.loads(line)["ports"].items()}
        yield WanRun(started)
    finally:
        for wan in started:
            if wan.process.poll() is None:
                stop_process(wan.process)  # type: ignore[arg-type]
            for pipe in (wan.process.stdin, wan.process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()


def main(argv: list[str]) -> None:
    spec, out_path = json.loads(argv[0]), Path(argv[1])

    with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
        runner.run(_serve(spec, out_path))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
