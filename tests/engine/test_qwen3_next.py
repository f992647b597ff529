"""Our Qwen3-Next against transformers' own implementation, the numerical oracle."""

from __future__ import annotations

import pytest
import torch

from prfaas.engine.executor import Executor
from prfaas.engine.llm import LLM
from prfaas.kv.layout import KvLayout
from prfaas.messages import SamplingParams
from prfaas.model import fast_decode
from prfaas.model.loader import load_model

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "dense-gqa": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        num_experts=0,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    ),
    "moe": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    ),
    "wide-heads": dict(
        num_attention_heads=8,
        num_key_value_heads=4,
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        num_experts=4,
        num_experts_per_tok=1,
        decoder_sparse_step=2,
        norm_topk_prob=False,
        layer_types=["full_attention", "linear_attention", "linear_attention", "full_attention"],
    ),
}


def make_checkpoint(path, name: str, seed: int = 0):
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        head_dim=16,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        initializer_range=0.1,
        max_position_embeddings=512,
    )
    kw.update(CONFIGS[name])
    cfg = transformers.Qwen3NextConfig(**kw)
    model = transformers.Qwen3NextForCausalLM(cfg).eval()
    # non-trivial norms, so that a wrong (1 + w) convention shows
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("kernel", [True, False], ids=["c_kernel", "torch_chunked"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_logits_match_transformers(tmp_path, monkeypatch, name, kernel):
    """Both delta-rule paths of the prefill: our C kernel (the CPU default) and the chunked torch
    form (other devices, or no C compiler)."""
    from prfaas.model import linear_mixing
    from prfaas.model.ops import cpu_kernel

    if kernel and not cpu_kernel.available():
        pytest.skip("no C compiler for the CPU kernel")
    if not kernel:
        monkeypatch.setattr(linear_mixing.cpu_kernel, "available", lambda: False)
    ref = make_checkpoint(tmp_path, name)
    model = load_model(tmp_path)
    ex = Executor(model, KvLayout(model.config, block_size=16), num_blocks=64, num_slots=4)
    prompt = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = ex.add("r", prompt, SamplingParams(max_tokens=4))
    ids = torch.tensor(prompt)
    meta = ex._meta([seq], [len(prompt)], list(range(len(prompt))))
    with torch.inference_mode():
        ours = model(ids, meta, ex.caches)
        theirs = ref(ids[None]).logits[0].float()
    assert rel_err(ours, theirs) < 1e-4, f"logits rel err {rel_err(ours, theirs):.2e}"


@pytest.mark.parametrize("fast", [True, False], ids=["fused_step", "torch_step"])
@pytest.mark.parametrize("name", ["dense-gqa", "moe"])
def test_greedy_generation_matches_transformers(tmp_path, name, fast):
    """Both decode steps: the fused C step (the CPU default) and the torch layers."""
    if fast and not fast_decode.available():
        pytest.skip("no C compiler for the fused decode step")
    ref = make_checkpoint(tmp_path, name, seed=3)
    ex_model = load_model(tmp_path)
    ex = Executor(ex_model, KvLayout(ex_model.config, block_size=16), num_blocks=64, num_slots=8, fast_decode=fast)
    prompts = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 40)]
    ours = LLM(ex).generate(prompts, SamplingParams(max_tokens=32))
    for prompt, out in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            gen = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
        assert out == gen[0, len(prompt) :].tolist()
    assert (ex._fast is not None) == fast


def test_grouped_projections_round_trip(tmp_path):
    """in_proj_qkvz / in_proj_ba are held regrouped by part (q | k | v | z): the loaded rows are
    the checkpoint's, moved, and saving writes the checkpoint's order back, tensor for tensor."""
    from safetensors.torch import load_file

    from prfaas.model.presets import save_weights

    make_checkpoint(tmp_path / "hf", "wide-heads")
    ours = load_model(tmp_path / "hf")
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    name = "model.layers.1.linear_attn.in_proj_qkvz.weight"
    nk, dk, dv, r = 4, 16, 16, 2
    grouped = stored[name].view(nk, 2 * dk + 2 * r * dv, -1)
    ours_w = ours.state_dict()[name]
    assert torch.equal(ours_w[: nk * dk], grouped[:, :dk].reshape(nk * dk, -1)), "q rows"
    v_rows = grouped[:, 2 * dk : 2 * dk + r * dv].reshape(nk * r * dv, -1)
    assert torch.equal(ours_w[2 * nk * dk : 2 * nk * dk + nk * r * dv], v_rows), "v rows"
    save_weights(ours, tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert set(again) == set(stored)
    for n, t in stored.items():
        assert torch.equal(again[n], t), f"{n} changed by a load and save"
