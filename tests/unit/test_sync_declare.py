"""Collection declarations from nodes: messages and the plan, definition by definition."""

from __future__ import annotations

import msgspec
import pytest

from fogline.core.sync import (
    DECLARE_DEFS_MAX,
    CollectionDef,
    DeclareCollections,
    DeclareResult,
    check_declaration,
    declare_subject,
    decode_sync,
    encode_sync,
)
from fogline.errors import ProtocolError
from fogline.protocol import node_id_from_subject

KNOWN = {"counts": CollectionDef("counts", "counter", "region"),
         "seen": CollectionDef("seen", "set", "global")}


def test_messages_round_trip_and_subject_names_the_node() -> None:
    request = DeclareCollections(defs=[CollectionDef("counts", "counter", "region")])
    assert decode_sync(encode_sync(request)) == request
    result = DeclareResult(created=["a"], existing=["b"], errors=["c"])
    assert decode_sync(encode_sync(result)) == result
    assert decode_sync(encode_sync(DeclareResult())) == DeclareResult([], [], [])
    assert declare_subject("nd-1") == "fl.node.nd-1.declare"
    assert node_id_from_subject(declare_subject("nd-1")) == "nd-1"


@pytest.mark.parametrize("data", [
    b"garbage",
    msgspec.msgpack.encode({"type": "decl", "defs": [["x", "tree", "global"]]}),
    msgspec.msgpack.encode({"type": "decl", "defs": [["x", "map", "planet"]]}),
    msgspec.msgpack.encode({"type": "decl"}),
])
def test_malformed_declarations_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        decode_sync(data)


def test_plan_creates_missing_and_reports_existing() -> None:
    defs = [CollectionDef("counts", "counter", "region"), CollectionDef("orders", "map", "node"),
            CollectionDef("orders", "map", "node")]  # a repeat that agrees is harmless
    create, existing, errors = check_declaration(defs, KNOWN)
    assert create == [CollectionDef("orders", "map", "node")]
    assert existing == ["counts"]
    assert errors == []


def test_plan_refuses_conflicts_and_invalid_names_and_keeps_the_rest() -> None:
    create, existing, errors = check_declaration([
        CollectionDef("counts", "map", "region"), CollectionDef("Bad Name", "map", "global"),
        CollectionDef("twice", "map", "node"), CollectionDef("twice", "set", "node"),
        CollectionDef("twice", "map", "node"), CollectionDef("fine", "map", "node"),
        CollectionDef("seen", "set", "global")], KNOWN)
    assert create == [CollectionDef("fine", "map", "node")]
    assert existing == ["seen"]
    assert len(errors) == 3
    assert "invalid collection name 'Bad Name'" in errors[0]
    assert "'twice' is declared both as map/node and as set/node" in errors[1]
    assert "'counts' exists as counter/region, not map/region" in errors[2]


def test_plan_limits_the_size_of_a_declaration() -> None:
    defs = [CollectionDef(f"c{i}", "map", "node") for i in range(DECLARE_DEFS_MAX + 1)]
    create, _, errors = check_declaration(defs, {})
    assert not create and "at most" in errors[0]


def test_refused_collections_are_those_neither_created_nor_existing_with_their_error() -> None:
    from fogline.core.sync import CollectionDef, refused_collections

    declared = [CollectionDef("a", "map", "node"), CollectionDef("b", "set", "global"),
                CollectionDef("c", "counter", "region")]
    result = DeclareResult(created=["a"], existing=[],
                           errors=["collection 'b' exists as map/global, not set/global"])
    assert refused_collections(declared, result) == {
        "b": "collection 'b' exists as map/global, not set/global", "c": "refused"}
    assert refused_collections(declared, DeclareResult(created=["a", "b"],
                                                       existing=["c"])) == {}
