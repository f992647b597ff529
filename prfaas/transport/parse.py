"""The protobuf-free, bounded parser of `prfaas.v1.KvChunk` bytes (both planes use it).

A peer controls every byte, so nothing here grows with what it declares: a varint is at most 10
bytes, `transfer_id` and `dtype` have length caps, `shape` at most `MAX_SHAPE_DIMS` entries, every
field but `shape` appears at most once, integers must fit their protobuf type, and everything but
`payload` and `scales` (the header) fits in `HEADER_READ_BYTES`. The work is O(header) whatever
the frame's size: `payload` and `scales` stay views, never scanned (the checksum is the caller's).

`parse_header(prefix, frame_len)` reads the header from a frame's first bytes, before the frame
is allocated: the TCP plane checks the declared length against the transfer with it. Any
violation is a `TransferError(INVALID_ARGUMENT, "malformed KvChunk: ...")`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prfaas.errors import Code
from prfaas.transport.errors import TransferError
from prfaas.transport.limits import (
    HEADER_READ_BYTES,
    MAX_DTYPE_BYTES,
    MAX_SHAPE_DIMS,
    MAX_TRANSFER_ID_BYTES,
    MAX_VARINT_BYTES,
)

PAYLOAD_FIELD, SCALES_FIELD = 10, 12
_BULK = (PAYLOAD_FIELD, SCALES_FIELD)
_INT32 = (4, 5, 6, 7, 13)  # layer, kind, token_start, token_end, first_token
_UINT32 = (2, 3)  # seq, total_chunks
_WIRE_TYPE = {1: 2, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 0, 8: 2, 10: 2, 11: 5, 12: 2, 13: 0}
_STR_CAP = {1: MAX_TRANSFER_ID_BYTES, 8: MAX_DTYPE_BYTES}
_MAX_DIM = 1 << 31


@dataclass
class WireChunk:
    """A parsed `KvChunk`; `payload` and `scales` are views of the received message.
    `crc` is the checksum of payload then scales when the caller computed it already (off the
    event loop, for a large frame); None: the receiver computes it."""

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
    crc: int | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return len(self.payload) + len(self.scales)


@dataclass
class ChunkHeader:
    """What a frame's first bytes say: the scalar fields seen and the bulk fields' declared
    lengths (their bytes may lie beyond the prefix)."""

    values: dict[int, int | str] = field(default_factory=dict)
    shape: list[int] = field(default_factory=list)
    bulk: dict[int, tuple[int, int]] = field(default_factory=dict)  # field -> (offset, length)

    @property
    def transfer_id(self) -> str:
        return str(self.values.get(1, ""))

    def int(self, number: int) -> int:
        v = self.values.get(number, 0)
        return v if isinstance(v, int) else 0


def malformed(why: str) -> TransferError:
    return TransferError(Code.INVALID_ARGUMENT, f"malformed KvChunk: {why}")


def read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    """A varint at `i` (at most 10 bytes, at most 64 bits); returns (value, next offset)."""
    n = shift = 0
    for k in range(MAX_VARINT_BYTES):
        if i + k >= len(buf):
            raise malformed("truncated varint")
        b = buf[i + k]
        n |= (b & 0x7F) << shift
        if b < 0x80:
            if n >> 64:
                raise malformed("varint overflows 64 bits")
            return n, i + k + 1
        shift += 7
    raise malformed(f"varint longer than {MAX_VARINT_BYTES} bytes")


def _scalar(number: int, raw: int) -> int:
    if number in _UINT32:
        if raw >= 1 << 32:
            raise malformed(f"field {number} out of uint32 range")
        return raw
    v = raw - (1 << 64) if raw >= 1 << 63 else raw
    if not -(1 << 31) <= v < 1 << 31:
        raise malformed(f"field {number} out of int32 range")
    return v


def _dims(h: ChunkHeader, values: list[int]) -> None:
    if len(h.shape) + len(values) > MAX_SHAPE_DIMS:
        raise malformed(f"shape has more than {MAX_SHAPE_DIMS} dimensions")
    for v in values:
        if not 0 <= v < _MAX_DIM:
            raise malformed(f"shape dimension {v} out of range")
    h.shape += values


def _packed_dims(h: ChunkHeader, buf: memoryview, i: int, end: int) -> None:
    out = []
    while i < end:
        v, i = read_varint(buf, i)
        out.append(v)
        if len(out) > MAX_SHAPE_DIMS:
            break
    if i != end:
        raise malformed("packed shape overruns its length")
    _dims(h, out)


def _field(h: ChunkHeader, buf: memoryview, i: int, frame_len: int) -> int:
    """Reads one field at `i` into `h`; returns the next offset (a bulk field's contents are
    skipped, and may lie beyond `buf` when `buf` is a prefix of a `frame_len`-byte frame)."""
    key, i = read_varint(buf, i)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise malformed("field number 0")
    if number == 9 and wire in (0, 2):
        if wire == 0:
            v, i = read_varint(buf, i)
            _dims(h, [v])
            return i
        n, i = read_varint(buf, i)
        if i + n > len(buf):
            raise malformed("truncated shape")
        _packed_dims(h, buf, i, i + n)
        return i + n
    if number in _WIRE_TYPE and _WIRE_TYPE[number] != wire:
        raise malformed(f"field {number} has wire type {wire}")
    if number in h.values or number in h.bulk:
        raise malformed(f"field {number} repeated")
    if wire == 0:
        v, i = read_varint(buf, i)
        if number in _WIRE_TYPE:
            h.values[number] = _scalar(number, v)
        return i
    if wire in (1, 5):
        size = 8 if wire == 1 else 4
        if i + size > len(buf):
            raise malformed("truncated fixed field")
        if number == 11:
            h.values[11] = int.from_bytes(buf[i : i + 4], "little")
        return i + size
    if wire != 2:
        raise malformed(f"bad wire type {wire}")
    n, i = read_varint(buf, i)
    if i + n > frame_len:
        raise malformed(f"field {number} of {n} bytes overruns the frame")
    if number in _BULK:
        h.bulk[number] = (i, n)
        return i + n
    if n > _STR_CAP.get(number, HEADER_READ_BYTES) or i + n > len(buf):
        raise malformed(f"field {number} of {n} bytes is too long")
    if number in _STR_CAP:
        try:
            h.values[number] = bytes(buf[i : i + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise malformed(f"field {number} is not UTF-8") from None
    return i + n


# a field's key and length varints take at most this many bytes
_FIELD_HEAD_MAX = 1 + 10


def _scan(buf: memoryview, frame_len: int) -> ChunkHeader:
    h, i = ChunkHeader(), 0
    bulk_bytes = 0
    prefix = len(buf) < frame_len
    while i < len(buf):
        if prefix and h.bulk and len(buf) - i < _FIELD_HEAD_MAX:
            # the header is behind us (it precedes scales and payload); the next field may straddle
            # the prefix's end (int8 scales ending just short of it): the whole frame's parse checks it
            break
        i = _field(h, buf, i, frame_len)
        bulk_bytes = sum(n for _, n in h.bulk.values())
        if i - bulk_bytes > HEADER_READ_BYTES:
            raise malformed(f"header longer than {HEADER_READ_BYTES} bytes")
    return h


def parse_header(prefix: bytes | bytearray | memoryview, frame_len: int) -> ChunkHeader:
    """The header from a frame's first bytes (the whole frame when it is that small). The
    prefix must hold the transfer id, layer and kind, which every chunk has before its payload."""
    buf = memoryview(prefix)
    h = _scan(buf, frame_len)
    if len(buf) < frame_len and not h.bulk:
        raise malformed(f"no payload within the first {len(buf)} bytes of a {frame_len}-byte frame")
    return h


def parse_chunk(data: bytes | bytearray | memoryview) -> WireChunk:
    """Parses a whole serialized `KvChunk`, keeping `payload` and `scales` as views of `data`."""
    buf = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    h = _scan(buf, len(buf))
    empty = memoryview(b"")

    def bulk(number: int) -> memoryview:
        off, n = h.bulk.get(number, (0, 0))
        return buf[off : off + n] if n else empty

    v = h.values
    return WireChunk(
        h.transfer_id, h.int(2), h.int(3), h.int(4), h.int(5), h.int(6), h.int(7), str(v.get(8, "")),
        tuple(h.shape), bulk(PAYLOAD_FIELD), h.int(11), bulk(SCALES_FIELD), h.int(13),
    )
