"""Desired state and bundles on their way to nodes.

Each node's DesiredState lives in the JetStream KV bucket `fl-desired` under the node's
id; its generation is the KV revision of that write, so it grows with every change and
every hub process agrees on it. After a write the hub publishes the state on the node's
`fl.cmd.<id>.desired`; a node that was away asks on `fl.node.<id>.desired` when it
reconnects. Bundles sit in the Object Store `fl-artifacts` and reach nodes in chunks
over `fl.node.<id>.artifact`, and only those in that node's desired state: nodes hold no
JetStream API permissions on the hub's buckets.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msgspec
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from fogline.errors import ProtocolError
from fogline.protocol import (
    ARTIFACT_BUCKET,
    ARTIFACT_CHUNK_BYTES,
    ARTIFACT_WILDCARD,
    DESIRED_BUCKET,
    DESIRED_GET_WILDCARD,
    HUB_QUEUE_GROUP,
    ArtifactChunk,
    ArtifactRequest,
    DesiredApp,
    DesiredRequest,
    DesiredState,
    PublisherKey,
    SiteSetting,
    StreamSetting,
    decode,
    desired_notify_subject,
    encode,
    node_id_from_subject,
)

log = logging.getLogger("fogline.hub.desired")

BUNDLE_CACHE_BYTES = 256 * 1024 * 1024
PUT_CONCURRENCY = 64


def bundle_name(digest: str) -> str:
    """Object names allow no ':'; `sha256:<hex>` becomes `sha256-<hex>`."""
    return digest.replace(":", "-")


class DesiredPublisher:
    def __init__(self, nc: NatsClient, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js
        self.kv: KeyValue | None = None
        self.objects: ObjectStore | None = None
        # What this hub last wrote per node: (apps, keys, streams, sites, generation).
        self._written: dict[str, tuple[Any, ...]] = {}
        self._bundles: OrderedDict[str, bytes] = OrderedDict()
        self._bundle_bytes = 0

    async def open(self) -> None:
        self.kv = await self.js.create_key_value(bucket=DESIRED_BUCKET, history=1)
        self.objects = await self.js.create_object_store(bucket=ARTIFACT_BUCKET)
        await self.nc.subscribe(DESIRED_GET_WILDCARD, queue=HUB_QUEUE_GROUP,
                                cb=self._on_desired_get)
        await self.nc.subscribe(ARTIFACT_WILDCARD, queue=HUB_QUEUE_GROUP,
                                cb=self._on_artifact)

    # Bundles ------------------------------------------------------------------------

    async def store_bundle(self, digest: str, data: bytes) -> None:
        assert self.objects is not None
        await self.objects.put(bundle_name(digest), data)
        self._remember(digest, data)

    def _remember(self, digest: str, data: bytes) -> None:
        if digest in self._bundles:
            self._bundles.move_to_end(digest)
            return
        self._bundles[digest] = data
        self._bundle_bytes += len(data)
        while self._bundle_bytes > BUNDLE_CACHE_BYTES and len(self._bundles) > 1:
            _, dropped = self._bundles.popitem(last=False)
            self._bundle_bytes -= len(dropped)

    async def bundle(self, digest: str) -> bytes:
        data = self._bundles.get(digest)
        if data is None:
            assert self.objects is not None
            result = await self.objects.get(bundle_name(digest))
            data = result.data or b""
            self._remember(digest, data)
        return data

    # Desired state ------------------------------------------------------------------

    async def current(self, node_id: str) -> DesiredState:
        assert self.kv is not None
        try:
            entry = await self.kv.get(node_id)
        except nats.js.errors.KeyNotFoundError:
            return DesiredState(node_id=node_id, generation=0)
        state = decode(entry.value or b"")
        if not isinstance(state, DesiredState):
            raise ProtocolError(f"fl-desired/{node_id} holds a {type(state).__name__}")
        return msgspec.structs.replace(state, generation=entry.revision or 0)

    async def publish(self, desired: Mapping[str, tuple[DesiredApp, ...]],
                      keys: tuple[PublisherKey, ...],
                      streams: tuple[StreamSetting, ...] = (),
                      sites: Mapping[str, tuple[SiteSetting, ...]] | None = None) -> int:
        """Write and announce the desired state of every node in `desired` whose apps,
        keys, streams or sites differ from what this hub last wrote; the number written.
        `sites` is per node (placement picks them); a node missing from it has none."""
        changed = []
        for node_id, apps in desired.items():
            # A node without apps needs no keys: registering a key rewrites only the
            # nodes it matters to, and a node never given anything is never written.
            node_sites = sites.get(node_id, ()) if sites else ()
            wanted = (apps, keys if apps else (), streams, node_sites)
            if self._written.get(node_id, ((), (), (), (), 0))[:4] != wanted:
                changed.append((node_id, wanted))
        semaphore = asyncio.Semaphore(PUT_CONCURRENCY)

        async def write(node_id: str, wanted: tuple[Any, ...]) -> None:
            apps, node_keys, node_streams, node_sites = wanted
            async with semaphore:
                assert self.kv is not None
                state = DesiredState(node_id=node_id, generation=0, apps=apps,
                                     keys=node_keys, streams=node_streams, sites=node_sites)
                generation = await self.kv.put(node_id, encode(state))
                self._written[node_id] = (apps, node_keys, node_streams, node_sites,
                                          generation)
                await self.nc.publish(desired_notify_subject(node_id), encode(
                    msgspec.structs.replace(state, generation=generation)))

        await asyncio.gather(*(write(node_id, wanted) for node_id, wanted in changed))
        return len(changed)

    async def load_written(self, node_ids: list[str]) -> None:
        """Learn what is stored for these nodes (after a hub restart), so an unchanged
        desired state is not written again."""
        for node_id in node_ids:
            if node_id in self._written:
                continue
            state = await self.current(node_id)
            if state.generation:
                self._written[node_id] = (state.apps, state.keys, state.streams,
                                          state.sites, state.generation)

    # Node requests ------------------------------------------------------------------

    async def _on_desired_get(self, msg: Msg) -> None:
        try:
            node_id = node_id_from_subject(msg.subject)
            if not isinstance(decode(msg.data), DesiredRequest):
                raise ProtocolError("expected a desired-state request")
            state = await self.current(node_id)
        except ProtocolError as exc:
            log.warning("desired-state request on %s refused: %s", msg.subject, exc)
            return
        await msg.respond(encode(state))

    async def _on_artifact(self, msg: Msg) -> None:
        try:
            node_id = node_id_from_subject(msg.subject)
            request = decode(msg.data)
            if not isinstance(request, ArtifactRequest):
                raise ProtocolError("expected an artifact request")
        except ProtocolError as exc:
            log.warning("artifact request on %s refused: %s", msg.subject, exc)
            return
        await msg.respond(encode(await self._chunk(node_id, request)))

    async def _chunk(self, node_id: str, request: ArtifactRequest) -> ArtifactChunk:
        written = self._written.get(node_id)
        digests = {app.digest for app in written[0]} if written else set()
        if request.digest not in digests:  # another hub process may have written it
            digests = {app.digest for app in (await self.current(node_id)).apps}
        if request.digest not in digests:
            return ArtifactChunk(request.digest, request.offset, 0,
                                 error="not in this node's desired state")
        try:
            data = await self.bundle(request.digest)
        except nats.js.errors.NotFoundError:
            return ArtifactChunk(request.digest, request.offset, 0, error="no such bundle")
        if not 0 <= request.offset <= len(data):
            return ArtifactChunk(request.digest, request.offset, len(data),
                                 error="offset out of range")
        return ArtifactChunk(request.digest, request.offset, len(data),
                             data[request.offset:request.offset + ARTIFACT_CHUNK_BYTES])
