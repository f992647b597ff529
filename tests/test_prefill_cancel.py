"""A prefill request closed by its caller at any point gives the compute lock back: closed while
queued, right after the lock became its own, or while it computes (the router cancels a prefill
whose decode side failed first; a lock left held would wedge the node for every later request)."""

from __future__ import annotations

import asyncio

import pytest

from prfaas.engine.llm import build_executor
from prfaas.messages import PrefillJob, Progress, SamplingParams, Started
from prfaas.model.presets import write_preset
from services.prefill.core import PrefillNode
from tests.support import PushStats


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_preset(tmp_path_factory.mktemp("qwen"), "qwen3_next", "tiny", seed=4))


class NullPush:
    """A sender that drops the KV: this test is about the compute lock, not the stream."""

    async def push_layer(self, layer_kv: object) -> None:
        await asyncio.sleep(0)

    async def finish(self, first_token: int) -> PushStats:
        return PushStats(0, 0, 0.0)

    async def abort(self) -> None:
        pass


def _job(i: int) -> PrefillJob:
    return PrefillJob(f"r{i}", f"t{i}", list(range(1, 300)), SamplingParams(max_tokens=2), "mem", 1, "", 0.0)


@pytest.mark.parametrize("when", ["queued", "just_acquired", "started"])
async def test_a_closed_prefill_gives_the_lock_back(model_dir, when):
    ex, _ = build_executor(model_dir, num_blocks=256, num_slots=8)
    lock = asyncio.Lock()
    node = PrefillNode("p0", ex, lambda job: NullPush(), lock, alive_interval_s=0.02)
    free_blocks = ex.blocks.num_free
    await lock.acquire()  # somebody else computes
    gen = node.prefill(_job(0))
    ev = await anext(gen)
    assert isinstance(ev, Progress) and ev.queued
    if when != "queued":
        lock.release()
        await asyncio.sleep(0.05)  # the request's acquire completes while its stream sits at a yield
        assert lock.locked(), "the queued request took the lock"
    if when == "started":
        while not isinstance(ev, Started):
            ev = await anext(gen)
    await gen.aclose()
    await asyncio.sleep(0.05)
    if when == "queued":
        lock.release()
    assert not lock.locked(), "the closed request left the compute lock held"
    assert node.running == 0 and node.queue_depth == 0
    assert ex.blocks.num_free == free_blocks, "the closed request's blocks went back"
    # and the node still serves
    out = [e async for e in node.prefill(_job(1))]
    assert type(out[-1]).__name__ == "Done"
