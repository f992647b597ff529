"""The KV stream's wire format: `KvPiece` <-> serialized `prfaas.v1.KvChunk`, with its checksum.

`encode_chunk_parts` writes the small fields with protobuf and appends `scales` and `payload` as
length-delimited fields itself, the payload a view of the tensor (no copy: the raw-TCP plane hands
the parts to one `sendmsg`); `parse_chunk` scans the top-level fields and hands `payload`/`scales`
out as memoryviews of the received bytes. Any protobuf implementation reads and writes the same
bytes. `decode_chunk` checks a chunk against the layout and itself (kind, shape, dtype, size,
CRC-32) and raises `TransferError` for anything that does not fit.

Payloads are raw little-endian. The wire format (negotiated per transfer, `codec.py`) may
compress paged payloads (int8 per row, fp8 per block, with float32 scales) and lets exact
payloads arrive in the sender's dtype, converted here into the receiver's; states travel exact.
"""

from __future__ import annotations

import sys
import warnings
from math import prod

import torch

from prfaas.dtypes import dtype_name, torch_dtype
from prfaas.errors import Code
from prfaas.kv.kinds import KvKind
from prfaas.kv.layout import KvLayout
from prfaas.transport.chunks import WIRE_EXACT, KvPiece
from prfaas.transport.codec import WireFormat, decode_tensor, encode_tensor
from prfaas.transport.errors import TransferError
from prfaas.transport.parse import PAYLOAD_FIELD, SCALES_FIELD, WireChunk, malformed, parse_chunk, parse_header

__all__ = ["WireChunk", "parse_chunk", "parse_header", "malformed", "encode_chunk", "encode_chunk_parts",
           "decode_chunk", "chunk_from_message", "expected_bulk_bytes"]
from prfaas.v1 import decode_pb2

try:  # the same CRC-32 as zlib's, with SIMD: ~19 GB/s against zlib's ~2 here (docs/transport.md)
    from zlib_ng.zlib_ng import crc32
except ImportError:  # pragma: no cover - zlib-ng is a dependency; zlib gives identical values
    from zlib import crc32

if sys.byteorder != "little":  # payloads are the host's memory as is
    raise ImportError("prfaas.transport.wire assumes a little-endian host")

if any(decode_pb2.KvKind.Value(k.name) != k.value for k in KvKind):
    raise ImportError("prfaas.kv.kinds.KvKind no longer matches prfaas.v1.KvKind: update kinds.py")



# --- encoding ------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_PAYLOAD_TAG = bytes([(PAYLOAD_FIELD << 3) | 2])
_SCALES_TAG = bytes([(SCALES_FIELD << 3) | 2])


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without a copy when it is already contiguous on the CPU (torch's
    numpy bridge is the zero-copy byte view: numpy is a dependency for it)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode_chunk_parts(
    transfer_id: str, seq: int, total_chunks: int, piece: KvPiece, wire_dtype: str = WIRE_EXACT
) -> list[bytes | memoryview]:
    """The serialized `KvChunk` as buffers to send back to back, the payload a view of the piece's
    tensor. The tensor must not change until they are sent; the checksum is taken here, so a
    change would fail the transfer. `wire_dtype` applies to this piece as given (the sender
    passes WIRE_EXACT for states)."""
    tensor, scales = encode_tensor(piece.tensor, WireFormat.parse(wire_dtype), paged=True)
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


def encode_chunk(transfer_id: str, seq: int, total_chunks: int, piece: KvPiece, wire_dtype: str = WIRE_EXACT) -> bytes:
    """One piece (already cut to chunk size) as one serialized `KvChunk`."""
    return b"".join(encode_chunk_parts(transfer_id, seq, total_chunks, piece, wire_dtype))


def encode_first_token(transfer_id: str, seq: int, total_chunks: int, token: int) -> bytes:
    return decode_pb2.KvChunk(
        transfer_id=transfer_id, seq=seq, total_chunks=total_chunks, layer=-1,
        kind=decode_pb2.FIRST_TOKEN, first_token=token, checksum=crc32(b""),
    ).SerializeToString()


# --- parsing: prfaas/transport/parse.py (bounded, protobuf-free) -------------------------------------
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


def _bad(why: str) -> TransferError:
    return TransferError(Code.INVALID_ARGUMENT, why)


def _expected(
    layout: KvLayout, layer: int, kind_number: int, token_start: int, token_end: int, wire_dtype: str
) -> tuple[KvKind, tuple[int, ...], WireFormat, tuple[str, ...], int]:
    """What a data chunk of (layer, kind, token range) may be, from the layout alone: its kind,
    shape, wire format, the payload dtypes it may come in, and the most payload + scales bytes."""
    if kind_number not in KvKind._value2member_map_:
        raise _bad(f"unknown kind {kind_number}")
    kind = KvKind(kind_number)
    if kind == KvKind.FIRST_TOKEN:
        raise _bad("FIRST_TOKEN carries no tensor")
    if not 0 <= layer < layout.num_layers:
        raise _bad(f"layer {layer} out of range")
    try:
        spec = layout.spec(layer, kind)
    except KeyError:
        raise _bad(f"kind {kind.name} does not belong to layer {layer}") from None
    if spec.paged and token_start >= token_end:
        raise _bad(f"empty token range [{token_start}, {token_end})")
    if not spec.paged and (token_start, token_end) != (0, 0):
        raise _bad(f"{kind.name} has a token range")
    shape = (token_end - token_start, *spec.shape) if spec.paged else spec.shape
    fmt = WireFormat.parse(wire_dtype)
    allowed = tuple(fmt.payload_dtypes(spec.dtype, spec.paged))
    most = max(torch_dtype(d).itemsize for d in allowed) * prod(shape) + fmt.scales_count(shape, spec.paged) * 4
    return kind, shape, fmt, allowed, most


def expected_bulk_bytes(
    layout: KvLayout, layer: int, kind: int, token_start: int, token_end: int, wire_dtype: str = WIRE_EXACT
) -> int:
    """The most payload plus scales bytes a chunk of (layer, kind, token range) may carry; raises
    `TransferError` when the layout has no such chunk. The TCP plane bounds a frame with it
    before allocating."""
    if kind == KvKind.FIRST_TOKEN:
        return 0
    return _expected(layout, layer, kind, token_start, token_end, wire_dtype)[4]


def decode_chunk(chunk: WireChunk, layout: KvLayout, wire_dtype: str = WIRE_EXACT) -> KvPiece:
    """Validates a data chunk against the layout and itself; returns its piece. The tensor is a
    view of the received bytes (exact, same dtype) or a new tensor (dequantised or converted)."""
    layer = chunk.layer
    kind, shape, fmt, allowed, _ = _expected(layout, layer, chunk.kind, chunk.token_start, chunk.token_end, wire_dtype)
    spec = layout.spec(layer, kind)
    if chunk.shape != shape:
        raise _bad(f"layer {layer} {kind.name}: shape {chunk.shape}, expected {shape}")
    if chunk.dtype not in allowed:
        raise _bad(f"layer {layer} {kind.name}: dtype {chunk.dtype!r}, expected {' or '.join(map(repr, allowed))}")
    wire = torch_dtype(chunk.dtype)
    n_scales = fmt.scales_count(shape, spec.paged) * 4
    if len(chunk.payload) != prod(shape) * wire.itemsize or len(chunk.scales) != n_scales:
        raise _bad(f"layer {layer} {kind.name}: payload size does not match the shape")
    crc = chunk.crc if chunk.crc is not None else chunk_crc(chunk)
    if crc != chunk.checksum:
        raise TransferError(Code.DATA_LOSS, f"layer {layer} {kind.name}: checksum mismatch")
    payload = _tensor(chunk.payload, wire, shape)
    scales = _tensor(chunk.scales, torch.float32, (n_scales // 4,)) if n_scales else None
    tensor = decode_tensor(payload, scales, fmt, spec.paged, spec.dtype)
    return KvPiece(layer, kind, chunk.token_start, chunk.token_end, tensor)


def chunk_crc(chunk: WireChunk) -> int:
    """CRC-32 of payload then scales (releases the GIL: callable from a worker thread)."""
    crc = crc32(chunk.payload)
    return crc32(chunk.scales, crc) if len(chunk.scales) else crc
