"""The hybrid prefix cache end to end, on both model families (the tiny random presets): hits on
prefill and on decode nodes, at, before and past a checkpoint, incremental transfers, and a
three-turn conversation whose third turn transfers only its new suffix. Tokens are always those of
a run without any cache (`LLM` on a fresh executor). Cores in one process, the real cache pool
core, the KV through the real chunk plan, codec and receiver (tests/prefix_support.py)."""

from __future__ import annotations

import pytest
import torch

from prfaas.engine.llm import LLM, build_executor
from prfaas.messages import SamplingParams
from prfaas.model.presets import write_preset
from tests.prefix_support import PrefixCluster

FAMILIES = ("qwen3_next", "kimi_linear")
BS = 16


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    return str(write_preset(tmp_path_factory.mktemp(request.param), request.param, "tiny", seed=3))


@pytest.fixture(scope="module")
def alone(model_dir):
    llm = LLM(build_executor(model_dir, num_blocks=512, num_slots=8)[0])
    return lambda prompt, params: llm.generate([prompt], params)[0]


def rand(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def boundary(tokens: int) -> int:
    """The last block boundary before `tokens` (a hit leaves one token to compute)."""
    return (tokens - 1) // BS * BS


async def test_three_turn_conversation_reuses_everything_and_sends_only_the_suffix(model_dir, alone):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    async with PrefixCluster(model_dir, {"p0": "local", "d0": "local"}) as c:
        p0, d0 = c.members["p0"], c.members["d0"]
        assert p0.prefill and d0.decode
        layout = p0.executor.layout
        prompt, prev = rand(600, 1), None
        for turn in range(3):
            sent0, got0 = p0.prefill.bytes_sent, d0.decode.bytes_received
            cached0, skip0 = p0.prefill.cached_tokens, d0.decode.prefix.cached_tokens  # type: ignore[union-attr]
            tokens, head = await c.generate(f"t{turn}", prompt, params)
            assert tokens == alone(prompt, params), f"turn {turn}"
            cached = p0.prefill.cached_tokens - cached0
            skip = d0.decode.prefix.cached_tokens - skip0  # type: ignore[union-attr]
            if prev is None:
                assert cached == skip == 0
            else:
                prev_prompt, prev_answer = prev
                # the prefill node saw the previous prompt; the decode node also its answer
                assert cached == boundary(len(prev_prompt)) == head.cached_tokens, f"turn {turn}"
                assert skip == (len(prev_prompt) + len(prev_answer) - 1) // BS * BS, f"turn {turn}"
            want = layout.kv_bytes(len(prompt), skip)
            assert p0.prefill.bytes_sent - sent0 == want, "the prefill node sent only [skip, P) and the states"
            assert d0.decode.bytes_received - got0 == want, "the decode node received as much"
            prev = (prompt, tokens)
            prompt = prompt + tokens + rand(40, 10 + turn)
        third = prev[0]
        # the third turn's paged KV: its new message and the partial block of the answer before it
        assert len(third) - skip == 40 + (len(third) - 40) % BS
        assert want == (len(third) - skip) * layout.bytes_per_token + layout.state_bytes
        # nothing held but the caches: every running request's blocks and slots came back
        for m in c.members.values():
            assert m.cache is not None
            assert m.executor.slots.num_free == m.executor.slots.num_slots - len(m.cache.states)


async def test_hits_at_before_and_past_a_checkpoint(model_dir, alone):
    """Checkpoints every 64 tokens and at a prompt's last block boundary: a prompt sharing exactly a
    checkpoint's prefix, a little less (the checkpoint before), or more (past it) hits where the
    rules say, on the prefill node; tokens unchanged."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    base = rand(300, 2)
    async with PrefixCluster(model_dir, {"p0": "local", "d0": "local"}, decode_cache=False) as c:
        p0 = c.members["p0"].prefill
        assert p0 is not None
        await c.generate("base", base, params)
        cases = {  # shared prefix -> the expected hit
            192: 192,            # at a grid checkpoint
            188: 128,            # just before it: the previous one
            200: 192,            # past it
            288: 288,            # at the tail checkpoint (the last block boundary of 300)
            299: 288,            # past the tail: the tail
        }
        for i, (shared, want) in enumerate(cases.items()):
            prompt = base[:shared] + rand(50, 100 + i)
            before = p0.cached_tokens
            tokens, head = await c.generate(f"c{i}", prompt, params)
            assert p0.cached_tokens - before == want == head.cached_tokens, f"shared {shared}"
            assert tokens == alone(prompt, params), f"shared {shared}"


async def test_decode_hit_with_chunked_prefill_off_the_chunk_grid(model_dir, alone):
    """The decode node holds a prefix that ends off the KV chunk grid, the prefill node computes
    in chunks and stops at checkpoints: every piece still lands on the transfer's grid (the support
    push checks it) and the tokens are unchanged."""
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    async with PrefixCluster(model_dir, {"p0": "local", "d0": "local"}, chunk_tokens=48,
                             checkpoint_tokens=32) as c:
        d0 = c.members["d0"].decode
        assert d0 and d0.prefix
        first = rand(77, 4)
        out, _ = await c.generate("a", first, params)
        nxt = first + out + rand(150, 5)
        tokens, _ = await c.generate("b", nxt, params)
        assert d0.prefix.cached_tokens == (77 + 9 - 1) // BS * BS
        assert tokens == alone(nxt, params)
