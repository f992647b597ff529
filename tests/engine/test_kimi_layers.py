"""Kimi-Linear layers against transformers' KimiLinearForCausalLM (the numerical oracle).

Tiny random checkpoints are written with `save_pretrained`, loaded into our model by name, and run
with hand-built ForwardMeta over a paged latent pool and state slots: whole-prompt prefill,
prefill then single-token decode, batched decode against each sequence alone, and the MLA
absorbed decode against the expanded form.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from prfaas.engine.executor import Executor
from prfaas.kv.layout import KvLayout, StateCache
from prfaas.messages import SamplingParams
from prfaas.model import fast_decode, kimi_linear
from prfaas.model.base import ForwardMeta
from prfaas.model.config import ModelConfig
from prfaas.model.hybrid import HybridForCausalLM
from prfaas.model.loader import load_model

transformers = pytest.importorskip("transformers")

BLOCK = 16
TOL = 1e-4

BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=12,
    linear_conv_kernel_dim=4,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.05,
)
CONFIGS: dict[str, dict[str, Any]] = {
    # q_lora None, grouped MoE routing (2 groups, 1 kept), full layer in the middle
    "moe_groups": dict(
        num_hidden_layers=4,
        num_attention_heads=2,
        q_lora_rank=None,
        linear_num_heads=2,
        linear_head_dim=8,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        num_local_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
    ),
    # q_lora set, all dense, more heads, first layer full
    "dense_qlora": dict(
        num_hidden_layers=3,
        num_attention_heads=4,
        q_lora_rank=24,
        linear_num_heads=4,
        linear_head_dim=16,
        layer_types=["full_attention", "linear_attention", "linear_attention"],
        mlp_layer_types=["dense"] * 3,
    ),
    # q_lora set, ungrouped MoE, two shared experts, no renormalisation
    "moe_shared": dict(
        num_hidden_layers=3,
        num_attention_heads=3,
        q_lora_rank=12,
        linear_num_heads=3,
        linear_head_dim=8,
        layer_types=["linear_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["sparse"] * 3,
        num_local_experts=4,
        num_experts_per_tok=3,
        n_group=1,
        topk_group=1,
        n_shared_experts=2,
        norm_topk_prob=False,
        routed_scaling_factor=1.5,
    ),
}


def make_checkpoint(path: Path, name: str, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """Saves a tiny random KimiLinearForCausalLM; norms and router biases are randomised too,
    so that a weight loaded into the wrong place shows."""
    cfg = transformers.KimiLinearConfig(**BASE, **CONFIGS[name])
    torch.manual_seed(seed)
    hf = transformers.KimiLinearForCausalLM(cfg).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for bname, b in hf.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    hf.save_pretrained(path)
    return path, hf


def load_ours(path: Path) -> HybridForCausalLM:
    from safetensors.torch import load_file

    model = HybridForCausalLM(ModelConfig.from_dir(path))
    state = {kimi_linear.checkpoint_name(k): v for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = rel_err(ours, ref)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


@torch.no_grad()
def hf_logits(hf: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0].float()  # (T, vocab)


def prompt_of(n: int, seed: int, vocab: int = 96) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- a hand-built executor: paged latent pool, state slots, ForwardMeta ---------------------
@dataclass
class Seq:
    tokens: list[int]
    block_table: list[int]
    slot: int
    num_cached: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)


class Runner:
    def __init__(self, model: HybridForCausalLM, num_blocks: int = 48, num_slots: int = 4) -> None:
        self.model = model
        dtype = next(model.parameters()).dtype
        self.caches = KvLayout(model.config, BLOCK, dtype).allocate(num_blocks, num_slots).layer_caches

    def new_seq(self, tokens: list[int], index: int) -> Seq:
        """Sequence `index` gets slot `index` and 8 blocks, in reverse order so paging matters."""
        return Seq(list(tokens), [index * 8 + b for b in reversed(range(8))], slot=index)

    @torch.no_grad()
    def step(self, seqs: list[Seq], counts: list[int]) -> torch.Tensor:
        """Feeds the next `counts[i]` tokens of each sequence; returns the logits (T, vocab)."""
        ids, positions, slot_mapping = [], [], []
        for s, n in zip(seqs, counts, strict=True):
            for p in range(s.num_cached, s.num_cached + n):
                ids.append(s.tokens[p])
                positions.append(p)
                slot_mapping.append(s.block_table[p // BLOCK] * BLOCK + p % BLOCK)
        meta = ForwardMeta(
            positions=torch.tensor(positions),
            query_lens=list(counts),
            context_lens=[s.num_cached + n for s, n in zip(seqs, counts, strict=True)],
            block_tables=[torch.tensor(s.block_table) for s in seqs],
            slot_mapping=torch.tensor(slot_mapping),
            state_slots=[s.slot for s in seqs],
        )
        logits = self.model(torch.tensor(ids), meta, self.caches)
        start = 0
        for s, n in zip(seqs, counts, strict=True):
            s.num_cached += n
            s.logits.append(logits[start : start + n])
            start += n
        return logits


# --- tests --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    path, hf = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return request.param, hf, load_ours(path)


def test_config_parses_saved_checkpoint(pair):
    name, hf, ours = pair
    c, h = ours.config, hf.config
    assert c.layer_types == tuple("full" if t == "full_attention" else "linear" for t in h.layer_types)
    assert c.mlp_types == tuple("moe" if t == "sparse" else "dense" for t in h.mlp_layer_types)
    assert (c.linear.num_k_heads, c.linear.head_k_dim) == (h.linear_num_heads, h.linear_head_dim)
    assert c.full.q_lora_rank == h.q_lora_rank and c.full.v_head_dim == h.v_head_dim
    if "moe" in c.mlp_types:
        assert c.moe is not None
        assert (c.moe.num_experts, c.moe.top_k) == (h.num_local_experts, h.num_experts_per_tok)
        assert (c.moe.num_groups, c.moe.topk_groups) == (h.n_group, h.topk_group)
        assert c.moe.shared_intermediate_size == h.moe_intermediate_size * h.n_shared_experts
        assert c.moe.norm_topk_prob == h.norm_topk_prob
        assert c.moe.routed_scaling_factor == h.routed_scaling_factor


@pytest.mark.parametrize("kernel", [True, False], ids=["c_kernel", "torch_chunked"])
def test_prefill_matches_transformers_layer_by_layer(pair, monkeypatch, kernel):
    """Both delta-rule paths: our C kernel (the CPU default) and the chunked torch form."""
    from prfaas.model import linear_mixing
    from prfaas.model.ops import cpu_kernel

    if kernel and not cpu_kernel.available():
        pytest.skip("no C compiler for the CPU kernel")
    if not kernel:
        monkeypatch.setattr(linear_mixing.cpu_kernel, "available", lambda: False)
    name, hf, ours = pair
    tokens = prompt_of(40, seed=1)
    with torch.no_grad():
        hf_out = hf(torch.tensor([tokens]), output_hidden_states=True)
    run = Runner(ours)
    seq = run.new_seq(tokens, 0)
    meta_run = Runner(ours)  # same inputs, layer by layer, to name the first layer that diverges
    s2 = meta_run.new_seq(tokens, 0)
    with torch.no_grad():
        meta = ForwardMeta(
            positions=torch.arange(40),
            query_lens=[40],
            context_lens=[40],
            block_tables=[torch.tensor(s2.block_table)],
            slot_mapping=torch.tensor([s2.block_table[p // BLOCK] * BLOCK + p % BLOCK for p in range(40)]),
            state_slots=[0],
        )
        x = ours.embed(torch.tensor(tokens))
        for i in range(ours.num_layers - 1):  # the last hidden state transformers returns is normed
            x = ours.layer(i, x, meta, meta_run.caches[i])
            assert_close(
                x, hf_out.hidden_states[i + 1][0], f"{name}: layer {i} ({ours.config.layer_types[i]}) output"
            )
    logits = run.step([seq], [40])
    assert_close(logits, hf_out.logits[0], f"{name}: prefill logits")


@pytest.mark.parametrize("fast", [True, False], ids=["fused_step", "torch_step"])
def test_prefill_then_decode_matches_transformers(pair, fast):
    """Decode by the torch layers and by the fused C step (prfaas/model/fast_decode) on the same
    pool: each step's logits against transformers'."""
    name, hf, ours = pair
    if fast and not fast_decode.available():
        pytest.skip("no C compiler for the fused decode step")
    tokens = prompt_of(40, seed=2)
    ref = hf_logits(hf, tokens)
    run = Runner(ours)
    seq = run.new_seq(tokens, 0)
    assert_close(run.step([seq], [30]), ref[:30], f"{name}: prefill(30) logits")
    fused = fast_decode.FastDecoder(ours, run.caches, BLOCK) if fast else None
    for t in range(30, 40):
        if fused is None:
            got = run.step([seq], [1])[0]
        else:
            got = fused.step([tokens[t]], [t], [seq.slot], [seq.block_table])[0][0]
        assert_close(got, ref[t], f"{name}: decode logits at position {t} ({'fused' if fast else 'torch'} step)")


def test_long_prompt_across_chunks_and_blocks(pair):
    """A 100-token prompt: the delta rule crosses a 64-token chunk and the latents span 7 blocks."""
    name, hf, ours = pair
    tokens = prompt_of(100, seed=5)
    ref = hf_logits(hf, tokens)
    run = Runner(ours)
    seq = run.new_seq(tokens, 1)
    assert_close(run.step([seq], [97]), ref[:97], f"{name}: prefill(97) logits")
    for t in range(97, 100):
        assert_close(run.step([seq], [1])[0], ref[t], f"{name}: decode logits at position {t}")


def test_batched_decode_matches_alone(pair):
    name, hf, ours = pair
    lengths, steps = (5, 23, 37), 6
    prompts = [prompt_of(n + steps, seed=10 + n) for n in lengths]

    def run_alone(j: int) -> list[torch.Tensor]:
        run = Runner(ours)
        seq = run.new_seq(prompts[j], j)
        run.step([seq], [lengths[j]])
        return [run.step([seq], [1])[0] for _ in range(steps)]

    alone = [run_alone(j) for j in range(3)]
    run = Runner(ours)
    seqs = [run.new_seq(p, j) for j, p in enumerate(prompts)]
    run.step(seqs, list(lengths))  # one packed prefill of three sequences
    for t in range(steps):
        logits = run.step(seqs, [1, 1, 1])
        for j in range(3):
            assert_close(logits[j], alone[j][t], f"{name}: batched decode step {t}, sequence {j} vs alone")
    for j in range(3):
        ref = hf_logits(hf, prompts[j])
        got = torch.cat(seqs[j].logits[1:])
        assert_close(got, ref[lengths[j] :], f"{name}: batched decode of sequence {j} vs transformers")


def assert_greedy(hf: torch.nn.Module, prompt: list[int], output: list[int], what: str) -> None:
    """Each generated token is transformers' argmax given the tokens before it (or a near tie)."""
    ref = hf_logits(hf, prompt + output[:-1])[len(prompt) - 1 :]
    for t, (tok, row) in enumerate(zip(output, ref, strict=True)):
        best = int(row.argmax())
        assert tok == best or row[best] - row[tok] < 1e-4, (
            f"{what}: token {t} is {tok}, transformers picks {best}"
        )


@pytest.mark.parametrize("fast", [True, False], ids=["fused_step", "torch_step"])
def test_executor_greedy_matches_transformers(pair, fast):
    """Both decode steps: the fused C step (the CPU default) and the torch layers."""
    if fast and not fast_decode.available():
        pytest.skip("no C compiler for the fused decode step")
    name, hf, ours = pair
    ex = Executor(ours, KvLayout(ours.config, block_size=BLOCK), num_blocks=24, num_slots=4, fast_decode=fast)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    prompts = [prompt_of(n, seed=20 + n) for n in (7, 33, 18)]
    seqs = [ex.add(f"r{j}", p, params) for j, p in enumerate(prompts)]
    for s in seqs:
        ex.prefill(s)
    while not all(s.finished for s in seqs):
        ex.decode_step(seqs)
    for j, s in enumerate(seqs):
        assert len(s.output) == 6
        assert_greedy(hf, prompts[j], s.output, f"{name}: executor sequence {j}")
        ex.free(s)
    assert ex.blocks.num_free == ex.blocks.num_blocks
    assert (ex._fast is not None) == fast


def test_loader_reads_transformers_checkpoint(tmp_path):
    path, _ = make_checkpoint(tmp_path, "moe_groups")
    model = load_model(path)
    ref = load_ours(path).state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_mla_absorbed_decode_matches_expanded(pair):
    name, hf, ours = pair
    tokens = prompt_of(36, seed=3)
    runs = []
    for absorb in (True, False):
        for layer in ours.model.layers:
            if isinstance(layer.self_attn, kimi_linear.KimiMLA):
                layer.self_attn.absorb_decode = absorb
        run = Runner(ours)
        seq = run.new_seq(tokens, 0)
        run.step([seq], [30])
        runs.append(torch.stack([run.step([seq], [1])[0] for _ in range(6)]))
    for layer in ours.model.layers:
        if isinstance(layer.self_attn, kimi_linear.KimiMLA):
            layer.self_attn.absorb_decode = True
    assert_close(runs[0], runs[1], f"{name}: absorbed vs expanded MLA decode logits", tol=1e-5)


def test_mla_attend_forms_agree_on_random_inputs():
    cfg = ModelConfig.from_dict(
        transformers.KimiLinearConfig(**BASE, **CONFIGS["dense_qlora"]).to_dict()
        | {"model_type": "kimi_linear"}
    )
    torch.manual_seed(0)
    mla = kimi_linear.KimiMLA(cfg)
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.3)
        from prfaas.model.ops.attention import TorchAttention

        meta = types.SimpleNamespace(attn=TorchAttention())
        q = torch.randn(5, cfg.full.num_heads, mla.qk_dim)
        ctx = mla.latents(torch.randn(21, cfg.hidden_size))
        a = mla.attend_expanded(q, ctx, meta)  # type: ignore[arg-type]
        b = mla.attend_absorbed(q, ctx, meta)  # type: ignore[arg-type]
    assert_close(b, a, "MLA absorbed vs expanded attention output", tol=1e-5)


def test_bf16_keeps_state_float32_and_tracks_fp32(pair):
    name, hf, ours = pair
    tokens = prompt_of(24, seed=4)
    ref = hf_logits(hf, tokens)
    model = HybridForCausalLM(ours.config)
    model.load_state_dict(ours.state_dict())
    model = model.to(torch.bfloat16).eval()
    run = Runner(model)
    seq = run.new_seq(tokens, 0)
    run.step([seq], [20])
    decode = torch.stack([run.step([seq], [1])[0] for _ in range(4)])
    for c in run.caches:
        if isinstance(c, StateCache):
            assert c.recurrent.dtype == torch.float32
    assert torch.isfinite(decode).all()
    assert_close(decode, ref[20:24], f"{name}: bf16 decode logits vs fp32 transformers", tol=5e-2)


def test_checkpoint_names_map_to_ours():
    assert kimi_linear.checkpoint_name("model.layers.3.block_sparse_moe.experts.0.w1.weight") == (
        "model.layers.3.mlp.experts.0.w1.weight"
    )
    assert (
        kimi_linear.checkpoint_name("model.layers.0.mlp.gate_proj.weight")
        == "model.layers.0.mlp.gate_proj.weight"
    )
