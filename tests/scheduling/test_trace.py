"""Trace replay: the Mooncake loader, its scaling and tokens, the reuse bound, and `prfaas sim --trace`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prfaas.sim.trace import (
    Scaling,
    TokenSpace,
    Trace,
    TraceError,
    reusable_per_request,
)

SLICE = Path(__file__).resolve().parent.parent / "data" / "mooncake_slice.jsonl"
PRESET_CONFIG = {"vocab_size": 1000, "bos_token_id": 256, "eos_token_id": [257], "pad_token_id": 258}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rec(ts_ms: int, n_in: int, ids: list[int], n_out: int = 10) -> dict:
    return {"timestamp": ts_ms, "input_length": n_in, "output_length": n_out, "hash_ids": ids}


# Four requests by hand (512-token blocks):
#   r0 [1, 2]    1024 tokens: nothing seen                                     -> 0
#   r1 [1, 2, 3] 1300 tokens (512 + 512 + 276): blocks 1, 2 seen               -> 1024
#   r2 [5, 2]     600 tokens: 5 new, and 2 under another parent is another block -> 0
#   r3 [1, 2, 3] 1200 tokens (512 + 512 + 176): all seen, 3 with 276 tokens    -> 1200
HAND = [rec(0, 1024, [1, 2]), rec(1000, 1300, [1, 2, 3]), rec(2000, 600, [5, 2]), rec(3000, 1200, [1, 2, 3])]


@pytest.fixture
def hand(tmp_path: Path) -> Path:
    return write(tmp_path / "hand.jsonl", HAND)


def test_reuse_bound_by_hand(hand: Path):
    b = Trace.load(hand).reuse_bound()
    assert (b.requests, b.prompt_tokens, b.reusable_tokens, b.reusable_full_block_tokens) == (4, 4124, 2224, 2048)
    assert b.fraction == pytest.approx(2224 / 4124)
    assert [h for h, _ in reusable_per_request(Trace.load(hand).requests)] == [0, 1024, 0, 1200]
    # scaled by 4 (128-token blocks): 256, 325 (128+128+69), 150, 300 (128+128+44)
    s = Trace.load(hand, Scaling(4)).reuse_bound()
    assert (s.prompt_tokens, s.reusable_tokens, s.reusable_full_block_tokens) == (1031, 556, 512)
    assert Trace.load(hand, Scaling(4)).reuse_bound(scaled=False) == b


def test_slices_start_cold_and_rebase_time(hand: Path):
    first2 = Trace.load(hand, first=2).reuse_bound()
    assert (first2.prompt_tokens, first2.reusable_tokens) == (2324, 1024)
    w = Trace.load(hand, Scaling(time_factor=2.0), window=(1.0, 4.0))
    assert [r.arrival_s for r in w.requests] == [0.0, 2.0, 4.0]
    assert (w.reuse_bound().prompt_tokens, w.reuse_bound().reusable_tokens) == (3100, 1200)
    assert Trace.load(hand, window=(1.0, 3.0)).reuse_bound().reusable_tokens == 0
    assert len(Trace.load(hand, first=1, window=(1.0, 4.0)).requests) == 1


def test_equal_ids_give_equal_tokens_and_different_ids_differ():
    space = TokenSpace.from_model_config(PRESET_CONFIG)
    assert space.exclude == {256, 257, 258}
    a, b = space.block(7, 3, 64), TokenSpace.from_model_config(PRESET_CONFIG).block(7, 3, 64)
    assert a == b and len(a) == 64
    assert space.block(8, 3, 64) != a, "another id"
    assert space.block(7, 4, 64) != a, "another position"
    assert TokenSpace(1000, frozenset({256, 257, 258}), seed=1).block(7, 3, 64) != a, "another seed"
    assert all(0 <= t < 1000 and t not in space.exclude for t in a)
    # the same tokens in a fresh interpreter (no per-process hash randomisation)
    code = ("from prfaas.sim.trace import TokenSpace; "
            "print(list(TokenSpace(1000, frozenset({256, 257, 258})).block(7, 3, 64)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == list(a)


def test_prompts_share_exactly_their_common_blocks_and_a_partial_tail_is_a_prefix(tmp_path: Path):
    rows = [rec(0, 1300, [1, 2, 3]), rec(0, 1536, [1, 2, 3]), rec(0, 1100, [1, 9, 10])]
    trace = Trace.load(write(tmp_path / "t.jsonl", rows), Scaling(8))   # 64-token blocks
    space = TokenSpace(50, frozenset({0, 1}))
    p0, p1, p2 = (ids for _, ids, _ in trace.replay(space))
    assert (len(p0), len(p1), len(p2)) == (163, 192, 138)
    assert p1[:163] == p0, "a partial last block is the prefix of the full one"
    assert p2[:64] == p0[:64] and p2[64:128] != p0[64:128]
    assert not set(p0 + p1 + p2) & {0, 1}


def test_scaling_keeps_block_structure():
    for factor in (1, 8, 32, 512):
        trace = Trace.load(SLICE, Scaling(factor))
        bt = 512 // factor
        assert trace.scaling.block_tokens == bt
        for scaled, orig in zip(trace.requests, trace.original, strict=True):
            sizes = scaled.block_sizes()
            assert len(sizes) == len(orig.hash_ids) == -(-scaled.input_length // bt)
            assert all(s == bt for s in sizes[:-1]) and 1 <= sizes[-1] <= bt
            full = [s == 512 for s in orig.block_sizes()]
            assert all(s == bt for s, f in zip(sizes, full, strict=True) if f), "full blocks stay full"
            assert sizes[-1] * factor >= orig.block_sizes()[-1] > (sizes[-1] - 1) * factor, "tails round up"
            assert scaled.output_length == max(1, -(-orig.output_length // factor))
    # the bound moves only through the partial tails' rounding
    assert Trace.load(SLICE, Scaling(32)).reuse_bound().fraction == pytest.approx(
        Trace.load(SLICE).reuse_bound().fraction, rel=0.02)


def test_slice_bound_matches_ids_seen_before():
    """The trace's ids are chained, so "prefix seen" equals "id seen" counted directly."""
    trace, seen, hit = Trace.load(SLICE), set(), 0
    for r in trace.requests:
        hit += sum(size for h, size in zip(r.hash_ids, r.block_sizes(), strict=True) if h in seen)
        seen.update(r.hash_ids)
    b = trace.reuse_bound()
    assert b.requests == 200 and b.reusable_tokens == hit and 0 < b.fraction < 1


def test_replay_yields_arrival_tokens_and_output():
    trace = Trace.load(SLICE, Scaling(32, time_factor=3.0), first=20)
    got = list(trace.replay(TokenSpace.from_model_config(PRESET_CONFIG)))
    assert len(got) == 20
    for (t, ids, n_out), req in zip(got, trace.requests, strict=True):
        assert t == req.arrival_s and len(ids) == req.input_length and n_out == req.output_length
    assert [t for t, _, _ in got] == sorted(t for t, _, _ in got)
    assert trace.requests[-1].arrival_s == pytest.approx(3.0 * trace.original[-1].arrival_s)


@pytest.mark.parametrize("line,message", [
    ("not json", "not JSON"),
    ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "'hash_ids' must be a list"),
    ('{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [1]}', "need 2"),
    ('{"timestamp": -1, "input_length": 10, "output_length": 1, "hash_ids": [1]}', "'timestamp' must be >= 0"),
    ('{"input_length": 10, "output_length": 1, "hash_ids": [1]}', "missing 'timestamp'"),
    ('{"timestamp": 0, "input_length": 1.5, "output_length": 1, "hash_ids": [1]}', "must be an integer"),
])
def test_bad_lines_are_refused_with_their_line(tmp_path: Path, line: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec(0, 10, [1])) + "\n" + line + "\n")
    with pytest.raises(TraceError, match=message) as e:
        Trace.load(path)
    assert "bad.jsonl:2" in str(e.value)


def test_bad_slices_and_factors_are_refused(hand: Path, tmp_path: Path):
    with pytest.raises(TraceError, match="before the previous"):
        Trace.load(write(tmp_path / "back.jsonl", [rec(5, 10, [1]), rec(4, 10, [1])]))
    with pytest.raises(TraceError, match="no request in the slice"):
        Trace.load(hand, window=(10.0, 20.0))
    with pytest.raises(TraceError, match="divisor of 512"):
        Scaling(3)
    with pytest.raises(TraceError, match="time_factor"):
        Scaling(1, 0.0)
    with pytest.raises(TraceError, match="first"):
        Trace.load(hand, first=0)
    with pytest.raises(TraceError, match="outside the vocabulary"):
        TokenSpace(100, frozenset({100}))
    with pytest.raises(TraceError, match="fewer than 2"):
        TokenSpace(2, frozenset({0}))
