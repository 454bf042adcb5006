"""Benchmark `merge`: how many CRDT ops per second the hub merges into its SQL replicas.

The peer is pycrdt (Yrs, the Rust Yjs) applying the same logical writes in the same
run: every simulated node has its own pycrdt Doc, each StateBatch the node would send
becomes one Yjs update made from one transaction, and a hub Doc applies them all in
the order the hub would merge them. Only the hub-side work is timed on both sides.

The workload is generated once, deterministically: map puts over a key space from many
nodes, each with its own hybrid logical clock (a little skewed), mostly written after
seeing the latest value, sometimes concurrently (a conflict), plus PN-counter ops. The
ops are grouped as the hub's merge worker sees them: per-node StateBatches, fetched 64
at a time, one `CollectionStore.merge` (one transaction) per fetch.

Rounds alternate fogline (fresh SQLite hub store) and pycrdt (fresh hub Doc); the
median of the rounds is reported for each. The pure in-memory `CollectionState.apply`
rate and, when PostgreSQL is reachable, the PostgreSQL rate are reported in conditions.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import platform
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import sqlalchemy as sa

from fogline.bench import result
from fogline.clock import ManualClock
from fogline.core.crdt import CollectionState, CounterOp, MapOp, Op
from fogline.core.hlc import Hlc, HybridLogicalClock
from fogline.core.sync import CollectionDef, StateBatch, decode_sync, encode_sync
from fogline.hub.collections import CollectionStore, Located
from fogline.hub.store import HubStore
from fogline.hub.sync import FETCH_BATCH

GOAL_OPS_PER_S = 100_000.0
NODES = 50
KEYS = 20_000
BATCH_OPS = 50  # ops per StateBatch a node sends (its send loop batches what is pending)
SEEN_LATEST = 0.9  # share of writes made after seeing the key's latest value
COUNTER_SHARE = 0.1  # counter ops per map put
CLOCK_SKEW_MS = 20.0  # each node's wall clock is off by up to this much
MAP_COLLECTION, COUNTER_COLLECTION = "kv", "hits"
REPLICA = "global"
POSTGRES_URL = os.environ.get("FOGLINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


class _SkewedClock:
    """A node's wall clock: the shared simulated time plus a fixed offset."""

    def __init__(self, base: ManualClock, offset_s: float) -> None:
        self.base = base
        self.offset_s = offset_s

    def now(self) -> float:
        return self.base.now() + self.offset_s

    def monotonic(self) -> float:
        return self.base.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)


@dataclass
class Batch:
    """One StateBatch as a node sends it, plus the peer's value for each op."""

    origin: str
    ops: list[tuple[str, Op]]
    counter_totals: dict[str, int] = field(default_factory=dict)


@dataclass
class Workload:
    batches: list[Batch]
    calls: list[list[Located]]  # what each merge-worker fetch hands CollectionStore.merge
    map_ops: int
    counter_ops: int

    @property
    def ops(self) -> int:
        return self.map_ops + self.counter_ops


def make_workload(map_ops: int, nodes: int = NODES, keys: int = KEYS,
                  seed: int = 7) -> Workload:
    """Ops in commit order per node, grouped into StateBatches and merge calls."""
    rng = random.Random(seed)
    base = ManualClock()
    names = [f"nd-{i:04d}" for i in range(nodes)]
    clocks = {n: HybridLogicalClock(n, _SkewedClock(
        base, rng.uniform(-CLOCK_SKEW_MS, CLOCK_SKEW_MS) / 1000)) for n in names}
    history: dict[str, list[Hlc]] = {}  # every write's ts per key, in write order
    totals = {n: [0, 0] for n in names}
    pending: dict[str, list[tuple[str, Op]]] = {n: [] for n in names}
    batches: list[Batch] = []
    encoder = msgspec.msgpack.Encoder()
    counter_ops = 0

    def flush(node: str) -> None:
        batches.append(Batch(node, pending[node]))
        pending[node] = []

    for i in range(map_ops):
        base.advance(rng.expovariate(1 / 0.0005))  # ~2,000 writes/s across the fleet
        node = rng.choice(names)
        hlc = clocks[node]
        key = f"k{rng.randrange(keys):05d}"
        seen = history.get(key, [])
        prev: Hlc | None = None
        if seen:
            # Usually the writer has the latest value (it came through fan-out); else
            # it wrote concurrently with the last write: a conflict at the hub.
            prev = seen[-1] if rng.random() < SEEN_LATEST or len(seen) == 1 else seen[-2]
            hlc.observe(prev)
        ts = hlc.now()
        value = encoder.encode({"v": i, "by": node, "ok": True})
        seen.append(ts)
        history[key] = seen
        pending[node].append((MAP_COLLECTION, MapOp(key, ts, value, prev)))
        if rng.random() < COUNTER_SHARE:
            amount = rng.randint(-2, 5)
            total = totals[node]
            total[0 if amount >= 0 else 1] += abs(amount)
            pending[node].append((COUNTER_COLLECTION, CounterOp(node, total[0], total[1])))
            counter_ops += 1
        if len(pending[node]) >= BATCH_OPS:
            flush(node)
    for node in names:
        if pending[node]:
            flush(node)
    calls: list[list[Located]] = []
    for start in range(0, len(batches), FETCH_BATCH):
        calls.append([(REPLICA, name, op) for batch in batches[start:start + FETCH_BATCH]
                      for name, op in batch.ops])
    return Workload(batches, calls, map_ops, counter_ops)


# fogline --------------------------------------------------------------------------

def time_store_merge(url: str, workload: Workload) -> tuple[float, int, int]:
    """Merge every call into a fresh hub store; (seconds, changed ops, conflicts)."""
    store = HubStore(url)
    try:
        collections = CollectionStore(store.engine)
        changed = conflicts = 0
        started = time.perf_counter()
        for located in workload.calls:
            outcome = collections.merge(located)
            changed += len(outcome.changed)
            conflicts += len(outcome.conflicts)
        elapsed = time.perf_counter() - started
    finally:
        store.close()
    return elapsed, changed, conflicts


def time_memory_apply(workload: Workload) -> tuple[float, int]:
    """The same ops through the pure in-memory CRDT core (no SQL); (seconds, changed)."""
    states = {MAP_COLLECTION: CollectionState("map"),
              COUNTER_COLLECTION: CollectionState("counter")}
    changed = 0
    started = time.perf_counter()
    for located in workload.calls:
        for _, name, op in located:
            changed += states[name].apply(op)
    return time.perf_counter() - started, changed


def time_decode(workload: Workload) -> float:
    """Decoding the StateBatches off the wire (the merge worker's other per-op cost)."""
    wire = [encode_sync(StateBatch(b.origin, 1, len(b.ops), b.ops)) for b in workload.batches]
    started = time.perf_counter()
    for data in wire:
        decode_sync(data)
    return time.perf_counter() - started


def check_same_state(url: str, workload: Workload) -> bool:
    """The merged SQL replica equals the in-memory one (the figure is of correct work)."""
    store = HubStore(url)
    try:
        collections = CollectionStore(store.engine)
        collections.define(CollectionDef(MAP_COLLECTION, "map", "global"), time.time())
        for located in workload.calls:
            collections.merge(located)
        expected = CollectionState("map")
        for located in workload.calls:
            for _, name, op in located:
                if name == MAP_COLLECTION:
                    expected.apply(op)
        got = collections.state(MAP_COLLECTION, REPLICA)
        return got.value() == expected.value()
    finally:
        store.close()


# pycrdt (the peer) ------------------------------------------------------------------

def ensure_pycrdt() -> str:
    """Import pycrdt, installing it from PyPI first when missing (BENCHMARKS.md)."""
    try:
        importlib.import_module("pycrdt")
        return "already installed"
    except ImportError:
        pass
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "pycrdt"],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"the peer pycrdt could not be installed (pip install pycrdt):\n"
                           f"{(done.stdout + done.stderr)[-2000:]}")
    importlib.invalidate_caches()
    importlib.import_module("pycrdt")
    return "installed by this benchmark's setup step (pip install pycrdt)"


def make_updates(workload: Workload, per_op: bool = False) -> list[bytes]:
    """One Yjs update per StateBatch (or per op), from one pycrdt Doc per node, in the
    order the hub merges them. Node Docs never see each other's updates, so every
    cross-node write to a key is concurrent in Yjs terms (Yjs has no HLC)."""
    from pycrdt import Doc, Map

    docs: dict[str, Any] = {}
    updates: list[bytes] = []
    for batch in workload.batches:
        if batch.origin not in docs:
            doc = Doc(client_id=len(docs) + 1)
            docs[batch.origin] = (doc, doc.get(MAP_COLLECTION, type=Map),
                                  doc.get(COUNTER_COLLECTION, type=Map))
        doc, kv, hits = docs[batch.origin]
        groups = [[item] for item in batch.ops] if per_op else [batch.ops]
        for group in groups:
            before = doc.get_state()
            with doc.transaction():
                for _, op in group:
                    if isinstance(op, MapOp):
                        kv[op.key] = op.value
                    elif isinstance(op, CounterOp):
                        hits[op.node] = op.p - op.n  # only the node writes its own total
            updates.append(doc.get_update(before))
    return updates


def time_pycrdt_apply(updates: list[bytes]) -> tuple[float, int]:
    """A fresh hub Doc applies every update; (seconds, keys in the hub's map)."""
    from pycrdt import Doc, Map

    hub = Doc()
    kv = hub.get(MAP_COLLECTION, type=Map)
    hub.get(COUNTER_COLLECTION, type=Map)
    started = time.perf_counter()
    for update in updates:
        hub.apply_update(update)
    elapsed = time.perf_counter() - started
    return elapsed, len(kv)


# PostgreSQL (conditions only) -------------------------------------------------------

def _postgres_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _postgres_schema() -> Any:
    """A URL whose search_path is a fresh schema, dropped on exit (as tests do)."""
    schema = f"fl_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_URL.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        try:
            yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
        finally:
            with admin.begin() as conn:
                conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        admin.dispose()


def postgres_rate(workload: Workload) -> tuple[float | None, str]:
    if not _postgres_reachable():
        return None, "PostgreSQL not reachable at 127.0.0.1:5432: figure skipped"
    try:
        with _postgres_schema() as url:
            elapsed, _, _ = time_store_merge(url, workload)
    except Exception as exc:  # report, do not fail the benchmark over an optional figure
        return None, f"PostgreSQL run failed: {type(exc).__name__}: {exc}"[:300]
    return workload.ops / elapsed, f"{POSTGRES_URL} (fresh schema), one round"


# The benchmark ----------------------------------------------------------------------

def _median_rate(ops: int, seconds: list[float]) -> float:
    return ops / statistics.median(seconds)


def run(quick: bool = False, ops: int | None = None,
        rounds: int | None = None) -> dict[str, Any]:
    """Run the benchmark; `ops` (map puts) and `rounds` override the sizes (for tests)."""
    map_ops = ops or (50_000 if quick else 200_000)
    round_count = rounds or (3 if quick else 5)
    setup = ensure_pycrdt()
    workdir = Path(tempfile.mkdtemp(prefix="fogline-bench-merge-"))
    try:
        t0 = time.perf_counter()
        workload = make_workload(map_ops)
        updates = make_updates(workload)
        generate_s = time.perf_counter() - t0
        ours_s: list[float] = []
        peer_s: list[float] = []
        memory_s: list[float] = []
        changed = conflicts = peer_keys = 0
        for index in range(round_count):
            url = f"sqlite:///{workdir / f'hub-{index}.db'}"

            def ours(url: str = url) -> None:
                nonlocal changed, conflicts
                elapsed, changed, conflicts = time_store_merge(url, workload)
                ours_s.append(elapsed)

            def peer() -> None:
                nonlocal peer_keys
                elapsed, peer_keys = time_pycrdt_apply(updates)
                peer_s.append(elapsed)

            # Alternate which side goes first, so neither always runs on a warm cache.
            steps: list[Callable[[], None]] = [ours, peer] if index % 2 == 0 else [peer, ours]
            for step in steps:
                step()
            memory_elapsed, memory_changed = time_memory_apply(workload)
            memory_s.append(memory_elapsed)
            with contextlib.suppress(OSError):
                for suffix in ("", "-wal", "-shm"):
                    (workdir / f"hub-{index}.db{suffix}").unlink(missing_ok=True)
        per_op_count = min(len(workload.batches), 400)
        per_op_updates = make_updates(Workload(workload.batches[:per_op_count], [], 0, 0),
                                      per_op=True)
        per_op_elapsed, _ = time_pycrdt_apply(per_op_updates)
        decode_s = time_decode(workload)
        same = check_same_state(f"sqlite:///{workdir / 'check.db'}", workload)
        pg_rate, pg_note = postgres_rate(workload)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    figure = _median_rate(workload.ops, ours_s)
    peer_figure = _median_rate(workload.ops, peer_s)
    ops_per_call = [len(c) for c in workload.calls]
    conditions: dict[str, Any] = {
        "ops": workload.ops,
        "map_puts": workload.map_ops,
        "counter_ops": workload.counter_ops,
        "nodes": NODES,
        "keys": KEYS,
        "ops_per_state_batch": BATCH_OPS,
        "state_batches_per_merge_call": FETCH_BATCH,
        "merge_calls": len(workload.calls),
        "ops_per_merge_call_median": statistics.median(ops_per_call),
        "value_bytes": len(msgspec.msgpack.encode({"v": map_ops, "by": "nd-0000", "ok": True})),
        "hub_changed_ops": changed,
        "hub_conflicts": conflicts,
        "hub_replica_matches_in_memory_core": same,
        "rounds": round_count,
        "aggregate": "median of rounds, both sides",
        "fogline_rounds_ops_per_s": [round(workload.ops / s) for s in ours_s],
        "pycrdt_rounds_ops_per_s": [round(workload.ops / s) for s in peer_s],
        "store": "SQLite file, WAL, synchronous=NORMAL, fresh per round "
                 "(CollectionStore.merge, one transaction per call)",
        "in_memory_apply_ops_per_s": round(_median_rate(workload.ops, memory_s)),
        "in_memory_note": "CollectionState.apply on every op, no SQL, same calls",
        "in_memory_changed_ops": memory_changed,
        "decode_state_batches_ops_per_s": round(workload.ops / decode_s),
        "postgresql_ops_per_s": round(pg_rate) if pg_rate else None,
        "postgresql_note": pg_note,
        "pycrdt_updates": len(updates),
        "pycrdt_update_bytes_mean": round(sum(map(len, updates)) / len(updates)),
        "pycrdt_hub_keys": peer_keys,
        "pycrdt_one_update_per_op_ops_per_s": round(
            sum(len(b.ops) for b in workload.batches[:per_op_count]) / per_op_elapsed),
        "pycrdt_note": "one Doc per node, one update per StateBatch (one transaction), hub "
                       "Doc.apply_update timed; node Docs never exchange updates, so "
                       "cross-node writes are concurrent; counters as a Map of node totals",
        "pycrdt_setup": setup,
        "pycrdt": importlib.metadata.version("pycrdt"),
        "generate_s": round(generate_s, 1),
        "sqlalchemy": sa.__version__,
        "sqlite": sqlite3.sqlite_version,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "cores_used": 1,
    }
    return result(name="merge", figure=round(figure), unit="ops/s",
                  peer="pycrdt Doc.apply_update, same updates", peer_figure=round(peer_figure),
                  better="higher", goal=">= 100,000 ops/s", met=bool(figure >= GOAL_OPS_PER_S),
                  conditions=conditions, samples=workload.ops * round_count)


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv[1:]), indent=2))
