"""Prefill and decode nodes with different cache dtypes, end to end (issue 13, part 3).

A bfloat16 PrfaaS prefill node serves a float32 decode node (and the reverse): every offloaded
request succeeds on its first attempt (one routing decision per request in the router's log,
no failed attempt), its tokens equal an in-process run of the same checkpoint that does the
same thing (prefill in the prefill node's dtype, the KV converted, decode in the decode node's),
and its first token equals a run wholly in the prefill node's dtype. A decode node that does not
convert is never paired with a prefill node of another dtype: the router logs that once and
routes the requests to the prefill node of its own dtype.
"""

from __future__ import annotations

import asyncio
import functools
import json

import pytest
import torch

from prfaas.cluster.local import ClusterSpec, LocalCluster
from prfaas.engine.llm import build_executor
from prfaas.messages import SamplingParams
from prfaas.v1 import common_pb2
from tests.support import stream

MODEL = "builtin:qwen3_next-small"
PROMPTS = ["    def __repr__(self):\n        return", "import os\nimport sys\n\n\ndef main(argv):\n    \"\"\"",
           "class Stack:\n    def push(self, item):\n"]
MAX_TOKENS = 12
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@functools.cache
def executor(dtype: torch.dtype):  # type: ignore[no-untyped-def]
    return build_executor(MODEL, dtype=dtype, num_blocks=64, num_slots=2)[0]


def reference(prompt_ids: list[int], prefill_dtype: torch.dtype, decode_dtype: torch.dtype) -> list[int]:
    """Greedy tokens: prefill in `prefill_dtype`, the KV cast to `decode_dtype`, decode there."""
    a, b = executor(prefill_dtype), executor(decode_dtype)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    seq = a.add("r", prompt_ids, params)
    a.prefill(seq)
    out = b.reserve("r", prompt_ids, params)
    for lk in a.export(seq).layers:
        for kind, t in lk.tensors.items():
            spec = b.layout.spec(lk.layer, kind)
            b.write_kv(out, lk.layer, kind, lk.token_start, lk.token_end, t.to(spec.dtype))
    a.free(seq)
    b.complete_import(out, seq.output[0])
    while not out.finished:
        b.decode_step([out])
    b.free(out)
    return out.output


def routes(log_dir) -> list[dict]:
    lines = [json.loads(x) for x in (log_dir / "router.log").read_text().splitlines() if x.startswith("{")]
    return lines


@pytest.mark.parametrize(("prefill", "decode"), [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_mixed_cache_dtypes_first_attempt(tmp_path, prefill, decode):
    spec = ClusterSpec(prfaas_prefill=1, local_prefill=0, local_decode=1, threshold_tokens=4, convertible_local=False,
                       metrics=False, frontdoor=False,
                       cluster_env={"prfaas": {"PRFAAS_DTYPE": prefill}, "local": {"PRFAAS_DTYPE": decode}})
    logs = tmp_path / "logs"
    with LocalCluster(MODEL, spec, log_dir=str(logs)) as c:
        results = [asyncio.run(stream(c.router_address, prompt=p, max_tokens=MAX_TOKENS, ignore_eos=True))
                   for p in PROMPTS]
    _, tok = build_executor(MODEL, num_blocks=8, num_slots=1)
    pd, dd = getattr(torch, prefill), getattr(torch, decode)
    for p, r in zip(PROMPTS, results, strict=True):
        assert r.code == "OK", r.details
        assert r.head.route == common_pb2.PRFAAS and r.head.prefill_node == "prfaas-p0", r.head
        ids = tok.encode(p)
        assert r.tokens == reference(ids, pd, dd), p
        assert r.tokens[0] == reference(ids, pd, pd)[0], "the first token is the prefill node's"
    events = routes(logs)
    assert sum(e.get("event") == "route" for e in events) == len(PROMPTS), "one attempt per request"
    assert not [e for e in events if "fail" in e.get("event", "") or e.get("level") == "error"], events


def test_a_pair_that_cannot_work_is_never_routed(tmp_path):
    """The local decode node (float32) does not convert; the PrfaaS prefill node is bfloat16, the
    local prefill node float32: every request goes to the local one, the refusal logged once."""
    spec = ClusterSpec(prfaas_prefill=1, local_prefill=1, local_decode=1, threshold_tokens=4, convertible_local=False,
                       metrics=False, frontdoor=False,
                       cluster_env={"prfaas": {"PRFAAS_DTYPE": "bfloat16"}, "local": {"PRFAAS_KV_WIRE_ACCEPT": ""}})
    logs = tmp_path / "logs"
    with LocalCluster(MODEL, spec, log_dir=str(logs)) as c:
        results = [asyncio.run(stream(c.router_address, prompt=p, max_tokens=4)) for p in PROMPTS]
    assert all(r.code == "OK" and r.head.prefill_node == "local-p0" for r in results), results
    events = routes(logs)
    assert [e["prefill"] for e in events if e.get("event") == "kv_pair_refused"] == ["prfaas-p0"]
    assert sum(e.get("event") == "route" for e in events) == len(PROMPTS)
