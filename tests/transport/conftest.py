"""Small hybrid layouts for the KV transport tests: a qwen3_next-style GQA model and a
kimi_linear-style MLA model."""

from __future__ import annotations

import pytest
import torch

from prfaas.kv.layout import KvLayout
from prfaas.model.config import ModelConfig
from prfaas.transport.chunks import KvPiece

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
    for s in layout.specs:
        if s.paged:
            t = torch.randn((n, *s.shape), generator=gen).to(s.dtype)
            out.append(KvPiece(s.layer, s.kind, skip_tokens, prompt_tokens, t))
        else:
            out.append(KvPiece(s.layer, s.kind, 0, 0, torch.randn(s.shape, generator=gen).to(s.dtype)))
    return out


@pytest.fixture(params=["qwen3_next", "kimi_linear"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def plaintext_plane():  # type: ignore[no-untyped-def]
    """These attacks speak the frame protocol itself, so the data plane runs without TLS here. Under
    TLS (the default) a peer without a certificate of the cluster never reaches the parser
    (tests/security); the limits are what is left for a peer that has one."""
    from prfaas.security import tls

    saved = tls._current
    tls._current = tls.TlsConfig(insecure=True)
    yield
    tls._current = saved
