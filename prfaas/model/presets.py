"""Built-in tiny checkpoints, written with our own code in Hugging Face format.

`prfaas model init --family F --preset tiny --out DIR` and the `builtin:F-tiny` model spec use
these. The weights are random (seeded), so outputs are meaningless but deterministic.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from prfaas.model.config import ModelConfig
from prfaas.model.hybrid import HybridForCausalLM, family_parts
from prfaas.model.trained import shipped_dir

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "qwen3_next": {
        "tiny": {
            "architectures": ["Qwen3NextForCausalLM"],
            "model_type": "qwen3_next",
            "vocab_size": 1000,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 64,
            "linear_value_head_dim": 64,
            "linear_conv_kernel_dim": 4,
            "layer_types": ["linear_attention"] * 3
            + ["full_attention"]
            + ["linear_attention"] * 3
            + ["full_attention"],
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 128,
            "shared_expert_intermediate_size": 128,
            "decoder_sparse_step": 2,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            "tie_word_embeddings": False,
            "bos_token_id": 256,
            "eos_token_id": 257,
            "pad_token_id": 258,
            "dtype": "float32",
        }
    },
    "kimi_linear": {
        "tiny": {
            "architectures": ["KimiLinearForCausalLM"],
            "model_type": "kimi_linear",
            "vocab_size": 1000,
            "hidden_size": 256,
            "intermediate_size": 512,
            "moe_intermediate_size": 128,
            "num_hidden_layers": 8,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "kv_lora_rank": 64,
            "q_lora_rank": None,
            "qk_nope_head_dim": 32,
            "qk_rope_head_dim": 16,
            "v_head_dim": 32,
            "linear_num_heads": 4,
            "linear_head_dim": 64,
            "linear_conv_kernel_dim": 4,
            "layer_types": ["linear_attention"] * 3
            + ["full_attention"]
            + ["linear_attention"] * 3
            + ["full_attention"],
            "mlp_layer_types": ["dense"] + ["sparse"] * 7,
            "num_experts": 8,
            "num_experts_per_token": 2,
            "num_shared_experts": 1,
            "num_expert_group": 1,
            "topk_group": 1,
            "moe_renormalize": True,
            "routed_scaling_factor": 2.446,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "model_max_length": 32768,
            "tie_word_embeddings": False,
            "bos_token_id": 256,
            "eos_token_id": 257,
            "pad_token_id": 258,
            "dtype": "float32",
        }
    },
}


def preset_config(family: str, preset: str = "tiny") -> dict[str, Any]:
    try:
        return dict(PRESETS[family][preset])
    except KeyError:
        known = ", ".join(f"{f}/{p}" for f, ps in PRESETS.items() for p in ps)
        raise ValueError(f"unknown preset {family}/{preset}: known are {known}") from None


@torch.no_grad()
def init_weights(model: HybridForCausalLM, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.empty(p.shape).uniform_(1.0, 16.0, generator=gen).log())
        elif leaf == "dt_bias":
            p.copy_(torch.empty(p.shape).uniform_(-1.0, 1.0, generator=gen))
        elif "norm" in name and p.dim() == 1:
            zero_centered = model.config.family == "qwen3_next" and not name.endswith("linear_attn.norm.weight")
            p.fill_(0.0 if zero_centered else 1.0)
        elif "conv1d" in name:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
        else:
            p.normal_(0.0, 0.02 * 4, generator=gen)
    for b in model.buffers():
        b.zero_()


def write_preset(out: str | Path, family: str, preset: str = "tiny", seed: int = 0) -> Path:
    """Writes config.json and model.safetensors for a random checkpoint; returns the directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = preset_config(family, preset)
    cfg = ModelConfig.from_dict(raw)
    model = HybridForCausalLM(cfg)
    init_weights(model, seed)
    save_weights(model, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return out


def save_weights(model: HybridForCausalLM, file: str | Path) -> None:
    """Our model's weights as a Hugging Face safetensors file (checkpoint names and layouts)."""
    cfg = model.config
    to_checkpoint = family_parts(cfg.family).to_checkpoint
    state = {k: to_checkpoint(cfg, k, v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(file), metadata={"format": "pt"})


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> Path:
    """A model spec is a directory, or `builtin:FAMILY-PRESET`: a trained model shipped in the
    package (prfaas/model/trained/, e.g. `builtin:qwen3_next-small`), else a random preset
    written on first use under `cache_dir`, default ~/.cache/prfaas/models."""
    if not spec.startswith("builtin:"):
        return Path(spec)
    name = spec.removeprefix("builtin:")
    if (shipped := shipped_dir(name)) is not None:
        return shipped
    family, _, preset = name.rpartition("-")
    if not family:
        family, preset = name, "tiny"
    base = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "prfaas" / "models"
    out = base / f"{family}-{preset}"
    if not (out / "config.json").is_file() or not (out / "model.safetensors").is_file():
        # written aside and renamed into place, so that processes starting together never read a
        # half-written checkpoint; the first rename wins
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{family}-{preset}.", dir=base))
        write_preset(tmp, family, preset)
        try:
            os.rename(tmp, out)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
