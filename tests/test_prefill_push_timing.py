"""When a prefill node pushes a prompt's KV: a short prompt on a local-cluster node after its first
token is sampled (`push_after_tokens`), every other prompt, and every prompt on a PrfaaS node (its
KV crosses the datacenter link), layer by layer while it computes. The same layers go out either
way, and the first token is the same."""

from __future__ import annotations

import pytest
import torch

from prfaas.engine.llm import build_executor
from prfaas.messages import Done, PrefillJob, Sampled, SamplingParams
from prfaas.model.presets import write_preset
from services.prefill.core import PrefillNode


class Recorder:
    def __init__(self, log: list) -> None:
        self.log, self.bytes, self.seconds, self.chunks = log, 0, 0.0, 0

    async def push_layer(self, layer_kv) -> None:  # type: ignore[no-untyped-def]
        self.log.append(("layer", layer_kv.layer, layer_kv.token_start, layer_kv.token_end))

    async def finish(self, first_token: int) -> Recorder:
        self.log.append(("finish", first_token))
        return self

    async def abort(self) -> None:
        self.log.append(("abort",))


@pytest.fixture(scope="module")
def executor(tmp_path_factory):
    return build_executor(write_preset(tmp_path_factory.mktemp("qwen"), "qwen3_next", "tiny", seed=6))[0]


async def _events(executor, cluster: str, n: int) -> list:  # type: ignore[no-untyped-def]
    log: list = []
    node = PrefillNode("p", executor, lambda job: Recorder(log), cluster=cluster, push_after_tokens=64)
    prompt = torch.randint(3, 900, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    async for ev in node.prefill(PrefillJob(f"r{n}", "t", prompt, SamplingParams(max_tokens=2), "x")):
        if isinstance(ev, Sampled):
            log.append(("sampled", ev.token_id))
        elif isinstance(ev, Done):
            log.append(("done", ev.first_token))
    assert executor.blocks.num_free == executor.blocks.num_blocks
    return log


@pytest.mark.parametrize("cluster,n,after", [("local", 40, True), ("local", 100, False),
                                             ("prfaas", 40, False), ("prfaas", 100, False)])
async def test_when_the_kv_is_pushed(executor, cluster, n, after):
    log = await _events(executor, cluster, n)
    kinds = [e[0] for e in log]
    layers = [e for e in log if e[0] == "layer"]
    assert len(layers) == executor.layout.num_layers and [e[1] for e in layers] == sorted(e[1] for e in layers)
    assert all(e[2:] == (0, n) for e in layers), "each layer's whole prompt, once"
    first_push, sampled = kinds.index("layer"), kinds.index("sampled")
    assert (first_push > sampled) == after, log
    assert kinds[-2:] == ["finish", "done"] and log[sampled][1] == log[-1][1]
    other = await _events(executor, "prfaas" if cluster == "local" else "local", n)
    assert [e for e in other if e[0] == "sampled"] == [log[sampled]], "the same first token either way"
