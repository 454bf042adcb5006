"""MqttLink: the asyncio MQTT client that app worker processes use, built on gmqtt.

docs/mqtt.md chose gmqtt (the fastest Python client measured) and MQTT 3.1.1 (all that
nats-server speaks). gmqtt leaves three things this module has to add:

- **PUBACK after the handler.** gmqtt either acknowledges a QoS1 message before calling
  `on_message` (optimistic, the default) or, with
  `optimistic_acknowledgement=False`, from a done-callback of the handler's task on
  whatever connection is current. The second would do, but a cancelled handler makes
  that callback raise inside the event loop, and an ack that outlives a reconnect goes
  out on the new connection with a packet id the broker may have handed to another
  message since (nats-server forgets packet ids when it restarts), which would
  acknowledge a message nobody handled. So the link takes QoS1 deliveries from gmqtt's
  packet handler (one instance attribute, set in `_Client`) and sends PUBACK itself
  once `on_message` has returned, and only on the connection the message came in on.
  A message whose handler did not finish there is delivered again by the broker, since
  the session is persistent (`clean_session=False`, the default): a worker that crashes
  mid-handler loses nothing. If `on_message` raises, the error is logged and the message
  is still acknowledged, so a poison message cannot loop forever. A handler that runs
  longer than the broker's redelivery delay (nats-server `ack_wait`) sees its message a
  second time: handlers must be idempotent, as at-least-once delivery requires anyway.
- **Bounded handlers.** Deliveries go to an inbox (a deque) drained by up to
  `max_in_flight` worker tasks, so handlers of different messages run concurrently, start
  in arrival order, and a burst costs no task per message. gmqtt reads the socket without
  back-pressure, and pausing the socket could deadlock a handler that publishes QoS1 and
  waits for a PUBACK arriving on that same socket, so the link bounds the inbox by other
  means. QoS1: the broker sends no more than its in-flight window of unacknowledged
  messages (nats-server `max_ack_pending` per subscription, Mosquitto
  `max_inflight_messages`) and the link acknowledges only handled ones, so the window is
  the bound and nothing is dropped. QoS0 has no window: one that finds the inbox at 65,536
  messages or 64 MiB is dropped and counted in `dropped_qos0` (QoS0 promises at most
  once; a broker drops it the same way).
- **Acknowledged publish.** gmqtt has no per-message "acked" hook, but it keeps every
  unacknowledged QoS1 PUBLISH in its `persistent_storage` (a constructor argument) and
  removes it on PUBACK. The link passes a storage that resolves one future per packet id
  on that removal, so `publish(qos=1)` returns exactly when the broker acknowledged it.
  Its deadline (`publish_timeout_s`) is checked by one sweep a second, not by a timer
  per publish, which cost more than the rest of the publish path.
  gmqtt replays stored messages itself after a reconnect. QoS0 returns once the message is
  in the socket's buffer, waiting while asyncio's write buffer is above its high-water mark
  so a fast publisher cannot grow it without bound. Unacknowledged QoS1 publishes are
  capped too (gmqtt has no window of its own and runs out of packet ids at 65535).

Reconnection after the first connect is gmqtt's, with the delay set per attempt for an
exponential backoff; the link resubscribes when the broker lost the session. Topics must
be UTF-8 and client ids ASCII (gmqtt sizes the CONNECT packet in characters). TLS
(`mqtts://`) uses the system CAs and, as everywhere in fogline, TLS 1.3 only.

The module is longer than fogline's ~400-line aim because its private helpers (`_Window`,
`_AckTracker`, `_Client`) are the gmqtt adapter of MqttLink and make sense nowhere else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from gmqtt import Client as GmqttClient
from gmqtt.mqtt.constants import UNLIMITED_RECONNECTS, MQTTCommands, MQTTv311
from gmqtt.mqtt.handler import MQTTConnectError
from gmqtt.storage import PersistentStorage
from gmqtt.subscription import Subscription

from fogline.errors import AuthError, ConfigError, RetryableError

logger = logging.getLogger(__name__)

OnMessage = Callable[[str, bytes, int], Awaitable[None]]
_Delivery = tuple[str, bytes, int, "int | None", Any]  # topic, payload, qos, packet id, conn

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
MAX_IN_FLIGHT = 256
MAX_UNACKED_PUBLISHES = 1024
INBOX_QOS0_MAX = 65536  # waiting messages past which QoS0 ones are dropped
INBOX_QOS0_MAX_BYTES = 64 * 1024 * 1024
PUBLISH_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
STOP_GRACE_S = 5.0
DISCONNECT_TIMEOUT_S = 2.0
BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 5.0
CLIENT_ID_MAX = 65535
REFUSED_AUTH = {4, 5}  # CONNACK: bad user name or password, not authorised
REFUSED_CONFIG = {1, 2}  # CONNACK: protocol version, identifier rejected


@dataclasses.dataclass(frozen=True)
class MqttEndpoint:
    """Where a link connects, parsed from its URL."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """`mqtt[s]://[user[:password]@]host[:port]`; anything else is a ConfigError that
    names the problem (the password is never echoed)."""
    shown = redact(url)
    if any(ch.isspace() for ch in url):
        raise ConfigError(f"MQTT URL {shown!r} contains whitespace")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"MQTT URL {shown!r} is malformed: {exc}") from exc
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError(f"MQTT URL {shown!r} must start with mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"MQTT URL {shown!r} has no host")
    if port == 0:
        raise ConfigError(f"MQTT URL {shown!r} has port 0; use 1-65535")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"MQTT URL {shown!r} must not have a path, query or fragment")
    username = None if parts.username is None else unquote(parts.username)
    if username == "":
        raise ConfigError(f"MQTT URL {shown!r} has an empty user name")
    password = None if parts.password is None else unquote(parts.password)
    return MqttEndpoint(host=parts.hostname, port=port or DEFAULT_PORTS[parts.scheme],
                        tls=parts.scheme == "mqtts", username=username, password=password)


def redact(url: str) -> str:
    return re.sub(r"//([^/@:]*):[^/@]*@", r"//\1:***@", url)


class _Window:
    """A FIFO limit on concurrent holders. asyncio.Semaphore in Python 3.11 rescans its
    woken waiters on every release, which is quadratic with thousands of publishers."""

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_acquire(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a place just as it was cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place goes straight to the next waiter
                return
        self._free += 1


class _AckTracker(PersistentStorage):
    """gmqtt's in-flight QoS1 store, plus one future per packet id that resolves when the
    broker's PUBACK removes the message, or fails once its deadline has passed. Deadlines
    are checked by one sweep (`expire`) rather than a timer per publish, which would cost
    more than the rest of the publish path together."""

    def __init__(self) -> None:
        super().__init__()
        self.last_mid = 0
        # Insertion order is publish order, so it is deadline order too.
        self._waiters: dict[int, tuple[asyncio.Future[None], float]] = {}

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.last_mid = mid

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        entry = self._waiters.pop(mid, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(None)

    def clear(self) -> None:
        # gmqtt clears the store when the broker reports no session: those messages will
        # never be acknowledged, so their publishers must hear it (and may retry).
        super().clear()
        self.fail_all(RetryableError("the MQTT broker lost the session before acknowledging"))

    def expect(self, mid: int, deadline: float) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[mid] = (waiter, deadline)
        return waiter

    def forget(self, mid: int, waiter: asyncio.Future[None]) -> None:
        entry = self._waiters.get(mid)
        if entry is not None and entry[0] is waiter:
            del self._waiters[mid]

    def expire(self, now: float, error: Exception) -> None:
        expired = []
        for mid, (_, deadline) in self._waiters.items():
            if deadline > now:
                break
            expired.append(mid)
        for mid in expired:
            waiter = self._waiters.pop(mid)[0]
            if not waiter.done():
                waiter.set_exception(error)

    def fail_all(self, error: Exception) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter, _ in waiters.values():
            if not waiter.done():
                waiter.set_exception(error)


class CorkedTransport:
    """gmqtt writes every packet (each PUBLISH, each PUBACK) with its own send(); this
    joins the packets of one loop turn into one write. Measured on an MQTT flow worker:
    the per-packet writes were 15% of its CPU."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._chunks: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._chunks:
            self._loop.call_soon(self.flush)
        self._chunks.append(data)

    def flush(self) -> None:
        if self._chunks and not self._transport.is_closing():
            self._transport.write(b"".join(self._chunks))
        self._chunks.clear()

    def close(self) -> None:
        self.flush()  # a DISCONNECT written just before must still go out
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Client(GmqttClient):
    """gmqtt's client with the link's hooks: QoS1 deliveries with their packet id, reconnects
    with backoff that stop for good on `close()`."""

    def __init__(self, link: MqttLink, client_id: str, clean_session: bool,
                 storage: _AckTracker) -> None:
        super().__init__(client_id, clean_session=clean_session, persistent_storage=storage)
        self._link = link
        self._closed = False
        self._reconnects: set[asyncio.Task[Any]] = set()
        self.failed_attempts = 0
        # The one reach into gmqtt's internals for receiving: its packet handler calls this
        # attribute for every QoS1 PUBLISH; the link acks it after the handler has run.
        self._package_handler._handle_qos_1_publish_packet = self._deliver_qos1
        # Until the first CONNACK, start() retries itself; gmqtt must not race it.
        self.reconnect_retries = 0

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        connection = await super()._create_connection(*args, **kwargs)
        protocol = getattr(connection, "_protocol", None)
        if protocol is not None and getattr(protocol, "_transport", None) is not None:
            protocol._transport = CorkedTransport(protocol._transport)
        return connection

    def _deliver_qos1(self, mid: int, payload: bytes, topic: str, properties: Any) -> None:
        self._link._dispatch(topic, payload, 1, mid, self._package_handler.current_connection)

    @property
    def current_connection(self) -> Any:
        return self._package_handler.current_connection

    async def reconnect(self, delay: bool = False) -> None:
        """gmqtt's reconnect (it runs one per attempt), tracked so close() can cancel it
        and with the delay growing per failed attempt."""
        if self._closed:
            return
        task = asyncio.current_task()
        if task is not None:
            self._reconnects.add(task)
        if delay:
            self.reconnect_delay = backoff_s(self.failed_attempts)
            self.failed_attempts += 1
        try:
            await super().reconnect(delay=delay)
        except asyncio.CancelledError:
            # Only close() or the loop's shutdown cancel it, and gmqtt's done-callback
            # would log a cancelled task as an error: end normally instead.
            pass
        finally:
            if task is not None:
                self._reconnects.discard(task)

    async def drain(self) -> None:
        """Wait while asyncio's write buffer is above its high-water mark."""
        connection = self._connection
        if connection is not None:
            await connection._protocol._drain_helper()

    async def close(self) -> None:
        """DISCONNECT if connected; no reconnect afterwards."""
        self._closed = True
        pending = list(self._reconnects)
        for task in pending:
            task.cancel()
        connection = self._connection
        if connection is None or connection.is_closing():
            self._is_active = False  # gmqtt's own flag: no reconnect from here on
        else:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.disconnect(), DISCONNECT_TIMEOUT_S)
        await asyncio.gather(*pending, return_exceptions=True)


def backoff_s(attempt: int) -> float:
    base = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(attempt, 16))
    return base * random.uniform(0.8, 1.2)  # jitter: workers do not reconnect in lockstep


class MqttLink:
    """One MQTT connection of a worker: subscriptions delivered to `on_message(topic,
    payload, qos)`, QoS1 acknowledged after it returns; `publish` with QoS 0 or 1."""

    def __init__(self, url: str, client_id: str, on_message: OnMessage, *,
                 clean_session: bool = False, keepalive_s: int = 30,
                 max_in_flight: int = MAX_IN_FLIGHT,
                 publish_timeout_s: float = PUBLISH_TIMEOUT_S,
                 stop_grace_s: float = STOP_GRACE_S) -> None:
        self._endpoint = parse_mqtt_url(url)
        self._where = redact(url)
        if not client_id or not client_id.isascii() or not client_id.isprintable() \
                or " " in client_id or len(client_id) > CLIENT_ID_MAX:
            raise ConfigError(f"MQTT client id {client_id!r} must be 1-{CLIENT_ID_MAX} "
                              "printable ASCII characters without spaces")
        if not 0 <= keepalive_s <= 65535:
            raise ConfigError(f"MQTT keepalive_s must be 0-65535, not {keepalive_s}")
        if max_in_flight < 1 or publish_timeout_s <= 0 or stop_grace_s < 0:
            raise ConfigError("max_in_flight must be >= 1, publish_timeout_s > 0, "
                              "stop_grace_s >= 0")
        self._client_id = client_id
        self._on_message = on_message
        self._clean_session = clean_session
        self._keepalive_s = keepalive_s
        self._publish_timeout_s = publish_timeout_s
        self._stop_grace_s = stop_grace_s
        self._client: _Client | None = None
        self._acks = _AckTracker()
        self._connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = False  # the hot path reads a bool, not the Event
        self._started = False
        self._subscriptions: list[Subscription] = []
        self._subscribed: asyncio.Future[None] | None = None
        self._publish_window = _Window(MAX_UNACKED_PUBLISHES)
        self._sweeper: asyncio.Task[None] | None = None
        self._max_in_flight = max_in_flight
        self._inbox: collections.deque[_Delivery] = collections.deque()
        self._inbox_bytes = 0
        self._workers: set[asyncio.Task[None]] = set()
        self._dropped_qos0 = 0

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def dropped_qos0(self) -> int:
        """QoS0 messages dropped because handlers were too far behind."""
        return self._dropped_qos0

    async def start(self, subscriptions: dict[str, int]) -> None:
        """Connect (retrying with backoff), subscribe (topic filter -> QoS 0 or 1) and
        return once the broker granted every subscription, or once stop() was called.
        Raises AuthError or ConfigError when the broker refuses for good."""
        if self._started:
            raise ConfigError("MqttLink.start() may be called only once")
        self._started = True
        for topic, qos in subscriptions.items():
            if not topic or qos not in (0, 1):
                raise ConfigError(f"MQTT subscription {topic!r}: needs a topic filter and "
                                  f"QoS 0 or 1 (QoS 2 is not supported), not {qos!r}")
        self._subscriptions = [Subscription(topic, qos=qos)
                               for topic, qos in subscriptions.items()]
        self._subscribed = asyncio.get_running_loop().create_future()
        if not self._subscriptions:
            self._subscribed.set_result(None)
        attempt = 0
        while not self._stopping.is_set():
            # Assigned before connecting: on_connect already needs it (publishers wake).
            client = self._client = self._new_client()
            connecting = asyncio.ensure_future(self._connect(client))
            try:
                if not await self._until_stopped(connecting):
                    await client.close()  # stop() may have closed it before it connected
                    return
                connecting.result()
            except (OSError, TimeoutError, MQTTConnectError) as exc:
                await client.close()
                self._client = None
                self._raise_if_refused_for_good(exc)
                delay_s = backoff_s(attempt)
                attempt += 1
                logger.warning("MQTT broker %s: cannot connect as %s (%s); retrying in %.1fs",
                               self._where, self._client_id, exc or type(exc).__name__,
                               delay_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay_s)
                continue
            client.reconnect_retries = UNLIMITED_RECONNECTS  # gmqtt owns reconnects now
            break
        if not await self._until_stopped(self._subscribed):
            return
        self._subscribed.result()  # raises ConfigError if a filter was refused

    async def publish(self, topic: str, payload: bytes, qos: int = 0,
                      retain: bool = False) -> None:
        """QoS0: returns once buffered for the socket. QoS1: returns once the broker sent
        PUBACK. Each wait (for a connection, for a place among the unacknowledged
        publishes, for the PUBACK) is bounded by `publish_timeout_s`, then RetryableError;
        a QoS1 message that timed out may still be delivered later (at least once)."""
        if qos not in (0, 1):
            raise ConfigError(f"MQTT publish QoS must be 0 or 1, not {qos!r}")
        # The common case takes no timer: waits that need one are the unusual ones.
        if qos == 0:
            if not self._connected.is_set():
                await self._bounded(self._wait_connected(), topic, "not connected")
            await self._publish_qos0(topic, payload, retain)
            return
        if not self._publish_window.try_acquire():
            await self._bounded(self._publish_window.acquire(), topic,
                                f"still {MAX_UNACKED_PUBLISHES} unacknowledged publishes")
        try:
            if not self._connected.is_set():
                await self._bounded(self._wait_connected(), topic, "not connected")
            await self._publish_qos1(topic, payload, retain)
        finally:
            self._publish_window.release()

    async def _bounded(self, awaitable: Awaitable[None], topic: str, reason: str) -> None:
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                await awaitable
        except TimeoutError as exc:
            raise RetryableError(f"MQTT publish to {topic!r} via {self._where}: {reason} "
                                 f"after {self._publish_timeout_s:g}s") from exc

    async def _publish_qos0(self, topic: str, payload: bytes, retain: bool) -> None:
        client = self._client
        assert client is not None  # connected
        client.publish(topic, payload, qos=0, retain=retain)
        try:
            await client.drain()
        except ConnectionError as exc:
            raise RetryableError(f"MQTT connection to {self._where} lost") from exc

    async def _publish_qos1(self, topic: str, payload: bytes, retain: bool) -> None:
        client = self._client
        assert client is not None  # connected
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_ack_deadlines())
        client.publish(topic, payload, qos=1, retain=retain)
        # gmqtt stored the message under its packet id inside publish(), synchronously,
        # so no PUBACK can have arrived before the waiter exists.
        mid = self._acks.last_mid
        waiter = self._acks.expect(mid, self._loop_time() + self._publish_timeout_s)
        try:
            with contextlib.suppress(ConnectionError):
                await client.drain()  # a lost connection is fine: gmqtt replays it
            await waiter
        finally:
            self._acks.forget(mid, waiter)

    async def _sweep_ack_deadlines(self) -> None:
        interval_s = min(1.0, self._publish_timeout_s / 4)
        error = RetryableError(f"MQTT broker {self._where} did not acknowledge a publish "
                               f"within {self._publish_timeout_s:g}s")
        while True:
            await asyncio.sleep(interval_s)
            self._acks.expire(self._loop_time(), error)

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    async def stop(self) -> None:
        """Let running handlers finish for up to `stop_grace_s` (their PUBACKs go out),
        DISCONNECT, then cancel the rest (unacknowledged: the broker redelivers them)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._closing = True
        if self._workers and self._stop_grace_s > 0:
            await asyncio.wait(set(self._workers), timeout=self._stop_grace_s)
        if self._client is not None:
            await self._client.close()
        self._connected.clear()
        workers = list(self._workers)
        for task in workers:
            task.cancel()
        if self._sweeper is not None:
            workers.append(self._sweeper)
            self._sweeper.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._inbox.clear()
        self._acks.fail_all(RetryableError("MQTT link stopped before the broker acknowledged"))

    # -- receiving ----------------------------------------------------------------------

    def _dispatch(self, topic: str, payload: bytes, qos: int, mid: int | None,
                  connection: Any) -> None:
        """From gmqtt's packet handler, synchronously, once per PUBLISH received."""
        if self._closing:
            return  # not acknowledged: the broker redelivers QoS1 to the next session
        inbox = self._inbox
        if qos == 0 and (len(inbox) >= INBOX_QOS0_MAX
                         or self._inbox_bytes >= INBOX_QOS0_MAX_BYTES):
            self._dropped_qos0 += 1
            if self._dropped_qos0 % 10_000 == 1:
                logger.warning("MQTT %s: handlers are behind, %d QoS0 messages dropped",
                               self._client_id, self._dropped_qos0)
            return
        inbox.append((topic, payload, qos, mid, connection))
        self._inbox_bytes += len(payload)
        if len(self._workers) < self._max_in_flight:
            task = asyncio.create_task(self._work())
            self._workers.add(task)
            task.add_done_callback(self._workers.discard)

    async def _work(self) -> None:
        """Handle messages from the inbox, oldest first, until it is empty. Up to
        `max_in_flight` of these run at once; under load each handles many messages, so
        there is no task per message."""
        inbox = self._inbox
        while inbox:
            topic, payload, qos, mid, connection = inbox.popleft()
            self._inbox_bytes -= len(payload)
            try:
                await self._on_message(topic, payload, qos)
            except Exception:
                # Acknowledged anyway: redelivering a message that fails every time
                # would hold a place in its subscription's window forever.
                logger.exception("MQTT handler failed on %r (QoS %d); message acknowledged",
                                 topic, qos)
            # Only on the connection it came in on (see the module docstring); after a
            # reconnect the broker delivers it again instead.
            if mid is not None and connection is self._handler_connection() \
                    and not connection.is_closing():
                connection.send_command_with_mid(MQTTCommands.PUBACK, mid, False)
        # Leave the pool now, not in the done-callback one loop step later: a message
        # dispatched in between would otherwise count this worker and wait in the inbox.
        task = asyncio.current_task()
        if task is not None:
            self._workers.discard(task)

    def _handler_connection(self) -> Any:
        client = self._client
        return None if client is None else client.current_connection

    # -- connection ---------------------------------------------------------------------

    def _new_client(self) -> _Client:
        client = _Client(self, self._client_id, self._clean_session, self._acks)
        endpoint = self._endpoint
        if endpoint.username is not None:
            client.set_auth_credentials(endpoint.username, endpoint.password)
        client.subscriptions.extend(self._subscriptions)
        client.on_message = self._on_gmqtt_message
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        return client

    async def _connect(self, client: _Client) -> None:
        endpoint = self._endpoint
        tls: ssl.SSLContext | bool = False
        if endpoint.tls:
            tls = ssl.create_default_context()
            tls.minimum_version = ssl.TLSVersion.TLSv1_3
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await client.connect(endpoint.host, endpoint.port, ssl=tls,
                                 keepalive=self._keepalive_s, version=MQTTv311)

    def _raise_if_refused_for_good(self, exc: BaseException) -> None:
        code = getattr(exc, "_code", None)  # gmqtt's MQTTConnectError keeps the CONNACK code
        if code in REFUSED_AUTH:
            raise AuthError(f"MQTT broker {self._where} refused {self._client_id}: {exc}") \
                from exc
        if code in REFUSED_CONFIG:
            raise ConfigError(f"MQTT broker {self._where} refused {self._client_id}: {exc}") \
                from exc

    def _on_gmqtt_message(self, client: _Client, topic: str, payload: bytes, qos: int,
                          properties: Any) -> None:
        # QoS0 only: QoS1 arrives through _Client._deliver_qos1. Deliberately not a
        # coroutine, so gmqtt calls it directly instead of wrapping it in a task.
        self._dispatch(topic, payload, qos, None, None)

    def _on_connect(self, client: _Client, session_present: int, result: int,
                    properties: Any) -> None:
        client.failed_attempts = 0
        if self._closing:
            return  # start() or stop() closes this client
        subs = client.subscriptions
        # A broker that kept the session kept its subscriptions; otherwise (first
        # connect, or it lost its state) subscribe again.
        if subs and (not session_present or not all(sub.acknowledged for sub in subs)):
            for sub in subs:
                sub.acknowledged = False
                client.resubscribe(sub)
        self._connected.set()

    def _on_disconnect(self, client: _Client, *args: Any) -> None:
        self._connected.clear()

    def _on_subscribe(self, client: _Client, mid: int, granted: tuple[int, ...],
                      properties: Any) -> None:
        refused = [sub.topic for sub in client.subscriptions
                   if sub.mid == mid and not sub.acknowledged]
        done = self._subscribed
        if refused:
            error = ConfigError(f"MQTT broker {self._where} refused subscriptions {refused}")
            if done is not None and not done.done():
                done.set_exception(error)
            else:
                logger.error("%s", error)
        elif done is not None and not done.done() \
                and all(sub.acknowledged for sub in client.subscriptions):
            done.set_result(None)

    async def _wait_connected(self) -> None:
        if self._stopping.is_set():
            raise RetryableError(f"MQTT link to {self._where} is stopped")
        if self._connected.is_set():
            return
        waiter = asyncio.ensure_future(self._connected.wait())
        if not await self._until_stopped(waiter):
            raise RetryableError(f"MQTT link to {self._where} is stopped")

    async def _until_stopped(self, future: asyncio.Future[Any]) -> bool:
        """Wait for `future` or stop(); True if the future finished."""
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({future, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not future.done():
                future.cancel()
        return future.done() and not future.cancelled()
