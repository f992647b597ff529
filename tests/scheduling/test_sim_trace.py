"""`prfaas sim --trace`: the simulator's prefix caches against the trace's own bound, and the command."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from prfaas.scheduling.model import Deployment
from prfaas.scheduling.planner import paper_case_study
from prfaas.scheduling.policy import HomogeneousPolicy
from prfaas.sim.prefix import BlockLRU, PrefixCaches
from prfaas.sim.simulator import SimConfig, Simulator
from prfaas.sim.trace import Trace, reusable_per_request
from prfaas.sim.trace_run import trace_arrivals

ROOT = Path(__file__).resolve().parent.parent.parent
SLICE = ROOT / "tests" / "data" / "mooncake_slice.jsonl"


def conversations(path: Path, n: int = 40, seed: int = 3) -> Path:
    """A generated trace in the Mooncake format: chats sharing a one-block system prompt (id 0); each
    turn re-sends the previous prompt plus new blocks; arrivals 200 s apart (no queueing)."""
    rng, next_id, chats, lines = random.Random(seed), 1, [], []
    for i in range(n):
        if not chats or rng.random() < 0.4:
            chats.append([0])
        chat = rng.choice(chats)
        for _ in range(rng.randint(1, 4)):
            chat.append(next_id)
            next_id += 1
        length = 512 * (len(chat) - 1) + rng.randint(1, 512)
        lines.append({"timestamp": 200_000 * i, "input_length": length, "output_length": 50, "hash_ids": chat[:]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def simulate(trace: Trace, capacity: int) -> list:
    system = paper_case_study().system
    caches = PrefixCaches(capacity, trace.scaling.block_tokens)
    sim = Simulator(system, Deployment(0, 1, 1), HomogeneousPolicy(), SimConfig(trace.duration_s + 3600),
                    caches=caches)
    return sim.run(trace_arrivals(trace))


def test_one_node_unbounded_cache_hits_exactly_the_full_block_bound(tmp_path: Path):
    trace = Trace.load(conversations(tmp_path / "chat.jsonl"))
    reqs = simulate(trace, capacity=1 << 20)
    want = [min(full, r.input_length - 1) for (_, full), r in zip(reusable_per_request(trace.requests),
                                                                     trace.requests, strict=True)]
    assert [r.cached for r in reqs] == want
    assert sum(want) > 0.4 * sum(r.input_length for r in trace.requests)
    small = simulate(trace, capacity=6)
    assert sum(r.cached for r in small) < sum(want), "a small cache evicts"


def test_lru_evicts_a_prompts_tail_before_its_head():
    lru = BlockLRU(4)
    lru.store([1, 2, 3])
    lru.store([7, 8])
    assert lru.match([1, 2, 3]) == 2 and lru.match([7, 8]) == 2 and lru.evicted == 1


def test_hits_are_usable_only_at_checkpoint_multiples():
    caches = PrefixCaches(100, 16, checkpoint_tokens=48)
    caches.store("n", [1, 2, 3, 4, 5])
    assert caches.hit_tokens("n", [1, 2, 3, 4, 5]) == 48 and caches.hit_tokens("n", [1, 2]) == 0
    assert PrefixCaches(100, 16).hit_tokens("n", [1]) == 0
    with pytest.raises(ValueError, match="multiple of the block size 16"):
        PrefixCaches(100, 16, checkpoint_tokens=40)


def test_sim_trace_command_on_the_slice(tmp_path: Path):
    cmd = [sys.executable, "-m", "prfaas.cli", "sim", "--trace", str(SLICE), "--length-factor", "1"]
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    bound = out["trace"]["reuse_bound"]
    assert out["trace"]["requests"] == 200 and 0 < bound["fraction"] < 1
    runs = out["runs"]
    assert set(runs) == {"prfaas/off", "prfaas/prefill", "prfaas/full"}
    assert runs["prfaas/off"]["hit_rate"] == 0
    for row in runs.values():
        assert row["completed"] + row["unserved"] <= 200 and row["ttft_p50"] > 0 and row["cross_cluster_gb"] > 0
        assert row["hit_rate"] <= bound["full_block_fraction"]
    assert runs["prfaas/prefill"]["hit_rate"] > 0
    assert runs["prfaas/full"]["cross_cluster_gb"] <= runs["prfaas/prefill"]["cross_cluster_gb"]
    r = subprocess.run([*cmd, "--cache", "full", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "prfaas/full: throughput=" in r.stdout and "hit_rate=" in r.stdout
    assert (tmp_path / "sim_trace_mooncake_slice.png").stat().st_size > 10_000


def test_sim_trace_command_refuses_bad_input(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    for args, message in [(["--trace", str(bad)], "bad.jsonl:1: missing 'input_length'"),
                          (["--trace", str(SLICE), "--length-factor", "3"], "divisor of 512"),
                          (["--trace", str(tmp_path / "none.jsonl")], "No such file"),
                          (["--trace", str(SLICE), "--cache-blocks", "0"], "--cache-blocks must be positive"),
                          (["--trace", str(SLICE), "--length-factor", "8", "--checkpoint-tokens", "100"],
                           "multiple of the block (64 tokens)")]:
        r = subprocess.run([sys.executable, "-m", "prfaas.cli", "sim", *args], capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
