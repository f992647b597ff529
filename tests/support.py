"""Test wiring: router, prefill and decode cores in one process (they take their collaborators as
protocols), with the KV moving through the real chunk plan, wire codec and receiver in memory."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from prfaas.kv.layout import KvLayout
from prfaas.kv.pool import LayerKv
from prfaas.messages import PrefillJob
from prfaas.transport.chunks import pieces_of, plan_total_chunks, split_piece, tokens_per_chunk
from prfaas.transport.receiver import KvReceiver
from prfaas.transport.wire import encode_chunk, encode_first_token, parse_chunk
from services.decode.core import DecodeNode
from services.prefill.core import PrefillNode
from services.router.core import Node

MAX_CHUNK = 64 * 1024


@dataclass(frozen=True)
class PushStats:
    bytes: int
    chunks: int
    seconds: float


class MemoryPush:
    """KvPush straight into a decode node's receiver, through the real chunk plan and codec."""

    def __init__(self, receiver: KvReceiver, job: PrefillJob, layout: KvLayout, stall: bool = False) -> None:
        self.receiver, self.job, self.layout, self.stall = receiver, job, layout, stall
        self.total = plan_total_chunks(layout, len(job.prompt), job.skip_tokens, MAX_CHUNK)
        self.seq = self.bytes = 0

    async def push_layer(self, lk: LayerKv) -> None:
        for piece in pieces_of(self.layout, lk, len(self.job.prompt)):
            spec = self.layout.spec(piece.layer, piece.kind)
            if spec.paged and piece.token_start < self.job.skip_tokens:
                raise AssertionError(f"piece from {piece.token_start} below skip_tokens {self.job.skip_tokens}")
            tpc = tokens_per_chunk(spec, MAX_CHUNK)
            if spec.paged and (piece.token_start - self.job.skip_tokens) % tpc:
                raise AssertionError(f"piece from {piece.token_start} off the chunk grid")
            parts = split_piece(piece, tpc, self.job.skip_tokens) if spec.paged else [piece]
            for part in parts:
                self.bytes += part.tensor.numel() * part.tensor.element_size()
                self._deliver(encode_chunk(self.job.transfer_id, self.seq, self.total, part))

    def _deliver(self, data: bytes) -> None:
        self.seq += 1
        if not self.stall:
            self.receiver.on_chunk(parse_chunk(data))

    async def finish(self, first_token: int) -> PushStats:
        if self.stall:
            await asyncio.sleep(3600)  # a link that never delivers
        self._deliver(encode_first_token(self.job.transfer_id, self.seq, self.total, first_token))
        return PushStats(self.bytes, self.seq, 0.0)

    async def abort(self) -> None:
        pass


class Directory:
    degraded = False

    def __init__(self, nodes: list[Node]) -> None:
        self._nodes = nodes

    async def nodes(self) -> list[Node]:
        return self._nodes

    async def hits(self, token_ids: list[int]) -> dict[str, int]:
        return {}


class MemoryClients:
    def __init__(self, decode: DecodeNode, prefill: dict[str, PrefillNode]) -> None:
        self.decode, self.prefill_nodes = decode, prefill

    def admit(self, address, request_id, prompt, params, timeout_s, wire_dtypes=(), **_):  # type: ignore[no-untyped-def]
        return self.decode.admit(request_id, prompt, params, timeout_s, wire_dtypes)

    def prefill(self, address, job, **_):  # type: ignore[no-untyped-def]
        return self.prefill_nodes[address].prefill(job)


@dataclass
class Streamed:
    """What a client saw of one Router.Generate call."""

    tokens: list[int]
    head: object | None  # the first GenerateResponse
    code: str  # "OK" or the status code's name
    details: str = ""
    trailing: dict[str, str] | None = None
    first_at: float = 0.0  # seconds from the call to the first message
    done_at: float = 0.0


async def stream(address: str, timeout_s: float = 120.0, watch: list[Streamed] | None = None,
                 **request: object) -> Streamed:
    """One Generate call; never raises for a status (it is in the result). With `watch`, its
    result is appended there at once and fills as the tokens come (a test can act mid-stream)."""
    import time

    import grpc

    from prfaas.rpc import channel as rpc_channel
    from prfaas.v1 import router_pb2, router_pb2_grpc

    t0 = time.monotonic()
    out = Streamed([], None, "OK")
    if watch is not None:
        watch.append(out)
    async with rpc_channel(address) as ch:
        call = router_pb2_grpc.RouterStub(ch).Generate(router_pb2.GenerateRequest(**request), timeout=timeout_s)
        try:
            async for msg in call:
                if out.head is None:
                    out.head, out.first_at = msg, time.monotonic() - t0
                out.tokens += list(msg.token_ids)
        except grpc.aio.AioRpcError as e:
            out.code, out.details = e.code().name, e.details() or ""
            out.trailing = {k: v for k, v in (e.trailing_metadata() or ())}
    out.done_at = time.monotonic() - t0
    return out


def tls_as(name: str, kind: str = ""):  # type: ignore[no-untyped-def]
    """A TLS configuration of the session's development PKI (tests/conftest.py) for `name`
    (kind: `name` itself for the services' and tools' names, else a worker)."""
    import os

    from prfaas.security import tls

    if os.environ.get("PRFAAS_INSECURE", "").lower() in ("1", "true", "yes", "on"):
        return tls.TlsConfig(insecure=True)
    kind = kind or (name if name in ("router", "cachepool", "frontdoor", "admin", "client") else "worker")
    return tls.resolve(tls_dir=os.environ["PRFAAS_TLS_DIR"], name=name, kind=kind)
