"""The training forward (prfaas/model/train_forward.py): its delta rule and conv against the
references, its logits against the serving path, its gradients against transformers', and a
short training run that learns.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prfaas.engine.executor import Executor
from prfaas.engine.sampling import SamplingParams
from prfaas.kv.layout import KvLayout
from prfaas.model.hybrid import family_parts
from prfaas.model.loader import load_model
from prfaas.model.ops.conv import causal_conv1d_tokens
from prfaas.model.ops.delta_rule import naive_delta_rule
from prfaas.model.ops.delta_rule_train import causal_conv_silu, chunk_delta_rule_train
from prfaas.model.presets import write_preset
from prfaas.model.train_forward import batch_logits, lm_loss
from prfaas.training.recipes import TrainRecipe
from prfaas.training.trainer import build_model, train

# (B, T, H, K, V, chunk): one token, shorter than a chunk, not a multiple of it, several chunks
SHAPES = [(1, 1, 2, 8, 8, 8), (2, 5, 2, 16, 8, 8), (2, 37, 3, 16, 12, 8), (1, 70, 2, 32, 16, 16)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = rel_err(ours, ref)
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def delta_inputs(B: int, T: int, H: int, K: int, V: int, gate: str, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -3.0 * torch.rand((B, T, H, K) if gate == "channel" else (B, T, H), generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


@pytest.mark.parametrize("gate", ["head", "channel"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_train_delta_rule_output_and_gradients_match_naive(shape, gate):
    B, T, H, K, V, chunk = shape
    inputs = delta_inputs(B, T, H, K, V, gate, seed=T)
    ref, _ = naive_delta_rule(*inputs, scale=K**-0.5)
    out = chunk_delta_rule_train(*inputs, scale=K**-0.5, chunk_size=chunk)
    assert_close("o", out, ref, 1e-5)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    ref_grads = torch.autograd.grad((ref * weight).sum(), inputs)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    for name, g, r in zip(("q", "k", "v", "g", "beta"), grads, ref_grads, strict=True):
        assert_close(f"d{name}", g, r, 1e-4)


def test_train_delta_rule_survives_strong_decays():
    """Decays of -40 per token: the pairwise factors are formed as e^(b_i - b_j), never split."""
    inputs = delta_inputs(1, 40, 2, 16, 8, "channel", seed=3)
    with torch.no_grad():
        inputs[3].mul_(15.0)
    ref, _ = naive_delta_rule(*inputs, scale=0.25)
    out = chunk_delta_rule_train(*inputs, scale=0.25)
    assert torch.isfinite(out).all()
    assert_close("o", out, ref, 1e-5)
    grads = torch.autograd.grad(out.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)


def test_train_conv_matches_serving_conv():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 21, 10, generator=gen), torch.randn(10, 4, generator=gen)
    ours = causal_conv_silu(x, w)
    for b in range(3):
        ref, _ = causal_conv1d_tokens(x[b], w)
        assert_close(f"row {b}", ours[b], ref, 1e-6)


@pytest.mark.parametrize("family", ["qwen3_next", "kimi_linear"])
def test_training_logits_equal_the_serving_prefill(tmp_path, family):
    """Each row of the batched training forward gives the logits the executor's prefill gives
    for that row alone (the random `tiny` preset: MoE layers included)."""
    model = load_model(write_preset(tmp_path, family))
    ids = torch.randint(0, 1000, (3, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = batch_logits(model, ids)
    ex = Executor(model, KvLayout(model.config, block_size=16), num_blocks=32, num_slots=4)
    for r in range(3):
        prompt = ids[r].tolist()
        seq = ex.add(f"r{r}", prompt, SamplingParams(max_tokens=1))
        with torch.inference_mode():
            ref = model(ids[r], ex._meta([seq], [len(prompt)], list(range(len(prompt)))), ex.caches)
        ex.free(seq)
        assert_close(f"row {r}", ours[r], ref, 1e-5)


def test_differentiable_path_refuses_ragged_batches(tmp_path):
    from prfaas.model.train_forward import training_meta

    model = load_model(write_preset(tmp_path, "qwen3_next"))
    meta = training_meta(2, 8)
    meta.query_lens = [10, 6]
    with pytest.raises(ValueError, match="one length"):
        model(torch.zeros(16, dtype=torch.long), meta, [None] * model.num_layers)


DENSE = {
    "qwen3_next": dict(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, num_experts=0,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    ),
    "kimi_linear": dict(
        vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=12, linear_num_heads=2, linear_head_dim=16, mlp_layer_types=["dense"] * 3,
        layer_types=["linear_attention", "full_attention", "linear_attention"], pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    ),
}


@pytest.mark.parametrize("family", list(DENSE))
def test_gradients_match_transformers(tmp_path, family):
    """Loss and every parameter's gradient from our training forward against transformers'
    autograd through its own implementation, on the same checkpoint (float64 weights; our logits
    come out in float32 and both families form their decays in float32, which bounds the agreement)."""
    transformers = pytest.importorskip("transformers")
    cls = {"qwen3_next": "Qwen3Next", "kimi_linear": "KimiLinear"}[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{cls}Config")(**DENSE[family], initializer_range=0.1)
    getattr(transformers, f"{cls}ForCausalLM")(cfg).save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    ours = load_model(tmp_path, dtype=torch.float64)
    ids = torch.randint(0, 200, (2, 41), generator=torch.Generator().manual_seed(2))
    loss = lm_loss(ours, ids)
    loss.backward()
    logits = hf(ids[:, :-1]).logits
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-6 * ref.item()
    parts, params = family_parts(family), dict(ours.named_parameters())

    def our_grad(hf_name: str) -> torch.Tensor:
        """The gradient of our parameter(s) behind one of transformers' in-memory parameters (its
        Kimi module keeps one fused conv and a forget_gate submodule; its checkpoints do not)."""
        name = parts.checkpoint_name(hf_name).replace(".forget_gate.", ".")
        if name.endswith(".self_attn.conv1d.weight"):
            prefix = name.removesuffix("conv1d.weight")
            return torch.cat([params[f"{prefix}{x}_conv1d.weight"].grad for x in "qkv"])  # type: ignore[misc]
        grad = params[name].grad
        assert grad is not None, f"{hf_name}: no gradient"
        return parts.to_checkpoint(ours.config, name, grad)

    for name, p in hf.named_parameters():
        assert_close(name, our_grad(name), p.grad, 1e-4)


@pytest.mark.parametrize("family", ["qwen3_next", "kimi_linear"])
def test_a_short_run_learns_a_pattern(family):
    """40 steps on a stream that repeats a 7-token phrase: the loss falls from about ln(vocab)
    to a small fraction of it (the trainer, its schedule and the gradients working together)."""
    raw = {"model_type": family, **DENSE[family]}
    model = build_model(raw, seed=0)
    stream = torch.tensor([3, 17, 42, 8, 99, 5, 150] * 200)
    recipe = TrainRecipe(seq_len=32, batch=4, steps=40, lr=1e-2, min_lr=1e-3, warmup=5, threads=2)
    log = train(model, stream, recipe, log=lambda s: None)
    assert log.losses[0] > 4.5  # ln(200) = 5.3
    assert sum(log.losses[-5:]) / 5 < 0.5, log.losses[-5:]


def test_training_is_deterministic():
    """The same seed and recipe give the same weights, bit for bit (same machine, same threads)."""
    raw = {"model_type": "kimi_linear", **DENSE["kimi_linear"]}
    stream = torch.randint(0, 200, (5000,), generator=torch.Generator().manual_seed(0))
    recipe = TrainRecipe(seq_len=32, batch=2, steps=3, warmup=2, threads=2)
    runs = []
    for _ in range(2):
        model = build_model(raw, seed=1)
        train(model, stream, recipe, log=lambda s: None)
        runs.append(model.state_dict())
    for name, t in runs[0].items():
        assert torch.equal(t, runs[1][name]), name
    other = build_model(raw, seed=2).state_dict()
    assert not torch.equal(other["lm_head.weight"], build_model(raw, seed=1).state_dict()["lm_head.weight"])
