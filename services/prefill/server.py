"""The Prefill servicer: request message in, the core's events out."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from structlog.contextvars import bind_contextvars

from prfaas.messages import Done, PrefillJob, PrefixMoved, Progress, Sampled
from prfaas.rpc.convert import logprob_to_pb, sampling_from_pb
from prfaas.rpc.status import grpc_errors
from prfaas.v1 import prefill_pb2, prefill_pb2_grpc

from .core import PrefillNode
from .moves import PrefixGone, PrefixMover


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, node: PrefillNode, mover: PrefixMover | None = None,
                 check_destination: Callable[[PrefillJob], Awaitable[None]] | None = None,
                 check_member: Callable[[str, str, str], Awaitable[None]] | None = None) -> None:
        self.node, self.mover = node, mover
        self.check_destination = check_destination  # a prefill node pushes KV only to members
        self.check_member = check_member  # and a prefix move only to a member node

    def _mover(self) -> PrefixMover:
        if self.mover is None:
            raise PrefixGone(f"node {self.node.node_id} keeps no prefix cache: nothing to move")
        return self.mover

    async def ImportPrefix(  # noqa: N802 - gRPC method name
        self, request: prefill_pb2.ImportPrefixRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prefill_pb2.ImportPrefixEvent]:
        bind_contextvars(request_id=request.request_id)
        async with grpc_errors(context):
            stream = self._mover().import_(request.request_id, list(request.token_ids), request.hit_tokens,
                                           request.transfer_timeout_s or 30.0, holder=request.holder_node)
            async with contextlib.aclosing(stream):
                async for ev in stream:
                    if isinstance(ev, PrefixMoved):
                        done = prefill_pb2.PrefixImported(tokens=ev.tokens, kv_bytes=ev.kv_bytes)
                        yield prefill_pb2.ImportPrefixEvent(imported=done)
                    else:
                        r = prefill_pb2.PrefixReserved(transfer_id=ev.transfer_id, kv_address=ev.kv_address)
                        yield prefill_pb2.ImportPrefixEvent(reserved=r)

    async def ExportPrefix(  # noqa: N802 - gRPC method name
        self, request: prefill_pb2.ExportPrefixRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.ExportPrefixDone:
        bind_contextvars(request_id=request.request_id, transfer_id=request.transfer_id)
        async with grpc_errors(context):
            mover = self._mover()
            if self.check_member is not None:  # KV goes only to a registered member (no request forgery)
                await self.check_member(request.dest_node, request.dest_address, f"prefix for {request.request_id}")
            st = await mover.export(request.request_id, list(request.token_ids), request.hit_tokens,
                                    request.transfer_id, request.dest_address, request.num_connections,
                                    request.deadline_unix_s, dest_node=request.dest_node)
            return prefill_pb2.ExportPrefixDone(tokens=st.tokens, kv_bytes=st.kv_bytes, transfer_s=st.seconds)
        raise AssertionError("unreachable")  # grpc_errors aborts the call

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
                request.skip_tokens,
                request.decode_node,
                request.forced_first_token if request.HasField("forced_first_token") else None,
            )
            if self.check_destination is not None:
                await self.check_destination(job)  # NotPermitted: PERMISSION_DENIED, before any work
            async with contextlib.aclosing(self.node.prefill(job)) as stream:
                async for ev in stream:
                    if isinstance(ev, Progress):
                        progress = prefill_pb2.PrefillProgress(tokens_done=ev.tokens_done, layers_done=ev.layers_done,
                                                               queued=ev.queued)
                        yield prefill_pb2.PrefillEvent(progress=progress)
                    elif isinstance(ev, Done):
                        done = prefill_pb2.PrefillDone(first_token=ev.first_token, kv_bytes=ev.kv_bytes,
                                                       prefill_s=ev.prefill_s, transfer_s=ev.transfer_s,
                                                       chunks=ev.chunks, drain_s=ev.drain_s)
                        if ev.first_logprob is not None:
                            done.first_logprob.CopyFrom(logprob_to_pb(ev.first_logprob))
                        yield prefill_pb2.PrefillEvent(done=done)
                    elif isinstance(ev, Sampled):
                        sampled = prefill_pb2.PrefillSampled(token_id=ev.token_id, finish_reason=ev.finish_reason or "")
                        if ev.logprob is not None:
                            sampled.logprob.CopyFrom(logprob_to_pb(ev.logprob))
                        yield prefill_pb2.PrefillEvent(sampled=sampled)
                    else:
                        started = prefill_pb2.PrefillStarted(node_id=ev.node_id, queue_wait_ms=ev.queue_wait_ms)
                        yield prefill_pb2.PrefillEvent(started=started)
