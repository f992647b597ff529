"""The data path, top to bottom, with real processes and real gRPC on loopback:
client -> router -> cache pool -> prefill node -> (KV stream) -> decode node -> router -> client.

Greedy tokens from Router.Generate must equal transformers' own `generate` on the same checkpoint,
for both model families and both routes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
import torch

from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.local import ClusterSpec, LocalCluster
from prfaas.rpc import channel as rpc_channel
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
    async with rpc_channel(address) as ch:
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
        async with rpc_channel(c.router_address) as ch:
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
        async with rpc_channel(c.router_address) as ch:
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
    """Every node's own accounting (`NodeControl.Stats`) shows nothing held but its prefix cache."""
    from prfaas.cluster.status import cluster_status

    rows: list[dict] = []
    for _ in range(int(timeout_s / 0.1)):
        await asyncio.sleep(0.1)
        rows = [r for r in await cluster_status(cachepool_address)
                if "stats" in r and (only is None or r["node"]["node_id"] in only)]
        if rows and all(is_idle(r["stats"]) for r in rows):
            return
    raise AssertionError(f"still held: {[(r['node']['node_id'], r['stats']) for r in rows]}")


def is_idle(st: dict) -> bool:
    return (
        int(st["free_blocks"]) + int(st["cached_blocks"]) == int(st["total_blocks"])
        and int(st["free_slots"]) + int(st["cached_states"]) == int(st["total_slots"])
        and st["running"] == 0
        and st["pending_transfers"] == 0
        and st["queue_depth"] == 0
    )


def test_status_shows_accounting_and_rates(cluster):
    """`prfaas status` lists every member with its own accounting (NodeControl.Stats) and the load of
    its last heartbeat, whose tokens_per_s moves with traffic."""
    c, _ = cluster
    before = {r["node"]["node_id"]: int(r["stats"]["tokens_done"]) for r in asyncio.run(status(c))}
    for p in prompts([20, 90], seed=7):
        asyncio.run(generate(c.router_address, p, 12, common_pb2.AUTO))
    rows = asyncio.run(status(c))
    assert {r["node"]["node_id"] for r in rows} == {"prfaas-p0", "local-p0", "local-d0"}
    done = {r["node"]["node_id"]: int(r["stats"]["tokens_done"]) - before[r["node"]["node_id"]] for r in rows}
    assert done["local-d0"] >= 2 * 11, done  # 11 decoded tokens per request (the first comes with the KV)
    assert done["prfaas-p0"] + done["local-p0"] == 110, done  # every prompt token computed once
    out = subprocess.run([sys.executable, "-m", "prfaas.cli", "status", "--cachepool", c.cachepool_address, "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    assert {r["node"]["node_id"] for r in json.loads(out.stdout)} == {"prfaas-p0", "local-p0", "local-d0"}

    async def rate_seen() -> bool:  # a heartbeat of the decode node, during a long decode, reports its rate
        busy = asyncio.create_task(generate(c.router_address, prompts([8], seed=9)[0], 400, common_pb2.LOCAL))
        try:
            async with CachePoolClient(c.cachepool_address) as pool:
                for _ in range(150):
                    await asyncio.sleep(0.1)
                    loads = {s.node.node_id: s.load for s in await pool.list_nodes()}
                    if loads["local-d0"].tokens_per_s > 0:
                        return True
            return False
        finally:
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)

    assert asyncio.run(rate_seen())
    asyncio.run(wait_all_free(c.cachepool_address))


async def status(c) -> list[dict]:
    from prfaas.cluster.status import cluster_status

    return await cluster_status(c.cachepool_address)


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
