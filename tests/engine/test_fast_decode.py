"""The fused C decode step against the torch reference step, on the built-in presets and on config
variants that reach its other paths: teacher-forced logits and greedy tokens at batch 1 and in a
mixed batch, a batch that changes while it decodes, bf16 against the float32 reference, the
switches, and the checks on what it is handed.

Exactness in float32: the two steps sum in different orders, so their logits differ by float32
rounding, and a choice whose two candidates are that close can go either way. Top-k expert routing
is such a choice (router probabilities 9e-8 apart were seen). Each comparison therefore checks
first that the reference's routing had no near tie on these inputs (every routed expert's score
clear of the first unrouted one), so that rounding cannot have changed a route; then the fused
step must give the reference's greedy tokens at every step and logits equal to rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prfaas.engine.executor import Executor, SeqState
from prfaas.kv.layout import KvLayout
from prfaas.messages import SamplingParams
from prfaas.model import fast_decode
from prfaas.model.config import ModelConfig
from prfaas.model.hybrid import HybridForCausalLM
from prfaas.model.kimi_linear import KimiRouter
from prfaas.model.loader import load_model
from prfaas.model.presets import init_weights, preset_config, save_weights
from prfaas.model.qwen3_next import SparseMoe

pytestmark = pytest.mark.skipif(not fast_decode.available(), reason="no C compiler for the fused decode step")

FAMILIES = ["qwen3_next", "kimi_linear"]
GAP = 1e-5  # smallest routing gap that float32 rounding (~1e-7 here) cannot close
# variants that take the step's other paths: q_lora and biases in MLA, grouped routing, a sigmoid
# router without renormalisation; every Qwen3-Next layer MoE, no renormalisation, another rotary
VARIANTS = {
    "kimi_linear": {"q_lora_rank": 32, "attention_bias": True, "num_expert_group": 2, "topk_group": 1,
                    "moe_renormalize": False},
    "qwen3_next": {"decoder_sparse_step": 1, "norm_topk_prob": False, "rope_parameters": {
        "rope_type": "default", "rope_theta": 50000.0, "partial_rotary_factor": 0.5}},
}


def write_model(out: Path, family: str, changes: dict | None = None, seed: int = 7) -> Path:
    raw = {**preset_config(family), **(changes or {})}
    model = HybridForCausalLM(ModelConfig.from_dict(raw))
    init_weights(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(raw))
    return out


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(family, tmp_path_factory):
    return write_model(tmp_path_factory.mktemp(family), family)


def executor(model, fast: bool, dtype=torch.float32, num_slots: int = 16) -> Executor:
    layout = KvLayout(model.config, block_size=16, dtype=dtype)
    return Executor(model, layout, num_blocks=256, num_slots=num_slots, fast_decode=fast)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class RoutingGaps:
    """The smallest gap, over every token of the reference's decode steps while `active`, between
    the last expert routed and the first one not (for a grouped router also between the last group
    kept and the first one dropped)."""

    def __init__(self, model: HybridForCausalLM) -> None:
        self.smallest, self.active = float("inf"), False
        self.handles = [m.register_forward_hook(self._hook) for m in model.modules()
                        if isinstance(m, SparseMoe | KimiRouter)]

    def _gap(self, scores: torch.Tensor, k: int) -> None:
        if k < scores.shape[-1]:
            top = scores.topk(k + 1, dim=-1).values
            self.smallest = min(self.smallest, (top[:, k - 1] - top[:, k]).min().item())

    def _hook(self, module, inputs, output) -> None:
        if not self.active:
            return
        x = inputs[0]
        if isinstance(module, SparseMoe):
            self._gap(torch.softmax(module.gate(x).float(), dim=-1), module.top_k)
            return
        choice = torch.sigmoid(x.float() @ module.weight.float().t()) + module.e_score_correction_bias
        if module.num_groups > 1:  # as the router groups them
            grouped = choice.view(x.shape[0], module.num_groups, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
            self._gap(group_scores, module.topk_groups)
            best = group_scores.topk(module.topk_groups, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        self._gap(choice, module.top_k)

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def check(self) -> None:
        assert self.smallest > GAP, f"these inputs have a routing near tie ({self.smallest:.1e}): pick others"


def lockstep(ref: Executor, fast: Executor, seqs: tuple[list[SeqState], list[SeqState]], steps: int,
             gaps: RoutingGaps):
    """Both executors step the same sequences; each step both are fed the reference's token.
    Yields (reference logits, fused logits, reference greedy, fused greedy)."""
    a, b = seqs
    for _ in range(steps):
        ba, bb = ref.prepare_decode(a), fast.prepare_decode(b)
        gaps.active = True
        la, ga = ref.decode_logits(ba)
        gaps.active = False
        lb, gb = fast.decode_logits(bb)
        yield la, lb, ga, gb
        for sa, sb, tok in zip(ba, bb, ga, strict=True):
            for ex, s in ((ref, sa), (fast, sb)):
                s.num_cached += 1
                ex.append_token(s, tok)


def started(ex: Executor, lens: list[int], max_tokens: int = 64) -> list[SeqState]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    seqs = [ex.add(f"r{i}", prompt(n, n), params) for i, n in enumerate(lens)]
    for s in seqs:
        ex.prefill(s)
    return seqs


def assert_matches(model, lens: list[int], steps: int = 32) -> None:
    ref, fast = executor(model, False), executor(model, True)
    gaps = RoutingGaps(model)
    try:
        for la, lb, ga, gb in lockstep(ref, fast, (started(ref, lens), started(fast, lens)), steps, gaps):
            assert fast._fast is not None
            gaps.check()  # first: a near tie on these inputs would make the comparison meaningless
            scale = la.abs().max().item()
            assert (la - lb).abs().max().item() <= 1e-4 * scale
            assert ga == gb
    finally:
        gaps.close()
    gaps.check()


@pytest.mark.parametrize("lens", [[40], [4, 18, 33, 64, 6]], ids=["batch1", "mixed"])
def test_fused_step_matches_the_reference(model_dir, lens):
    assert_matches(load_model(model_dir), lens)


@pytest.mark.parametrize("fam", FAMILIES)
def test_fused_step_matches_on_config_variants(fam, tmp_path):
    model = load_model(write_model(tmp_path / fam, fam, VARIANTS[fam], seed=3))
    assert_matches(model, [9, 30, 16], steps=12)


def decode_all(ex: Executor, seqs: list[SeqState], gaps: RoutingGaps | None = None) -> None:
    while not all(s.finished for s in seqs):
        if gaps is not None:
            gaps.active = True
        ex.decode_step(seqs)
        if gaps is not None:
            gaps.active = False


def test_free_running_greedy_equal_and_thread_count_invariant(model_dir):
    """Free-running greedy tokens, reference and fused, equal; the fused step at one thread and at
    two gives the same bits (the threads split columns and heads, never a sum). Prefill runs at one
    thread in every run (torch's products round differently with the thread count)."""
    model = load_model(model_dir)
    gaps = RoutingGaps(model)
    outs, logits = [], []
    before = torch.get_num_threads()
    try:
        for fast, threads in ((False, 1), (True, 1), (True, 2)):
            torch.set_num_threads(1)
            ex = executor(model, fast)
            seqs = started(ex, [4, 18, 40], max_tokens=33)
            torch.set_num_threads(threads)
            logits.append(ex.decode_logits(ex.prepare_decode(seqs))[0])
            for s in seqs:  # that step's token, so that the run goes on from it
                s.num_cached += 1
                ex.append_token(s, int(logits[-1][seqs.index(s)].argmax()))
            decode_all(ex, seqs, None if fast else gaps)
            outs.append([s.output for s in seqs])
    finally:
        torch.set_num_threads(before)
        gaps.close()
    gaps.check()
    assert outs[0] == outs[1] == outs[2]
    assert torch.equal(logits[1], logits[2])


def test_batch_that_changes_while_decoding(model_dir):
    """Held slots between the batch's (not one run), sequences finishing, one joining mid-way,
    block tables growing across block boundaries: the kept tables follow every change."""
    model = load_model(model_dir)
    gaps = RoutingGaps(model)
    outs = []
    try:
        for fast in (False, True):
            ex = executor(model, fast)
            held = [ex.add(f"h{i}", prompt(4, i), SamplingParams(max_tokens=2)) for i in range(3)]
            ex.free(held[1])
            seqs = [ex.add(f"a{i}", prompt(n, n), SamplingParams(max_tokens=m, ignore_eos=True))
                    for i, (n, m) in enumerate([(14, 20), (31, 5), (2, 20)])]
            for s in seqs:
                ex.prefill(s)
            every = list(seqs)
            for step in range(20):
                if step == 7:
                    late = ex.add("late", prompt(15, 99), SamplingParams(max_tokens=10, ignore_eos=True))
                    ex.prefill(late)
                    seqs.append(late)
                    every.append(late)
                gaps.active = not fast
                ex.decode_step(seqs)
                gaps.active = False
                for s in [s for s in seqs if s.finished]:
                    ex.free(s)
                seqs = [s for s in seqs if not s.finished]
            outs.append({s.request_id: s.output for s in every})
    finally:
        gaps.close()
    gaps.check()
    assert outs[0] == outs[1]
    assert all(len(o) > 1 for o in outs[0].values())


def test_bf16_is_as_close_to_float32_as_the_torch_step(model_dir):
    """bf16 cannot match float32 to rounding; the fused bf16 step must be as close to the float32
    reference as the torch bf16 step is (fed the float32 reference's tokens, 16 steps)."""
    lens = [5, 40]
    ref32, ref16, fast16 = (executor(load_model(model_dir, dtype=d), f, d)
                            for d, f in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)))
    seqs = [started(ex, lens) for ex in (ref32, ref16, fast16)]
    err = {"torch": 0.0, "fused": 0.0}
    agree = {"torch": 0, "fused": 0}
    for _ in range(16):
        batches = [ex.prepare_decode(s) for ex, s in zip((ref32, ref16, fast16), seqs, strict=True)]
        (l32, g32), (l16, g16), (lf, gf) = (ex.decode_logits(b) for ex, b in
                                            zip((ref32, ref16, fast16), batches, strict=True))
        err["torch"] += (l16 - l32).abs().mean().item()
        err["fused"] += (lf - l32).abs().mean().item()
        agree["torch"] += sum(a == b for a, b in zip(g16, g32, strict=True))
        agree["fused"] += sum(a == b for a, b in zip(gf, g32, strict=True))
        for ex, batch in zip((ref32, ref16, fast16), batches, strict=True):
            for s, tok in zip(batch, g32, strict=True):
                s.num_cached += 1
                ex.append_token(s, tok)
    assert fast16._fast is not None
    assert err["fused"] <= 1.5 * err["torch"], err
    assert agree["fused"] >= agree["torch"] - 2, agree


def test_switches_and_fallbacks(model_dir, monkeypatch):
    model = load_model(model_dir)
    on, off = executor(model, True), executor(model, False)
    for ex in (on, off):
        ex.decode_step(started(ex, [8]))
    assert on._fast is not None and off._fast is None
    monkeypatch.setenv("PRFAAS_FAST_DECODE", "0")
    env_off = executor(model, None)
    env_off.decode_step(started(env_off, [8]))
    assert env_off._fast is None
    monkeypatch.delenv("PRFAAS_FAST_DECODE")
    wide = executor(load_model(model_dir, dtype=torch.float64), None, torch.float64)  # not covered: torch step
    seq = started(wide, [8])[0]
    wide.decode_step([seq])
    assert wide._fast is None and len(seq.output) == 2


def test_without_c_kernels_the_step_is_unavailable(model_dir):
    """As on a machine without a C compiler: the executor runs the torch step from the start."""
    code = (
        "import sys; from prfaas.model import fast_decode; from prfaas.model.loader import load_model\n"
        "from prfaas.engine.executor import Executor; from prfaas.kv.layout import KvLayout\n"
        "m = load_model(sys.argv[1]); ex = Executor(m, KvLayout(m.config, block_size=16), 64, 4)\n"
        "print(fast_decode.available(), ex.fast_decode)"
    )
    env = {**os.environ, "PRFAAS_CPU_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code, str(model_dir)], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_bad_step_inputs_are_refused(model_dir):
    model = load_model(model_dir)
    ex = executor(model, True)
    seq = started(ex, [20])[0]
    ex.decode_step([seq])
    dec = ex._fast
    assert dec is not None
    table, pos = seq.block_table, seq.num_tokens - 1
    with pytest.raises(ValueError, match="vocabulary"):
        dec.step([model.config.vocab_size], [pos], [seq.slot], [table])
    with pytest.raises(ValueError, match="past the sequence"):
        dec.step([1], [16 * len(table)], [seq.slot], [table])
    with pytest.raises(ValueError, match="state slot"):
        dec.step([1], [pos], [99], [table])
    with pytest.raises(ValueError, match="block id"):
        dec.step([1], [pos], [seq.slot], [[*table[:-1], 10_000]])
    with pytest.raises(ValueError, match="one token"):
        dec.step([1, 2], [pos], [seq.slot], [table])


def test_block_table_width_follows_the_tables_not_the_batch_changes():
    """The padded tables grow with the longest table only: a continuous batch changes size at every
    admission and completion, and its width must not grow with those changes."""
    from prfaas.model.fast_decode import _Tables

    t = _Tables(num_blocks=1000)
    for step in range(200):
        b = 1 + step % 7  # the batch size changes at every step
        rows = t.update([[i * 10 + j for j in range(3)] for i in range(b)])
        assert rows.shape == (b, 8)
    assert t.update([list(range(20))]).shape == (1, 20)
