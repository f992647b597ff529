"""S_kv with compression on the wire (prfaas/scheduling/compression.py) in the planner, and the
wire-size accounting of a real layout (prfaas/transport/formats.transfer_bytes) against the
encoder's actual bytes."""

from __future__ import annotations

import pytest

from prfaas.scheduling.compression import bytes_per_element, compressed_kv_bytes
from prfaas.scheduling.planner import paper_case_study
from prfaas.scheduling.profiles import KV_BYTES


def test_only_the_full_attention_part_shrinks():
    state = KV_BYTES(0.0)
    assert state > 0
    for fmt, factor in [("int8", (1 + 4 / 576) / 2), ("fp8", (1 + 4 / 32) / 2)]:
        p = compressed_kv_bytes(KV_BYTES, fmt)
        assert p(0.0) == pytest.approx(state)
        for length in KV_BYTES.lengths:
            assert p(length) == pytest.approx(state + (KV_BYTES(length) - state) * factor)
    assert compressed_kv_bytes(KV_BYTES, "off").values == pytest.approx(KV_BYTES.values)
    with pytest.raises(ValueError, match="unknown KV compression"):
        bytes_per_element("int4", 64, 2.0)


def test_the_planner_sees_the_smaller_transfers():
    exact = paper_case_study().plans()["prfaas"]
    for fmt in ("int8", "fp8"):
        small = paper_case_study(fmt).plans()["prfaas"]
        assert small.lambda_max >= exact.lambda_max
        assert small.egress_bytes_per_s < 0.7 * exact.egress_bytes_per_s


def test_transfer_bytes_match_the_encoder():
    from prfaas.transport.chunks import split_piece, tokens_per_chunk
    from prfaas.transport.formats import transfer_bytes
    from prfaas.transport.wire import encode_chunk, parse_chunk
    from tests.transport.conftest import make_layout, make_pieces

    layout = make_layout("kimi_linear")
    pieces = make_pieces(layout, 64)
    for fmt in ("", "int8", "fp8"):
        got = 0
        for p in pieces:
            spec = layout.spec(p.layer, p.kind)
            parts = split_piece(p, tokens_per_chunk(spec), 0) if spec.paged else [p]
            for part in parts:
                c = parse_chunk(encode_chunk("t", 0, 1, part, fmt if spec.paged else ""))
                got += c.nbytes
        assert got == transfer_bytes(layout, 64, fmt), fmt
