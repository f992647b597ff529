"""The Decode servicer: Admit (reserve, then stream tokens) and PushKv (the KV stream, delegated
to the transport's gRPC plane)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from structlog.contextvars import bind_contextvars

from prfaas.messages import Alive, Reserved, TokenBatch
from prfaas.rpc.convert import logprob_to_pb, sampling_from_pb
from prfaas.rpc.status import grpc_errors
from prfaas.transport.grpc_push import PushKvServicer
from prfaas.v1 import decode_pb2, decode_pb2_grpc

from .core import DecodeNode


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, node: DecodeNode) -> None:
        self.node = node
        self.push = PushKvServicer(node.receiver)

    async def Admit(  # noqa: N802 - gRPC method name
        self, request: decode_pb2.AdmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.AdmitEvent]:
        bind_contextvars(request_id=request.request_id)  # every log line of this call carries it
        async with grpc_errors(context):
            stream = self.node.admit(
                request.request_id,
                list(request.token_ids),
                sampling_from_pb(request.sampling),
                request.transfer_timeout_s,
                tuple(request.accept_wire_dtypes),
                prefill_node=request.prefill_node,
            )
            async with contextlib.aclosing(stream):
                async for ev in stream:
                    if isinstance(ev, Reserved):
                        bind_contextvars(transfer_id=ev.transfer_id)
                        yield decode_pb2.AdmitEvent(
                            reserved=decode_pb2.Reserved(
                                transfer_id=ev.transfer_id,
                                node_id=ev.node_id,
                                wire_dtype=ev.wire_dtype,
                                kv_address=ev.kv_address,
                                skip_tokens=ev.skip_tokens,
                            )
                        )
                    elif isinstance(ev, TokenBatch):
                        tokens = decode_pb2.Tokens(
                            token_ids=ev.token_ids,
                            finish_reason=ev.finish_reason or "",
                            logprobs=[logprob_to_pb(lp) for lp in ev.logprobs],
                        )
                        yield decode_pb2.AdmitEvent(tokens=tokens)
                    elif isinstance(ev, Alive):
                        yield decode_pb2.AdmitEvent(alive=decode_pb2.Alive(kv_pending=ev.kv_pending))
