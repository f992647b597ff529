"""Converting local nodes between prefill and decode on the live system: an in-flight request
finishes on its node after the switch, and new work follows the new roles."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.local import ClusterSpec, LocalCluster
from prfaas.engine.llm import LLM, build_executor
from prfaas.messages import SamplingParams
from prfaas.model.presets import write_preset
from prfaas.rpc import channel as rpc_channel
from prfaas.v1 import common_pb2, common_pb2_grpc, router_pb2, router_pb2_grpc
from tests.support import tls_as

pytestmark = pytest.mark.slow


async def set_role(address: str, role: int) -> common_pb2.SetRoleResponse:
    async with rpc_channel(address, tls=tls_as("router")) as ch:  # only the router may SetRole
        return await common_pb2_grpc.NodeControlStub(ch).SetRole(common_pb2.SetRoleRequest(role=role))


async def wait_roles(pool_address: str, want: dict[str, str]) -> None:
    async with CachePoolClient(pool_address) as pool:
        for _ in range(200):
            roles = {s.node.node_id: str(s.node.role) for s in await pool.list_nodes()}
            if all(roles.get(k) == v for k, v in want.items()):
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"roles {roles}, wanted {want}")


def test_swap_roles_without_losing_requests(tmp_path):
    model_dir = str(write_preset(tmp_path / "m", "qwen3_next", "tiny", seed=4))
    spec = ClusterSpec(
        prfaas_prefill=0,
        local_prefill=1,
        local_decode=1,
        policy="homogeneous",
        extra_env={"PRFAAS_HEARTBEAT_INTERVAL_S": "0.2"},
    )
    g = torch.Generator().manual_seed(0)
    long_prompt = torch.randint(0, 256, (40,), generator=g).tolist()
    new_prompt = torch.randint(0, 256, (30,), generator=g).tolist()
    with LocalCluster(model_dir, spec, log_dir=str(tmp_path / "logs")) as c:
        p0, d0 = c.address_of("local-p0"), c.address_of("local-d0")

        async def run() -> tuple[list[int], router_pb2.GenerateResponse, list[int], router_pb2.GenerateResponse]:
            async with rpc_channel(c.router_address) as ch:
                stub = router_pb2_grpc.RouterStub(ch)
                call = stub.Generate(router_pb2.GenerateRequest(token_ids=long_prompt, max_tokens=120))
                first = await call.read()
                assert first.decode_node == "local-d0"
                # swap while local-d0 is decoding the long request
                assert (await set_role(p0, common_pb2.DECODE)).previous == common_pb2.PREFILL
                assert (await set_role(d0, common_pb2.PREFILL)).previous == common_pb2.DECODE
                await wait_roles(c.cachepool_address, {"local-p0": "decode", "local-d0": "prefill"})
                await asyncio.sleep(1.0)  # the router's directory refreshes
                new: list[int] = []
                new_head = None
                async for msg in stub.Generate(router_pb2.GenerateRequest(token_ids=new_prompt, max_tokens=8)):
                    new_head = new_head or msg
                    new += list(msg.token_ids)
                rest = list(first.token_ids)
                while (msg := await call.read()) is not grpc.aio.EOF:
                    rest += list(msg.token_ids)
                assert new_head is not None
                return rest, first, new, new_head

        long_out, first, new_out, new_head = asyncio.run(run())
    ex = build_executor(model_dir)[0]
    assert long_out == LLM(ex).generate([long_prompt], SamplingParams(max_tokens=120))[0]
    assert (new_head.prefill_node, new_head.decode_node) == ("local-d0", "local-p0")
    assert new_out == LLM(ex).generate([new_prompt], SamplingParams(max_tokens=8))[0]
