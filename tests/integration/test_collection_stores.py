"""The SQL replicas (hub: SQLite and PostgreSQL; node: SQLite) make exactly the same
merge decisions as the in-memory CRDT core, whatever the batching and order."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fogline.clock import ManualClock
from fogline.core.crdt import CollectionState, Op
from fogline.core.hlc import HybridLogicalClock
from fogline.core.sync import CollectionDef
from fogline.errors import ConfigError, NotFoundError, ProtocolError
from fogline.hub.collections import CollectionStore
from fogline.hub.store import HubStore
from fogline.node.collections import NodeCollections

NODES = ("nd-a", "nd-b", "nd-c")


def random_ops(seed: int, kind: str, count: int) -> list[Op]:
    """Ops as three replicas would produce them, each seeing only part of the others'."""
    rng = random.Random(seed)
    clock = ManualClock()
    replicas = {n: (HybridLogicalClock(n, clock), CollectionState(kind)) for n in NODES}
    ops: list[Op] = []
    for _ in range(count):
        clock.advance(rng.choice([0, 0, 0.001, 0.5]))
        node = rng.choice(NODES)
        hlc, state = replicas[node]
        key = rng.choice("abcd")
        elem = msgspec.msgpack.encode(key)
        if kind == "map":
            op = state.put(hlc, key, None if rng.random() < 0.2 else
                           msgspec.msgpack.encode(rng.randint(0, 9)))
        elif kind == "counter":
            op = state.increment(node, rng.randint(-3, 5))
        else:
            op = state.add(hlc, elem) if rng.random() < 0.6 else state.remove(elem)
        state.apply(op)
        ops.append(op)
        if rng.random() < 0.3 and ops:  # gossip: another replica sees an earlier op
            other = replicas[rng.choice(NODES)][1]
            other.apply(rng.choice(ops))
    return ops


def reference(kind: str, ops: list[Op]) -> CollectionState:
    state = CollectionState(kind)
    for op in ops:
        state.apply(op)
    return state


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_store(request: pytest.FixtureRequest, tmp_path: Path) -> CollectionStore:
    url = (f"sqlite:///{tmp_path / 'hub.db'}" if request.param == "sqlite"
           else request.getfixturevalue("postgres_url"))
    store = HubStore(url)
    request.addfinalizer(store.close)
    return CollectionStore(store.engine)


@pytest.mark.parametrize("kind", ["map", "counter", "set"])
@pytest.mark.parametrize("seed", range(6))
def test_hub_sql_merge_equals_the_core(hub_store: CollectionStore, kind: str,
                                       seed: int) -> None:
    ops = random_ops(seed, kind, 120)
    rng = random.Random(seed)
    shuffled = ops + rng.sample(ops, len(ops) // 3)  # duplicates, too
    rng.shuffle(shuffled)
    hub_store.define(CollectionDef("c", kind, "global"), 0.0)  # type: ignore[arg-type]
    position = 0
    while position < len(shuffled):
        size = rng.randint(1, 40)
        hub_store.merge([("global", "c", op) for op in shuffled[position:position + size]])
        position += size
    assert hub_store.state("c", "global").value() == reference(kind, ops).value()
    # Every op again changes nothing.
    assert hub_store.merge([("global", "c", op) for op in ops]).changed == []


def test_hub_collection_definitions_are_immutable(hub_store: CollectionStore) -> None:
    assert hub_store.define(CollectionDef("t", "map", "region"), 0.0) == "created"
    assert hub_store.define(CollectionDef("t", "map", "region"), 1.0) == "unchanged"
    for changed in (CollectionDef("t", "set", "region"), CollectionDef("t", "map", "global")):
        with pytest.raises(ConfigError, match="type and scope cannot change"):
            hub_store.define(changed, 2.0)
    assert hub_store.definitions()["t"] == CollectionDef("t", "map", "region")


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["map", "counter", "set"]))
async def test_node_sqlite_merge_equals_the_core(tmp_path: Path, seed: int, kind: str) -> None:
    ops = random_ops(seed, kind, 60)
    store = NodeCollections(tmp_path / f"{seed}-{kind}.db", "nd-z", ManualClock())
    try:
        await store.merge_remote([], [CollectionDef("c", kind, "global")])  # type: ignore[arg-type]
        rng = random.Random(seed)
        shuffled = ops + rng.sample(ops, len(ops) // 4)
        rng.shuffle(shuffled)
        await store.merge_remote([("c", op) for op in shuffled])
        assert store.state("c").value() == reference(kind, ops).value()
    finally:
        store.close()


async def test_node_local_api_and_its_rejections(tmp_path: Path) -> None:
    clock = ManualClock()
    store = NodeCollections(tmp_path / "state.db", "nd-a", clock)
    try:
        await store.merge_remote([], [CollectionDef("m", "map", "region"),
                                      CollectionDef("n", "counter", "global"),
                                      CollectionDef("s", "set", "node")])
        m, n, s = store.collection("m"), store.collection("n"), store.collection("s")
        await m.put("press/1", {"temp": 21.5, "ok": True})
        await m.put("press/2", [1, 2])
        await m.put("valve/1", "open")
        assert m.get("press/1") == {"temp": 21.5, "ok": True}
        assert [k for k, _ in m.items("press/")] == ["press/1", "press/2"]
        assert await m.update("count", lambda old: (old or 0) + 1) == 1
        assert await m.update("count", lambda old: (old or 0) + 1) == 2
        await m.delete("valve/1")
        assert m.get("valve/1", "gone") == "gone"
        await n.incr(5)
        await n.decr(2)
        assert n.value() == 3
        await s.add("a")
        await s.add("b")
        await s.remove("a")
        assert s.value() == {"b"} and s.contains("b") and not s.contains("a")
        pending = store.pending_count()
        assert pending == 11  # every acknowledged write waits for sync

        with pytest.raises(NotFoundError, match="not defined on this node"):
            store.collection("nope")
        with pytest.raises(ConfigError, match="is a counter, not a map"):
            await n.put("k", 1)
        with pytest.raises(ProtocolError, match="exceeds"):
            await m.put("big", b"x" * 300_000)
        with pytest.raises(ConfigError, match="cannot be stored"):
            await m.put("obj", object())
        assert store.pending_count() == pending  # refused writes changed nothing
        assert m.get("big") is None
    finally:
        store.close()

    # Everything acknowledged is on disk: a new process (here: a new store) sees it.
    reopened = NodeCollections(tmp_path / "state.db", "nd-a", clock)
    try:
        assert reopened.collection("m").get("count") == 2
        assert reopened.collection("n").value() == 3
        assert reopened.pending_count() == 11
        # The HLC never goes back across restarts.
        assert reopened.hlc.last >= store.hlc.last
    finally:
        reopened.close()


async def test_a_cancelled_write_never_breaks_the_writer(tmp_path: Path) -> None:
    import asyncio
    import contextlib
    import threading

    from fogline.node.sqlite_writer import GroupCommitWriter

    writer = GroupCommitWriter(tmp_path / "w.db")
    try:
        gate = threading.Event()
        await writer.submit(lambda c: c.execute("CREATE TABLE t (x INTEGER)"))
        blocker = asyncio.ensure_future(writer.submit(lambda c: gate.wait(5)))
        await asyncio.sleep(0.05)  # the writer is busy with the blocker
        queued = asyncio.ensure_future(writer.submit(
            lambda c: c.execute("INSERT INTO t VALUES (1)")))
        await asyncio.sleep(0.01)
        queued.cancel()
        # Let the cancellation reach the writer's queue entry before it is unblocked.
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        gate.set()
        await blocker
        # The writer thread survived and the cancelled write was never done.
        await writer.submit(lambda c: c.execute("INSERT INTO t VALUES (2)"))
        rows = writer.read(lambda c: c.execute("SELECT x FROM t").fetchall())
        assert rows == [(2,)]
    finally:
        writer.close()
