"""Wire formats (prfaas/transport/codec.py): names, negotiation, fp8 and int8 error bounds,
and payloads in the sender's dtype converted on receive, through the real chunk encoder."""

from __future__ import annotations

import pytest
import torch

from prfaas.transport.codec import (
    FP8_MAX,
    WireFormat,
    accepted_formats,
    choose,
    dequantize_fp8,
    is_valid,
    quantize_fp8,
)
from prfaas.transport.errors import TransferError
from prfaas.transport.wire import decode_chunk, encode_chunk, parse_chunk
from tests.transport.conftest import make_layout, make_pieces
from tests.transport.test_codec import encode_all


def test_names_parse_and_print_back():
    for name in ["", "int8", "fp8", "bfloat16", "float32", "int8+bfloat16", "fp8+float32"]:
        assert WireFormat.parse(name).name == name
    for bad in ["int4", "fp8+int8", "+bfloat16", "bfloat16+fp8", "fp8+bfloat16+float32", "int8+"]:
        assert not is_valid(bad), bad
        with pytest.raises(ValueError, match="unknown wire dtype"):
            WireFormat.parse(bad)


def test_choose_negotiates():
    every = accepted_formats()
    assert choose(every, "float32", "float32") == ""
    assert choose(every, "float32", "float32", "fp8") == "fp8"
    assert choose(every, "bfloat16", "float32") == "bfloat16"
    assert choose(every, "bfloat16", "float32", "int8") == "int8+bfloat16"
    exact_only = accepted_formats(compressions=())
    assert choose(exact_only, "float32", "float32", "fp8") == "", "falls back to exact"
    no_convert = accepted_formats(convert=False)
    assert choose(no_convert, "bfloat16", "float32") is None, "a pair that cannot work"
    assert choose(no_convert, "bfloat16", "bfloat16", "fp8") == "fp8"


def test_fp8_error_is_relative_to_its_block():
    torch.manual_seed(0)
    x = torch.randn(64, 2, 96) * torch.logspace(-3, 3, 96)  # very different magnitudes along a row
    q, s = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 2, 3)
    y = dequantize_fp8(q, s, torch.float32)
    blocks = x.view(64, 2, 3, 32).abs().amax(-1, keepdim=True)
    err = ((y - x).view(64, 2, 3, 32).abs() / blocks).max().item()
    assert err <= 2**-4 + 1e-6, err  # e4m3: 3 mantissa bits, half an ulp at the block's top
    assert err > 0, "fp8 is lossy: an exact result means nothing was quantised"
    assert dequantize_fp8(*quantize_fp8(torch.zeros(4, 32)), torch.float32).eq(0).all()
    big = torch.full((1, 32), 1e30)
    assert torch.isfinite(dequantize_fp8(*quantize_fp8(big), torch.float32)).all()
    assert FP8_MAX == torch.finfo(torch.float8_e4m3fn).max


@pytest.mark.parametrize("wire", ["int8", "fp8"])
def test_compressed_transfer_paged_within_bounds_states_exact(family, wire):
    layout = make_layout(family)
    pieces = make_pieces(layout, 64)
    chunks, _ = encode_all(layout, pieces, wire=wire)
    exact_bytes = sum(len(c) for c in encode_all(layout, pieces)[0])
    got = {}
    for data in chunks[:-1]:
        p = decode_chunk(parse_chunk(data), layout, wire)
        got.setdefault((p.layer, p.kind), []).append(p.tensor)
    for p in pieces:
        t = torch.cat(got[(p.layer, p.kind)])
        if layout.spec(p.layer, p.kind).paged:
            rel = ((t - p.tensor).abs().max() / p.tensor.abs().max()).item()
            assert 0 < rel < (1 / 127 if wire == "int8" else 1 / 16), (p.kind.name, rel)
        else:
            assert torch.equal(t, p.tensor), p.kind.name
    assert sum(len(c) for c in chunks) < exact_bytes


@pytest.mark.parametrize(("src", "dst"), [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_payloads_in_the_senders_dtype_are_converted(family, src, dst):
    sender, receiver = make_layout(family, src), make_layout(family, dst)
    pieces = make_pieces(sender, 40)
    source = str(src).removeprefix("torch.")
    chunks, _ = encode_all(sender, pieces)
    for data in chunks[:-1]:
        c = parse_chunk(data)
        if c.dtype != str(receiver.spec(c.layer, c.kind).dtype).removeprefix("torch."):
            with pytest.raises(TransferError, match="expected"):  # not negotiated: refused
                decode_chunk(c, receiver, "")
        p = decode_chunk(c, receiver, source)
        want = next(q for q in pieces if (q.layer, q.kind) == (p.layer, p.kind))
        spec = receiver.spec(p.layer, p.kind)
        assert p.tensor.dtype == spec.dtype
        a, b = p.token_start - want.token_start, p.token_end - want.token_start
        sl = want.tensor[a:b] if spec.paged else want.tensor
        assert torch.equal(p.tensor, sl.to(spec.dtype)), "conversion is the plain cast of the sender's values"


def test_fp8_chunk_is_smaller_than_int8_exact_ratio():
    layout = make_layout("kimi_linear")
    piece = next(p for p in make_pieces(layout, 64) if layout.spec(p.layer, p.kind).paged)
    sizes = {w: len(encode_chunk("t", 0, 1, piece, w)) for w in ["", "int8", "fp8"]}
    # a latent of 40 has fp8 blocks of 8 (gcd with 32): a scale per 8 bytes
    assert sizes["int8"] < sizes["fp8"] < 0.4 * sizes[""], sizes
