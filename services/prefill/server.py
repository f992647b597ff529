"""The Prefill servicer, and the adapter from the executor's LayerKv to the KV sender."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import grpc
from structlog.contextvars import bind_contextvars

from prfaas.engine import executor as names
from prfaas.engine.executor import LayerKv
from prfaas.kv.codec import KvKind, KvPiece
from prfaas.kv.layout import KvLayout
from prfaas.transport.sender import KvChannels, KvSender
from prfaas.v1 import prefill_pb2, prefill_pb2_grpc
from services.common.convert import sampling_from_pb
from services.common.errors import grpc_errors
from services.prefill.core import Done, PrefillJob, PrefillNode

KINDS = {
    names.FULL_K: KvKind.FULL_K,
    names.FULL_V: KvKind.FULL_V,
    names.FULL_LATENT: KvKind.FULL_LATENT,
    names.LINEAR_RECURRENT: KvKind.LINEAR_RECURRENT,
    names.LINEAR_CONV: KvKind.LINEAR_CONV,
}


class SenderPush:
    """`KvPush` over the transport's KvSender: one piece per tensor of each finished layer."""

    def __init__(self, sender: KvSender) -> None:
        self.sender = sender

    async def push_layer(self, layer_kv: LayerKv) -> None:
        for name, t in layer_kv.tensors.items():
            await self.sender.push(KvPiece(layer_kv.layer, KINDS[name], layer_kv.token_start, layer_kv.token_end, t))

    async def finish(self, first_token: int) -> dict[str, float]:
        stats = await self.sender.finish(first_token)
        return {"bytes": stats.bytes, "chunks": stats.chunks, "seconds": stats.seconds}

    async def abort(self) -> None:
        await self.sender.abort()


def sender_factory(layout: KvLayout, channels: KvChannels):  # type: ignore[no-untyped-def]
    """Senders share the node's channels: N TCP connections per decode node, kept warm."""

    def make(job: PrefillJob) -> SenderPush:
        timeout = max(1.0, job.deadline_unix_s - time.time()) if job.deadline_unix_s else None
        return SenderPush(
            KvSender(
                job.decode_address,
                job.transfer_id,
                layout,
                prompt_tokens=len(job.prompt),
                num_connections=channels.num_connections,
                wire_dtype=job.wire_dtype,
                timeout_s=timeout,
                channels=channels,
            )
        )

    return make


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, node: PrefillNode) -> None:
        self.node = node

    async def Prefill(  # noqa: N802 - gRPC method name
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prefill_pb2.PrefillEvent]:
        bind_contextvars(request_id=request.request_id, transfer_id=request.transfer_id)
        async with grpc_errors(context):
            job = PrefillJob(
                request.request_id,
                request.transfer_id,
                list(request.token_ids),
                sampling_from_pb(request.sampling),
                request.decode_address,
                request.num_connections,
                request.wire_dtype,
                request.deadline_unix_s,
            )
            async with contextlib.aclosing(self.node.prefill(job)) as stream:
                async for ev in stream:
                    if isinstance(ev, Done):
                        yield prefill_pb2.PrefillEvent(
                            done=prefill_pb2.PrefillDone(
                                first_token=ev.first_token,
                                kv_bytes=ev.kv_bytes,
                                prefill_s=ev.prefill_s,
                                transfer_s=ev.transfer_s,
                                chunks=ev.chunks,
                            )
                        )
                    else:
                        yield prefill_pb2.PrefillEvent(
                            started=prefill_pb2.PrefillStarted(node_id=ev.node_id, queue_wait_ms=ev.queue_wait_ms)
                        )
