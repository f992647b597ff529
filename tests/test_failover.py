"""Failures on the data path: a stalled KV transfer passes its deadline and the router retries
elsewhere; a dead prefill node makes the router fall back; nothing stays reserved.

The first test wires router, prefill and decode cores in one process (the cores take their
collaborators as protocols); the KV moves through the real codec and receiver in memory. The
second uses real processes and gRPC."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from prfaas.engine.llm import LLM, build_executor
from prfaas.errors import InvalidRequest
from prfaas.kv.prefill_plan import PrefillPlanner
from prfaas.messages import Done, PrefillJob, Sampled, SamplingParams
from prfaas.model.presets import write_preset
from prfaas.scheduling.policy import PrfaasPolicy
from prfaas.transport.chunks import tokens_per_chunk
from prfaas.transport.receiver import KvReceiver
from services.decode.core import DecodeNode
from services.prefill.core import PrefillNode
from services.router.core import GenerateInput, Node, Router
from tests.support import MAX_CHUNK, Directory, MemoryClients, MemoryPush, PushStats


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_preset(tmp_path_factory.mktemp("qwen"), "qwen3_next", "tiny", seed=1))


class _Lying(PrefillNode):
    """A prefill node that reports a first token outside the vocabulary (its KV is fine)."""

    async def prefill(self, job):  # type: ignore[no-untyped-def,override]
        async for ev in super().prefill(job):
            yield Sampled(self.executor.config.vocab_size + 5) if isinstance(ev, Sampled) else ev


async def _serve_once(model_dir, params, *, stall: bool, early: bool = True, lie: bool = False):
    """One request through router, prefill and decode cores; the PrfaaS node's transfer stalls
    when `stall`, its first token is out of the vocabulary when `lie`. Returns the outputs, the
    router and the prompt (after checking every node's accounting is back to idle)."""
    decode_ex, _ = build_executor(model_dir, num_blocks=256, num_slots=8)
    receiver = KvReceiver()
    decode = DecodeNode("d0", decode_ex, receiver, transfer_timeout_s=0.5)
    decode.start()
    stalled_ex, _ = build_executor(model_dir, num_blocks=256, num_slots=8)
    healthy_ex, _ = build_executor(model_dir, num_blocks=256, num_slots=8)
    stalled = (_Lying if lie else PrefillNode)(
        "p-stalled", stalled_ex, lambda job: MemoryPush(receiver, job, decode_ex.layout, stall=stall))
    healthy = PrefillNode("p-ok", healthy_ex, lambda job: MemoryPush(receiver, job, decode_ex.layout))
    nodes = [
        Node("p-stalled", "prfaas", "prefill", "p-stalled"),
        Node("p-ok", "local", "prefill", "p-ok"),
        Node("d0", "local", "decode", "d0"),
    ]
    router = Router(
        Directory(nodes),
        MemoryClients(decode, {"p-stalled": stalled, "p-ok": healthy}),
        PrfaasPolicy(threshold=16),
        transfer_timeout_s=0.5,
        early_first_token=early,
        vocab_size=decode_ex.config.vocab_size,
    )
    prompt = torch.randint(0, 256, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    try:
        outs = [o async for o in router.generate(GenerateInput("r1", "", prompt, params, "auto"))]
    finally:
        await decode.stop()
    for ex in (decode_ex, stalled_ex, healthy_ex):
        assert ex.blocks.num_free == ex.blocks.num_blocks and ex.slots.num_free == ex.slots.num_slots
    assert len(receiver) == 0
    return outs, router, prompt


async def test_stalled_transfer_times_out_and_router_retries(model_dir):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    outs, router, prompt = await _serve_once(model_dir, params, stall=True)
    # the first token came from the stalled node as it sampled it (its KV never drained); the retry on
    # the healthy node forced that token and names itself on its first message
    served = [o for o in outs if o.prefill_node]
    assert [o.prefill_node for o in served] == ["p-stalled", "p-ok"] and served[-1].route == "local"
    assert router.stats.retries == 1
    tokens = [t for o in outs for t in o.token_ids]
    expected = LLM(build_executor(model_dir)[0]).generate([prompt], params)[0]
    assert tokens == expected


@pytest.mark.parametrize("seed", [7, None])
async def test_a_retry_after_the_first_token_continues_a_sampled_request(model_dir, seed):
    """Temperature sampling: the retry forces the first token the client already has (unseeded, a
    new sample would differ and the router would refuse the decode node's first token); seeded, the
    whole stream is what an unbroken run gives."""
    params = SamplingParams(max_tokens=8, temperature=2.0, seed=seed, ignore_eos=True)
    broken, router, _ = await _serve_once(model_dir, params, stall=True)
    assert router.stats.retries == 1 and router.stats.failures == 0
    assert len(broken[0].token_ids) == 1 and sum(len(o.token_ids) for o in broken) == 8
    if seed is not None:
        whole, _, _ = await _serve_once(model_dir, params, stall=False)
        assert [t for o in broken for t in o.token_ids] == [t for o in whole for t in o.token_ids]


async def test_a_first_token_outside_the_vocabulary_never_reaches_the_client(model_dir):
    """A prefill node whose early first token is nonsense: the attempt fails on it (blamed, out
    of routing) before the client hears anything, and the retry elsewhere serves the request."""
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    outs, router, prompt = await _serve_once(model_dir, params, stall=False, lie=True)
    assert [o.prefill_node for o in outs if o.prefill_node] == ["p-ok"] and router.stats.retries == 1
    expected = LLM(build_executor(model_dir)[0]).generate([prompt], params)[0]
    assert [t for o in outs for t in o.token_ids] == expected


async def test_first_token_from_the_decode_node_when_asked(model_dir):
    """`--first-token decode`: the client's first token waits for the KV, so a stalled transfer is
    retried before the client hears anything."""
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    outs, router, prompt = await _serve_once(model_dir, params, stall=True, early=False)
    assert [o.prefill_node for o in outs if o.prefill_node] == ["p-ok"] and router.stats.retries == 1
    expected = LLM(build_executor(model_dir)[0]).generate([prompt], params)[0]
    assert [t for o in outs for t in o.token_ids] == expected


async def test_a_prefill_node_sends_a_forced_first_token_and_judges_its_finish(model_dir):
    """A retry's `forced_first_token`: checked against the vocabulary, sent instead of a sample
    (to the decode node and in `Sampled`), and its finish judged anew (here a stop token)."""
    ex, _ = build_executor(model_dir, num_blocks=64, num_slots=2)
    sent: list[int] = []

    class Push(MemoryPush):
        async def finish(self, first_token: int):  # type: ignore[no-untyped-def]
            sent.append(first_token)
            return PushStats(self.bytes, self.seq, 0.0)

    node = PrefillNode("p", ex, lambda job: Push(KvReceiver(), job, ex.layout, stall=True))
    prompt = list(range(1, 40))
    params = SamplingParams(max_tokens=5, stop_token_ids=(3,))
    vocab = ex.config.vocab_size
    with pytest.raises(InvalidRequest, match=f"forced_first_token {vocab} is outside the vocabulary"):
        [ev async for ev in node.prefill(PrefillJob("r", "t", prompt, params, "mem", forced_first_token=vocab))]
    plain = [ev async for ev in node.prefill(PrefillJob("r", "t1", prompt, params, "mem"))]
    forced = 3 if plain[-1].first_token != 3 else 4
    events = [ev async for ev in node.prefill(PrefillJob("r", "t2", prompt, params, "mem", forced_first_token=forced))]
    sampled = [ev for ev in events if isinstance(ev, Sampled)]
    done = events[-1]
    assert sampled == [Sampled(forced, "stop" if forced == 3 else None, None)]
    assert isinstance(done, Done) and done.first_token == forced and sent[-1] == forced
    assert ex.blocks.num_free == ex.blocks.num_blocks


@pytest.mark.slow
def test_dead_prefill_node_falls_back_to_local(model_dir):
    from prfaas.cluster.local import ClusterSpec, LocalCluster
    from prfaas.v1 import common_pb2
    from tests.test_data_path import generate, wait_all_free

    # KV over gRPC PushKv here (the data-path tests use the default raw-TCP data plane)
    spec = ClusterSpec(
        prfaas_prefill=1,
        local_prefill=1,
        local_decode=1,
        threshold_tokens=32,
        extra_env={"PRFAAS_KV_TRANSPORT": "grpc"},
    )
    with LocalCluster(model_dir, spec) as c:
        victim = next(p for p in c.procs if p.name == "prfaas-p0")
        os.kill(victim.popen.pid, signal.SIGKILL)
        victim.popen.wait()
        prompt = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(2)).tolist()
        got, head = asyncio.run(generate(c.router_address, prompt, 8, common_pb2.AUTO))
        assert head.route == common_pb2.LOCAL and head.prefill_node == "local-p0"
        params = SamplingParams(max_tokens=8)
        assert got == LLM(build_executor(model_dir)[0]).generate([prompt], params)[0]
        # the dead node stays listed until its heartbeats time out; the live nodes hold nothing
        live = {p.name for p in c.procs if p.popen.poll() is None}
        asyncio.run(wait_all_free(c.cachepool_address, only=live))


async def test_chunked_streaming_prefill_sends_states_once_and_matches(model_dir):
    """A prefill node that prefills in chunks streams every chunk's full-attention KV but each
    linear state only once, and the decode side continues exactly."""
    decode_ex, _ = build_executor(model_dir, num_blocks=256, num_slots=8)
    receiver = KvReceiver()
    decode = DecodeNode("d0", decode_ex, receiver, transfer_timeout_s=5)
    decode.start()
    prefill_ex, _ = build_executor(model_dir, num_blocks=256, num_slots=8)
    chunked = PrefillNode("p0", prefill_ex, lambda job: MemoryPush(receiver, job, decode_ex.layout),
                          planner=PrefillPlanner(prefill_ex.layout.block_size, chunk_tokens=128))
    nodes = [Node("p0", "local", "prefill", "p0"), Node("d0", "local", "decode", "d0")]
    router = Router(Directory(nodes), MemoryClients(decode, {"p0": chunked}), PrfaasPolicy(threshold=1e9))
    results: list[tuple] = []
    router.prefill_observers.append(lambda *result: results.append(result))  # what the control loop is told
    prompt = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(3)).tolist()  # 3 chunks
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    try:
        outs = [o async for o in router.generate(GenerateInput("c1", "", prompt, params, "auto"))]
    finally:
        await decode.stop()
    expected = LLM(build_executor(model_dir)[0]).generate([prompt], params)[0]
    assert [t for o in outs for t in o.token_ids] == expected
    assert router.stats.retries == 0
    [(route, tokens, prefill_s, kv_bytes, transfer_s, drain_s)] = results
    assert (route, tokens) == ("local", 300) and kv_bytes > 0 and transfer_s >= 0  # in memory: no wire time
    assert prefill_s > 0 and 0 <= drain_s < prefill_s, "the drain: from the end of the compute to the last ack"
    assert decode_ex.blocks.num_free == decode_ex.blocks.num_blocks


async def test_router_spreads_concurrent_prefills_over_equal_nodes(model_dir):
    """Heartbeats lag: with two idle PrfaaS nodes, concurrent long prompts must not all pick the
    first one (the router counts its own in-flight requests)."""
    decode_ex, _ = build_executor(model_dir, num_blocks=512, num_slots=16)
    receiver = KvReceiver()
    decode = DecodeNode("d0", decode_ex, receiver, transfer_timeout_s=10)
    decode.start()
    prefills = {}
    for name in ("pa", "pb"):
        ex, _ = build_executor(model_dir, num_blocks=256, num_slots=8)
        prefills[name] = PrefillNode(name, ex, lambda job: MemoryPush(receiver, job, decode_ex.layout))
    nodes = [Node("pa", "prfaas", "prefill", "pa"), Node("pb", "prfaas", "prefill", "pb"),
             Node("d0", "local", "decode", "d0")]
    router = Router(Directory(nodes), MemoryClients(decode, prefills), PrfaasPolicy(threshold=8))
    params = SamplingParams(max_tokens=2, ignore_eos=True)

    async def one(i: int) -> str:
        prompt = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(i)).tolist()
        outs = [o async for o in router.generate(GenerateInput(f"s{i}", "", prompt, params, "auto"))]
        return outs[0].prefill_node

    try:
        used = await asyncio.gather(*(one(i) for i in range(4)))
    finally:
        await decode.stop()
    assert set(used) == {"pa", "pb"}, used
    assert router.capacity.in_flight() == 0 and not router.capacity.prefilling


@pytest.mark.parametrize("family", ["qwen3_next", "kimi_linear"])
async def test_prefix_cache_reuses_blocks_and_state(tmp_path, family):
    """A second prompt sharing a 256-token prefix computes only its suffix on the prefill node,
    which sends the whole KV (the decode side lacks the prefix) and publishes what it caches."""
    from prfaas.kv.prefix_cache import PrefixCache
    from prfaas.kv.prefix_index import CacheEventKind

    path = str(write_preset(tmp_path, family, "tiny", seed=5))
    decode_ex, _ = build_executor(path, num_blocks=256, num_slots=8)
    receiver = KvReceiver()
    decode = DecodeNode("d0", decode_ex, receiver, transfer_timeout_s=10)
    decode.start()
    prefill_ex, _ = build_executor(path, num_blocks=256, num_slots=8)
    grid = tokens_per_chunk(prefill_ex.layout.paged_specs[0], MAX_CHUNK)
    grid = max(grid, prefill_ex.layout.block_size)
    events = []
    cache = PrefixCache("p0", prefill_ex.blocks, prefill_ex.slots)
    node = PrefillNode("p0", prefill_ex, lambda job: MemoryPush(receiver, job, decode_ex.layout),
                       planner=PrefillPlanner(prefill_ex.layout.block_size, grid), prefix_cache=cache,
                       on_cache_events=events.extend)
    router = Router(Directory([Node("p0", "local", "prefill", "p0"), Node("d0", "local", "decode", "d0")]),
                    MemoryClients(decode, {"p0": node}), PrfaasPolicy(threshold=1e9))
    g = torch.Generator().manual_seed(8)
    shared = torch.randint(0, 256, (2 * grid,), generator=g).tolist()
    a = shared + torch.randint(0, 256, (44,), generator=g).tolist()
    b = shared + torch.randint(0, 256, (50,), generator=g).tolist()
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    try:
        got = []
        for i, prompt in enumerate((a, b)):
            outs = [o async for o in router.generate(GenerateInput(f"q{i}", "", prompt, params, "auto"))]
            got.append([t for o in outs for t in o.token_ids])
    finally:
        await decode.stop()
    ref = LLM(build_executor(path)[0])
    assert got == [ref.generate([a], params)[0], ref.generate([b], params)[0]]
    assert node.cached_tokens == 2 * grid, "the second prompt reused the first one's checkpoint"
    kinds = [e.kind for e in events]
    assert CacheEventKind.BLOCK_STORED in kinds and CacheEventKind.STATE_STORED in kinds
    # the cache holds each prompt's blocks up to its last checkpoint, one slot per checkpoint
    assert len(cache.blocks) == (len(b) - 1) // 16 + (len(a) - 1) // 16 - 2 * grid // 16
    assert prefill_ex.blocks.num_free == prefill_ex.blocks.num_blocks - len(cache.blocks)
    assert prefill_ex.slots.num_free == 8 - len(cache.states) and len(cache.states) >= 2
    assert decode_ex.blocks.num_free == decode_ex.blocks.num_blocks
    evicted = cache.evict(prefill_ex.blocks.num_blocks, 8)
    assert prefill_ex.blocks.num_free == prefill_ex.blocks.num_blocks and prefill_ex.slots.num_free == 8
    assert {e.kind for e in evicted} == {CacheEventKind.BLOCK_EVICTED, CacheEventKind.STATE_EVICTED}
