"""The shipped trained models' config.json (their training recipe: prfaas/training/recipes.py).

Both families at one size, about 2.8M parameters: hidden 128, 8 layers (3 linear : 1 full,
twice), two heads of 64 everywhere, dense SwiGLU MLPs (MoE stays covered by the random `tiny`
presets), untied embeddings, a 4096-token byte-level BPE vocabulary. Small because a few minutes
on two cores is far from enough tokens for a larger model (docs/models.md).
"""

from __future__ import annotations

from typing import Any

from prfaas.training.tokenizer import EOS_ID

LAYER_TYPES = (["linear_attention"] * 3 + ["full_attention"]) * 2
VOCAB_SIZE = 4096


def _common() -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": len(LAYER_TYPES),
        "layer_types": list(LAYER_TYPES),
        "linear_conv_kernel_dim": 4,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": EOS_ID,
    }


def qwen3_next_config() -> dict[str, Any]:
    return {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        **_common(),
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "linear_num_key_heads": 1,
        "linear_num_value_heads": 2,
        "linear_key_head_dim": 64,
        "linear_value_head_dim": 64,
        "num_experts": 0,
        "mlp_only_layers": list(range(len(LAYER_TYPES))),
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    }


def kimi_linear_config() -> dict[str, Any]:
    return {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        **_common(),
        "num_attention_heads": 2,
        "num_key_value_heads": 2,  # transformers' MLA needs as many as attention heads
        "kv_lora_rank": 64,
        "q_lora_rank": None,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "linear_num_heads": 2,
        "linear_head_dim": 64,
        "mlp_layer_types": ["dense"] * len(LAYER_TYPES),
        "num_experts": 0,
        "rms_norm_eps": 1e-5,
        "model_max_length": 4096,
    }


CONFIGS = {"qwen3_next": qwen3_next_config, "kimi_linear": kimi_linear_config}
PRESET = "small"


def model_config(family: str) -> dict[str, Any]:
    try:
        return CONFIGS[family]()
    except KeyError:
        raise ValueError(f"unknown model family {family!r}: known are {', '.join(CONFIGS)}") from None
