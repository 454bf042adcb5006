"""The demo's user simulator (fogline.sim.demo_users) and the app story's cut window."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fogline.sim.demo_apps import AppNode, AppWorkload
from fogline.sim.demo_users import PathClient, PathStats, UserPath, percentile


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 99) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0


def test_path_stats_count_per_second_and_keep_failures_out_of_latency() -> None:
    stats = PathStats()
    for at_s, latency_ms in ((100.1, 2.0), (100.5, 1.0), (101.2, 9.0)):
        stats.record(at_s, latency_ms)
    stats.record(101.3, None, "ConnectionResetError")
    body = stats.to_dict(now_s=101.5)
    assert (body["ok"], body["failed"]) == (3, 1)
    assert body["p50_ms"] == 2.0 and body["max_ms"] == 9.0
    assert body["by_second"] == {"100": [2, 0], "101": [1, 1]}
    assert body["errors"] == {"ConnectionResetError": 1}


async def serve_once_then_close(reader: asyncio.StreamReader,
                                writer: asyncio.StreamWriter) -> None:
    """Two answers on one connection, the second with `Connection: close`."""
    for close in (False, True):
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        body = b'{"machine": "m1"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (
            len(body), b"Connection: close\r\n" if close else b"", body))
        await writer.drain()
    writer.close()


async def test_client_keeps_connections_alive_until_told_otherwise() -> None:
    server = await asyncio.start_server(serve_once_then_close, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        client = PathClient(UserPath("eu", "edge", "n1", "127.0.0.1", port, ("m1",), 10.0))
        assert (await client.call("m1"))[0] == 200
        assert len(client._idle) == 1  # kept for the next request
        assert (await client.call("m1"))[0] == 200
        assert client._idle == []  # the server said close


def test_cut_window_counts_whole_seconds_inside_the_cut(tmp_path: Path) -> None:
    apps = AppWorkload(tmp_path)
    apps.partitioned("eu", at_s=100.5)
    apps.healed(at_s=103.2)
    apps.users = {"paths": {
        "eu/edge": {"by_second": {"100": [9, 0], "101": [10, 0], "102": [10, 0],
                                  "103": [4, 0]}},
        "eu/cloud": {"by_second": {"100": [5, 4], "101": [0, 10], "102": [0, 10]}}}}
    window = apps.during_cut()
    assert window["edge_requests"] == {"ok": 20, "failed": 0, "seconds": 2}
    assert window["cloud_requests"] == {"ok": 0, "failed": 20, "seconds": 2}


def test_app_counters_add_up_over_the_versions_a_node_ran() -> None:
    node = AppNode("n1", "eu", "near", Path("/nonexistent"))
    node.saw({"revision": 1, "stats": {"messages": 5, "malformed": 1}})
    node.saw({"revision": 1, "stats": {"messages": 9, "malformed": 1}})
    node.saw({"revision": 2, "stats": {"messages": 2}})  # a new version starts at zero
    assert (node.stat("messages"), node.stat("malformed"), node.switches) == (11, 1, 1)
    node.saw({})  # not reported this time: the last status stays
    assert node.stat("messages") == 11
