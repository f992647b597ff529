"""A prefill node's prefix cache keeps checkpoints every `checkpoint_tokens` past the hit and at the
last block boundary before the prompt's end (a later turn of the same conversation hits it); a
prompt that shares only a shorter prefix, such as a system prompt, hits the interval checkpoint
before its end. Cores in one process, KV through the real codec and receiver; tokens checked
against a run without any cache. The planner's rules alone are in test_plan_rules."""

from __future__ import annotations

import pytest
import torch

from prfaas.engine.llm import LLM, build_executor
from prfaas.kv.prefix_cache import PrefixCache
from prfaas.messages import SamplingParams
from prfaas.model.presets import write_preset
from prfaas.scheduling.policy import PrfaasPolicy
from prfaas.transport.receiver import KvReceiver
from services.decode.core import DecodeNode
from services.prefill.core import PrefillNode
from services.router.core import GenerateInput, Node, Router
from services.worker.node import prefill_planner
from tests.support import Directory, MemoryClients, MemoryPush


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_preset(tmp_path_factory.mktemp("qwen"), "qwen3_next", "tiny", seed=4))


async def test_shorter_shared_prefix_hits_the_early_checkpoint(model_dir):
    decode_ex, _ = build_executor(model_dir, num_blocks=512, num_slots=16)
    receiver = KvReceiver()
    decode = DecodeNode("d0", decode_ex, receiver, transfer_timeout_s=10)
    prefill_ex, _ = build_executor(model_dir, num_blocks=512, num_slots=16)
    planner = prefill_planner(prefill_ex.layout, 128, 64)  # chunks of 128, checkpoints every 64
    chunk = planner.chunk_tokens
    cache = PrefixCache("p0", prefill_ex.blocks, prefill_ex.slots)
    node = PrefillNode("p0", prefill_ex, lambda job: MemoryPush(receiver, job, decode_ex.layout), None, planner,
                       cache)
    router = Router(
        Directory([Node("p0", "local", "prefill", "p0"), Node("d0", "local", "decode", "d0")]),
        MemoryClients(decode, {"p0": node}),
        PrfaasPolicy(threshold=1e9),
    )
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(0, 256, (chunk + 40,), generator=gen).tolist()  # shared: 168 tokens
    first = system + torch.randint(0, 256, (5 * chunk,), generator=gen).tolist()
    second = system + torch.randint(0, 256, (2 * chunk,), generator=gen).tolist()
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    decode.start()
    try:
        outs = []
        for i, prompt in enumerate((first, second)):
            got = [o async for o in router.generate(GenerateInput(f"r{i}", "", prompt, params, "auto"))]
            outs.append([t for o in got for t in o.token_ids])
            if i == 0:
                assert node.cached_tokens == 0
                assert len(cache.states) == 8, "7 interval checkpoints (64 ... 448) and the last boundary (800)"
    finally:
        await decode.stop()
    assert node.cached_tokens == 128, "the second prompt reused the interval checkpoint before 168"
    alone = LLM(build_executor(model_dir)[0])
    assert outs == [alone.generate([first], params)[0], alone.generate([second], params)[0]]
    held = len(cache.states)
    assert prefill_ex.slots.num_free == prefill_ex.slots.num_slots - held, "only the cache holds slots"
    assert decode_ex.blocks.num_free == decode_ex.blocks.num_blocks


def test_plan_rules():
    from prfaas.kv.prefill_plan import PrefillPlanner

    p = PrefillPlanner(16, grid=64, chunk_tokens=100, max_checkpoints=3)
    assert p.checkpoint_positions(300) == [64, 128, 288]  # two interval ones, then the tail
    assert p.checkpoint_positions(300, hit=128) == [192, 256, 288]
    assert p.checkpoint_positions(300, hit=288) == []  # nothing new past the hit
    assert p.checkpoint_positions(16) == []  # the last boundary before the end is 0
    plan = p.plan(300, hit=128)
    # parts end at chunk boundaries only; a checkpoint inside a part is a snapshot during its pass
    assert [(s.start, s.end, s.checkpoints) for s in plan.segments] == [(128, 228, (192,)), (228, 300, (256, 288))]
    assert plan.checkpoints == (192, 256, 288)
    assert [(s.start, s.end, s.checkpoints) for s in PrefillPlanner(16, grid=64).plan(200).segments] == [
        (0, 200, (64, 128, 192))]
    assert PrefillPlanner(16, grid=64, chunk_tokens=50).plan(100).segments[0].end == 50
    assert p.max_hit_blocks(300) == 18 and PrefillPlanner(16).max_hit_blocks(300) == 0
    for bad in (dict(grid=24), dict(grid=-16), dict(chunk_tokens=-1), dict(grid=16, max_checkpoints=0)):
        with pytest.raises(ValueError):
            PrefillPlanner(16, **bad)
    with pytest.raises(ValueError, match="leave some"):
        p.plan(300, hit=300)


def _states(ex, slot: int) -> list[torch.Tensor]:
    return [ex.pool.tensor(s)[slot].clone() for s in ex.layout.specs if not s.paged]


@pytest.mark.parametrize("family", ["qwen3_next", "kimi_linear"])
@pytest.mark.parametrize("kernel", [True, False], ids=["c_kernel", "torch_chunked"])
def test_snapshots_in_one_pass_equal_a_split_prefill(tmp_path, monkeypatch, family, kernel):
    """A checkpoint inside a part is the linear layers' states after that many tokens, taken during
    the part's one pass: the states a prefill stopped there would leave (to rounding: a part of
    other length runs its projections in other GEMM blocks), and the part's own states and first
    token unchanged. Wrong offsets (a state taken a token early or late) are far outside this."""
    from prfaas.model import linear_mixing

    if not kernel:
        monkeypatch.setattr(linear_mixing.cpu_kernel, "available", lambda: False)
    elif not linear_mixing.cpu_kernel.available():
        pytest.skip("the C kernel did not build here")
    ex, _ = build_executor(write_preset(tmp_path, family, "tiny", seed=5))
    prompt = torch.randint(3, 900, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    points = (2, 64, 192)  # inside the conv's window too (2 < width - 1)
    one = ex.add("one", prompt, SamplingParams(max_tokens=1))
    snaps = [(p, ex.slots.allocate()) for p in points]
    *_, first = ex.prefill_layerwise(one, read=False, snapshots=snaps)
    split = ex.add("split", prompt, SamplingParams(max_tokens=1))
    for p, slot in snaps:
        list(ex.prefill_layerwise(split, p, read=False))
        for got, want in zip(_states(ex, slot), _states(ex, split.slot), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"snapshot at {p}")
    *_, split_first = ex.prefill_layerwise(split, read=False)
    assert first == split_first
    for a, b in zip(_states(ex, one.slot), _states(ex, split.slot), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="snapshot positions"):
        list(ex.prefill_layerwise(ex.add("bad", prompt, SamplingParams(max_tokens=1)), snapshots=[(0, snaps[0][1])]))
