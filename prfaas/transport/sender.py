"""The prefill side of the KV stream: cuts each finished layer into chunks and stripes them over
N connections to the decode node (raw-TCP frames, or `Decode.PushKv` gRPC streams).

    sender = KvSender(address, transfer_id, layout, prompt_tokens=n, skip_tokens=cached)
    for layer_kv in each_finished_layer:     # as each layer (of each prompt chunk) finishes
        await sender.push_layer(layer_kv)    # waits only while every connection's queue is full
    stats = await sender.finish(first_token)

What travels follows the chunk plan (`chunks.py`): paged tensors as their tokens are computed, cut
on a grid of `tokens_per_chunk` tokens counted from `skip_tokens` (so a piece must start on that
grid: whole-range pieces always do); states once, as they stand at the end of the prompt. The
receiver's verdict comes back as a `TransferError` (raised by `push_layer` or `finish`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prfaas.errors import Code
from prfaas.kv.layout import KvLayout
from prfaas.kv.pool import LayerKv
from prfaas.messages import PrefillJob
from prfaas.transport.chunks import (
    DEFAULT_MAX_CHUNK_BYTES,
    WIRE_EXACT,
    KvPiece,
    pieces_of,
    plan_total_chunks,
    split_piece,
    tokens_per_chunk,
)
from prfaas.transport.codec import is_valid
from prfaas.transport.errors import TransferError
from prfaas.transport.grpc_push import GrpcPushCall, KvChannels
from prfaas.transport.stats import GLOBAL, LinkStats
from prfaas.transport.tcp import TcpPushCall, is_tcp
from prfaas.transport.wire import encode_chunk_parts, encode_first_token

DEFAULT_CONNECTIONS = 4     # chosen by bench/transport_link.py: >= 0.97 of a shaped link (docs/transport.md)
DEFAULT_QUEUE_CHUNKS = 4    # per connection: what `push` may run ahead of the network


class PushCall(Protocol):
    """One transfer's share of chunks on one connection: `TcpPushCall` or `GrpcPushCall`."""

    link: str

    async def write(self, parts: list[bytes | memoryview]) -> None: ...

    async def finish(self) -> int:
        """Ends the share; the bytes the receiver acknowledged. Raises `TransferError`."""
        ...

    def cancel(self) -> None: ...

    async def error(self, cause: BaseException) -> TransferError:
        """Why the call failed, in the receiver's words where it gave any."""
        ...


@dataclass(frozen=True)
class TransferStats:
    bytes: int            # payload bytes (plus scales) pushed
    wire_bytes: int       # serialized message bytes
    chunks: int
    seconds: float        # first push to the last ack
    connections: int

    @property
    def goodput(self) -> float:
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class _Connection:
    def __init__(self, call: PushCall, queue_chunks: int) -> None:
        self.call = call
        # a chunk's buffers and size, or None: the end of this connection's share
        self.queue: asyncio.Queue[tuple[list[bytes | memoryview], int] | None] = asyncio.Queue(queue_chunks)
        self.queued_bytes = 0
        self.drained = False   # the writer took the end-of-stream sentinel
        self.task: asyncio.Task[int | None] | None = None


class KvSender:
    def __init__(
        self,
        address: str | Sequence[str],
        transfer_id: str,
        layout: KvLayout,
        *,
        prompt_tokens: int,
        skip_tokens: int = 0,
        num_connections: int = DEFAULT_CONNECTIONS,
        wire_dtype: str = WIRE_EXACT,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        queue_chunks: int = DEFAULT_QUEUE_CHUNKS,
        timeout_s: float | None = None,
        channels: KvChannels | None = None,
        stats: LinkStats | None = GLOBAL,
        peer: str = "",
    ) -> None:
        """`peer`: the decode node's id, which its certificate must name (mutual TLS); empty: the
        host of the address."""
        if not is_valid(wire_dtype):
            raise ValueError(f"unknown wire dtype {wire_dtype!r}")
        self.addresses = [address] if isinstance(address, str) else list(address)
        self.transfer_id, self.layout = transfer_id, layout
        self.prompt_tokens, self.skip_tokens = prompt_tokens, skip_tokens
        self.num_connections = num_connections
        self.wire_dtype, self.max_chunk_bytes = wire_dtype, max_chunk_bytes
        self.queue_chunks, self.timeout_s = queue_chunks, timeout_s
        self.total_chunks = plan_total_chunks(layout, prompt_tokens, skip_tokens, max_chunk_bytes)
        self._own_channels = channels is None
        self._channels = channels or KvChannels(num_connections)
        self._stats = stats
        self.peer = peer
        self._conns: list[_Connection] = []
        self._seq = 0
        self._bytes = self._wire_bytes = 0
        self._error: TransferError | None = None
        self._closed = False
        self._t0 = 0.0

    @classmethod
    def for_job(cls, job: PrefillJob, layout: KvLayout, channels: KvChannels) -> KvSender:
        """A prefill job's sender; senders of one node share its channels (N connections per
        decode node, kept warm). The job's deadline bounds every network wait."""
        timeout = max(1.0, job.deadline_unix_s - time.time()) if job.deadline_unix_s else None
        return cls(job.decode_address, job.transfer_id, layout, prompt_tokens=len(job.prompt),
                   skip_tokens=job.skip_tokens, num_connections=job.num_connections or channels.num_connections,
                   wire_dtype=job.wire_dtype,
                   timeout_s=timeout, channels=channels, peer=job.decode_node)

    async def __aenter__(self) -> KvSender:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is not None or not self._closed:
            await self.abort()

    # --- the caller's side ------------------------------------------------------------------------
    async def push_layer(self, layer_kv: LayerKv) -> None:
        """Queues what of one layer's freshly computed KV travels (see the module docstring)."""
        for piece in pieces_of(self.layout, layer_kv, self.prompt_tokens):
            await self.push(piece)

    async def push(self, piece: KvPiece) -> None:
        """Encodes one tensor and queues its chunks; returns once they are queued."""
        try:
            await self._push(piece)
        except TransferError:
            await self.abort()
            raise

    async def _push(self, piece: KvPiece) -> None:
        self._check()
        self._start()
        spec = self.layout.spec(piece.layer, piece.kind)
        parts, wire = [piece], WIRE_EXACT  # states travel whole and exact
        if spec.paged:
            tpc, wire = tokens_per_chunk(spec, self.max_chunk_bytes), self.wire_dtype
            if (piece.token_start - self.skip_tokens) % tpc:
                raise ValueError(f"piece starts at token {piece.token_start}, off the {tpc}-token chunk grid")
            parts = split_piece(piece, tpc, self.skip_tokens)
        for part in parts:
            if self._seq >= self.total_chunks - 1:
                raise ValueError(f"more chunks than planned ({self.total_chunks}): a piece was pushed twice?")
            buffers = encode_chunk_parts(self.transfer_id, self._seq, self.total_chunks, part, wire)
            self._seq += 1
            self._bytes += part.tensor.numel() * part.tensor.element_size()
            await self._enqueue(buffers)

    async def finish(self, first_token: int) -> TransferStats:
        """Sends the first token, closes the streams and waits for every acknowledgement."""
        try:
            return await self._finish(first_token)
        except TransferError:
            await self.abort()
            raise

    async def _finish(self, first_token: int) -> TransferStats:
        self._check()
        self._start()
        if self._seq != self.total_chunks - 1:
            await self.abort()
            raise ValueError(f"finish after {self._seq} chunks, {self.total_chunks - 1} planned")
        await self._enqueue([encode_first_token(self.transfer_id, self._seq, self.total_chunks, first_token)])
        self._seq += 1
        for c in self._conns:
            await c.queue.put(None)
        acks = await asyncio.gather(*(c.task for c in self._conns if c.task is not None))
        if self._error is not None:
            raise self._error
        seconds = time.perf_counter() - self._t0
        await self._close()
        for c, acked in zip(self._conns, acks, strict=True):
            if self._stats is not None and acked is not None:
                self._stats.record_acked(c.call.link, acked)
        if self._stats is not None:
            self._stats.record_transfer(self.addresses[0], ok=True)
        return TransferStats(self._bytes, self._wire_bytes, self._seq, seconds, len(self._conns))

    async def abort(self) -> None:
        """Cancels every stream and closes owned channels. The decode side drops the transfer when
        its connection breaks (TCP), when the router cancels its Admit, or at the deadline."""
        if self._closed:
            return
        for c in self._conns:
            c.call.cancel()
            if c.task is not None:
                c.task.cancel()
        await asyncio.gather(*(c.task for c in self._conns if c.task is not None), return_exceptions=True)
        if self._stats is not None and self._conns:
            self._stats.record_transfer(self.addresses[0], ok=False)
        await self._close()

    # --- internals ----------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise TransferError(Code.CANCELLED, f"transfer {self.transfer_id} is closed")

    def _start(self) -> None:
        if self._conns:
            return
        self._t0 = time.perf_counter()
        for i in range(self.num_connections):
            address = self.addresses[i % len(self.addresses)]
            if is_tcp(address):  # the raw-TCP data plane (prfaas/transport/tcp.py)
                call: PushCall = TcpPushCall(address, self.timeout_s, self._stats, expect=self.peer)
            else:
                channel = self._channels.get(address, self.peer)[i % self._channels.num_connections]
                call = GrpcPushCall(channel, address, self.timeout_s)
            conn = _Connection(call, self.queue_chunks)
            conn.task = asyncio.create_task(self._write(conn))
            self._conns.append(conn)

    async def _enqueue(self, parts: list[bytes | memoryview]) -> None:
        size = sum(len(p) for p in parts)
        conn = min(self._conns, key=lambda c: c.queued_bytes)
        conn.queued_bytes += size
        self._wire_bytes += size
        await conn.queue.put((parts, size))
        self._check()

    async def _write(self, conn: _Connection) -> int | None:
        try:
            while (item := await conn.queue.get()) is not None:
                parts, size = item
                await conn.call.write(parts)
                conn.queued_bytes -= size
                if self._stats is not None:
                    self._stats.record_sent(conn.call.link, size)
            conn.drained = True
            return await conn.call.finish()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # abort() stops this writer
                raise
            # the call ended under the writer: report the receiver's status when it gave one
            cause = TransferError(Code.CANCELLED, f"transfer {self.transfer_id}: stream cancelled")
            await self._fail(conn, self._error or await conn.call.error(cause))
            return None
        except Exception as e:
            await self._fail(conn, await conn.call.error(e))
            return None

    async def _fail(self, conn: _Connection, error: TransferError) -> None:
        if self._error is None:
            self._error = error
            for c in self._conns:  # the transfer is lost: stop the other streams too
                c.call.cancel()
        while not conn.drained:  # unblock a `push` waiting on this queue, up to `finish`'s sentinel
            conn.drained = await conn.queue.get() is None

    async def _close(self) -> None:
        self._closed = True
        if self._own_channels:
            await self._channels.close()
