"""The llama.cpp baseline's preparation (bench/llamacpp_gguf.py), and, where llama-cpp-python and
its converter are installed (scripts/bench_setup.sh; never in CI), llama.cpp against transformers.

What runs everywhere: the staging copy the converter reads describes the same model as the
checkpoint (our own config parser reads both alike), the tokenizer written for it has the config's
vocab size and GPT-2's byte-level pre-tokenizer, and configs llama.cpp's loaders refuse are named
with the reason. The rest skips without llama_cpp."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from prfaas.model.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import llamacpp  # noqa: E402
import llamacpp_gguf as gg  # noqa: E402

transformers = pytest.importorskip("transformers")
FAMILIES = ("qwen3_next", "kimi_linear")


def small_config(family: str, **kw: object) -> object:
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  max_position_embeddings=512, layer_types=["linear_attention"] * 3 + ["full_attention"],
                  initializer_range=0.05)
    if family == "qwen3_next":
        cfg = dict(common, num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
                   linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
        return transformers.Qwen3NextConfig(**{**cfg, **kw})
    cfg = dict(common, num_attention_heads=2, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
               qk_rope_head_dim=8, v_head_dim=16, linear_num_heads=2, linear_head_dim=16, num_local_experts=4,
               num_experts_per_tok=2, moe_intermediate_size=32, mlp_layer_types=["dense"] + ["sparse"] * 3,
               pad_token_id=0, bos_token_id=1, eos_token_id=2,
               rms_norm_eps=1e-6)  # llama.cpp uses it for KDA's l2 norm too, where transformers has 1e-6
    return transformers.KimiLinearConfig(**{**cfg, **kw})


def write(family: str, path: Path, **kw: object) -> Path:
    torch.manual_seed(0)
    cls = transformers.Qwen3NextForCausalLM if family == "qwen3_next" else transformers.KimiLinearForCausalLM
    cls(small_config(family, **kw)).eval().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_staged_copy_is_the_same_model(tmp_path, family):
    src = write(family, tmp_path / "hf")
    out = tmp_path / "staged"
    out.mkdir()
    staged = gg.stage(src, out)
    raw = json.loads((src / "config.json").read_text())
    a, b = ModelConfig.from_dict(raw), ModelConfig.from_dict(staged)
    def spec(c: ModelConfig) -> tuple:
        return c.layer_types, c.mlp_types, c.linear, c.full, c.moe, c.rms_norm_eps

    assert spec(a) == spec(b)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    if family == "kimi_linear":
        assert staged["linear_attn_config"]["full_attn_layers"] == [4]
        assert staged["first_k_dense_replace"] == 1 and staged["num_key_value_heads"] == 2
        assert "model.layers.0.mlp.gate_proj.weight" in names  # the dense MLP out of block_sparse_moe
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    else:
        assert (out / "model.safetensors").is_symlink()


def test_tokenizer_has_the_vocab_size_and_gpt2_pre_tokenizer(tmp_path):
    gg.write_tokenizer(tmp_path, 300)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 300 and max(tok.get_vocab().values()) == 299
    text = "Hello world, 12345 it's  here"
    assert tok.decode(tok.encode(text)) == text
    pre = json.loads((tmp_path / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    with pytest.raises(gg.GgufError, match="at least 257"):
        gg.write_tokenizer(tmp_path, 200)


def test_configs_llamacpp_refuses_are_named(tmp_path):
    dense = json.loads((write("qwen3_next", tmp_path / "q", decoder_sparse_step=2) / "config.json").read_text())
    assert "every layer MoE" in gg.unsupported(dense)
    heads = json.loads((write("qwen3_next", tmp_path / "v", linear_value_head_dim=32) / "config.json").read_text())
    assert "equal key and value head sizes" in gg.unsupported(heads)
    kimi = json.loads((write("kimi_linear", tmp_path / "k", linear_num_heads=4) / "config.json").read_text())
    assert "KDA head count" in gg.unsupported(kimi)
    late = json.loads((write("kimi_linear", tmp_path / "m", mlp_layer_types=["sparse", "dense", "sparse", "sparse"])
                       / "config.json").read_text())
    assert "leading dense layers then MoE" in gg.unsupported(late)
    out = tmp_path / "staged"
    out.mkdir()
    with pytest.raises(gg.GgufError, match="every layer MoE"):
        gg.stage(tmp_path / "q", out)
    for family in FAMILIES:
        ok = json.loads((write(family, tmp_path / f"ok-{family}") / "config.json").read_text())
        assert gg.unsupported(ok) is None


def needs_llamacpp() -> None:
    if (reason := llamacpp.import_reason()) is not None:
        pytest.skip(reason)
    try:
        gg.converter_dir()
    except gg.GgufError as e:
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_llamacpp_matches_transformers(tmp_path, family, monkeypatch):
    """f32 logits of a prompt and greedy tokens, llama.cpp against transformers."""
    needs_llamacpp()
    monkeypatch.setenv(gg.CACHE_ENV, str(tmp_path / "gguf"))
    src = write(family, tmp_path / "hf")
    side = llamacpp.open_llamacpp(src, "fp32", threads=2)
    assert side is not None
    prompt = llamacpp.prompt_of(40, 7, vocab=300)
    try:
        ours = torch.from_numpy(side.prompt_logits(prompt))
        greedy = side.greedy(prompt, 12)
    finally:
        side.close()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = ref(torch.tensor([prompt])).logits[0]
        gen = ref.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-4  # f32, flash attention off: ~2e-6
    assert greedy == gen[0, len(prompt):].tolist()
