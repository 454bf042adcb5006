"""What the node asks the hub for deployments: its desired state and the bundles in it.

Both are request/reply on the node's own subjects. A bundle travels in chunks of
`ARTIFACT_CHUNK_BYTES`, asked for one offset after another until the hub's `total`;
the whole bundle is held in memory, so it is capped at the bundle limit (64 MiB). The
caller checks the bytes (digest, signature) before anything is written.

Errors: the hub away or slow is a `RetryableError`; a malformed reply a `ProtocolError`;
a bundle the hub refuses to serve, or one that cannot be the desired one (another size,
too large), an `ArtifactRefused` with a short code, reported with the node's refusals.
"""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NatsClient

from fogline.errors import ProtocolError, RetryableError, TerminalError
from fogline.protocol import (
    ARTIFACT_CHUNK_BYTES,
    ArtifactChunk,
    ArtifactRequest,
    DesiredApp,
    DesiredRequest,
    DesiredState,
    Message,
    artifact_subject,
    decode,
    desired_get_subject,
    encode,
)

REQUEST_TIMEOUT_S = 5.0


class ArtifactRefused(TerminalError):
    """The hub will not serve a bundle, or serves one that cannot be the desired one.
    `reason` is a short code: `hub-refused`, `size-mismatch` or `too-large`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def _request(nc: NatsClient, subject: str, payload: bytes, what: str,
                   timeout_s: float) -> Message:
    try:
        reply = await nc.request(subject, payload, timeout=timeout_s)
    except nats.errors.NoRespondersError as exc:
        raise RetryableError(f"no hub is answering {what}") from exc
    except (nats.errors.Error, TimeoutError) as exc:  # nats' TimeoutError is asyncio's too
        raise RetryableError(f"{what} got no answer: {type(exc).__name__} {exc}".strip(),
                             delay_s=timeout_s) from exc
    return decode(reply.data)


async def get_desired(nc: NatsClient, node_id: str,
                      timeout_s: float = REQUEST_TIMEOUT_S) -> DesiredState:
    """The hub's current desired state for this node (generation 0 if it has none)."""
    message = await _request(nc, desired_get_subject(node_id), encode(DesiredRequest()),
                             "the desired state request", timeout_s)
    if not isinstance(message, DesiredState):
        raise ProtocolError(f"desired state request answered with {type(message).__name__}")
    if message.node_id != node_id:
        raise ProtocolError(f"desired state for {message.node_id!r} sent to {node_id!r}")
    return message


async def fetch_bundle(nc: NatsClient, node_id: str, app: DesiredApp,
                       timeout_s: float = REQUEST_TIMEOUT_S) -> bytes:
    """The bytes of `app`'s bundle, unchecked (the caller checks digest and signature).

    `timeout_s` bounds each chunk's request, not the whole transfer."""
    # fogline.bundle (and cryptography) load only on nodes that get deployments.
    from fogline.bundle import BUNDLE_BYTES_MAX

    if app.size > BUNDLE_BYTES_MAX:
        raise ArtifactRefused("too-large", f"bundle of {app.name} revision {app.revision} is "
                                           f"{app.size} bytes, more than {BUNDLE_BYTES_MAX}")
    if app.size < 0:
        raise ProtocolError(f"bundle of {app.name} has a negative size {app.size}")
    # Every chunk but the last is full, so the count is known: a hub sending less per
    # reply cannot keep the node looping.
    chunks_max = app.size // ARTIFACT_CHUNK_BYTES + 1
    data = bytearray()
    for _ in range(chunks_max):
        chunk = await _request(nc, artifact_subject(node_id),
                               encode(ArtifactRequest(app.digest, len(data))),
                               f"the bundle request of {app.name}", timeout_s)
        if not isinstance(chunk, ArtifactChunk):
            raise ProtocolError(f"bundle request answered with {type(chunk).__name__}")
        if chunk.error:
            raise ArtifactRefused("hub-refused", f"the hub refused bundle {app.digest} of "
                                                 f"{app.name}: {chunk.error[:200]}")
        if chunk.digest != app.digest or chunk.offset != len(data):
            raise ProtocolError(f"bundle chunk of {chunk.digest} at {chunk.offset} answered "
                                f"the request for {app.digest} at {len(data)}")
        if chunk.total != app.size:
            raise ArtifactRefused("size-mismatch", f"the hub serves {chunk.total} bytes for "
                                                   f"bundle {app.digest} of {app.name}, the "
                                                   f"desired state says {app.size}")
        if len(chunk.data) > ARTIFACT_CHUNK_BYTES \
                or len(data) + len(chunk.data) > app.size:
            raise ProtocolError(f"bundle chunk of {len(chunk.data)} bytes at {chunk.offset} "
                                f"is too long")
        data += chunk.data
        if len(data) == app.size:
            return bytes(data)
    raise ProtocolError(f"bundle {app.digest} of {app.name} did not complete in "
                        f"{chunks_max} chunks")
