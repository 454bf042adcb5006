"""WAN emulator: one user-space asyncio TCP proxy per link (no tc/netem needed).

Each link adds one-way latency, jitter and a bandwidth cap per direction, and can be
partitioned (``reset`` or ``blackhole``) and healed at run time. Chunks are stamped
on arrival and released at ``arrival + serialization + latency + jitter``, pipelined,
never reordered (a release is never earlier than the one before it). Loss is not
emulated: a proxy that dropped bytes would corrupt the TCP stream, not slow it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import socket
import struct
from collections import deque
from typing import Literal

from fogline.clock import Clock, SystemClock
from fogline.errors import ConfigError, NotFoundError

__all__ = ["LinkConfig", "LinkCounters", "PartitionMode", "WanEmulator", "WanLink"]

log = logging.getLogger(__name__)

PartitionMode = Literal["reset", "blackhole"]
Address = tuple[str, int]

PARTITION_MODES: tuple[str, ...] = ("reset", "blackhole")
DELAY_MS_MAX = 60_000.0  # A minute of one-way delay is already no longer a WAN.
READ_BYTES_MAX = 64 * 1024
SLICE_S = 0.005  # Capped links release in 5 ms slices, so delivery is smooth, not bursty.
CONNECT_TIMEOUT_S = 10.0
TIMER_GRID_S = 0.001  # asyncio's selector timeout unit; pass 0 with a simulated clock.


def _check_delay(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number of milliseconds, got {value!r}")
    if not math.isfinite(value) or value < 0 or value > DELAY_MS_MAX:
        raise ConfigError(f"{name} must be between 0 and {DELAY_MS_MAX:g} ms, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class LinkConfig:
    """The shape of one link; immutable so a change is one atomic swap."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_bps: float | None = None  # bytes/s per direction; None = unlimited
    partitioned: bool = False
    partition_mode: PartitionMode = "reset"

    def __post_init__(self) -> None:
        _check_delay("latency_ms", self.latency_ms)
        _check_delay("jitter_ms", self.jitter_ms)
        bps = self.bandwidth_bps
        if bps is not None:
            if isinstance(bps, bool) or not isinstance(bps, int | float):
                raise ConfigError(f"bandwidth_bps must be a number of bytes/s or null, got {bps!r}")
            if not math.isfinite(bps) or bps <= 0:
                raise ConfigError(
                    f"bandwidth_bps must be > 0 (use a partition to cut a link), got {bps!r}"
                )
        if not isinstance(self.partitioned, bool):
            raise ConfigError(f"partitioned must be true or false, got {self.partitioned!r}")
        if self.partition_mode not in PARTITION_MODES:
            raise ConfigError(
                f"partition_mode must be one of {list(PARTITION_MODES)}, "
                f"got {self.partition_mode!r}"
            )

    def replace(self, **changes: object) -> LinkConfig:
        """A validated copy with `changes`; unknown names are rejected, not ignored."""
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown link setting(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(slots=True)
class LinkCounters:
    """Totals since the link was created, for metrics."""

    bytes_to_upstream: int = 0
    bytes_to_client: int = 0
    bytes_dropped: int = 0  # swallowed by a blackhole
    connections_total: int = 0
    connections_open: int = 0
    connections_reset: int = 0  # cut by the emulator (partition, heal after blackhole)
    partitions: int = 0


class _Pacer:
    """Rounds timer waits to the event loop's grid so releases land on time.

    asyncio's selector sleeps in whole milliseconds, rounded up: a 9.6 ms wait ends
    after 10 ms, late by up to a step, twice per round trip. Asking for the nearest
    whole step instead lands every release within half a step of its deadline, with
    no busy waiting. A grid of 0 means exact waits (a simulated clock).
    """

    def __init__(self, clock: Clock, grid_s: float) -> None:
        self._clock = clock
        self.grid_s = grid_s

    async def sleep_until(self, deadline_s: float) -> None:
        delay_s = deadline_s - self._clock.monotonic()
        if self.grid_s:
            delay_s = round(delay_s / self.grid_s) * self.grid_s
        if delay_s > 0:
            await self._clock.sleep(delay_s)


class _Pipe:
    """One direction of one connection: stamp chunks on arrival, release them in order."""

    def __init__(
        self,
        link: WanLink,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter | None,
        to_upstream: bool,
    ) -> None:
        self._link, self._conn = link, conn
        self._reader, self._writer = reader, writer
        self._to_upstream = to_upstream
        self._queue: deque[tuple[float, bytes | None]] = deque()  # None marks EOF
        self._queued_bytes = 0
        self._has_data = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()
        self._last_release_s = 0.0

    async def pump_in(self) -> None:
        while True:
            await self._has_room.wait()
            data = await self._reader.read(READ_BYTES_MAX)
            if self._conn.blackholed:
                self._link.counters.bytes_dropped += len(data)
                if not data:  # A blackhole swallows the FIN too; wait for heal or close.
                    await asyncio.get_running_loop().create_future()
                continue
            self._schedule(data or None)
            if not data:
                return

    def _schedule(self, data: bytes | None) -> None:
        link, config = self._link, self._link.config
        now_s = link.clock.monotonic()
        bps = config.bandwidth_bps
        pieces: list[bytes | None] = [data]
        if data is not None and bps is not None:
            size = max(1024, int(bps * SLICE_S))
            pieces = [data[i : i + size] for i in range(0, len(data), size)]
        for piece in pieces:
            sent_s = now_s
            if piece is not None and bps is not None:
                # Serialization: the link is busy n/bps seconds per chunk, shared by all
                # connections on this link in this direction.
                sent_s = max(now_s, link.busy_until_s[self._to_upstream]) + len(piece) / bps
                link.busy_until_s[self._to_upstream] = sent_s
            delay_ms = config.latency_ms
            if config.jitter_ms:
                jitter_ms = config.jitter_ms
                delay_ms = max(0.0, delay_ms + link.rng.uniform(-jitter_ms, jitter_ms))
            # Never earlier than the chunk before it: jitter must not reorder bytes.
            release_s = max(self._last_release_s, sent_s + delay_ms / 1000.0)
            self._last_release_s = release_s
            self._queue.append((release_s, piece))
            self._queued_bytes += len(piece or b"")
        if self._queued_bytes >= self._link.queue_bytes_max:
            self._has_room.clear()
        self._has_data.set()

    async def pump_out(self) -> None:
        assert self._writer is not None
        pacer, clock = self._link.pacer, self._link.clock
        while True:
            if not self._queue:
                self._has_data.clear()
                await self._has_data.wait()
                continue
            await pacer.sleep_until(self._queue[0][0])
            due_s = clock.monotonic() + pacer.grid_s / 2
            batch: list[bytes] = []
            eof = False
            while self._queue and self._queue[0][0] <= due_s:
                piece = self._queue.popleft()[1]
                if piece is None:
                    eof = True
                    break
                batch.append(piece)
            if batch:
                self._write(b"".join(batch))
            if eof:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            await self._writer.drain()

    def _write(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        self._queued_bytes -= len(data)
        if self._to_upstream:
            self._link.counters.bytes_to_upstream += len(data)
        else:
            self._link.counters.bytes_to_client += len(data)
        if self._queued_bytes < self._link.queue_bytes_max:
            self._has_room.set()

    def drop_queued(self) -> None:
        self._link.counters.bytes_dropped += self._queued_bytes
        self._queue.clear()
        self._queued_bytes = 0
        self._has_room.set()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, not FIN: SO_LINGER 0 makes the kernel abort the connection."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    """One client connection and, unless born blackholed, its upstream connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.client = (reader, writer)
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.pipes: list[_Pipe] = []
        self.blackholed = False
        self.task: asyncio.Task[None] | None = None

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client[1], self.upstream_writer) if w is not None]

    def reset(self) -> None:
        for writer in self.writers():
            _reset(writer)

    def close(self) -> None:
        for writer in self.writers():
            writer.close()


class WanLink:
    """A listening port whose connections reach `upstream` through an emulated WAN.

    The socket is bound here, so `.port` is known before `run()`; connections made
    before then wait in the listen backlog.
    """

    def __init__(
        self,
        name: str,
        upstream: Address,
        config: LinkConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        queue_bytes_max: int = 1 << 20,
        connections_max: int = 1024,
        timer_grid_s: float = TIMER_GRID_S,
    ) -> None:
        if config is not None and not isinstance(config, LinkConfig):
            raise ConfigError(f"config must be a LinkConfig, got {type(config).__name__}")
        self.name = name
        self.upstream = (str(upstream[0]), int(upstream[1]))
        self.clock: Clock = clock or SystemClock()
        self.rng = rng or random.Random()
        self.queue_bytes_max = queue_bytes_max
        self.connections_max = connections_max
        self.counters = LinkCounters()
        self.pacer = _Pacer(self.clock, timer_grid_s)
        self.busy_until_s = {True: 0.0, False: 0.0}  # per direction: to_upstream?
        self._config = config or LinkConfig()
        self._connections: set[_Connection] = set()
        self._task_group: asyncio.TaskGroup | None = None
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self._sock = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise ConfigError(f"link {name!r} cannot listen on {host}:{port}: {exc}") from exc
        self._sock.setblocking(False)
        self.address: Address = self._sock.getsockname()[:2]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def config(self) -> LinkConfig:
        return self._config

    def update(self, **changes: object) -> LinkConfig:
        """Change some settings at run time; a bad change raises and changes nothing."""
        config = self._config.replace(**changes)
        self.set_config(config)
        return config

    def set_config(self, config: LinkConfig) -> None:
        """Swap in a whole config; partition transitions act on open connections now."""
        if not isinstance(config, LinkConfig):
            raise ConfigError(f"config must be a LinkConfig, got {type(config).__name__}")
        old, self._config = self._config, config
        if config.partitioned:
            self.counters.partitions += not old.partitioned
            for conn in list(self._connections):
                if config.partition_mode == "reset":
                    self._cut(conn)
                elif not conn.blackholed:
                    conn.blackholed = True
                    for pipe in conn.pipes:
                        pipe.drop_queued()
        elif old.partitioned:
            # Bytes swallowed by a blackhole left a hole in these streams; a real TCP
            # would have timed out, so they end with a reset instead of resuming.
            for conn in list(self._connections):
                if conn.blackholed:
                    self._cut(conn)

    def partition(self, mode: PartitionMode = "reset") -> None:
        self.update(partitioned=True, partition_mode=mode)

    def heal(self) -> None:
        self.update(partitioned=False)

    def _cut(self, conn: _Connection) -> None:
        conn.reset()
        self._connections.discard(conn)
        self.counters.connections_reset += 1
        if conn.task is not None:
            conn.task.cancel()

    def _on_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine), so asyncio spawns no task we do not own.
        conn = _Connection(reader, writer)
        self.counters.connections_total += 1
        config = self._config
        refuse = config.partitioned and config.partition_mode == "reset"
        if refuse or self._task_group is None or len(self._connections) >= self.connections_max:
            _reset(writer)
            self.counters.connections_reset += 1
            return
        conn.blackholed = config.partitioned
        self._connections.add(conn)
        conn.task = self._task_group.create_task(self._serve(conn))

    async def _serve(self, conn: _Connection) -> None:
        self.counters.connections_open += 1
        try:
            client_reader, client_writer = conn.client
            if conn.blackholed:
                conn.pipes = [_Pipe(self, conn, client_reader, None, to_upstream=True)]
                await conn.pipes[0].pump_in()
                return
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                up_reader, conn.upstream_writer = await asyncio.open_connection(*self.upstream)
            conn.pipes = [
                _Pipe(self, conn, client_reader, conn.upstream_writer, to_upstream=True),
                _Pipe(self, conn, up_reader, client_writer, to_upstream=False),
            ]
            async with asyncio.TaskGroup() as group:
                for pipe in conn.pipes:
                    group.create_task(pipe.pump_in())
                    group.create_task(pipe.pump_out())
        except Exception as exc:  # A peer reset or vanished: pass the reset on.
            conn.reset()
            if isinstance(exc, OSError) or (
                isinstance(exc, ExceptionGroup) and exc.split(OSError)[1] is None
            ):
                log.debug("link %s: connection ended: %r", self.name, exc)
            else:
                log.warning("link %s: connection failed", self.name, exc_info=exc)
        finally:
            self.counters.connections_open -= 1
            self._connections.discard(conn)
            conn.close()

    async def run(self) -> None:
        """Serve until cancelled; every connection task is owned here and ends with it."""
        try:
            async with asyncio.TaskGroup() as group:
                self._task_group = group
                server = await asyncio.start_server(self._on_accept, sock=self._sock)
                try:
                    await asyncio.get_running_loop().create_future()  # until cancelled
                finally:
                    self._task_group = None
                    server.close()
        finally:
            self.close()

    def close(self) -> None:
        """Release the listening socket (for a link that never ran, or after run)."""
        self._sock.close()


class WanEmulator:
    """A set of named links started and stopped together."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        clock: Clock | None = None,
        seed: int | None = None,
        timer_grid_s: float = TIMER_GRID_S,
    ) -> None:
        self.host = host
        self.clock: Clock = clock or SystemClock()
        self.timer_grid_s = timer_grid_s
        self._rng = random.Random(seed)
        self._links: dict[str, WanLink] = {}
        self._task_group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None

    @property
    def links(self) -> dict[str, WanLink]:
        return dict(self._links)

    def add_link(
        self, name: str, upstream: Address, config: LinkConfig | None = None, *, port: int = 0
    ) -> WanLink:
        if name in self._links:
            raise ConfigError(f"link {name!r} already exists")
        link = WanLink(
            name,
            upstream,
            config,
            host=self.host,
            port=port,
            clock=self.clock,
            rng=self._rng,
            timer_grid_s=self.timer_grid_s,
        )
        self._links[name] = link
        if self._task_group is not None:
            self._task_group.create_task(link.run())
        return link

    def link(self, name: str) -> WanLink:
        try:
            return self._links[name]
        except KeyError:
            raise NotFoundError(f"no link named {name!r}") from None

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Run every link (and links added later) until cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                self._task_group = group
                for link in self._links.values():
                    group.create_task(link.run())
                if ready is not None:
                    ready.set()
                try:
                    await asyncio.get_running_loop().create_future()  # until cancelled
                finally:
                    self._task_group = None
        finally:
            for link in self._links.values():
                link.close()

    async def __aenter__(self) -> WanEmulator:
        ready = asyncio.Event()
        self._runner = asyncio.create_task(self.run(ready))
        await ready.wait()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
