"""SQL for cache purges: the numbered log nodes catch up from, and who applied what.

The database numbers purges (one sequence for the fleet), so several hub processes can
issue them. A purge's targets are the nodes of its region (or every node) when it was
issued; a target has applied it once its `purge_seq` reached the purge's number, which
nodes report by acknowledgement and in every heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from fogline.errors import NotFoundError
from fogline.hub.store import events, nodes, purge_acks, purges
from fogline.protocol import PURGES_PER_REPLY_MAX, Purge, PurgeLog

# Purges kept for catching up; a node further behind empties its caches instead.
PURGES_KEPT = 10_000
# Purges whose per-node acknowledgements are kept (for latency and status).
ACKED_PURGES_KEPT = 500


@dataclass(frozen=True)
class Ack:
    node_id: str
    seq: int
    applied_at_s: float
    removed: int


def _purge_of(row: Any) -> Purge:
    return Purge(seq=row["seq"], kind=row["kind"], values=tuple(row["purge_values"]),
                 issued_at_s=row["issued_at_s"], region=row["region"], site=row["site"])


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class PurgeStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def issue(self, kind: str, values: tuple[str, ...], region: str, site: str,
              actor: str, reason: str, now_s: float) -> tuple[Purge, int]:
        """Record a purge and its audit event; returns it and how many nodes it targets."""
        with self.engine.begin() as conn:
            query = sa.select(nodes.c.id).where(nodes.c.status != "revoked")
            if region:
                query = query.where(nodes.c.region == region)
            targets = sorted(conn.execute(query).scalars())
            seq = conn.execute(purges.insert().values(
                kind=kind, purge_values=list(values), region=region, site=site,
                issued_at_s=now_s, actor=actor, reason=reason, targets=targets,
            )).inserted_primary_key[0]
            conn.execute(events.insert().values(
                at_s=now_s, actor=actor, kind="cache.purge", subject=f"purge/{seq}",
                detail={"kind": kind, "values": list(values), "region": region,
                        "site": site, "targets": len(targets), "reason": reason}))
            self._prune(conn, seq)
        purge = Purge(seq=seq, kind=kind, values=values, issued_at_s=now_s, region=region,
                      site=site)
        return purge, len(targets)

    def _prune(self, conn: Connection, seq: int) -> None:
        if seq % 100:  # now and then is enough
            return
        conn.execute(purges.delete().where(purges.c.seq <= seq - PURGES_KEPT))
        conn.execute(purge_acks.delete().where(purge_acks.c.seq <= seq - ACKED_PURGES_KEPT))

    def last_seq(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.max(purges.c.seq))).scalar() or 0

    def log_after(self, after: int) -> PurgeLog:
        """What a node that applied everything up to `after` must apply next."""
        with self.engine.connect() as conn:
            last, first = conn.execute(
                sa.select(sa.func.max(purges.c.seq), sa.func.min(purges.c.seq))).one()
            last = last or 0
            if after >= last:
                return PurgeLog(purges=(), last_seq=last)
            # A node that never counted purges may hold anything; one whose next purge
            # is no longer kept cannot replay it. Both start over from an empty cache.
            if after == 0 or (first or 0) > after + 1:
                return PurgeLog(purges=(), last_seq=last, reset=True)
            rows = conn.execute(purges.select().where(purges.c.seq > after)
                                .order_by(purges.c.seq).limit(PURGES_PER_REPLY_MAX)).mappings()
            found = tuple(_purge_of(row) for row in rows)
        return PurgeLog(purges=found, last_seq=last, more=found[-1].seq < last)

    def record_acks(self, acks: list[Ack]) -> None:
        if not acks:
            return
        newest: dict[str, int] = {}
        for ack in acks:
            newest[ack.node_id] = max(newest.get(ack.node_id, 0), ack.seq)
        with self.engine.begin() as conn:
            known = set(conn.execute(sa.select(purges.c.seq).where(
                purges.c.seq.in_({a.seq for a in acks}))).scalars())
            present = set(conn.execute(sa.select(nodes.c.id).where(
                nodes.c.id.in_(newest))).scalars())
            rows = {(a.seq, a.node_id): {"seq": a.seq, "node_id": a.node_id,
                                         "applied_at_s": a.applied_at_s, "removed": a.removed}
                    for a in acks if a.seq in known and a.node_id in present}
            existing = set(conn.execute(sa.select(purge_acks.c.seq, purge_acks.c.node_id)
                                        .where(purge_acks.c.seq.in_(known))).tuples())
            fresh = [row for key, row in rows.items() if key not in existing]
            if fresh:
                conn.execute(purge_acks.insert(), fresh)
            conn.execute(
                nodes.update().where(nodes.c.id == sa.bindparam("b_id"),
                                     nodes.c.purge_seq < sa.bindparam("b_seq"))
                .values(purge_seq=sa.bindparam("b_seq")),
                [{"b_id": node_id, "b_seq": seq} for node_id, seq in newest.items()
                 if node_id in present])

    # Status -------------------------------------------------------------------------

    def _applied(self, conn: Connection) -> dict[str, tuple[int, str, str, str]]:
        rows = conn.execute(sa.select(nodes.c.id, nodes.c.purge_seq, nodes.c.name,
                                      nodes.c.region, nodes.c.status))
        return {r.id: (r.purge_seq, r.name, r.region, r.status) for r in rows}

    def summaries(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest purges, each with how many targets applied it and how fast."""
        with self.engine.connect() as conn:
            rows = list(conn.execute(purges.select().order_by(purges.c.seq.desc())
                                     .limit(limit)).mappings())
            applied = self._applied(conn)
            latencies: dict[int, list[float]] = {}
            if rows:
                acks = conn.execute(
                    sa.select(purge_acks.c.seq, purge_acks.c.applied_at_s).where(
                        purge_acks.c.seq.in_([r["seq"] for r in rows])))
                issued = {r["seq"]: r["issued_at_s"] for r in rows}
                for seq, at_s in acks:
                    latencies.setdefault(seq, []).append((at_s - issued[seq]) * 1000)
        return [self._summary(row, applied, latencies.get(row["seq"], [])) for row in rows]

    @staticmethod
    def _summary(row: Any, applied: dict[str, tuple[int, str, str, str]],
                 latencies_ms: list[float]) -> dict[str, Any]:
        targets = [t for t in row["targets"] if t in applied]
        done = sum(1 for t in targets if applied[t][0] >= row["seq"])
        return {
            "seq": row["seq"], "kind": row["kind"], "values": row["purge_values"],
            "region": row["region"], "site": row["site"], "issued_at_s": row["issued_at_s"],
            "actor": row["actor"], "reason": row["reason"], "targets": len(targets),
            "applied": done, "pending": len(targets) - done,
            "latency_ms": {"p50": _percentile(latencies_ms, 0.5),
                           "p99": _percentile(latencies_ms, 0.99),
                           "max": max(latencies_ms, default=None),
                           "acks": len(latencies_ms)},
        }

    def status(self, seq: int) -> dict[str, Any]:
        """One purge, with every target node's state."""
        with self.engine.connect() as conn:
            row = conn.execute(purges.select().where(purges.c.seq == seq)).mappings().first()
            if row is None:
                raise NotFoundError(f"no purge {seq} (kept: the last {PURGES_KEPT})")
            applied = self._applied(conn)
            acks = {node_id: (at_s, removed) for node_id, at_s, removed in conn.execute(
                sa.select(purge_acks.c.node_id, purge_acks.c.applied_at_s,
                          purge_acks.c.removed).where(purge_acks.c.seq == seq))}
        summary = self._summary(row, applied, [(at - row["issued_at_s"]) * 1000
                                               for at, _ in acks.values()])
        summary["nodes"] = [{
            "node_id": node_id, "node": applied[node_id][1], "region": applied[node_id][2],
            "status": applied[node_id][3], "applied": applied[node_id][0] >= seq,
            "applied_at_s": acks[node_id][0] if node_id in acks else None,
            "latency_ms": (acks[node_id][0] - row["issued_at_s"]) * 1000
            if node_id in acks else None,
            "removed": acks[node_id][1] if node_id in acks else None,
        } for node_id in row["targets"] if node_id in applied]
        return summary
