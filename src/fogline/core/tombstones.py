"""When a tombstone may go: the garbage-collection rule for deletes, sans IO.

A tombstone (a deleted map entry, a removed set tag) exists to defeat older writes
that have not arrived yet. It may be dropped once no such write can still arrive:

- every node in the replica's scope (offline ones included, revoked ones excluded) has
  reported a moment when it had nothing left to upload, together with its HLC at that
  moment (`clean_hlc_ms`): every op it made up to that HLC has reached the hub's
  stream, and every later op carries a larger timestamp;
- the hub has merged everything in its stream (no backlog).

Then any tombstone whose timestamp is below the smallest of those marks (the horizon)
has already defeated every older write there will ever be, at the hub and, through the
ordered fan-out, at every node. The hub drops such tombstones and tells each replica's
nodes the horizon, so they drop theirs.
"""

from __future__ import annotations

from collections.abc import Iterable


def gc_horizon_ms(clean_marks_ms: Iterable[int], merge_backlog: int) -> int | None:
    """The timestamp below which tombstones of one replica may be dropped, or None.

    `clean_marks_ms` has one entry per node in scope; 0 means the node never reported
    a clean upload, which blocks collection.
    """
    marks = list(clean_marks_ms)
    if merge_backlog > 0 or not marks or min(marks) <= 0:
        return None
    return min(marks)


def marks_in_scope(replica: str, marks: Iterable[tuple[str, str, int]]) -> list[int]:
    """The clean marks of the nodes holding `replica`, from (node id, region, mark)."""
    scope, _, name = replica.partition(".")
    if scope == "global":
        return [mark for _, _, mark in marks]
    if scope == "region":
        return [mark for _, region, mark in marks if (region or "none") == name]
    return [mark for node_id, _, mark in marks if node_id == name]
