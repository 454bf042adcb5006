"""Supervising one app's worker processes.

Every worker is watched three ways: its exit (crash → restart with backoff, see
`core.supervision`), pings answered from its event loop (none for `timeout + grace`:
the loop is blocked, so the worker is replaced), and its RSS (above the app's limit:
replaced). Each end has a reason, which the app's status carries to `/healthz`, the
heartbeat and the hub. Requests in flight on a worker that ends get 503 with the reason.

The status also carries the app's recent traffic (`core.window`): every HTTP call's
latency and outcome, measured in `http()`, and the workers' other counters as they
report them; rollout gates judge a new revision by these.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from fogline.clock import Clock
from fogline.core.supervision import CrashHistory, RestartPolicy, replace_reason
from fogline.core.window import RollingWindow
from fogline.node.apps.host import AppServices, error_fields
from fogline.node.apps.wire import (
    EXIT_LOAD_FAILED,
    LOAD_FAILED_EVENT,
    Frame,
    FrameChannel,
    Hello,
    HttpCall,
    HttpReply,
    Ping,
    Pong,
    Rpc,
    RpcReply,
    Stats,
    add_stats,
)
from fogline.protocol import AppStatus

log = logging.getLogger("fogline.node.apps")

START_TIMEOUT_S = 30.0
WINDOW_S = 10.0
# Worker counters folded into the window's metrics (requests and errors are measured
# by `http()` itself).
WINDOW_COUNTERS = ("timeouts", "handler_errors", "malformed", "messages", "schedule_runs")
WATCH_INTERVAL_S = 0.5
STOP_GRACE_S = 3.0
OUTPUT_LINES_KEPT = 20
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def _readable(line: str) -> tuple[int, str]:
    """A worker's JSON log line as `event key=value ...` (traceback on its own lines)."""
    if not line.startswith("{"):
        return logging.INFO, line
    try:
        record = json.loads(line)
        level = _LEVELS.get(record.pop("level", "info"), logging.INFO)
        for key in ("ts", "app"):
            record.pop(key, None)
        trace = record.pop("traceback", "")
        text = " ".join([str(record.pop("event", "")),
                         *(f"{k}={v!r}" for k, v in record.items())])
    except (ValueError, AttributeError):
        return logging.INFO, line
    return level, f"{text}\n{trace.rstrip()}" if trace else text


def _expire(future: asyncio.Future[HttpReply]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


class AppUnavailable(Exception):
    """No worker can take the request; the message says why (503)."""


@dataclass(frozen=True)
class AppLimits:
    timeout_s: float = 10.0
    memory_mb: int = 256
    request_body_bytes: int = 1024 * 1024
    workers: int = 1


@dataclass
class AppDefinition:
    """What the node runs for one app: its directory and the validated manifest's
    fields (the agent reads `fogline.yaml`; workers never parse it)."""

    name: str
    version: str
    directory: Path
    entrypoint: str
    config: dict[str, Any] = field(default_factory=dict)
    collections: dict[str, str] = field(default_factory=dict)  # name -> type
    streams: frozenset[str] = frozenset()
    limits: AppLimits = AppLimits()
    requirements: list[str] = field(default_factory=list)
    python: str = sys.executable  # a per-app environment's when it has requirements


class WorkerProcess:
    """One running worker: its process, channel and calls in flight."""

    def __init__(self, index: int, process: asyncio.subprocess.Process,
                 channel: FrameChannel) -> None:
        self.index = index
        self.process = process
        self.channel = channel
        self.hello: asyncio.Future[Hello] = asyncio.get_running_loop().create_future()
        self.calls: dict[int, asyncio.Future[HttpReply]] = {}
        self.stats = Stats()
        self.last_pong_s = 0.0
        self.stuck_s = 0.0
        self.end_reason = ""
        self.ready = False
        self.generation = -1
        self.output: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)

    def fail_calls(self, reason: str) -> None:
        for future in self.calls.values():
            if not future.done():
                future.set_exception(AppUnavailable(reason))
        self.calls.clear()


class AppSupervisor:
    def __init__(self, definition: AppDefinition, services: AppServices, node: dict[str, Any],
                 state_db: Path, mqtt_url: str | None, clock: Clock,
                 policy: RestartPolicy | None = None, *, revision: int = 0) -> None:
        self.definition = definition
        self.revision = revision  # the deployment's; 0 for an app given locally
        self.services = services
        self.node = node
        self.state_db = state_db
        self.mqtt_url = mqtt_url
        self.clock = clock
        self.policy = policy or RestartPolicy()
        self.history = [CrashHistory(self.policy) for _ in range(definition.limits.workers)]
        self.workers: list[WorkerProcess | None] = [None] * definition.limits.workers
        self.state = "starting"
        self.reason = ""
        self.since_s = clock.now()
        self.stats_total = Stats()  # counters of workers that ended
        self.window = RollingWindow(WINDOW_S, counters=WINDOW_COUNTERS)
        # The last worker that ended: why, and what it printed last.
        self.exits = 0
        self.last_exit = ""
        self.last_output: list[str] = []
        self._call_ids = itertools.count(1)
        self._next = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._restart = asyncio.Event()
        self._generation = 0
        self.on_change: Callable[[AppSupervisor], None] | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    # Status -----------------------------------------------------------------------------

    def _set_state(self, state: str, reason: str = "") -> None:
        if state != self.state or reason != self.reason:
            if state != self.state:
                self.since_s = self.clock.now()
                log.info("app %s: %s%s", self.name, state, f" ({reason})" if reason else "")
            self.state, self.reason = state, reason
            if self.on_change is not None:
                self.on_change(self)

    def status(self) -> AppStatus:
        return AppStatus(name=self.name, version=self.definition.version, state=self.state,
                         restarts=sum(h.restarts for h in self.history), reason=self.reason,
                         since_s=self.since_s, revision=self.revision,
                         window=self.window.snapshot(self.clock.monotonic()))

    def stats(self) -> Stats:
        """Counters over every worker this supervisor ran."""
        total = self.stats_total
        for worker in self.workers:
            if worker is not None:
                total = add_stats(total, worker.stats)
        return total

    # Requests ---------------------------------------------------------------------------

    def _pick(self) -> WorkerProcess:
        count = len(self.workers)
        for offset in range(count):
            worker = self.workers[(self._next + offset) % count]
            if worker is not None and worker.ready and not worker.channel.closed:
                self._next = (self._next + offset + 1) % count
                return worker
        detail = f" ({self.reason})" if self.reason else ""
        raise AppUnavailable(f"app {self.name!r} is {self.state}{detail}")

    async def http(self, method: str, path: str, query: str,
                   headers: list[tuple[str, str]], body: bytes) -> HttpReply:
        """The worker's reply; AppUnavailable (503) or TimeoutError (504). The window
        counts the call, as an error if its status is 5xx or it raised (a call cancelled
        by its caller is not counted)."""
        monotonic = self.clock.monotonic
        started_s = monotonic()
        try:
            worker = self._pick()
        except AppUnavailable:
            self.window.observe(started_s, 0.0, True)
            raise
        call_id = next(self._call_ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[HttpReply] = loop.create_future()
        worker.calls[call_id] = future
        worker.channel.send(HttpCall(call_id, method, path, query, headers, body))
        # The worker answers 504 itself at the timeout; this backstop only fires if its
        # loop is blocked (the watcher then replaces it). A bare timer, not wait_for:
        # it is on every request's path.
        timer = loop.call_later(self.definition.limits.timeout_s + 1.0, _expire, future)
        error: bool | None = None  # None: cancelled, not counted
        try:
            reply = await future
            error = reply.status >= 500
            return reply
        except (AppUnavailable, TimeoutError):
            error = True
            raise
        finally:
            timer.cancel()
            worker.calls.pop(call_id, None)
            if error is not None:
                ended_s = monotonic()
                self.window.observe(ended_s, (ended_s - started_s) * 1000.0, error)

    def in_flight(self) -> int:
        """HTTP calls sent to a worker and not yet answered."""
        return sum(len(w.calls) for w in self.workers if w is not None)

    async def drain(self, timeout_s: float) -> None:
        """Until no HTTP call is in flight on any worker, or `timeout_s` passed: a
        version being replaced finishes what it took before it stops. (Polls: it runs
        once per replacement, and the request path stays free of bookkeeping.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.01)

    # Frames from a worker --------------------------------------------------------------

    def _on_frame(self, worker: WorkerProcess, frame: Frame) -> None:
        if isinstance(frame, HttpReply):
            future = worker.calls.pop(frame.id, None)
            if future is not None and not future.done():
                future.set_result(frame)
        elif isinstance(frame, Rpc):
            asyncio.get_running_loop().create_task(self._rpc(worker, frame))
        elif isinstance(frame, Pong):
            worker.last_pong_s = self.clock.monotonic()
            worker.stuck_s = frame.stuck_s
        elif isinstance(frame, Stats):
            self._fold(worker.stats, frame)
            worker.stats = frame
        elif isinstance(frame, Hello) and not worker.hello.done():
            worker.hello.set_result(frame)

    def _fold(self, before: Stats, after: Stats) -> None:
        """Count what a worker's cumulative counters grew by into the window."""
        now_s = self.clock.monotonic()
        for name in WINDOW_COUNTERS:
            grown = getattr(after, name) - getattr(before, name)
            if grown > 0:
                self.window.count(now_s, name, grown)

    async def _rpc(self, worker: WorkerProcess, frame: Rpc) -> None:
        try:
            value = await self.services.call(frame.op, frame.args)
            reply = RpcReply(frame.id, value)
        except Exception as exc:  # every failure goes back to the handler that asked
            kind, message = error_fields(exc)
            reply = RpcReply(frame.id, None, kind, message)
        worker.channel.send(reply)

    # Worker lifecycle -------------------------------------------------------------------

    def _spec(self, index: int) -> dict[str, Any]:
        d = self.definition
        return {"name": d.name, "index": index, "app_dir": str(d.directory),
                "entrypoint": d.entrypoint, "config": d.config,
                "collections": d.collections, "streams": sorted(d.streams),
                "timeout_s": d.limits.timeout_s, "memory_mb": d.limits.memory_mb,
                "node": self.node, "state_db": str(self.state_db), "mqtt_url": self.mqtt_url,
                "parent_pid": os.getpid()}

    async def _spawn(self, index: int) -> WorkerProcess:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                self.definition.python, "-m", "fogline.node.apps.worker",
                json.dumps(self._spec(index)), str(theirs.fileno()),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                cwd=self.definition.directory, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            theirs.close()
        holder: list[WorkerProcess] = []
        _, channel = await asyncio.get_running_loop().create_unix_connection(
            lambda: FrameChannel(lambda frame: self._on_frame(holder[0], frame),
                                 lambda exc: None), sock=ours)
        worker = WorkerProcess(index, process, channel)
        holder.append(worker)
        return worker

    async def _pump_output(self, worker: WorkerProcess) -> None:
        """Forward the worker's log lines to the node's log; keep the last few for the
        reason shown when it dies."""
        assert worker.process.stdout is not None
        async for raw in worker.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            worker.output.append(line)
            level, text = _readable(line)
            log.log(level, "[%s/%d] %s", self.name, worker.index, text)

    async def _watch(self, worker: WorkerProcess) -> None:
        """Ping, and check RSS, until the worker has to be replaced."""
        limits = self.definition.limits
        process = psutil.Process(worker.process.pid)
        ping_ids = itertools.count(1)
        worker.last_pong_s = self.clock.monotonic()
        while True:
            worker.channel.send(Ping(next(ping_ids)))
            await asyncio.sleep(WATCH_INTERVAL_S)
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                return
            reason = replace_reason(silent_s=self.clock.monotonic() - worker.last_pong_s,
                                    stuck_s=worker.stuck_s, rss_bytes=rss,
                                    timeout_s=limits.timeout_s, memory_mb=limits.memory_mb)
            if reason is not None:
                return self._kill(worker, reason)
            if self.history[worker.index].check_stable(self.clock.now()):
                self._set_state("running")

    def _kill(self, worker: WorkerProcess, reason: str) -> None:
        log.warning("app %s worker %d: %s; replacing it", self.name, worker.index, reason)
        worker.end_reason = reason
        worker.fail_calls(reason)
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()

    def _exit_reason(self, worker: WorkerProcess, code: int) -> str:
        if worker.end_reason:
            return worker.end_reason
        if code == EXIT_LOAD_FAILED:
            for line in reversed(worker.output):
                with contextlib.suppress(ValueError, AttributeError):
                    record = json.loads(line)
                    if record.get("event") == LOAD_FAILED_EVENT:
                        return f"failed to load: {record.get('error')}"
            return "failed to load"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"crashed: killed by {signal.Signals(-code).name}"
        # An uncaught error prints a plain traceback; the app's own JSON log lines are
        # not about the exit.
        last = next((line for line in reversed(worker.output)
                     if line.strip() and not line.startswith("{")), "")
        detail = f": {last[-200:]}" if last else ""
        return f"crashed: exit code {code}{detail}"

    async def _run_one(self, index: int) -> None:
        """Keep worker `index` running until cancelled."""
        history = self.history[index]
        while True:
            generation = self._generation
            history.started(self.clock.now())
            worker = await self._spawn(index)
            self.workers[index] = worker
            pump = asyncio.create_task(self._pump_output(worker))
            watch: asyncio.Task[None] | None = None
            try:
                hello_or_exit = await self._wait_ready(worker)
                if hello_or_exit:
                    if generation != self._generation:  # a reload came while it started
                        await self._stop_worker(worker, "reloading")
                        self._add_stats(worker)
                        continue
                    worker.ready = True
                    worker.generation = generation
                    if not history.failed:
                        self._set_state("running")
                    watch = asyncio.create_task(self._watch(worker))
                    restart = asyncio.create_task(self._restart.wait())
                    waiter = asyncio.create_task(worker.process.wait())
                    try:
                        await asyncio.wait({waiter, restart},
                                           return_when=asyncio.FIRST_COMPLETED)
                    except asyncio.CancelledError:  # leave no waiter behind
                        waiter.cancel()
                        raise
                    finally:
                        restart.cancel()
                    if not waiter.done():  # reload asked for: stop this one, start anew
                        waiter.cancel()
                        await self._stop_worker(worker, "reloading")
                        self._add_stats(worker)
                        continue
                code = await worker.process.wait()
            finally:
                worker.ready = False
                if watch is not None:
                    watch.cancel()
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    await self._stop_worker(worker, "app stopped")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(pump, 1.0)
                pump.cancel()
            reason = self._exit_reason(worker, code)
            self.exits += 1
            self.last_exit, self.last_output = reason, list(worker.output)
            worker.fail_calls(f"app worker exited while handling the request ({reason})")
            worker.channel.close()
            self._add_stats(worker)
            self.workers[index] = None
            decision = history.exited(self.clock.now())
            state = "failed" if decision.crash_loop else "restarting"
            if decision.crash_loop:
                reason += (f" ({decision.crashes_in_window} exits in "
                           f"{self.policy.crash_loop_window_s:.0f}s)")
            self._set_state(state, reason)
            # A reload (new code) ends the backoff at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._restart.wait(), decision.delay_s)

    async def _wait_ready(self, worker: WorkerProcess) -> bool:
        """True once the worker said Hello; False if it exited or never did."""
        exited = asyncio.create_task(worker.process.wait())
        try:
            done, _ = await asyncio.wait({worker.hello, exited}, timeout=START_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if worker.hello.done():
            return True
        if not done:
            self._kill(worker, f"did not start within {START_TIMEOUT_S:.0f}s")
        return False

    def _add_stats(self, worker: WorkerProcess) -> None:
        self.stats_total = add_stats(self.stats_total, worker.stats)
        worker.stats = Stats()

    async def _stop_worker(self, worker: WorkerProcess, reason: str) -> None:
        worker.ready = False
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(worker.process.wait(), STOP_GRACE_S)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        worker.fail_calls(reason)
        worker.channel.close()

    # Control ----------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return bool(self._tasks)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run_one(i)) for i in range(len(self.workers))]

    def fail(self, reason: str) -> None:
        """An app that cannot start at all (e.g. its requirements did not install)."""
        self._set_state("failed", reason)

    async def reload(self, definition: AppDefinition | None = None) -> None:
        """Replace every worker (new code, or a new manifest with the same number of
        workers; the agent builds a new supervisor when that number changes)."""
        if definition is not None:
            if definition.limits.workers != self.definition.limits.workers:
                raise ValueError("a supervisor keeps its number of workers")
            self.definition = definition
        # New code gets a fresh start: no inherited crash loop or backoff, and the app
        # reads `starting` until a worker of this generation says Hello.
        self._generation += 1
        for history in self.history:
            history.reset()
        self._set_state("starting", "reloading")
        self._restart.set()
        await asyncio.sleep(0)
        self._restart = asyncio.Event()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._set_state("stopped")

    async def wait_started(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every worker of a new supervisor is ready; AppUnavailable with the
        reason as soon as one exits instead (a new version gets no second try), or if
        they are not all ready within `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        exits = self.exits
        while not all(w is not None and w.ready for w in self.workers):
            if self.exits > exits or self.state in ("failed", "stopped"):
                raise AppUnavailable(self.last_exit or self.reason or self.state)
            if loop.time() > deadline:
                raise AppUnavailable(f"not ready within {timeout_s:g}s ({self.state}"
                                     f"{': ' + self.reason if self.reason else ''})")
            await asyncio.sleep(0.02)

    async def wait_running(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every worker is ready (tests, `fogline dev`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not all(w is not None and w.ready for w in self.workers):
            if loop.time() > deadline:
                raise TimeoutError(f"app {self.name!r} is {self.state}: {self.reason}")
            await asyncio.sleep(0.02)

