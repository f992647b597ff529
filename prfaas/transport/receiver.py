"""The decode side of the KV stream: a registry of expected transfers that verifies chunks and
writes them into the decode executor's pool (through a `KvSink`). Plain asyncio, no gRPC.

Rules:
  - `expect()` registers a transfer before any of its chunks may arrive; a chunk for an unknown,
    finished, failed or expired transfer is refused with NOT_FOUND.
  - Chunks arrive in any order and on any connection. A transfer completes when each full layer's
    tensors cover `[skip_tokens, prompt_tokens)` exactly once, each linear layer has its recurrent
    and conv state, the FIRST_TOKEN chunk is there, and the chunk count equals `total_chunks`.
  - The first error fails the transfer for good: `sink.release()` is called exactly once, the
    waiter gets the `TransferError`, the registry forgets the transfer. On success the sink is
    not released: its blocks now belong to the decode batch.
  - The deadline is a timer on the event loop (`loop.call_at`), cancelled when the transfer ends.
"""

from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, field
from typing import Protocol

import torch

from prfaas.kv.codec import (
    FULL_KINDS,
    WIRE_DTYPES,
    CodecError,
    KvKind,
    WireChunk,
    decode_chunk,
    kinds_of_layer,
)
from prfaas.kv.layout import KvLayout
from prfaas.transport.errors import TransferError

__all__ = ["KvSink", "KvReceiver", "Transfer", "TransferError", "MemorySink"]


class KvSink(Protocol):
    """Where a transfer's tensors go: the decode executor's blocks and state slot of one request.
    Tensors handed to `write_*` are only valid during the call (views of the received message):
    copy them. Calls happen on the event loop, one at a time."""

    def write_full(self, layer: int, kind: KvKind, token_start: int, token_end: int, tensor: torch.Tensor) -> None: ...

    def write_linear(self, layer: int, kind: KvKind, tensor: torch.Tensor) -> None: ...

    def release(self) -> None:
        """The transfer failed, timed out or was cancelled: free what was reserved for it."""


class MemorySink:
    """A sink that keeps copies of everything (tests and benchmarks)."""

    def __init__(self) -> None:
        self.full: dict[tuple[int, KvKind, int], torch.Tensor] = {}
        self.linear: dict[tuple[int, KvKind], torch.Tensor] = {}
        self.released = False

    def write_full(self, layer: int, kind: KvKind, token_start: int, token_end: int, tensor: torch.Tensor) -> None:
        self.full[(layer, kind, token_start)] = tensor.clone()

    def write_linear(self, layer: int, kind: KvKind, tensor: torch.Tensor) -> None:
        self.linear[(layer, kind)] = tensor.clone()

    def release(self) -> None:
        self.released = True

    def assembled(self, layer: int, kind: KvKind) -> torch.Tensor:
        """One full-attention tensor, its chunks concatenated in token order."""
        parts = sorted((start, t) for (lay, k, start), t in self.full.items() if lay == layer and k == kind)
        return torch.cat([t for _, t in parts])


@dataclass
class Transfer:
    transfer_id: str
    layout: KvLayout
    prompt_tokens: int
    skip_tokens: int
    sink: KvSink
    wire_dtype: str
    future: asyncio.Future[int]
    total_chunks: int | None = None
    chunks: int = 0
    bytes: int = 0
    first_token: int | None = None
    seqs: set[int] = field(default_factory=set)
    ranges: dict[tuple[int, KvKind], list[tuple[int, int]]] = field(default_factory=dict)
    covered: dict[tuple[int, KvKind], int] = field(default_factory=dict)
    states: set[tuple[int, KvKind]] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None
    _registry: KvReceiver | None = field(default=None, repr=False)

    async def wait(self) -> int:
        """The first token once every chunk arrived and verified; raises `TransferError`.
        Cancelling the waiter cancels the transfer (and releases the sink)."""
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            if self._registry is not None and not self.future.done():
                self._registry.cancel(self.transfer_id)
            raise

    @property
    def done(self) -> bool:
        return self.future.done()

    def _complete(self) -> bool:
        if self.first_token is None:
            return False
        want = self.prompt_tokens - self.skip_tokens
        for layer in range(self.layout.config.num_layers):
            for kind in kinds_of_layer(self.layout, layer):
                if kind in FULL_KINDS:
                    if want and self.covered.get((layer, kind), 0) != want:
                        return False
                elif (layer, kind) not in self.states:
                    return False
        return True


class KvReceiver:
    """The registry of expected transfers on one decode node."""

    def __init__(self) -> None:
        self._transfers: dict[str, Transfer] = {}

    def __len__(self) -> int:
        return len(self._transfers)

    def __contains__(self, transfer_id: str) -> bool:
        return transfer_id in self._transfers

    def expect(
        self,
        transfer_id: str,
        layout: KvLayout,
        prompt_tokens: int,
        skip_tokens: int,
        sink: KvSink,
        deadline_s: float,
        wire_dtype: str = "",
    ) -> Transfer:
        if transfer_id in self._transfers:
            raise TransferError("ALREADY_EXISTS", f"transfer {transfer_id} is already expected")
        if not 0 <= skip_tokens <= prompt_tokens or prompt_tokens <= 0:
            raise TransferError("INVALID_ARGUMENT", f"bad token range [{skip_tokens}, {prompt_tokens})")
        if wire_dtype not in WIRE_DTYPES:
            raise TransferError("INVALID_ARGUMENT", f"unknown wire dtype {wire_dtype!r}")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        t = Transfer(transfer_id, layout, prompt_tokens, skip_tokens, sink, wire_dtype, fut, _registry=self)
        t.timer = loop.call_later(deadline_s, self._expire, transfer_id)
        self._transfers[transfer_id] = t
        return t

    def cancel(self, transfer_id: str, reason: str = "cancelled by the decode side") -> bool:
        t = self._transfers.get(transfer_id)
        if t is None:
            return False
        self._fail(t, TransferError("CANCELLED", reason))
        return True

    def on_chunk(self, chunk: WireChunk) -> int:
        """Validates one chunk and writes it into its transfer's sink; returns the payload bytes.
        Raises `TransferError`; any error but NOT_FOUND fails the transfer."""
        t = self._transfers.get(chunk.transfer_id)
        if t is None:
            raise TransferError("NOT_FOUND", f"transfer {chunk.transfer_id!r} is unknown, finished or expired")
        try:
            self._accept(t, chunk)
        except CodecError as e:
            err = TransferError(e.code, f"transfer {t.transfer_id}: {e}")  # type: ignore[arg-type]
            raise self._fail(t, err) from None
        except TransferError as e:
            raise self._fail(t, e) from None
        except Exception as e:  # a sink that refuses (e.g. out of its blocks)
            raise self._fail(t, TransferError("INTERNAL", f"transfer {t.transfer_id}: {e!r}")) from e
        if t._complete():
            if t.chunks != t.total_chunks:
                raise self._fail(
                    t,
                    TransferError(
                        "INVALID_ARGUMENT",
                        f"transfer {t.transfer_id}: complete after {t.chunks} of {t.total_chunks} chunks",
                    ),
                )
            self._finish(t)
            t.future.set_result(t.first_token)  # type: ignore[arg-type]
        elif t.chunks == t.total_chunks:
            raise self._fail(
                t,
                TransferError(
                    "INVALID_ARGUMENT", f"transfer {t.transfer_id}: all {t.chunks} chunks arrived but KV is missing"
                ),
            )
        return chunk.nbytes

    # --- internals ----------------------------------------------------------------------------
    def _accept(self, t: Transfer, chunk: WireChunk) -> None:
        tid = t.transfer_id
        if t.total_chunks is None:
            t.total_chunks = chunk.total_chunks
        elif chunk.total_chunks != t.total_chunks:
            raise TransferError(
                "INVALID_ARGUMENT", f"transfer {tid}: total_chunks {chunk.total_chunks} != {t.total_chunks}"
            )
        if chunk.seq >= chunk.total_chunks:
            raise TransferError(
                "INVALID_ARGUMENT", f"transfer {tid}: seq {chunk.seq} >= total_chunks {chunk.total_chunks}"
            )
        if chunk.seq in t.seqs:
            raise TransferError("ALREADY_EXISTS", f"transfer {tid}: duplicate seq {chunk.seq}")
        if chunk.kind == KvKind.FIRST_TOKEN:
            if t.first_token is not None:
                raise TransferError("ALREADY_EXISTS", f"transfer {tid}: second FIRST_TOKEN")
            t.first_token = chunk.first_token
        else:
            piece = decode_chunk(chunk, t.layout, t.wire_dtype)
            key = (piece.layer, piece.kind)
            if piece.kind in FULL_KINDS:
                self._claim_range(t, key, piece.token_start, piece.token_end)
                t.sink.write_full(piece.layer, piece.kind, piece.token_start, piece.token_end, piece.tensor)
            else:
                if key in t.states:
                    raise TransferError(
                        "ALREADY_EXISTS", f"transfer {tid}: second {piece.kind.name} for layer {piece.layer}"
                    )
                t.states.add(key)
                t.sink.write_linear(piece.layer, piece.kind, piece.tensor)
        t.seqs.add(chunk.seq)
        t.chunks += 1
        t.bytes += chunk.nbytes

    @staticmethod
    def _claim_range(t: Transfer, key: tuple[int, KvKind], start: int, end: int) -> None:
        if start < t.skip_tokens or end > t.prompt_tokens:
            raise TransferError(
                "INVALID_ARGUMENT",
                f"transfer {t.transfer_id}: tokens [{start}, {end}) outside [{t.skip_tokens}, {t.prompt_tokens})",
            )
        ranges = t.ranges.setdefault(key, [])
        i = bisect.bisect_left(ranges, (start, end))
        if (i > 0 and ranges[i - 1][1] > start) or (i < len(ranges) and ranges[i][0] < end):
            raise TransferError(
                "ALREADY_EXISTS",
                f"transfer {t.transfer_id}: layer {key[0]} {key[1].name} tokens [{start}, {end}) overlap",
            )
        ranges.insert(i, (start, end))
        t.covered[key] = t.covered.get(key, 0) + end - start

    def _finish(self, t: Transfer) -> None:
        if t.timer is not None:
            t.timer.cancel()
        self._transfers.pop(t.transfer_id, None)

    def _fail(self, t: Transfer, error: TransferError) -> TransferError:
        if t.future.done():
            return error
        self._finish(t)
        try:
            t.sink.release()
        finally:
            t.future.set_exception(error)
        return error

    def _expire(self, transfer_id: str) -> None:
        t = self._transfers.get(transfer_id)
        if t is not None:
            self._fail(
                t,
                TransferError(
                    "DEADLINE_EXCEEDED", f"transfer {transfer_id}: {t.chunks} chunks arrived before the deadline"
                ),
            )
