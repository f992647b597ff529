"""The KV chunk codec: one layer's tensor <-> `KvChunk` wire messages.

A `KvPiece` is one tensor of one layer as the prefill produces it:
  - full kinds (FULL_K, FULL_V, FULL_LATENT): `(tokens, *token_shape)` for `[token_start, token_end)`;
  - LINEAR_RECURRENT: `(H, K, V)` float32; LINEAR_CONV: `(C, W-1)` in the cache dtype.
Full pieces are cut along tokens into chunks of at most `max_chunk_bytes`; states travel whole.

The wire is the `prfaas.v1.KvChunk` schema, encoded and parsed here without extra copies of the
payload: `encode_chunk` writes the small fields with protobuf and appends `scales` and `payload`
as length-delimited fields itself (one copy, tensor -> message bytes); `parse_chunk` scans the
top-level fields and hands `payload`/`scales` out as memoryviews of the received bytes. Any
protobuf implementation reads and writes the same bytes.

Payloads are raw little-endian. With wire dtype "int8" (negotiated per transfer) full-attention
payloads are quantised per row (the last dimension) with float32 scales; states stay exact.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from math import prod

import torch

from prfaas.kv.kinds import FULL_KINDS, KvKind
from prfaas.kv.layout import STATE_DTYPE, KvLayout
from prfaas.v1 import decode_pb2

try:  # the same CRC-32 as zlib's, with SIMD: ~19 GB/s against zlib's ~2 here (docs/transport.md)
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; zlib gives identical values
    from zlib import crc32

if sys.byteorder != "little":  # payloads are the host's memory as is
    raise ImportError("prfaas.kv.codec assumes a little-endian host")

WIRE_EXACT = ""      # payload in the layout's dtype
WIRE_INT8 = "int8"   # full-attention payloads as int8 with per-row float32 scales
WIRE_DTYPES = (WIRE_EXACT, WIRE_INT8)

DEFAULT_MAX_CHUNK_BYTES = 256 << 10  # chosen by bench/transport.py (docs/transport.md)


if any(decode_pb2.KvKind.Value(k.name) != k.value for k in KvKind):
    raise ImportError("prfaas.kv.kinds.KvKind no longer matches prfaas.v1.KvKind: update kinds.py")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CodecError(ValueError):
    """A chunk that contradicts the layout or itself. `code` is a TransferError code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class KvPiece:
    layer: int
    kind: KvKind
    token_start: int
    token_end: int
    tensor: torch.Tensor


@dataclass
class WireChunk:
    """A parsed `KvChunk`; `payload` and `scales` are views of the received message."""

    transfer_id: str
    seq: int
    total_chunks: int
    layer: int
    kind: int
    token_start: int
    token_end: int
    dtype: str
    shape: tuple[int, ...]
    payload: memoryview
    checksum: int
    scales: memoryview
    first_token: int

    @property
    def nbytes(self) -> int:
        return len(self.payload) + len(self.scales)


# --- layout rules --------------------------------------------------------------------------------
def kinds_of_layer(layout: KvLayout, layer: int) -> tuple[KvKind, ...]:
    """The kinds of piece a layer ships, in sending order."""
    if layout.layer_kind(layer) == "linear":
        return (KvKind.LINEAR_RECURRENT, KvKind.LINEAR_CONV)
    if layout.full_layer(layer).kind == "gqa":
        return (KvKind.FULL_K, KvKind.FULL_V)
    return (KvKind.FULL_LATENT,)


def expected_shape(layout: KvLayout, layer: int, kind: KvKind, num_tokens: int = 0) -> tuple[int, ...]:
    if kind == KvKind.LINEAR_RECURRENT:
        return layout.linear_layer(layer).recurrent_shape
    if kind == KvKind.LINEAR_CONV:
        return layout.linear_layer(layer).conv_shape
    return (num_tokens, *layout.full_layer(layer).token_shape)


def tensor_dtype(layout: KvLayout, kind: KvKind) -> torch.dtype:
    return STATE_DTYPE if kind == KvKind.LINEAR_RECURRENT else layout.dtype


def tokens_per_chunk(layout: KvLayout, layer: int, wire_dtype: str, max_chunk_bytes: int) -> int:
    """Tokens per full-attention chunk: the largest power of two that fits (so that pieces of
    power-of-two token counts, as a chunked prefill makes them, fall on the chunk grid)."""
    row = prod(layout.full_layer(layer).token_shape)
    if wire_dtype == WIRE_INT8:
        per_token = row + 4 * row // layout.full_layer(layer).token_shape[-1]
    else:
        per_token = row * layout.elem_size
    n = max(1, max_chunk_bytes // per_token)
    return 1 << (n.bit_length() - 1)


def plan_total_chunks(
    layout: KvLayout, prompt_tokens: int, skip_tokens: int, wire_dtype: str, max_chunk_bytes: int
) -> int:
    """How many chunks a transfer of `[skip_tokens, prompt_tokens)` takes, FIRST_TOKEN included."""
    n = prompt_tokens - skip_tokens
    total = 1 + 2 * len(layout.linear_layers)
    for f in layout.full_layers:
        total += f.num_tensors * -(-n // tokens_per_chunk(layout, f.layer, wire_dtype, max_chunk_bytes))
    return total


# --- encoding ------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_PAYLOAD_TAG = bytes([(10 << 3) | 2])
_SCALES_TAG = bytes([(12 << 3) | 2])


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is already contiguous on the CPU."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) symmetric int8: returns (q, scales) with q * scales[..., None] ~ t."""
    x = t.float()
    scales = (x.abs().amax(dim=-1) / 127.0).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(x / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scales.unsqueeze(-1)).to(dtype)


def encode_chunk(transfer_id: str, seq: int, total_chunks: int, piece: KvPiece, wire_dtype: str = WIRE_EXACT) -> bytes:
    """One piece (already cut to chunk size) as a serialized `KvChunk`."""
    return b"".join(encode_chunk_parts(transfer_id, seq, total_chunks, piece, wire_dtype))


def encode_chunk_parts(
    transfer_id: str, seq: int, total_chunks: int, piece: KvPiece, wire_dtype: str = WIRE_EXACT
) -> list[bytes | memoryview]:
    """The serialized `KvChunk` as buffers to send back to back, the payload a view of the piece's
    tensor (no copy: the raw-TCP plane hands them to one `sendmsg`). The tensor must not change
    until they are sent; the checksum is taken here, so a change would fail the transfer."""
    tensor, scales = piece.tensor, None
    if wire_dtype == WIRE_INT8 and piece.kind in FULL_KINDS:
        tensor, scales = quantize_int8(tensor)
    payload = _raw(tensor)
    crc = crc32(payload)
    parts: list[bytes | memoryview] = []
    if scales is not None:
        sv = _raw(scales)
        crc = crc32(sv, crc)
        parts += [_SCALES_TAG, _varint(len(sv)), sv]
    header = decode_pb2.KvChunk(
        transfer_id=transfer_id,
        seq=seq,
        total_chunks=total_chunks,
        layer=piece.layer,
        kind=int(piece.kind),  # type: ignore[arg-type]
        token_start=piece.token_start,
        token_end=piece.token_end,
        dtype=dtype_name(tensor.dtype),
        shape=tensor.shape,
        checksum=crc,
    ).SerializeToString()
    return [b"".join([header, *parts[:2]]), *parts[2:], _PAYLOAD_TAG + _varint(len(payload)), payload]


def encode_first_token(transfer_id: str, seq: int, total_chunks: int, token: int) -> bytes:
    return decode_pb2.KvChunk(
        transfer_id=transfer_id, seq=seq, total_chunks=total_chunks, layer=-1,
        kind=decode_pb2.FIRST_TOKEN, first_token=token, checksum=crc32(b""),
    ).SerializeToString()


def split_piece(piece: KvPiece, tokens_per_chunk: int, grid_origin: int) -> list[KvPiece]:
    """Cuts a full piece at multiples of `tokens_per_chunk` counted from `grid_origin` (views)."""
    if piece.kind not in FULL_KINDS:
        return [piece]
    out, start = [], piece.token_start
    while start < piece.token_end:
        end = min(piece.token_end, grid_origin + ((start - grid_origin) // tokens_per_chunk + 1) * tokens_per_chunk)
        a, b = start - piece.token_start, end - piece.token_start
        out.append(KvPiece(piece.layer, piece.kind, start, end, piece.tensor[a:b]))
        start = end
    return out


# --- parsing -------------------------------------------------------------------------------------
def _read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(buf):
            raise CodecError("INVALID_ARGUMENT", "truncated KvChunk")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7


def parse_chunk(data: bytes) -> WireChunk:
    """Parses a serialized `KvChunk`, keeping `payload` and `scales` as views of `data`."""
    buf = memoryview(data)
    views: dict[int, memoryview] = {}
    rest: list[memoryview] = []
    i = 0
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _read_varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            if i + n > len(buf):
                raise CodecError("INVALID_ARGUMENT", "truncated KvChunk")
            if field in (10, 12):
                views[field] = buf[i : i + n]
                i += n
                continue
            i += n
        else:
            raise CodecError("INVALID_ARGUMENT", f"bad wire type {wire} in KvChunk")
        if i > len(buf):
            raise CodecError("INVALID_ARGUMENT", "truncated KvChunk")
        rest.append(buf[start:i])
    try:
        msg = decode_pb2.KvChunk.FromString(b"".join(rest))
    except Exception as e:  # protobuf's DecodeError
        raise CodecError("INVALID_ARGUMENT", f"malformed KvChunk: {e}") from None
    return _wire(msg, views.get(10, memoryview(b"")), views.get(12, memoryview(b"")))


def chunk_from_message(msg: decode_pb2.KvChunk) -> WireChunk:
    """A `KvChunk` already parsed by protobuf (the generated servicer's path)."""
    return _wire(msg, memoryview(msg.payload), memoryview(msg.scales))


def _wire(msg: decode_pb2.KvChunk, payload: memoryview, scales: memoryview) -> WireChunk:
    return WireChunk(
        msg.transfer_id, msg.seq, msg.total_chunks, msg.layer, msg.kind, msg.token_start, msg.token_end,
        msg.dtype, tuple(msg.shape), payload, msg.checksum, scales, msg.first_token,
    )


# --- decoding ------------------------------------------------------------------------------------
def _tensor(view: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if len(view) == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only buffer: the sink copies, nobody writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=dtype).view(shape)


def decode_chunk(chunk: WireChunk, layout: KvLayout, wire_dtype: str = WIRE_EXACT) -> KvPiece:
    """Validates a data chunk against the layout and itself; returns its piece. The tensor is a
    view of the received bytes (exact) or a new tensor (int8 dequantised)."""
    try:
        kind = KvKind(chunk.kind)
    except ValueError:
        raise CodecError("INVALID_ARGUMENT", f"unknown kind {chunk.kind}") from None
    if kind == KvKind.FIRST_TOKEN:
        raise CodecError("INVALID_ARGUMENT", "FIRST_TOKEN carries no tensor")
    layer = chunk.layer
    if not 0 <= layer < layout.config.num_layers:
        raise CodecError("INVALID_ARGUMENT", f"layer {layer} out of range")
    if kind not in kinds_of_layer(layout, layer):
        raise CodecError("INVALID_ARGUMENT", f"kind {kind.name} does not belong to layer {layer}")
    full = kind in FULL_KINDS
    if full and chunk.token_start >= chunk.token_end:
        raise CodecError("INVALID_ARGUMENT", f"empty token range [{chunk.token_start}, {chunk.token_end})")
    if not full and (chunk.token_start, chunk.token_end) != (0, 0):
        raise CodecError("INVALID_ARGUMENT", f"{kind.name} has a token range")
    shape = expected_shape(layout, layer, kind, chunk.token_end - chunk.token_start)
    if chunk.shape != shape:
        raise CodecError("INVALID_ARGUMENT", f"layer {layer} {kind.name}: shape {chunk.shape}, expected {shape}")
    target = tensor_dtype(layout, kind)
    quantized = full and wire_dtype == WIRE_INT8
    want = "int8" if quantized else dtype_name(target)
    if chunk.dtype != want:
        raise CodecError("INVALID_ARGUMENT", f"layer {layer} {kind.name}: dtype {chunk.dtype!r}, expected {want!r}")
    wire = _DTYPES[want]
    n_scales = prod(shape[:-1]) * 4 if quantized else 0
    if len(chunk.payload) != prod(shape) * wire.itemsize or len(chunk.scales) != n_scales:
        raise CodecError("INVALID_ARGUMENT", f"layer {layer} {kind.name}: payload size does not match the shape")
    crc = crc32(chunk.payload)
    if n_scales:
        crc = crc32(chunk.scales, crc)
    if crc != chunk.checksum:
        raise CodecError("DATA_LOSS", f"layer {layer} {kind.name}: checksum mismatch")
    tensor = _tensor(chunk.payload, wire, shape)
    if quantized:
        tensor = dequantize_int8(tensor, _tensor(chunk.scales, torch.float32, shape[:-1]), target)
    return KvPiece(layer, kind, chunk.token_start, chunk.token_end, tensor)
