"""`python -m fogline.node.apps.worker SPEC_JSON FD`: one app worker process.

The node agent starts it with one end of a socketpair as FD and supervises it. The
worker imports the app, says `Hello`, then serves `HttpCall`s, answers `Ping`s from its
event loop (a blocked loop shows up as missing pongs), subscribes to the app's topics
and runs its schedules (worker 0 only: every worker of an app would otherwise get each
device message), and reports `Stats` once a second. Anything a handler does wrong
becomes a reply (404, 405, 400, 500 with an error id, 504) and a counter; only a bug in
the worker itself, a blocked loop or the memory limit ends the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import resource
import secrets
import signal
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from fogline.app import (
    App,
    Message,
    MethodNotAllowed,
    NodeInfo,
    Request,
    Response,
    ScheduleHandler,
    TopicHandler,
    decode_message,
    to_response,
)
from fogline.clock import Clock, SystemClock
from fogline.errors import ConfigError, ProtocolError
from fogline.node.apps.context import StateReader, StructuredLog, WorkerContext, rpc_error
from fogline.node.apps.loader import import_entrypoint
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
)

SYNC_THREADS = 8
STATS_INTERVAL_S = 1.0
DRAIN_S = 2.0
# Malformed-payload log lines per second; beyond that they are only counted, so a
# device spewing garbage cannot flood the node's log.
MALFORMED_LOGS_PER_S = 5
# The kernel's data-segment limit, as a multiple of the app's memory limit: a backstop
# for an allocation burst between two of the node's RSS checks.
RLIMIT_DATA_FACTOR = 2

_JSON = "application/json"


def _json_reply(call_id: int, status: int, body: dict[str, Any],
                headers: list[tuple[str, str]] | None = None) -> HttpReply:
    return HttpReply(call_id, status, [("content-type", _JSON), *(headers or [])],
                     json.dumps(body).encode())


def _reply(call_id: int, response: Response) -> HttpReply:
    headers = [("content-type", response.media_type)]
    headers.extend(response.headers.items())
    return HttpReply(call_id, response.status, headers, response.body)


class _Expired(Exception):
    """A handler outran the app's timeout."""


class Worker:
    def __init__(self, spec: dict[str, Any], clock: Clock | None = None) -> None:
        self.spec = spec
        self.name: str = spec["name"]
        self.index: int = spec.get("index", 0)
        self.timeout_s: float = spec["timeout_s"]
        self.clock = clock or SystemClock()
        self.log = StructuredLog(self.name)
        self.stats = Stats()
        self._stats_sent = Stats()
        self._loop = asyncio.get_running_loop()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            SYNC_THREADS, thread_name_prefix=f"app-{self.name}")
        self._sync_started: dict[int, float] = {}
        self._rpc_ids = itertools.count(1)
        self._rpcs: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = asyncio.Event()
        self._malformed_window = (0.0, 0)
        self.channel: FrameChannel | None = None
        self.mqtt: Any = None
        self.app: App | None = None
        self.ctx: WorkerContext | None = None

    # Setup ------------------------------------------------------------------------------

    def load(self) -> App:
        spec = self.spec
        directory = Path(spec["app_dir"])
        return import_entrypoint(directory, spec["entrypoint"], self.name,
                                 f"{directory / 'fogline.yaml'}: spec.entrypoint")

    async def connect(self, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        _, channel = await self._loop.create_unix_connection(
            lambda: FrameChannel(self._on_frame, self._on_close), sock=sock)
        self.channel = channel

    async def run(self, fd: int) -> None:
        await self.connect(fd)
        app = self.app = self.load()
        spec = self.spec
        node = spec["node"]
        publish = None
        topics = list(app.subscriptions()) if self.index == 0 else []
        if spec.get("mqtt_url"):
            from fogline.transport.mqtt_link import MqttLink  # only workers that use MQTT

            self.mqtt = MqttLink(spec["mqtt_url"], f"fl-{node['id']}-{self.name}-{self.index}",
                                 self._on_device_message, clean_session=False)
            publish = self.mqtt.publish
        self.ctx = WorkerContext(
            config=spec.get("config", {}),
            node=NodeInfo(node["id"], node["region"], node["tier"], node.get("labels", {})),
            clock=self.clock, log=self.log, reader=StateReader(Path(spec["state_db"])),
            rpc=self.rpc, collections=spec.get("collections", {}),
            streams=frozenset(spec.get("streams", [])), publish=publish)
        background = [self._loop.create_task(self._report_stats())]
        if self.mqtt is not None:
            # In the background: routes serve while the broker is unreachable, and the
            # link keeps retrying until it is back.
            background.append(self._loop.create_task(
                self.mqtt.start(app.subscriptions() if self.index == 0 else {})))
        if self.index == 0:
            background += [self._loop.create_task(self._run_schedule(schedule))
                           for schedule in app.schedules]
        assert self.channel is not None
        self.channel.send(Hello(os.getpid(), len(app.routes), topics, len(app.schedules)))
        try:
            await self._closed.wait()
        finally:
            for task in background:
                task.cancel()
            await self._drain()

    async def _drain(self) -> None:
        """Let requests and messages in flight finish (up to DRAIN_S), then leave; an
        unfinished QoS1 message is not acked, so the broker delivers it again."""
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=DRAIN_S)
        with contextlib.suppress(Exception):
            if self.mqtt is not None:
                await asyncio.wait_for(self.mqtt.stop(), DRAIN_S)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # Frames -----------------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, HttpCall):
            self._spawn(self._serve_http(frame))
        elif isinstance(frame, Ping):
            assert self.channel is not None
            self.channel.send(Pong(frame.id, self._stuck_s()))
        elif isinstance(frame, RpcReply):
            future = self._rpcs.pop(frame.id, None)
            if future is not None and not future.done():
                if frame.error_kind:
                    future.set_exception(rpc_error(frame.error_kind, frame.error))
                else:
                    future.set_result(frame.value)

    def _on_close(self, exc: Exception | None) -> None:
        # The node went away (or stopped us): nothing more can be answered.
        for future in self._rpcs.values():
            if not future.done():
                future.set_exception(ConnectionError("the node closed the worker channel"))
        self._rpcs.clear()
        self._closed.set()

    async def rpc(self, op: str, args: list[Any]) -> Any:
        if self.channel is None or self.channel.closed:
            raise ConnectionError("the node closed the worker channel")
        call_id = next(self._rpc_ids)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._rpcs[call_id] = future
        self.channel.send(Rpc(call_id, op, args))
        return await future

    def _stuck_s(self) -> float:
        if not self._sync_started:
            return 0.0
        return time.monotonic() - min(self._sync_started.values())

    # Running handlers -------------------------------------------------------------------

    async def _call(self, fn: Callable[..., Any], is_async: bool, *args: Any) -> Any:
        """Run a handler under the app's timeout; sync handlers on the pool."""
        task = asyncio.current_task()
        assert task is not None
        expired = []

        def expire() -> None:
            expired.append(True)
            task.cancel()

        timer = self._loop.call_later(self.timeout_s, expire)
        try:
            if is_async:
                return await fn(*args)
            return await self._loop.run_in_executor(self._pool, self._run_sync, fn, *args)
        except asyncio.CancelledError:
            if expired:
                task.uncancel()
                raise _Expired from None
            raise
        finally:
            timer.cancel()

    def _run_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        key = id(args)
        self._sync_started[key] = time.monotonic()
        try:
            return fn(*args)
        finally:
            del self._sync_started[key]

    def _error_id(self, where: str, exc: BaseException, **fields: Any) -> str:
        error_id = secrets.token_hex(6)
        self.log.error(f"{where} raised", error_id=error_id, error=f"{type(exc).__name__}: "
                       f"{exc}", traceback="".join(traceback.format_exception(exc)), **fields)
        return error_id

    async def _serve_http(self, call: HttpCall) -> None:
        reply = await self._route(call)
        self.stats.requests += 1
        if reply.status >= 500:
            self.stats.errors += 1
        if self.channel is not None:
            self.channel.send(reply)

    async def _route(self, call: HttpCall) -> HttpReply:
        assert self.app is not None
        found = self.app.match_route(call.method, call.path)
        if found is None:
            return _json_reply(call.id, 404, {"error": "no route", "app": self.name,
                                              "method": call.method, "path": call.path})
        if isinstance(found, MethodNotAllowed):
            return _json_reply(call.id, 405, {"error": "method not allowed",
                                              "allowed": list(found.allowed)},
                               [("allow", ", ".join(found.allowed))])
        handler, params = found
        request = Request(call.method, call.path, params,
                          dict(parse_qsl(call.query, keep_blank_values=True)),
                          dict(call.headers), call.body)
        try:
            value = await self._call(handler.fn, handler.is_async, request, self.ctx)
            return _reply(call.id, to_response(value))
        except _Expired:
            self.stats.timeouts += 1
            self.log.warning("handler timed out", route=f"{handler.method} {handler.path}",
                             timeout_s=self.timeout_s)
            return _json_reply(call.id, 504, {"error": "handler timed out",
                                              "timeout_s": self.timeout_s})
        except ProtocolError as exc:
            return _json_reply(call.id, 400, {"error": str(exc)})
        except Exception as exc:  # user code: any failure is a 500 with an id to grep for
            error_id = self._error_id("route", exc, route=f"{handler.method} {handler.path}")
            return _json_reply(call.id, 500, {"error": "internal error",
                                              "error_id": error_id})

    async def _on_device_message(self, topic: str, payload: bytes, qos: int) -> None:
        assert self.app is not None
        self.stats.messages += 1
        for handler in self.app.handlers_for_topic(topic):
            try:
                message = decode_message(handler, topic, payload, self.clock.now(), qos)
            except ProtocolError as exc:
                self.stats.malformed += 1
                self._log_malformed(handler, exc)
                continue
            await self._run_topic_handler(handler, message)

    async def _run_topic_handler(self, handler: TopicHandler, message: Message) -> None:
        try:
            await self._call(handler.fn, handler.is_async, message, self.ctx)
        except _Expired:
            self.stats.timeouts += 1
            self.log.warning("topic handler timed out", topic=message.topic,
                             timeout_s=self.timeout_s)
        except Exception as exc:  # user code
            self.stats.handler_errors += 1
            self._error_id("topic handler", exc, topic=message.topic)

    def _log_malformed(self, handler: TopicHandler, exc: ProtocolError) -> None:
        second = time.monotonic() // 1
        start, count = self._malformed_window
        if start != second:
            start, count = second, 0
        self._malformed_window = (start, count + 1)
        if count < MALFORMED_LOGS_PER_S:
            self.log.warning("malformed payload dropped", codec=handler.codec,
                             pattern=handler.pattern, error=str(exc))

    async def _run_schedule(self, handler: ScheduleHandler) -> None:
        schedule = handler.schedule(self.clock.monotonic())
        while True:
            now_s = self.clock.monotonic()
            await self.clock.sleep(max(0.0, schedule.next_due(now_s) - now_s))
            if not schedule.on_tick(self.clock.monotonic()):
                continue
            self.stats.schedule_runs += 1
            try:
                await self._call(handler.fn, handler.is_async, self.ctx)
            except _Expired:
                self.stats.timeouts += 1
                self.log.warning("schedule timed out", every_s=handler.interval_s)
            except Exception as exc:  # user code
                self.stats.handler_errors += 1
                self._error_id("schedule", exc, every_s=handler.interval_s)

    async def _report_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            if self.stats != self._stats_sent and self.channel is not None:
                snapshot = msgspec.structs.replace(self.stats)  # self.stats keeps counting
                self.channel.send(snapshot)
                self._stats_sent = snapshot


def _guard_process(spec: dict[str, Any]) -> None:
    """Die with the node (even a SIGKILLed one) and cap the data segment."""
    from fogline.transport.nats_server import die_with_parent

    die_with_parent()
    if os.getppid() != spec["parent_pid"]:
        sys.exit(1)  # the node died before we asked to die with it
    limit = spec["memory_mb"] * 1024 * 1024 * RLIMIT_DATA_FACTOR
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    fd = int(argv[2])
    _guard_process(spec)
    from fogline.runtime import fast_loop_factory

    async def serve() -> None:
        worker = Worker(spec)
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, worker._closed.set)
        try:
            await worker.run(fd)
        except ConfigError as exc:
            worker.log.error(LOAD_FAILED_EVENT, error=str(exc))
            sys.stderr.flush()
            os._exit(EXIT_LOAD_FAILED)

    with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
        runner.run(serve())


if __name__ == "__main__":
    main(sys.argv)
