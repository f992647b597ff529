"""Accelerator profile emulation: a node computes for real and holds each result until the
profile's time has passed. Tokens stay exactly those of an unemulated run; the hold is at least
the emulated time; the accounting says how much of it was real compute.

Cores wired in one process, the KV through the real codec and receiver (tests/support.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from prfaas.engine.llm import LLM, build_executor
from prfaas.eval.emulate import EmulatedProfile, Emulator
from prfaas.messages import SamplingParams
from prfaas.model.presets import write_preset
from prfaas.scheduling.policy import PrfaasPolicy
from prfaas.scheduling.profiles import Profile
from prfaas.transport.receiver import KvReceiver
from services.decode.core import DecodeNode
from services.prefill.core import PrefillNode
from services.router.core import GenerateInput, Node, Router
from tests.support import Directory, MemoryClients, MemoryPush


def test_profile_times_and_json_roundtrip(tmp_path):
    p = EmulatedProfile("h200", Profile.from_points([1024, 8192], [0.44, 0.72]),
                        Profile.from_points([1, 20], [0.025, 0.025]), time_factor=2.0, length_scale=64,
                        output_scale=8)
    assert p.prefill_time(16) == pytest.approx(2 * 0.44)  # 16 real tokens = 1024 profile tokens
    assert p.prefill_time(128) == pytest.approx(2 * 0.72)
    assert p.decode_time(5) == pytest.approx(2 * 8 * 0.025)
    assert p.decode_time(0) == 0.0
    p.save(tmp_path / "p.json")
    assert EmulatedProfile.load(tmp_path / "p.json") == p
    with pytest.raises(ValueError, match="time_factor"):
        EmulatedProfile("x", time_factor=0)
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "speed": 3}))
    with pytest.raises(ValueError, match="unknown keys"):
        EmulatedProfile.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        EmulatedProfile.load(tmp_path / "broken.json")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_preset(tmp_path_factory.mktemp("qwen"), "qwen3_next", "tiny", seed=3))


async def _serve(model_dir: str, emulator: Emulator | None, prompt: list[int], params: SamplingParams):
    dec_ex, _ = build_executor(model_dir, num_blocks=256, num_slots=4)
    pre_ex, _ = build_executor(model_dir, num_blocks=256, num_slots=4)
    rx = KvReceiver()
    decode = DecodeNode("d0", dec_ex, rx, transfer_timeout_s=30, emulator=emulator)
    prefill = PrefillNode("p0", pre_ex, lambda job: MemoryPush(rx, job, dec_ex.layout), emulator=emulator)
    router = Router(Directory([Node("p0", "local", "prefill", "p0"), Node("d0", "local", "decode", "d0")]),
                    MemoryClients(decode, {"p0": prefill}), PrfaasPolicy(threshold=1e9))
    decode.start()
    t0 = time.monotonic()
    try:
        outs, first_at = [], None
        async for o in router.generate(GenerateInput("r", "", prompt, params, "auto")):
            first_at = first_at or time.monotonic() - t0
            outs.append(o)
    finally:
        await decode.stop()
    return [t for o in outs for t in o.token_ids], first_at, time.monotonic() - t0


async def test_emulated_node_holds_results_and_keeps_tokens(model_dir, tmp_path):
    prompt = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    stats = tmp_path / "stats.json"
    # 96 real tokens x 16 = 1536 profile tokens -> 0.5 + (1536-1024)/1024 * 0.1 = 0.55 s; decode 0.1 s/step
    prof = EmulatedProfile("slow", Profile.from_points([1024, 2048], [0.5, 0.6]),
                           Profile.from_points([1, 8], [0.05, 0.05]), time_factor=1.0, length_scale=16,
                           output_scale=2, stats_path=str(stats))
    emu = Emulator(prof)
    tokens, ttft, total = await _serve(model_dir, emu, prompt, params)
    assert tokens == LLM(build_executor(model_dir)[0]).generate([prompt], params)[0]
    assert ttft >= 0.55, f"the first token came after {ttft:.3f} s, before the emulated prefill time"
    assert total >= 0.55 + 4 * 0.1, f"5 tokens in {total:.3f} s: decode steps were not held"
    acct = emu.acct
    assert acct.events == {"prefill": 1, "decode": 4}
    assert acct.emulated_s["prefill"] >= 0.55 and acct.emulated_s["decode"] >= 0.4
    assert 0 < acct.real_s["prefill"] < acct.emulated_s["prefill"] or acct.overruns["prefill"] == 1
    written = json.loads(stats.read_text())
    assert written["events"]["prefill"] == 1 and written["profile"] == "slow"
