"""The data path, top to bottom, with real processes and real gRPC on loopback:
client -> router -> cache pool -> prefill node -> (KV stream) -> decode node -> router -> client.

Greedy tokens from Router.Generate must equal transformers' own `generate` on the same checkpoint,
for both model families and both routes."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.local import ClusterSpec, LocalCluster
from prfaas.rpc import insecure_channel
from prfaas.v1 import common_pb2, router_pb2, router_pb2_grpc

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def make_checkpoint(path, family: str):
    torch.manual_seed(0)
    if family == "qwen3_next":
        cfg = transformers.Qwen3NextConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            decoder_sparse_step=2,
            initializer_range=0.1,
            max_position_embeddings=4096,
        )
        model = transformers.Qwen3NextForCausalLM(cfg)
    else:
        cfg = transformers.KimiLinearConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            linear_num_heads=2,
            linear_head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.1,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        )
        model = transformers.KimiLinearForCausalLM(cfg)
    model.eval().save_pretrained(path)
    return model


def reference(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


async def generate(
    address: str, prompt: list[int], n: int, route: int
) -> tuple[list[int], router_pb2.GenerateResponse]:
    async with insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        out: list[int] = []
        head = None
        async for msg in stub.Generate(
            router_pb2.GenerateRequest(token_ids=prompt, max_tokens=n, route=route, stop_token_ids=[])
        ):
            head = head or msg
            out += list(msg.token_ids)
        assert head is not None
        return out, head


@pytest.fixture(scope="module", params=["qwen3_next", "kimi_linear"])
def cluster(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = make_checkpoint(path, request.param)
    spec = ClusterSpec(
        prfaas_prefill=1,
        local_prefill=1,
        local_decode=1,
        threshold_tokens=64,
        extra_env={"PRFAAS_KV_BLOCKS": "512", "PRFAAS_STATE_SLOTS": "32"},
    )
    with LocalCluster(str(path), spec, log_dir=str(path / "logs")) as c:
        yield c, ref


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("route", [common_pb2.LOCAL, common_pb2.PRFAAS])
def test_greedy_tokens_match_transformers(cluster, route):
    c, ref = cluster
    for prompt in prompts([5, 70]):
        got, head = asyncio.run(generate(c.router_address, prompt, 16, route))
        assert head.route == route
        assert got == reference(ref, prompt, 16)


def test_sixteen_concurrent_mixed_requests(cluster):
    c, ref = cluster
    ps = prompts([3, 9, 17, 33, 65, 100, 130, 200] * 2, seed=1)

    async def all_of():
        return await asyncio.gather(*(generate(c.router_address, p, 8, common_pb2.AUTO) for p in ps))

    results = asyncio.run(all_of())
    routes = {head.route for _, head in results}
    assert routes == {common_pb2.LOCAL, common_pb2.PRFAAS}, "threshold 64 splits this mix across both routes"
    for p, (got, _) in zip(ps, results, strict=True):
        assert got == reference(ref, p, 8)


def test_bad_requests_get_clear_status(cluster):
    c, _ = cluster

    async def call(**kw):
        async with insecure_channel(c.router_address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            async for _ in stub.Generate(router_pb2.GenerateRequest(**kw)):
                pass

    for kw, words in [
        (dict(token_ids=[], max_tokens=4), "prompt is empty"),
        (dict(token_ids=[1, 2, 99999], max_tokens=4), "outside the vocabulary"),
        (dict(token_ids=[1, 2, 3], max_tokens=0), "max_tokens"),
        (dict(token_ids=[1, 2, 3], prompt="hi", max_tokens=3), "not both"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            asyncio.run(call(**kw))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert words in (e.value.details() or ""), (kw, e.value.details())


def test_client_cancel_frees_every_node(cluster):
    c, _ = cluster
    prompt = prompts([150], seed=5)[0]

    async def run():
        async with insecure_channel(c.router_address) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            call = stub.Generate(router_pb2.GenerateRequest(token_ids=prompt, max_tokens=2000, route=common_pb2.PRFAAS))
            n = 0
            async for msg in call:
                n += len(msg.token_ids)
                if n >= 3:
                    call.cancel()
                    break
        await wait_all_free(c.cachepool_address)

    asyncio.run(run())


async def wait_all_free(cachepool_address: str, only: set[str] | None = None, timeout_s: float = 10.0) -> None:
    """Every node's own accounting, as it reports it to the cache pool, shows nothing held."""
    async with CachePoolClient(cachepool_address) as pool:
        for _ in range(int(timeout_s / 0.1)):
            await asyncio.sleep(0.1)
            nodes = [
                s
                for s in await pool.list_nodes()
                if s.node.role in ("prefill", "decode") and (only is None or s.node.node_id in only)
            ]
            if all(
                s.load.free_blocks == s.node.capacity_blocks
                and s.load.free_slots == s.node.capacity_slots
                and s.load.running == 0
                for s in nodes
            ):
                return
        raise AssertionError(f"blocks still held: {[(s.node.node_id, s.load) for s in nodes]}")


def test_prefix_hits_are_reused_and_cache_affine(tmp_path):
    """The prefill node caches the prompt's blocks and a state checkpoint and tells the pool; a
    second prompt with the same prefix goes to that node (cache-affine) and reuses it."""
    from prfaas.model.presets import write_preset

    model = write_preset(tmp_path / "m", "qwen3_next", "tiny", seed=2)
    spec = ClusterSpec(prfaas_prefill=2, local_prefill=1, local_decode=1, threshold_tokens=64)
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(3, 256, (512,), generator=g).tolist()
    a = shared + torch.randint(3, 256, (40,), generator=g).tolist()
    b = shared + torch.randint(3, 256, (70,), generator=g).tolist()
    with LocalCluster(str(model), spec, log_dir=str(tmp_path / "logs")) as c:
        got_a, head_a = asyncio.run(generate(c.router_address, a, 6, common_pb2.PRFAAS))

        async def wait_for_hit() -> int:
            async with CachePoolClient(c.cachepool_address) as pool:
                for _ in range(100):
                    hit = (await pool.match(b)).hit_tokens(head_a.prefill_node)
                    if hit:
                        return hit
                    await asyncio.sleep(0.1)
            return 0

        assert asyncio.run(wait_for_hit()) == 512
        got_b, head_b = asyncio.run(generate(c.router_address, b, 6, common_pb2.PRFAAS))
    assert head_b.prefill_node == head_a.prefill_node and head_b.cached_tokens == 512
    from prfaas.engine.llm import LLM, build_executor
    from prfaas.messages import SamplingParams

    ref = LLM(build_executor(str(model))[0])
    assert got_a == ref.generate([a], SamplingParams(max_tokens=6))[0]
    assert got_b == ref.generate([b], SamplingParams(max_tokens=6))[0]
