"""Fleet-wide cache purges at the hub: issue, broadcast, catch-up, acknowledgements.

A purge is recorded first (the database gives it its number), then published once on
`fl.purge`, which every node subscribes to: one message reaches the whole fleet as fast
as NATS fans it out. Nodes apply purges in order and ask `fl.node.<id>.purges` for the
ones they missed (a gap in the numbers, a reconnect, a restart, or a periodic check),
so a lost broadcast costs latency, never a purge. Acknowledgements (`fl.node.<id>.purged`)
are batched into the database for `fogline get purges`.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter

from fogline.clock import Clock
from fogline.core.purge import check_purge
from fogline.errors import ProtocolError
from fogline.hub.purge_store import Ack, PurgeStore
from fogline.protocol import (
    HUB_QUEUE_GROUP,
    PURGE_SUBJECT,
    PURGED_WILDCARD,
    PURGES_GET_WILDCARD,
    Purge,
    PurgeAck,
    PurgesRequest,
    decode,
    encode,
    node_id_from_subject,
)

log = logging.getLogger("fogline.hub.purges")

ACK_FLUSH_S = 0.2


class PurgeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.issued = Counter("fogline_hub_purges_issued_total", "Cache purges issued",
                              ["kind"], registry=registry)
        self.catch_ups = Counter("fogline_hub_purge_catch_ups_total",
                                 "Purge log requests answered for nodes", registry=registry)
        self.acks = Counter("fogline_hub_purge_acks_total",
                            "Purge acknowledgements received from nodes", registry=registry)


class HubPurges:
    def __init__(self, store: PurgeStore, nc: NatsClient, clock: Clock,
                 metrics: PurgeMetrics) -> None:
        self.store = store
        self.nc = nc
        self.clock = clock
        self.metrics = metrics
        self._acks: list[Ack] = []
        self._acks_waiting = asyncio.Event()

    async def issue(self, kind: str, values: list[str], region: str, site: str,
                    actor: str, reason: str) -> tuple[Purge, int]:
        """Validate, record and broadcast a purge; returns it and its target count."""
        checked_kind, checked = check_purge(kind, values, region, site)
        purge, targets = await asyncio.to_thread(
            self.store.issue, checked_kind, checked, region, site, actor, reason,
            self.clock.now())
        await self.nc.publish(PURGE_SUBJECT, encode(purge))
        await self.nc.flush()
        self.metrics.issued.labels(kind=checked_kind).inc()
        log.info("purge %d by %s: %s %s%s to %d nodes", purge.seq, actor, kind,
                 ", ".join(checked), f" in {region}" if region else "", targets)
        return purge, targets

    async def run(self) -> None:
        """Answer catch-up requests and collect acknowledgements until cancelled."""
        await self.nc.subscribe(PURGES_GET_WILDCARD, queue=HUB_QUEUE_GROUP,
                                cb=self._on_request)
        await self.nc.subscribe(PURGED_WILDCARD, queue=HUB_QUEUE_GROUP, cb=self._on_ack,
                                pending_msgs_limit=500_000)
        while True:
            await self._acks_waiting.wait()
            await self.clock.sleep(ACK_FLUSH_S)  # let one broadcast's acks gather
            self._acks_waiting.clear()
            batch, self._acks = self._acks, []
            try:
                await asyncio.to_thread(self.store.record_acks, batch)
            except Exception:
                log.exception("purge acknowledgements not recorded")

    async def _on_request(self, msg: Msg) -> None:
        try:
            request = decode(msg.data)
            if not isinstance(request, PurgesRequest) or request.after < 0:
                raise ProtocolError("not a purge log request")
        except ProtocolError as exc:
            log.warning("purge request on %s refused: %s", msg.subject, exc)
            return
        reply = await asyncio.to_thread(self.store.log_after, request.after)
        self.metrics.catch_ups.inc()
        await msg.respond(encode(reply))

    async def _on_ack(self, msg: Msg) -> None:
        try:
            node_id = node_id_from_subject(msg.subject)
            ack = decode(msg.data)
            if not isinstance(ack, PurgeAck) or ack.seq <= 0:
                raise ProtocolError("not a purge acknowledgement")
        except ProtocolError as exc:
            log.warning("purge ack on %s refused: %s", msg.subject, exc)
            return
        self.metrics.acks.inc()
        self._acks.append(Ack(node_id, ack.seq, ack.applied_at_s, ack.removed))
        self._acks_waiting.set()
