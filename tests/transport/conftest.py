"""Small hybrid layouts for the KV transport tests: a qwen3_next-style GQA model and a
kimi_linear-style MLA model."""

from __future__ import annotations

import pytest
import torch

from prfaas.kv.codec import KvKind, KvPiece, kinds_of_layer
from prfaas.kv.layout import STATE_DTYPE, KvLayout
from prfaas.model.config import ModelConfig

QWEN3_NEXT = {
    "model_type": "qwen3_next",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
}
KIMI_LINEAR = {
    "model_type": "kimi_linear",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "linear_num_heads": 2,
    "linear_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "layer_types": ["linear_attention", "linear_attention", "full_attention", "full_attention"],
}


def make_layout(family: str, dtype: torch.dtype = torch.float32) -> KvLayout:
    raw = QWEN3_NEXT if family == "qwen3_next" else KIMI_LINEAR
    return KvLayout(ModelConfig.from_dict(dict(raw)), block_size=16, dtype=dtype)


def make_pieces(layout: KvLayout, prompt_tokens: int, skip_tokens: int = 0, seed: int = 0) -> list[KvPiece]:
    """Random KV for every layer, as a layer-wise prefill would produce it."""
    gen = torch.Generator().manual_seed(seed)
    n = prompt_tokens - skip_tokens
    out = []
    for layer in range(layout.config.num_layers):
        for kind in kinds_of_layer(layout, layer):
            if kind == KvKind.LINEAR_RECURRENT:
                t = torch.randn(layout.linear_layer(layer).recurrent_shape, generator=gen, dtype=STATE_DTYPE)
                out.append(KvPiece(layer, kind, 0, 0, t))
            elif kind == KvKind.LINEAR_CONV:
                t = torch.randn(layout.linear_layer(layer).conv_shape, generator=gen).to(layout.dtype)
                out.append(KvPiece(layer, kind, 0, 0, t))
            else:
                shape = (n, *layout.full_layer(layer).token_shape)
                out.append(
                    KvPiece(layer, kind, skip_tokens, prompt_tokens, torch.randn(shape, generator=gen).to(layout.dtype))
                )
    return out


@pytest.fixture(params=["qwen3_next", "kimi_linear"])
def family(request) -> str:
    return request.param
