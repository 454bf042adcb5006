"""Streams through real node processes: kill -9 mid-storm, and the hub's exactly-once."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.fleet import HubProcess, run_hub, wait_for

KILLS = 20


def emit_storm(node_dir: Path, stop: threading.Event, acknowledged: list[int],
               workers: int = 4) -> list[threading.Thread]:
    """Emitters that keep posting records and note every seq the node acknowledged."""
    lock = threading.Lock()

    def emitter(worker: int) -> None:
        token = (node_dir / "local.token").read_text().strip()
        n = 0
        while not stop.is_set():
            try:
                endpoint = (node_dir / "endpoint").read_text().strip()
                response = httpx.post(f"{endpoint}/local/streams/telemetry",
                                      json={"record": {"worker": worker, "n": n}},
                                      headers={"Authorization": f"Bearer {token}"}, timeout=2)
            except (httpx.HTTPError, OSError):
                time.sleep(0.02)
                continue
            if response.status_code == 200:
                with lock:
                    acknowledged.append(response.json()["seq"])
                n += 1

    threads = [threading.Thread(target=emitter, args=(w,), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    return threads


def hub_seqs(hub: HubProcess, node_id: str) -> list[int]:
    seqs: list[int] = []
    after = 0
    while True:
        rows = hub.api("GET", f"/v1/nodes/{node_id}/streams/telemetry/records",
                       params={"after_seq": after, "limit": 10_000})
        if not rows:
            return seqs
        seqs.extend(row["seq"] for row in rows)
        after = seqs[-1]


def test_kill_9_mid_emit_storm_20_times_loses_and_duplicates_nothing(
        tmp_path: Path, hub_db_args: list[str]) -> None:
    rng = random.Random(7)
    with run_hub(tmp_path / "hub", "--heartbeat-interval", "1s", *hub_db_args) as hub:
        node_dir = tmp_path / "n1"
        process = hub.start_node(node_dir, "n1", hub.create_token())
        wait_for(lambda: (node_dir / "endpoint").exists(), 30, "node up")
        wait_for(lambda: hub.nodes_by_name().get("n1"), 30, "node registered")
        node_id = hub.nodes_by_name()["n1"]["id"]
        acknowledged: list[int] = []
        stop = threading.Event()
        threads = emit_storm(node_dir, stop, acknowledged)
        try:
            for _ in range(KILLS):
                before = len(acknowledged)
                wait_for(lambda b=before: len(acknowledged) > b + 20, 30, "emits to flow")
                time.sleep(rng.uniform(0.05, 0.4))
                process.send_signal(signal.SIGKILL)
                process.wait()
                (node_dir / "endpoint").unlink()
                process = hub.start_node(node_dir, "n1")
                wait_for(lambda: (node_dir / "endpoint").exists(), 30, "node back")
        finally:
            stop.set()
            for thread in threads:
                thread.join(5)
        acked = sorted(acknowledged)
        assert len(acked) == len(set(acked)), "a seq was acknowledged twice"
        wait_for(lambda: len(hub_seqs(hub, node_id)) >= acked[-1], 60,
                 "the hub to hold every record")
        at_hub = hub_seqs(hub, node_id)
        assert len(at_hub) == len(set(at_hub)), "duplicates at the hub"
        assert set(acked) <= set(at_hub), "an acknowledged record was lost"
        # Sequences are dense: nothing committed was skipped either.
        assert at_hub == list(range(1, len(at_hub) + 1))
