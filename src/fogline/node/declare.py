"""Ask the hub to create the collections an app declares.

The hub drops uploaded ops of collections it does not know, so the agent declares an
app's collections (request/reply on the node's own `fl.node.<id>.declare`) before its
ops are uploaded. Until the hub answers, the app keeps writing locally: the node defines
the collections itself with `NodeCollections.define_local`.
"""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NatsClient

from fogline.core.sync import (
    CollectionDef,
    DeclareCollections,
    DeclareResult,
    declare_subject,
    decode_sync,
    encode_sync,
)
from fogline.errors import ProtocolError, RetryableError


async def declare_collections(nc: NatsClient, node_id: str, defs: list[CollectionDef],
                              timeout_s: float = 5.0) -> DeclareResult:
    """The hub's answer to declaring `defs`. Raises RetryableError if the hub cannot be
    reached or does not answer in `timeout_s`; a refusal (conflict, invalid definition)
    is an answer, in `DeclareResult.errors`, and retrying it cannot help."""
    request = encode_sync(DeclareCollections(defs=list(defs)))
    try:
        reply = await nc.request(declare_subject(node_id), request, timeout=timeout_s)
    except nats.errors.NoRespondersError as exc:
        raise RetryableError("no hub is answering collection declarations") from exc
    except (nats.errors.Error, TimeoutError) as exc:  # nats' TimeoutError is asyncio's too
        raise RetryableError(f"collection declaration got no answer: "
                             f"{type(exc).__name__} {exc}".strip(),
                             delay_s=timeout_s) from exc
    result = decode_sync(reply.data)
    if not isinstance(result, DeclareResult):
        raise ProtocolError(f"declaration answered with {type(result).__name__}")
    return result
