"""A convertible node runs prefill and decode on one executor under one compute lock. A long
prompt prefilled in chunks there hands the lock over between chunks, so the node's running decode
batch keeps stepping during the prefill instead of stalling for its whole duration; both requests
still get exactly the tokens they get alone.

Cores wired in one process, the KV through the real codec and receiver (as in test_failover)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from prfaas.engine.llm import LLM, build_executor
from prfaas.kv.prefill_plan import PrefillPlanner
from prfaas.messages import SamplingParams
from prfaas.model.presets import write_preset
from prfaas.scheduling.policy import PrfaasPolicy
from prfaas.transport.receiver import KvReceiver
from services.decode.core import DecodeNode
from services.prefill.core import PrefillNode
from services.router.core import GenerateInput, Node, Router
from tests.support import Directory, MemoryClients, MemoryPush


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_preset(tmp_path_factory.mktemp("qwen"), "qwen3_next", "tiny", seed=2))


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("interleave", [True, False], ids=["yields", "holds"])
async def test_decode_steps_between_prefill_chunks(model_dir, interleave):
    shared_ex, _ = build_executor(model_dir, num_blocks=512, num_slots=8)
    lock = asyncio.Lock()
    shared_rx = KvReceiver()
    shared_decode = DecodeNode("conv", shared_ex, shared_rx, transfer_timeout_s=30, compute_lock=lock)
    other_rx = KvReceiver()
    other_ex, _ = build_executor(model_dir, num_blocks=512, num_slots=8)
    other_decode = DecodeNode("d1", other_ex, other_rx, transfer_timeout_s=30)
    window: list[float] = []  # B's prefill: from its sender's creation (compute starts) to finish()

    class TimedPush(MemoryPush):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            window.append(time.monotonic())

        async def finish(self, first_token: int):  # type: ignore[no-untyped-def]
            window.append(time.monotonic())
            return await super().finish(first_token)

    shared_prefill = PrefillNode(
        "conv", shared_ex, lambda job: TimedPush(other_rx, job, other_ex.layout), lock,
        PrefillPlanner(shared_ex.layout.block_size, chunk_tokens=128), yield_between_chunks=interleave,
    )
    feeder_ex, _ = build_executor(model_dir, num_blocks=512, num_slots=8)
    feeder = PrefillNode("p0", feeder_ex, lambda job: MemoryPush(shared_rx, job, shared_ex.layout))

    steps: list[float] = []  # when each decode step of the shared node ended
    run_decode = shared_ex.run_decode

    def timed_run_decode(seqs):
        out = run_decode(seqs)
        steps.append(time.monotonic())
        return out

    shared_ex.run_decode = timed_run_decode  # type: ignore[method-assign]
    # request A decodes on the convertible node (prefilled elsewhere)
    router_a = Router(
        Directory([Node("p0", "local", "prefill", "p0"), Node("conv", "local", "decode", "conv")]),
        MemoryClients(shared_decode, {"p0": feeder}),
        PrfaasPolicy(threshold=1e9),
    )
    # request B, a long prompt, is prefilled on the convertible node and decoded on d1
    router_b = Router(
        Directory([Node("conv", "local", "prefill", "conv"), Node("d1", "local", "decode", "d1")]),
        MemoryClients(other_decode, {"conv": shared_prefill}),
        PrfaasPolicy(threshold=1e9),
    )
    prompt_a, params_a = prompt_of(40, 1), SamplingParams(max_tokens=300, ignore_eos=True)
    prompt_b, params_b = prompt_of(1024, 2), SamplingParams(max_tokens=4, ignore_eos=True)  # 8 chunks
    shared_decode.start()
    other_decode.start()
    try:
        gen_a = router_a.generate(GenerateInput("a", "", prompt_a, params_a, "auto"))
        first_a = await gen_a.__anext__()  # A is decoding now
        rest_a = asyncio.ensure_future(_collect(gen_a))
        outs_b = [o async for o in router_b.generate(GenerateInput("b", "", prompt_b, params_b, "auto"))]
        outs_a = [first_a, *await rest_a]
    finally:
        await shared_decode.stop()
        await other_decode.stop()
    start, end = window
    during = sum(1 for t in steps if start < t < end)
    alone = LLM(build_executor(model_dir)[0])
    assert [t for o in outs_a for t in o.token_ids] == alone.generate([prompt_a], params_a)[0]
    assert [t for o in outs_b for t in o.token_ids] == alone.generate([prompt_b], params_b)[0]
    if interleave:
        assert during >= 6, f"only {during} decode steps ran during an 8-chunk prefill ({end - start:.2f} s)"
    else:
        assert during <= 1, f"{during} decode steps ran while the prefill held the lock"
    for ex in (shared_ex, other_ex, feeder_ex):
        assert ex.blocks.num_free == ex.blocks.num_blocks and ex.slots.num_free == ex.slots.num_slots


async def _collect(gen):
    return [o async for o in gen]
