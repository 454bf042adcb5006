"""Frames between the node agent and its app workers, over one socketpair per worker.

Each frame is a 4-byte big-endian length and a msgpack array whose first element tags
the message (msgspec array-like structs: no field names on the wire). Requests carry an
id so many can be in flight on one connection; replies name the id they answer.
`docs/app-front.md` records why this, and not an HTTP proxy, carries the front's
requests.

    node -> worker: HttpCall, Ping, RpcReply
    worker -> node: Hello, HttpReply, Pong, Rpc, Stats
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec

FRAME_BYTES_MAX = 64 * 1024 * 1024
_HEADER = 4


class HttpCall(msgspec.Struct, array_like=True, tag=1):
    id: int
    method: str
    path: str  # relative to the app: `/machines/m1` for `/factory/machines/m1`
    query: str
    headers: list[tuple[str, str]]
    body: bytes


class HttpReply(msgspec.Struct, array_like=True, tag=2):
    id: int
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Ping(msgspec.Struct, array_like=True, tag=3):
    id: int


class Pong(msgspec.Struct, array_like=True, tag=4):
    id: int
    # How long the oldest sync handler has been running on a pool thread (a thread
    # cannot be cancelled, so the node replaces a worker whose threads are all stuck).
    stuck_s: float = 0.0


class Hello(msgspec.Struct, array_like=True, tag=5):
    """The app imported and its handlers registered: the worker is ready."""

    pid: int
    routes: int
    topics: list[str]
    schedules: int


class Rpc(msgspec.Struct, array_like=True, tag=6):
    """A write the worker asks the node to make durably (collections, streams)."""

    id: int
    op: str
    args: list[Any]


class RpcReply(msgspec.Struct, array_like=True, tag=7):
    id: int
    value: Any = None
    # The exception class name (ConfigError, NotFoundError, ...) and its message.
    error_kind: str = ""
    error: str = ""


class Stats(msgspec.Struct, array_like=True, tag=8):
    """Cumulative counters since the worker started."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    messages: int = 0
    malformed: int = 0
    handler_errors: int = 0
    schedule_runs: int = 0


def add_stats(a: Stats, b: Stats) -> Stats:
    return Stats(*(getattr(a, f) + getattr(b, f) for f in Stats.__struct_fields__))


Frame = HttpCall | HttpReply | Ping | Pong | Hello | Rpc | RpcReply | Stats

# A worker whose app cannot be imported logs this event (with `error`) and exits with
# this code; the node shows that error as the app's reason.
EXIT_LOAD_FAILED = 3
LOAD_FAILED_EVENT = "app failed to load"

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)


def encode_frame(frame: Frame) -> bytes:
    data = _encoder.encode(frame)
    return len(data).to_bytes(_HEADER, "big") + data


class FrameChannel(asyncio.Protocol):
    """Frames in and out of a stream transport.

    Writes made during one loop iteration leave in one send (a burst of replies costs
    one syscall). A frame that does not decode, or is too big, closes the channel:
    both ends are ours, so a bad frame means a broken peer.
    """

    def __init__(self, on_frame: Callable[[Frame], None],
                 on_close: Callable[[Exception | None], None]) -> None:
        self._on_frame = on_frame
        self._on_close = on_close
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, size = 0, len(buffer)
        view = memoryview(buffer)
        try:
            while size - offset >= _HEADER:
                length = int.from_bytes(view[offset:offset + _HEADER], "big")
                if length > FRAME_BYTES_MAX:
                    raise ValueError(f"frame of {length} bytes exceeds {FRAME_BYTES_MAX}")
                end = offset + _HEADER + length
                if end > size:
                    break
                frame = _decoder.decode(view[offset + _HEADER:end])
                offset = end
                self._on_frame(frame)
        except (ValueError, msgspec.DecodeError) as exc:
            view.release()
            self._fail(exc)
            return
        view.release()
        if offset:
            del buffer[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._on_close(exc)

    def send(self, frame: Frame) -> None:
        if self.closed:
            return
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(encode_frame(frame))

    def _flush(self) -> None:
        if self._transport is not None and not self.closed and self._out:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: Exception) -> None:
        if self._transport is not None:
            self._transport.abort()
        if not self.closed:
            self.closed = True
            self._on_close(exc)
