"""Frames between the node and its app workers: round trips, split reads, bad frames."""

from __future__ import annotations

import asyncio
import socket

import pytest

from fogline.node.apps.wire import (
    FRAME_BYTES_MAX,
    Frame,
    FrameChannel,
    HttpCall,
    HttpReply,
    Rpc,
    Stats,
    encode_frame,
)


async def _pair() -> tuple[FrameChannel, list[Frame], list[Exception | None], socket.socket]:
    ours, theirs = socket.socketpair()
    got: list[Frame] = []
    closed: list[Exception | None] = []
    loop = asyncio.get_running_loop()
    _, channel = await loop.create_unix_connection(
        lambda: FrameChannel(got.append, closed.append), sock=ours)
    theirs.setblocking(False)
    return channel, got, closed, theirs


async def test_frames_survive_any_split_of_the_byte_stream() -> None:
    channel, got, _, peer = await _pair()
    frames: list[Frame] = [HttpCall(1, "GET", "/a", "x=1", [("h", "v")], b"\x00" * 3000),
                           Rpc(2, "put", ["kv", "k", b"\x81"]), Stats(requests=5)]
    data = b"".join(encode_frame(f) for f in frames)
    loop = asyncio.get_running_loop()
    for i in range(0, len(data), 7):  # 7-byte pieces: headers and bodies cut anywhere
        await loop.sock_sendall(peer, data[i:i + 7])
        await asyncio.sleep(0)
    for _ in range(100):
        if len(got) == 3:
            break
        await asyncio.sleep(0.01)
    assert got == frames
    channel.close()
    peer.close()


async def test_writes_in_one_loop_turn_leave_together_and_arrive_in_order() -> None:
    channel, _, _, peer = await _pair()
    for i in range(50):
        channel.send(HttpReply(i, 200, [], b"ok"))
    await asyncio.sleep(0.05)
    data = peer.recv(1 << 20)
    assert data == b"".join(encode_frame(HttpReply(i, 200, [], b"ok")) for i in range(50))
    channel.close()
    peer.close()


@pytest.mark.parametrize("garbage", [
    (FRAME_BYTES_MAX + 1).to_bytes(4, "big"),              # announces too much
    (3).to_bytes(4, "big") + b"\x93\x63\x01",               # unknown tag 99
])
async def test_a_bad_frame_closes_the_channel(garbage: bytes) -> None:
    channel, got, closed, peer = await _pair()
    await asyncio.get_running_loop().sock_sendall(peer, garbage)
    for _ in range(100):
        if closed:
            break
        await asyncio.sleep(0.01)
    assert closed and closed[0] is not None and got == []
    assert channel.closed
    channel.send(Stats())  # a send after close is dropped, not an error
    peer.close()
