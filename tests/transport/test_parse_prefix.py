"""A frame's header is parsed from its first HEADER_READ_BYTES before the frame is allocated. With
int8 KV the scales come between header and payload: when they end a few bytes short of that
prefix, the payload's tag and length straddle its end. That frame is well formed and must be
taken (it was refused "malformed KvChunk: truncated varint" once in a soak, failing a request)."""

from __future__ import annotations

import torch

from prfaas.kv.kinds import KvKind
from prfaas.transport.chunks import KvPiece
from prfaas.transport.limits import HEADER_READ_BYTES
from prfaas.transport.parse import parse_chunk, parse_header
from prfaas.transport.wire import encode_chunk_parts


def test_a_payload_field_straddling_the_header_prefix_is_well_formed():
    tokens, heads, dim = 120, 2, 64
    tensor = torch.randn(tokens, heads, dim)
    seen = set()
    for pad in range(0, 64):  # the transfer id's length moves the payload's tag byte by byte
        tid = "t" * (1 + pad)
        parts = encode_chunk_parts(tid, 3, 99, KvPiece(0, KvKind.FULL_K, 0, tokens, tensor), "int8")
        frame = b"".join(parts)
        at = len(frame) - len(parts[-1]) - len(parts[-2])  # where the payload's tag begins
        if not HEADER_READ_BYTES - 4 <= at < HEADER_READ_BYTES:
            continue
        seen.add(at)
        header = parse_header(memoryview(frame)[:HEADER_READ_BYTES], len(frame))
        assert header.transfer_id == tid
        chunk = parse_chunk(frame)
        assert (chunk.transfer_id, chunk.seq, chunk.token_end) == (tid, 3, tokens) and len(chunk.payload) > 0
    assert seen, "no transfer id length put the payload's tag across the prefix's end: adjust the sizes"
