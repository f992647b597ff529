"""The prefix cache across real processes (gRPC, the raw-TCP KV data plane, the cache pool):

1. a first turn offloaded to the PrfaaS node; the decode node keeps the prompt and its answer;
2. the second turn (prompt + answer + new message) is short uncached, so it prefills locally: the
   abundant-bandwidth rule moves the prefix from the PrfaaS node (Prefill.ImportPrefix /
   ExportPrefix over TCP), the local prefill node computes only the rest and sends the decode
   node only what it lacks (skip_tokens); both ends count the same bytes, the tokens are those of
   a run without any cache;
3. the PrfaaS node is killed: the cache pool's Match stops naming it once its heartbeats stop,
   and still names what the others hold."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families

from prfaas.cluster.client import CachePoolClient
from prfaas.cluster.local import ClusterSpec, LocalCluster
from prfaas.engine.llm import LLM, build_executor
from prfaas.messages import SamplingParams
from prfaas.model.presets import write_preset
from tests.support import stream

BS = 16


def counter(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def match(address: str, prompt: list[int]) -> dict[str, int]:
    async with CachePoolClient(address) as pool:
        return {h.node_id: h.hit_tokens for h in (await pool.match(prompt)).hits}


def test_conversation_moves_skips_and_survives_a_lost_node(tmp_path):
    model = str(write_preset(tmp_path / "m", "qwen3_next", "tiny", seed=9))
    spec = ClusterSpec(prfaas_prefill=1, local_prefill=1, local_decode=1, threshold_tokens=100, frontdoor=False,
                       convertible_local=False,
                       extra_env={"PRFAAS_HEARTBEAT_TIMEOUT_S": "3", "PRFAAS_CHECKPOINT_TOKENS": "64"},
                       router_env={"PRFAAS_BANDWIDTH_MODE": "abundant", "PRFAAS_CONTROL_INTERVAL_S": "0"})
    g = torch.Generator().manual_seed(3)
    first = torch.randint(3, 250, (300,), generator=g).tolist()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = LLM(build_executor(model)[0])
    layout = ref.executor.layout
    with LocalCluster(model, spec, log_dir=str(tmp_path / "logs")) as c:
        url = c.metrics_urls
        a = asyncio.run(stream(c.router_address, token_ids=first, max_tokens=12, ignore_eos=True))
        assert a.code == "OK" and a.head.prefill_node == "prfaas-p0" and a.tokens == ref.generate([first], params)[0]
        second = first + a.tokens + torch.randint(3, 250, (40,), generator=g).tolist()
        skip = (len(first) + len(a.tokens) - 1) // BS * BS  # the decode node fed the prompt and the answer
        for _ in range(100):  # the decode node's and the prefill node's events reach the pool
            hits = asyncio.run(match(c.cachepool_address, second))
            if hits.get("local-d0") == skip and hits.get("prfaas-p0"):
                break
            time.sleep(0.1)
        assert hits == {"local-d0": skip, "prfaas-p0": 288}, hits
        sent0 = counter(url["local-p0"], "prfaas_kv_transfer_bytes_total")
        got0 = counter(url["local-d0"], "prfaas_kv_received_bytes_total")
        b = asyncio.run(stream(c.router_address, token_ids=second, max_tokens=12, ignore_eos=True))
        assert b.code == "OK" and b.tokens == ref.generate([second], params)[0]
        assert (b.head.prefill_node, b.head.decode_node, b.head.cached_tokens) == ("local-p0", "local-d0", 288)
        assert counter(url["router"], "prfaas_prefix_moves_total", decision="moved") == 1
        assert counter(url["router"], "prfaas_prefix_move_bytes_total") == layout.kv_bytes(288)
        want = layout.kv_bytes(len(second), skip)  # only [skip, P) and the states
        assert counter(url["local-p0"], "prfaas_kv_transfer_bytes_total") - sent0 == want
        assert counter(url["local-d0"], "prfaas_kv_received_bytes_total") - got0 == want
        assert counter(url["local-d0"], "prfaas_decode_prefix_cache_hits_total") == skip
        prfaas = next(p for p in c.procs if p.name == "prfaas-p0")
        os.kill(prfaas.popen.pid, signal.SIGKILL)
        prfaas.popen.wait(10)
        for _ in range(100):
            hits = asyncio.run(match(c.cachepool_address, first))
            if "prfaas-p0" not in hits:
                break
            time.sleep(0.1)
        assert hits == {"local-p0": 288}, "the moved prefix is the local node's own; the dead node is gone"
