"""The decode side of the KV stream: a registry of expected transfers that verifies chunks and
writes them into the decode executor's pool (through a `KvSink`). Plain asyncio, no gRPC.

Rules:
  - `expect()` registers a transfer before any of its chunks may arrive; a chunk for an unknown,
    finished, failed or expired transfer is refused with NOT_FOUND.
  - Chunks arrive in any order and on any connection. A transfer completes when every paged
    tensor of the layout covers `[skip_tokens, prompt_tokens)` exactly once, every state tensor
    has arrived once, the FIRST_TOKEN chunk is there, and the chunk count equals `total_chunks`.
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

from prfaas.errors import Code
from prfaas.kv.kinds import KvKind
from prfaas.kv.layout import KvLayout
from prfaas.obs.log import get_logger
from prfaas.transport.chunks import KvPiece
from prfaas.transport.codec import is_valid
from prfaas.transport.errors import TransferError
from prfaas.transport.limits import HEADER_SLACK
from prfaas.transport.parse import ChunkHeader
from prfaas.transport.wire import WireChunk, decode_chunk, expected_bulk_bytes

log = get_logger(__name__)

__all__ = ["KvSink", "KvReceiver", "Transfer", "TransferError", "MemorySink"]


class KvSink(Protocol):
    """Where a transfer's tensors go: the decode executor's blocks and state slot of one request.
    A piece's tensor is only valid during the call (a view of the received message): copy it.
    Calls happen on the event loop, one at a time."""

    def write(self, piece: KvPiece) -> None: ...

    def release(self) -> None:
        """The transfer failed, timed out or was cancelled: free what was reserved for it."""


class MemorySink:
    """A sink that keeps copies of everything (tests and benchmarks)."""

    def __init__(self) -> None:
        self.pieces: dict[tuple[int, KvKind, int], torch.Tensor] = {}
        self.released = False

    def write(self, piece: KvPiece) -> None:
        self.pieces[(piece.layer, piece.kind, piece.token_start)] = piece.tensor.clone()

    def release(self) -> None:
        self.released = True

    def assembled(self, layer: int, kind: KvKind) -> torch.Tensor:
        """One tensor: a state as it arrived, a paged tensor's chunks concatenated in token order."""
        parts = sorted((start, t) for (lay, k, start), t in self.pieces.items() if lay == layer and k == kind)
        return torch.cat([t for _, t in parts]) if len(parts) > 1 else parts[0][1]


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
    covered: dict[tuple[int, KvKind], int] = field(default_factory=dict)  # paged: tokens received
    states: set[tuple[int, KvKind]] = field(default_factory=set)  # states received
    timer: asyncio.TimerHandle | None = None
    sender: str | None = None  # the only peer identity (node id) its chunks may come from; None: unchecked
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
        for s in self.layout.specs:
            if s.paged:
                if want and self.covered.get((s.layer, s.kind), 0) != want:
                    return False
            elif (s.layer, s.kind) not in self.states:
                return False
        return True


def _chunk_count_bounds(t: Transfer) -> tuple[int, int]:
    """The fewest and most chunks a transfer can take, whatever the sender's chunk size: every
    state once, each paged tensor in one chunk or one per token, and the first token."""
    n = t.prompt_tokens - t.skip_tokens
    paged, states = len(t.layout.paged_specs), len(t.layout.state_specs)
    return 1 + states + (paged if n else 0), 1 + states + paged * n


class KvReceiver:
    """The registry of expected transfers on one decode node."""

    def __init__(self) -> None:
        self._transfers: dict[str, Transfer] = {}
        self.largest_piece_bytes = 0  # the largest whole state (or one token) of a layout expected so far

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
        sender: str | None = None,
    ) -> Transfer:
        if transfer_id in self._transfers:
            raise TransferError(Code.ALREADY_EXISTS, f"transfer {transfer_id} is already expected")
        if not 0 <= skip_tokens <= prompt_tokens or prompt_tokens <= 0:
            raise TransferError(Code.INVALID_ARGUMENT, f"bad token range [{skip_tokens}, {prompt_tokens})")
        if not is_valid(wire_dtype):
            raise TransferError(Code.INVALID_ARGUMENT, f"unknown wire dtype {wire_dtype!r}")
        self.largest_piece_bytes = max(self.largest_piece_bytes, *(s.nbytes for s in layout.specs))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        t = Transfer(transfer_id, layout, prompt_tokens, skip_tokens, sink, wire_dtype, fut, sender=sender,
                     _registry=self)
        t.timer = loop.call_later(deadline_s, self._expire, transfer_id)
        self._transfers[transfer_id] = t
        return t

    def cancel(self, transfer_id: str, reason: str = "cancelled by the decode side") -> bool:
        t = self._transfers.get(transfer_id)
        if t is None:
            return False
        self._fail(t, TransferError(Code.CANCELLED, reason))
        return True

    def on_chunk(self, chunk: WireChunk, peer: str | None = None) -> int:
        """Validates one chunk and writes it into its transfer's sink; returns the payload bytes.
        `peer`: the sender's verified node id (mutual TLS). Raises `TransferError`; any error but
        NOT_FOUND and PERMISSION_DENIED (a chunk from another peer: the transfer goes on) fails it."""
        t = self._transfers.get(chunk.transfer_id)
        if t is None:
            raise TransferError(Code.NOT_FOUND, f"transfer {chunk.transfer_id!r} is unknown, finished or expired")
        if t.sender is not None and peer != t.sender:
            log.warning("kv_from_the_wrong_peer", transfer_id=t.transfer_id, peer=peer, expected=t.sender)
            raise TransferError(Code.PERMISSION_DENIED, f"transfer {t.transfer_id} takes KV from {t.sender} only, "
                                f"not from {peer or 'an unidentified peer'}")
        try:
            self._accept(t, chunk)
        except TransferError as e:
            raise self._fail(t, TransferError(e.code, f"transfer {t.transfer_id}: {e.message}")) from None
        except Exception as e:  # a sink that refuses (e.g. out of its blocks)
            raise self._fail(t, TransferError(Code.INTERNAL, f"transfer {t.transfer_id}: {e!r}")) from e
        if t._complete():
            if t.chunks != t.total_chunks:
                raise self._fail(
                    t,
                    TransferError(
                        Code.INVALID_ARGUMENT,
                        f"transfer {t.transfer_id}: complete after {t.chunks} of {t.total_chunks} chunks",
                    ),
                )
            self._finish(t)
            t.future.set_result(t.first_token)  # type: ignore[arg-type]
        elif t.chunks == t.total_chunks:
            raise self._fail(
                t,
                TransferError(
                    Code.INVALID_ARGUMENT, f"transfer {t.transfer_id}: all {t.chunks} chunks arrived but KV is missing"
                ),
            )
        return chunk.nbytes

    def check_frame(self, header: ChunkHeader | WireChunk, frame_len: int) -> None:
        """Before a frame is allocated: its header names a live transfer, a chunk that transfer
        still needs, and `frame_len` is no more than that chunk can take. Raises `TransferError`
        (NOT_FOUND for an unknown transfer; any other error fails the transfer)."""
        if isinstance(header, WireChunk):
            c = header
            fields = (c.seq, c.layer, c.kind, c.token_start, c.token_end)
        else:
            fields = (header.int(2), header.int(4), header.int(5), header.int(6), header.int(7))
        t = self._transfers.get(header.transfer_id)
        if t is None:
            raise TransferError(Code.NOT_FOUND, f"transfer {header.transfer_id!r} is unknown, finished or expired")
        try:
            bound = self._frame_bound(t, *fields) + HEADER_SLACK
            if frame_len > bound:
                raise TransferError(
                    Code.INVALID_ARGUMENT, f"a frame of {frame_len} bytes for a chunk that takes at most {bound}"
                )
        except TransferError as e:
            raise self._fail(t, TransferError(e.code, f"transfer {t.transfer_id}: {e.message}")) from None

    @staticmethod
    def _frame_bound(t: Transfer, seq: int, layer: int, kind: int, start: int, end: int) -> int:
        if seq in t.seqs:
            raise TransferError(Code.ALREADY_EXISTS, f"duplicate seq {seq}")
        if kind == KvKind.FIRST_TOKEN:
            return 0
        bulk = expected_bulk_bytes(t.layout, layer, kind, start, end, t.wire_dtype)  # checks layer and kind
        if t.layout.spec(layer, kind).paged:
            if start < t.skip_tokens or end > t.prompt_tokens:
                raise TransferError(
                    Code.INVALID_ARGUMENT, f"tokens [{start}, {end}) outside [{t.skip_tokens}, {t.prompt_tokens})"
                )
            ranges = t.ranges.get((layer, KvKind(kind)), [])
            i = bisect.bisect_left(ranges, (start, end))
            if (i > 0 and ranges[i - 1][1] > start) or (i < len(ranges) and ranges[i][0] < end):
                raise TransferError(Code.ALREADY_EXISTS, f"layer {layer} tokens [{start}, {end}) arrived already")
        elif (layer, KvKind(kind)) in t.states:
            raise TransferError(Code.ALREADY_EXISTS, f"second {KvKind(kind).name} for layer {layer}")
        return bulk

    # --- internals ----------------------------------------------------------------------------
    def _accept(self, t: Transfer, chunk: WireChunk) -> None:
        if t.total_chunks is None:
            low, high = _chunk_count_bounds(t)
            if not low <= chunk.total_chunks <= high:
                raise TransferError(
                    Code.INVALID_ARGUMENT, f"total_chunks {chunk.total_chunks} outside [{low}, {high}] for this layout"
                )
            t.total_chunks = chunk.total_chunks
        elif chunk.total_chunks != t.total_chunks:
            raise TransferError(Code.INVALID_ARGUMENT, f"total_chunks {chunk.total_chunks} != {t.total_chunks}")
        if chunk.seq >= chunk.total_chunks:
            raise TransferError(Code.INVALID_ARGUMENT, f"seq {chunk.seq} >= total_chunks {chunk.total_chunks}")
        if chunk.seq in t.seqs:
            raise TransferError(Code.ALREADY_EXISTS, f"duplicate seq {chunk.seq}")
        if chunk.kind == KvKind.FIRST_TOKEN:
            if t.first_token is not None:
                raise TransferError(Code.ALREADY_EXISTS, "second FIRST_TOKEN")
            if not 0 <= chunk.first_token < t.layout.config.vocab_size:
                raise TransferError(Code.INVALID_ARGUMENT, f"first token {chunk.first_token} outside the vocabulary")
            t.first_token = chunk.first_token
        else:
            piece = decode_chunk(chunk, t.layout, t.wire_dtype)
            key = (piece.layer, piece.kind)
            if t.layout.spec(piece.layer, piece.kind).paged:
                self._claim_range(t, key, piece.token_start, piece.token_end)
            elif key in t.states:
                raise TransferError(Code.ALREADY_EXISTS, f"second {piece.kind.name} for layer {piece.layer}")
            else:
                t.states.add(key)
            t.sink.write(piece)
        t.seqs.add(chunk.seq)
        t.chunks += 1
        t.bytes += chunk.nbytes

    @staticmethod
    def _claim_range(t: Transfer, key: tuple[int, KvKind], start: int, end: int) -> None:
        if start < t.skip_tokens or end > t.prompt_tokens:
            raise TransferError(
                Code.INVALID_ARGUMENT, f"tokens [{start}, {end}) outside [{t.skip_tokens}, {t.prompt_tokens})"
            )
        ranges = t.ranges.setdefault(key, [])
        i = bisect.bisect_left(ranges, (start, end))
        if (i > 0 and ranges[i - 1][1] > start) or (i < len(ranges) and ranges[i][0] < end):
            raise TransferError(Code.ALREADY_EXISTS, f"layer {key[0]} {key[1].name} tokens [{start}, {end}) overlap")
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
                    Code.DEADLINE_EXCEEDED, f"transfer {transfer_id}: {t.chunks} chunks arrived before the deadline"
                ),
            )
