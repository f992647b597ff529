"""Serving under load, on real processes: a burst of 4x the decode slots all completes, one
oversized request does not block small ones, a full queue refuses with a retry hint, a poisoned
sequence ends alone, and malformed or extreme requests get the right status while the router keeps
serving (a property-based test)."""

from __future__ import annotations

import asyncio
import math
import os

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prfaas.cluster.local import ClusterSpec, LocalCluster
from prfaas.engine.llm import LLM, build_executor
from prfaas.kv.kinds import KvKind
from prfaas.messages import SamplingParams
from prfaas.model.presets import write_preset
from prfaas.rpc import channel as rpc_channel
from prfaas.rpc.convert import sampling_to_pb
from prfaas.transport.sender import KvSender
from prfaas.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from tests.support import stream, tls_as
from tests.test_data_path import wait_all_free

SLOTS = 8  # decode slots (and batch): the burst is 4x this
SPEC = ClusterSpec(
    prfaas_prefill=1, local_prefill=1, local_decode=1, threshold_tokens=64,
    extra_env={"PRFAAS_KV_BLOCKS": "256", "PRFAAS_STATE_SLOTS": str(SLOTS), "PRFAAS_MAX_BATCH": str(SLOTS)},
    router_env={"PRFAAS_MAX_QUEUE": "40", "PRFAAS_STALL_TIMEOUT_S": "5"},
)  # 256 blocks of 16 tokens per node; a request may hold half: 2048 tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_preset(tmp_path_factory.mktemp("model"), "qwen3_next", "tiny", seed=11))


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with LocalCluster(model_dir, SPEC, log_dir=str(logs)) as c:
        yield c


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = LLM(build_executor(model_dir, num_blocks=512)[0])
    return lambda prompt, n: llm.generate([prompt], SamplingParams(max_tokens=n))[0]


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_a_burst_of_four_times_the_decode_slots_all_completes(cluster, reference):
    prompts = [prompt_of(5 + 9 * i, seed=i) for i in range(4 * SLOTS)]

    async def burst():
        return await asyncio.gather(*(stream(cluster.router_address, token_ids=p, max_tokens=8) for p in prompts))

    results = asyncio.run(burst())
    assert [r.code for r in results] == ["OK"] * len(prompts), {r.code: r.details for r in results if r.code != "OK"}
    assert {r.head.route for r in results} == {common_pb2.LOCAL, common_pb2.PRFAAS}
    for i in (0, 7, 19, 31):  # a sample against the same prompts run alone, in one process
        assert results[i].tokens == reference(prompts[i], 8), i
    asyncio.run(wait_all_free(cluster.cachepool_address))


def test_an_oversized_prompt_does_not_block_small_ones(cluster):
    big = prompt_of(1800, seed=100)  # + 200 tokens: 125 of the decode node's 256 blocks (the cap is 128)
    small = [prompt_of(20, seed=200 + i) for i in range(10)]

    async def mix():
        big_call = asyncio.ensure_future(stream(cluster.router_address, token_ids=big, max_tokens=200))
        await asyncio.sleep(0.2)
        smalls = await asyncio.gather(*(stream(cluster.router_address, token_ids=p, max_tokens=8) for p in small))
        return await big_call, smalls

    big_result, smalls = asyncio.run(mix())
    assert big_result.code == "OK" and all(s.code == "OK" for s in smalls)
    assert max(s.done_at for s in smalls) + 0.2 < big_result.done_at, "small ones finished while the big one ran"
    never = asyncio.run(stream(cluster.router_address, token_ids=prompt_of(2100, seed=300), max_tokens=16))
    assert never.code == "INVALID_ARGUMENT" and "admits 128 per request" in never.details, never.details
    asyncio.run(wait_all_free(cluster.cachepool_address))


def test_a_full_queue_refuses_with_a_retry_hint(cluster):
    prompts = [prompt_of(10, seed=400 + i) for i in range(80)]

    async def flood():
        return await asyncio.gather(*(stream(cluster.router_address, token_ids=p, max_tokens=48) for p in prompts))

    results = asyncio.run(flood())
    refused = [r for r in results if r.code != "OK"]
    assert refused, "80 at once into 8 slots, 8 prefill places and a queue of 40"
    for r in refused:
        assert r.code == "RESOURCE_EXHAUSTED" and "queue is full" in r.details
        assert int(r.trailing["retry-after-ms"]) > 0 and r.trailing["grpc-retry-pushback-ms"]
    assert len(results) - len(refused) >= SLOTS + 40 - 8  # everything the queue took completed
    asyncio.run(wait_all_free(cluster.cachepool_address))


def test_a_poisoned_sequence_ends_alone(cluster, model_dir, reference):
    """KV with NaNs (as a corrupt prefill would send) for one request: its stream ends with INTERNAL
    and the reason; requests decoding in the same batch go on with the tokens they would have had."""
    ex, _ = build_executor(model_dir, num_blocks=64)
    poisoned_prompt = prompt_of(40, seed=500)
    params = SamplingParams(max_tokens=16)
    seq = ex.add("poisoned", poisoned_prompt, params)
    *layers, first = list(ex.prefill_layerwise(seq))
    spec = ex.layout.paged_specs[0]
    layers[spec.layer].tensors[spec.kind] = torch.full_like(layers[spec.layer].tensors[spec.kind], math.nan)
    decode_address = cluster.proc("local-d0").address
    others = [prompt_of(30, seed=600 + i) for i in range(4)]

    async def run():
        # as the router would (only it may Admit), naming this process's identity as the pushing node
        async with rpc_channel(decode_address, tls=tls_as("router")) as ch:
            admit = decode_pb2_grpc.DecodeStub(ch).Admit(decode_pb2.AdmitRequest(
                request_id="poisoned", sampling=sampling_to_pb(params), token_ids=poisoned_prompt,
                prefill_node=os.environ.get("PRFAAS_TLS_NAME", "")))
            events = aiter(admit)
            reserved = (await anext(events)).reserved
            normal = [asyncio.ensure_future(stream(cluster.router_address, token_ids=p, max_tokens=24,
                                                   route=common_pb2.LOCAL)) for p in others]
            await asyncio.sleep(0.3)  # they are decoding when the poisoned one joins the batch
            sender = KvSender(reserved.kv_address, reserved.transfer_id, ex.layout, prompt_tokens=len(poisoned_prompt))
            for lk in layers:
                await sender.push_layer(lk)
            await sender.finish(first)
            got: list[int] = []
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for ev in events:
                    got += list(ev.tokens.token_ids)
            return got, err.value, await asyncio.gather(*normal)

    got, err, normal = asyncio.run(run())
    assert got == [first], "the first token came with the KV; the first decode step found NaN"
    assert err.code() == grpc.StatusCode.INTERNAL and "non-finite logits" in (err.details() or "")
    for p, r in zip(others, normal, strict=True):
        assert r.code == "OK" and r.tokens == reference(p, 24)
    assert KvKind(spec.kind).name.startswith("FULL")
    asyncio.run(wait_all_free(cluster.cachepool_address))


# --- hostile and careless requests ---------------------------------------------------------------
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, 9.78e-39]))
REQUESTS = st.fixed_dictionaries({}, optional={
    "request_id": st.text(max_size=200),
    "prompt": st.text(max_size=300),
    "token_ids": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=40),
    "max_tokens": st.one_of(st.integers(-5, 8), st.sampled_from([2**31 - 1, 10**6, 5000])),
    "temperature": FLOATS,
    "top_p": FLOATS,
    "top_k": st.integers(-(2**31), 2**31 - 1),
    "seed": st.integers(0, 2**64 - 1),
    "stop_token_ids": st.lists(st.integers(-(2**31), 2**31 - 1), max_size=70),
    "route": st.integers(-3, 5),
})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=REQUESTS)
def test_malformed_and_extreme_requests_get_the_right_status(cluster, req):
    r = asyncio.run(stream(cluster.router_address, timeout_s=60, **req))
    assert r.code in ("OK", "INVALID_ARGUMENT"), (req, r.code, r.details)
    if r.code == "OK":
        assert 0 < len(r.tokens) <= req.get("max_tokens", 0)
    else:
        assert r.details, "a refusal says what was wrong"


def test_undecodable_bytes_are_invalid_argument_and_the_router_keeps_serving(cluster, reference):
    async def raw(data: bytes) -> grpc.aio.AioRpcError | None:
        async with rpc_channel(cluster.router_address) as ch:
            call = ch.unary_stream("/prfaas.v1.Router/Generate", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)(data)
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as e:
                return e
        return None

    for data in (b"\xff\xff\xff", b"\x1a\x05\x01", b"\x08" + b"\xff" * 11):
        e = asyncio.run(raw(data))
        assert e is not None and e.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in (e.details() or "")
    p = prompt_of(12, seed=700)
    ok = asyncio.run(stream(cluster.router_address, token_ids=p, max_tokens=6))
    assert ok.code == "OK" and ok.tokens == reference(p, 6)
