"""The chunk codec without the network: split, encode, parse, validate, decode."""

from __future__ import annotations

import zlib

import pytest
import torch

from prfaas.kv.kinds import KvKind
from prfaas.transport.chunks import WIRE_EXACT, WIRE_INT8, KvPiece, plan_total_chunks, split_piece, tokens_per_chunk
from prfaas.transport.errors import TransferError
from prfaas.transport.wire import (
    chunk_from_message,
    decode_chunk,
    encode_chunk,
    encode_first_token,
    parse_chunk,
)
from prfaas.v1 import decode_pb2
from tests.transport.conftest import make_layout, make_pieces


def encode_all(layout, pieces, wire="", max_chunk_bytes=4096, skip=0, prompt=None):
    prompt = prompt if prompt is not None else max(p.token_end for p in pieces)
    total = plan_total_chunks(layout, prompt, skip, max_chunk_bytes)
    out, seq = [], 0
    for p in pieces:
        spec = layout.spec(p.layer, p.kind)
        parts = split_piece(p, tokens_per_chunk(spec, max_chunk_bytes), skip) if spec.paged else [p]
        for part in parts:
            out.append(encode_chunk("t", seq, total, part, wire if spec.paged else WIRE_EXACT))
            seq += 1
    out.append(encode_first_token("t", seq, total, 42))
    return out, total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(family, dtype):
    layout = make_layout(family, dtype)
    pieces = make_pieces(layout, 100, skip_tokens=32)
    chunks, total = encode_all(layout, pieces, skip=32, prompt=100)
    assert len(chunks) == total
    got: dict[tuple[int, KvKind], list[torch.Tensor]] = {}
    for data in chunks[:-1]:
        c = parse_chunk(data)
        assert len(data) <= 4096 + 200 or not layout.spec(c.layer, c.kind).paged, "chunk over max_chunk_bytes"
        p = decode_chunk(c, layout)
        got.setdefault((p.layer, p.kind), []).append(p.tensor.clone())
    for p in pieces:
        t = torch.cat(got[(p.layer, p.kind)])
        assert t.dtype == p.tensor.dtype and torch.equal(t, p.tensor), f"layer {p.layer} {p.kind.name}"
    assert parse_chunk(chunks[-1]).first_token == 42


def test_wire_bytes_are_a_standard_kvchunk(family):
    layout = make_layout(family)
    piece = make_pieces(layout, 8)[-1]
    data = encode_chunk("xfer", 3, 9, piece)
    msg = decode_pb2.KvChunk.FromString(data)
    assert (msg.transfer_id, msg.seq, msg.total_chunks, msg.layer) == ("xfer", 3, 9, piece.layer)
    assert msg.payload == piece.tensor.contiguous().numpy().tobytes()
    assert msg.checksum == zlib.crc32(msg.payload)
    fast, slow = parse_chunk(data), chunk_from_message(msg)
    assert bytes(fast.payload) == bytes(slow.payload) and fast.shape == slow.shape
    assert parse_chunk(msg.SerializeToString()).shape == fast.shape  # field order does not matter


def test_int8_full_within_tolerance_states_exact(family):
    layout = make_layout(family)
    pieces = make_pieces(layout, 64)
    chunks, _ = encode_all(layout, pieces, wire=WIRE_INT8)
    for data in chunks[:-1]:
        c = parse_chunk(data)
        p = decode_chunk(c, layout, WIRE_INT8)
        src = next(x for x in pieces if (x.layer, x.kind) == (p.layer, p.kind))
        if layout.spec(p.layer, p.kind).paged:
            assert c.dtype == "int8"
            ref = src.tensor[p.token_start : p.token_end]
            bound = ref.abs().amax(dim=-1, keepdim=True) / 127 * 0.5 + 1e-6
            assert ((p.tensor - ref).abs() <= bound).all(), f"layer {p.layer} {p.kind.name}"
        else:
            assert c.dtype != "int8" and torch.equal(p.tensor, src.tensor), f"layer {p.layer} {p.kind.name}"


def test_int8_compresses():
    layout = make_layout("qwen3_next")
    piece = make_pieces(layout, 64)[2]
    assert piece.kind == KvKind.FULL_K
    assert len(encode_chunk("t", 0, 1, piece, WIRE_INT8)) < 0.3 * len(encode_chunk("t", 0, 1, piece))


def _chunk(layout, piece, **override):
    c = parse_chunk(encode_chunk("t", 0, 1, piece))
    for k, v in override.items():
        setattr(c, k, v)
    return c


def test_validation_against_the_layout():
    layout = make_layout("qwen3_next")  # layers: linear, full, linear, full
    full = KvPiece(1, KvKind.FULL_K, 0, 4, torch.randn(4, 2, 32))
    state = make_pieces(layout, 4)[0]
    cases = {
        "full kind on a linear layer": _chunk(layout, full, layer=0),
        "latent on a gqa layer": _chunk(layout, full, kind=int(KvKind.FULL_LATENT)),
        "shape vs token range": _chunk(layout, full, token_end=5),
        "shape vs layout": _chunk(layout, KvPiece(1, KvKind.FULL_K, 0, 4, torch.randn(4, 4, 16))),
        "dtype": _chunk(layout, KvPiece(1, KvKind.FULL_K, 0, 4, torch.randn(4, 2, 32, dtype=torch.bfloat16))),
        "state with a token range": _chunk(layout, state, token_end=3),
        "layer out of range": _chunk(layout, full, layer=9),
        "int8 not negotiated": parse_chunk(encode_chunk("t", 0, 1, full, WIRE_INT8)),
    }
    for name, c in cases.items():
        with pytest.raises(TransferError) as e:
            decode_chunk(c, layout)
        assert e.value.code == "INVALID_ARGUMENT", name


def test_bad_checksum_is_data_loss():
    layout = make_layout("kimi_linear")
    data = bytearray(encode_chunk("t", 0, 1, KvPiece(2, KvKind.FULL_LATENT, 0, 4, torch.randn(4, 40))))
    data[-5] ^= 0xFF
    with pytest.raises(TransferError) as e:
        decode_chunk(parse_chunk(bytes(data)), layout)
    assert e.value.code == "DATA_LOSS"


def test_truncated_message_is_invalid():
    data = encode_chunk("t", 0, 1, KvPiece(2, KvKind.FULL_LATENT, 0, 4, torch.randn(4, 40)))
    with pytest.raises(TransferError) as e:
        parse_chunk(data[:-7] + b"\x52\xff")
    assert e.value.code == "INVALID_ARGUMENT"


def test_chunk_grid_and_plan():
    layout = make_layout("qwen3_next")  # 2 x 32 fp32 = 256 bytes per token per tensor
    assert tokens_per_chunk(layout.spec(1, KvKind.FULL_K), 4096) == 16
    assert tokens_per_chunk(layout.spec(1, KvKind.FULL_K), 5000) == 16   # power of two
    parts = split_piece(KvPiece(1, KvKind.FULL_K, 8, 50, torch.randn(42, 2, 32)), 16, 8)
    assert [(p.token_start, p.token_end) for p in parts] == [(8, 24), (24, 40), (40, 50)]
    # 2 full layers x 2 tensors x ceil(42/16) + 2 linear layers x 2 states + first token
    assert plan_total_chunks(layout, 50, 8, 4096) == 12 + 4 + 1
