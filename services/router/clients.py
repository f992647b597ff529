"""gRPC clients the router core is handed: Decode.Admit and Prefill.Prefill as async
iterators of domain events. One channel per node address, reused."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc

from prfaas.errors import RemoteError
from prfaas.messages import (
    Alive,
    Done,
    PrefillJob,
    PrefixMoved,
    PrefixReserved,
    Progress,
    Reserved,
    Sampled,
    SamplingParams,
    Started,
    TokenBatch,
)
from prfaas.rpc import channel
from prfaas.rpc.convert import logprob_from_pb, sampling_to_pb
from prfaas.rpc.status import code_of
from prfaas.v1 import decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc


class GrpcNodeClients:
    def __init__(self) -> None:
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def _channel(self, address: str, node_id: str = "") -> grpc.aio.Channel:
        """The channel to a node, which must present the certificate of `node_id`."""
        ch = self._channels.get((address, node_id))
        if ch is None:
            ch = self._channels[(address, node_id)] = channel(address, expect=node_id)
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def admit(
        self, address: str, request_id: str, prompt: list[int], params: SamplingParams, timeout_s: float,
        wire_dtypes: tuple[str, ...] = (),
        node_id: str = "", prefill_node: str = "",
    ) -> AsyncGenerator[Reserved | TokenBatch | Alive, None]:
        stub = decode_pb2_grpc.DecodeStub(self._channel(address, node_id))
        call = stub.Admit(
            decode_pb2.AdmitRequest(
                request_id=request_id,
                sampling=sampling_to_pb(params),
                transfer_timeout_s=timeout_s,
                token_ids=prompt,
                accept_wire_dtypes=list(wire_dtypes),
                prefill_node=prefill_node,  # the only identity the decode node takes this KV from
            )
        )
        try:
            async for ev in call:
                which = ev.WhichOneof("event")
                if which == "reserved":
                    r = ev.reserved
                    yield Reserved(r.transfer_id, r.node_id, r.wire_dtype, r.kv_address, r.skip_tokens)
                elif which == "tokens":
                    t = ev.tokens
                    logprobs = [logprob_from_pb(x) for x in t.logprobs]
                    yield TokenBatch(list(t.token_ids), t.finish_reason or None, logprobs)
                else:
                    yield Alive(ev.alive.kv_pending)
        except grpc.aio.AioRpcError as e:
            raise RemoteError(code_of(e.code()), e.details() or "") from e
        finally:
            call.cancel()

    async def prefill(self, address: str, job: PrefillJob,
                      node_id: str = "") -> AsyncGenerator[Started | Progress | Sampled | Done, None]:
        stub = prefill_pb2_grpc.PrefillStub(self._channel(address, node_id))
        call = stub.Prefill(
            prefill_pb2.PrefillRequest(
                request_id=job.request_id,
                transfer_id=job.transfer_id,
                token_ids=job.prompt,
                sampling=sampling_to_pb(job.params),
                decode_address=job.decode_address,
                num_connections=job.num_connections,
                wire_dtype=job.wire_dtype,
                deadline_unix_s=job.deadline_unix_s,
                skip_tokens=job.skip_tokens,
                decode_node=job.decode_node,
                forced_first_token=job.forced_first_token,
            )
        )
        try:
            async for ev in call:
                which = ev.WhichOneof("event")
                if which == "started":
                    yield Started(ev.started.node_id, ev.started.queue_wait_ms)
                elif which == "progress":
                    p = ev.progress
                    yield Progress(p.tokens_done, p.layers_done, p.queued)
                elif which == "sampled":
                    sm = ev.sampled
                    lp = logprob_from_pb(sm.logprob) if sm.HasField("logprob") else None
                    yield Sampled(sm.token_id, sm.finish_reason or None, lp)
                else:
                    d = ev.done
                    first_lp = logprob_from_pb(d.first_logprob) if d.HasField("first_logprob") else None
                    yield Done(d.first_token, d.kv_bytes, d.prefill_s, d.transfer_s, d.chunks, first_lp, d.drain_s)
        except grpc.aio.AioRpcError as e:
            raise RemoteError(code_of(e.code()), e.details() or "") from e
        finally:
            call.cancel()

    # --- cross-cluster prefix moves -------------------------------------------------------------
    async def import_prefix(
        self, address: str, request_id: str, prompt: list[int], hit: int, timeout_s: float,
        node_id: str = "", holder_node: str = "",
    ) -> AsyncGenerator[PrefixReserved | PrefixMoved, None]:
        """`node_id`: the importer's (its certificate must name it); `holder_node`: the only node it
        may take the prefix's KV from."""
        stub = prefill_pb2_grpc.PrefillStub(self._channel(address, node_id))
        call = stub.ImportPrefix(prefill_pb2.ImportPrefixRequest(
            request_id=request_id, token_ids=prompt, hit_tokens=hit, transfer_timeout_s=timeout_s,
            holder_node=holder_node))
        try:
            async for ev in call:
                if ev.WhichOneof("event") == "reserved":
                    yield PrefixReserved(ev.reserved.transfer_id, ev.reserved.kv_address)
                else:
                    yield PrefixMoved(ev.imported.tokens, ev.imported.kv_bytes)
        except grpc.aio.AioRpcError as e:
            raise RemoteError(code_of(e.code()), e.details() or "") from e
        finally:
            call.cancel()

    async def export_prefix(self, address: str, request_id: str, prompt: list[int], hit: int, transfer_id: str,
                            dest: str, deadline_unix_s: float, node_id: str = "", dest_node: str = "") -> PrefixMoved:
        """`node_id`: the holder's; `dest_node`: the importer's, a member the holder checks."""
        stub = prefill_pb2_grpc.PrefillStub(self._channel(address, node_id))
        try:
            r = await stub.ExportPrefix(prefill_pb2.ExportPrefixRequest(
                request_id=request_id, token_ids=prompt, hit_tokens=hit, transfer_id=transfer_id,
                dest_address=dest, deadline_unix_s=deadline_unix_s, dest_node=dest_node))
        except grpc.aio.AioRpcError as e:
            raise RemoteError(code_of(e.code()), e.details() or "") from e
        return PrefixMoved(r.tokens, r.kv_bytes, r.transfer_s)
